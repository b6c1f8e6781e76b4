"""The engine core: requests in, one backend step at a time, outputs out (continuous batching).

Plain logic in the shape of vLLM's EngineCore: `add_request`, `abort`, `step() -> outputs`,
usable in one process with a fake backend. Requests join and leave between steps. Each step
carries the decode token of every running request, then chunks of waiting prompts, up to the
step's token budget (NOTE [ step size ]). The backend samples where the logits are, each request
with its own parameters and its own seeded generator (sent with its first chunk), so a seed
reproduces whatever else shares the batch; the core gets ids back, one step behind (NOTE [ one
step behind ]). A request whose logits are not finite is finished with an error and the others
go on; when the backend's step fails, the requests of the steps in flight are finished with its
error (reported by the next step) and the exception goes to the caller, which knows whether the
backend can go on.

NOTE [ one step behind ]
`step()` submits step n + 1 before it collects step n's ids: n + 1 is built from what the core knew after n - 1,
every request that samples in n continuing with the token -1 (the id n samples, which the backend feeds on its
device). So the GPU runs n + 1 while the core detokenizes n and checks its stops. A request that ends at n (EOS,
a stop string, max_tokens, its context full) had one more token computed in n + 1: that token is discarded
(never shown, never counted, not in the prefix-reuse record), and the request's row is given back only once the
steps in flight that carry it are collected, so a new request never takes a row the backend still writes; where
the next waiting request would take a free row though that one holds a longer prefix of its prompt (the next
turn of a chat), the core collects the step before it submits the next. Where n surely ends a request (its
max_tokens reached by n's token, its ring full), n + 1 leaves it out. An aborted request frees its row likewise,
after the steps in flight that carry it. With `lookahead` off, each step is submitted and collected in turn (the
reference the tests compare against). Where the backend's round trip outlasts a step (`steps_ahead`: the
pipeline of a model kept whole on a GPU, where a small model's decode step can be shorter than a Forward's round
trip through two sockets and the coordinator's loop), `lookahead` 2 keeps two steps submitted ahead of the one
collected: n + 2 feeds -1 too (the id step n+1 samples on the device, in stream order), a request that ends at n
had two more tokens computed and discarded, and one whose ring has no room ends after the last id in flight is
shown. (On SmolLM2 on an H200 the gain was within the noise: the host's work a step, not the round trip, bounded
it there; BENCHMARKS.md.) A caller that waits for the device between steps (torch.cuda.synchronize) drains step
n + 1 and gets the host and the device in series again, as with `lookahead` off: the benches time a step from
the last one's return to its own (stage_bench.time_decode).

NOTE [ step size ]
The backend pads a step to B sequences times its longest chunk S (the attention's queries and
mask are [B, S, ...]), and the plan sizes the step's scratch for max(step_tokens, max_seqs)
tokens. So a step holds every running request's decode token (at most max_seqs) and prompt
chunks of at most step_tokens tokens in all, and B * S stays within max(step_tokens, max_seqs):
a long chunk beside many decoding sequences is cut shorter. A waiting request takes a row only in a step carrying its
first chunk; those whose prompt is at most half a step go first, past longer ones, and the prompts' chunks make room.

NOTE [ prefix reuse ]
A freed row keeps its KV until another sequence writes it, so the core remembers which tokens
a freed row holds (positions 0.. in slots 0.., when its ring never evicted). A new request
takes the free row that holds the longest prefix of its prompt and prefills only the rest: the
next turn of a chat finds its whole conversation so far, and a common system prompt is found
whenever a row that held it is free. Rows without such a record are taken first, then the
least recently freed, so recent prefixes last longest. The KV is not copied between rows: a
prefix held by a running request is not shared.

Speculative decoding (drafts and their verification) lives in speculation.py
(NOTE [ speculative decoding ]).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from layerstream.compute.sampling import FINITE, SamplingParams, fresh_seed, non_finite_error
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.stepper import StepResult
from layerstream.coordinator.api_names import python_names
from layerstream.coordinator.kv_ring import KVRing
from layerstream.coordinator.outputs import RequestOutput, StopMatcher
from layerstream.coordinator.speculation import RequestDrafts, Speculation
from layerstream.coordinator.tokenizer import StreamDecoder, Tokenizer, token_ids
from layerstream.errors import ConfigError, ContextFullError, LayerstreamError, PromptTooLongError
from layerstream.proto.messages import SamplerStart


class StepBackend(Protocol):
    """Runs steps: `submit` starts one (sampling the sequences flagged in `sample`, a count k > 1
    verifying the chunk's last k - 1 tokens as drafts; new requests' samplers in `starts`),
    `collect` gives the oldest submitted one's result; `step` is both at once, returning logits
    (evaluation); `discard` forgets the steps in flight after a failure."""

    def submit(self, seqs: list[SeqStep], sample: list[int], starts: list[SamplerStart], want: str) -> None: ...
    def collect(self) -> StepResult: ...
    def step(self, seqs: list[SeqStep], want: str) -> torch.Tensor | None: ...
    def discard(self) -> None: ...


@dataclass(eq=False)
class _Ids:
    """A request's sampled ids on their way through the steps in flight (NOTE [ one step behind ])."""

    sampled: int = 0  # ids collected (an EOS included)
    pending: int | None = None  # collected and not yet fed
    ahead: int = 0  # ids sampled in steps in flight
    steps: int = 0  # steps in flight that carry it
    full: bool = False  # its ring has no room for the id in flight: it ends with that one


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    decoder: StreamDecoder
    stops: StopMatcher
    row: int | None = None
    ring: KVRing | None = None
    fed: int = 0  # prompt tokens fed so far (counted when submitted)
    started: bool = False  # its sampler was sent (with its first chunk)
    generated: list[int] = field(default_factory=list)
    ids: _Ids = field(default_factory=_Ids)
    done: bool = False  # finished or aborted; its row goes back once no step in flight carries it
    held: list[int] | None = None  # the record its row keeps (NOTE [ prefix reuse ]), until then
    drafts: RequestDrafts | None = None  # None: it drafts nothing (speculation.py)

    def history(self) -> list[int]:
        """The prompt's tail the repetition penalty looks at (sent once, with its sampler)."""
        n = self.params.repeat_last_n
        return [] if not self.params.penalized else list(self.prompt if n < 0 else self.prompt[-n:])

    def fed_tokens(self) -> list[int]:
        """The tokens whose KV its row holds at positions 0.. (ids of steps in flight left out)."""
        if self.fed < len(self.prompt):
            return self.prompt[: self.fed]
        return self.prompt + self.generated[: max(self.ids.sampled - 1, 0)]  # the last id was never fed


@dataclass
class _Step:
    """A step in flight: per sequence its request, tokens, positions sampled (0, 1, 1 + drafts), and whether it decodes."""

    plan: list[tuple[_Request, list[int], int, bool]]


class EngineCore:
    """Schedules requests over a step backend: admission, chunking, stopping."""

    def __init__(self, backend: StepBackend, tokenizer: Tokenizer, n_vocab: int, *, max_seqs: int, ctx: int,
                 step_tokens: int, on_context_full: str = "error", sink_tokens: int = 4, lookahead: int = 1,
                 lookup: int = 0, draft=None, adaptive: bool = True):
        if step_tokens < 1:
            raise ConfigError(f"step_tokens={step_tokens}: must be at least 1")
        self.speculation = Speculation(lookup, draft, adaptive)  # (NOTE [ speculative decoding ])
        self.spec = self.speculation.stats
        self.backend, self.tokenizer, self.n_vocab = backend, tokenizer, n_vocab
        self.max_seqs, self.ctx, self.step_tokens, self.on_context_full = max_seqs, ctx, step_tokens, on_context_full
        self.closed, self.sink_tokens = False, sink_tokens  # (closed: set by Engine.close, new work then refused)
        self.lookahead = int(lookahead)  # steps submitted ahead of the one collected (NOTE [ one step behind ])
        self.pad_tokens = max(step_tokens, max_seqs)  # B * S of a step at most (NOTE [ step size ])
        self.free_rows = list(range(max_seqs))
        self.row_tokens: dict[int, list[int]] = {}  # free row -> tokens whose KV it still holds (NOTE above)
        self.reused_tokens = 0  # prompt tokens whose KV an earlier request left in its row
        self.waiting: deque[_Request] = deque()  # not yet holding a row
        self.running: list[_Request] = []  # holding a row: prefilling or decoding
        self.aborted: list[RequestOutput] = []  # finished outside a step (abort, failed step): reported by the next
        self.inflight: deque[_Step] = deque()  # submitted, not yet collected (NOTE [ one step behind ])
        self.steps = 0

    # -- rows (also lent to Engine's direct evaluation API) -------------------------------------

    def take_row(self) -> int:
        """A free row: one holding no reusable KV first, else the least recently freed."""
        if not self.free_rows:
            raise ConfigError(f"more than {self.max_seqs} sequences at once; raise --batch")
        row, _ = self._row_for(())
        self._claim(row)
        return row

    def _row_for(self, prompt) -> tuple[int, int]:
        """The free row holding the longest prefix of `prompt`'s KV and its tokens (not the last), else take_row's (NOTE [ prefix reuse ])."""
        row, n = next((r for r in self.free_rows if r not in self.row_tokens), self.free_rows[0]), 0
        for r in self.free_rows:
            m = _common_prefix(self.row_tokens.get(r, ()), prompt)
            if m > n:
                row, n = r, m
        return row, min(n, len(prompt) - 1)

    def _claim(self, row: int) -> None:
        self.free_rows.remove(row)
        self.row_tokens.pop(row, None)

    def give_row(self, row: int, held: list[int] | None = None) -> None:
        """Free a row; `held`: the tokens whose KV it keeps at positions 0.. (reusable)."""
        self.free_rows.append(row)
        if held:
            self.row_tokens[row] = held

    def score(self, tokens: list[int], on_logits: Callable[[int, torch.Tensor], None]) -> None:
        """Feed `tokens` as one sequence for evaluation (no sampling): chunks within the step's size
        (NOTE [ step size ]), each step's logits of every position passed on at once as
        on_logits(position of its first row, [n, V]), never kept; the row is given back with its KV
        recorded for reuse (NOTE [ prefix reuse ]). Runs between requests, not beside them."""
        if self.closed:
            raise LayerstreamError("this engine is closed; load another")
        if self.running or self.waiting:
            raise ConfigError("evaluation needs the engine idle: let the requests in flight finish, or abort them")
        if not tokens:
            raise ValueError("score() needs at least one token")
        while self.inflight:  # the discarded tokens of requests that ended (NOTE [ one step behind ])
            self._collect(self.aborted)
        row = self.take_row()
        ring = KVRing(self.ctx, self.sink_tokens, self.on_context_full)
        fed, held, finite = 0, None, True
        try:
            while fed < len(tokens):
                n = min(len(tokens) - fed, self.step_tokens, max(ring.max_chunk(), 1))
                slots, pos = ring.append(n)
                self.steps += 1
                seq = SeqStep(row, tokens[fed : fed + n], slots, pos, ring.slot_positions())
                logits = self.backend.step([seq], "all")
                finite = finite and bool(torch.isfinite(logits).all())  # (NaN in its KV: no record)
                on_logits(fed, logits)
                fed, logits = fed + n, None  # (a step's logits gone before the next: NOTE [ streamed perplexity ])
            held = list(tokens) if ring.total == ring.count and finite else None  # (a failed step keeps no record)
        finally:
            self.give_row(row, held)

    # -- requests ---------------------------------------------------------------------------------

    @python_names()  # (the Python API's `e.core`: NOTE [ the caller's names ] in api_names.py)
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Queue a request; a prompt that cannot fit the context is refused now, before prefill."""
        if self.closed:  # (a local backend ran on: README says a closed engine refuses every call)
            raise LayerstreamError("this engine is closed; load another")
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"a request's params must be a SamplingParams, not {type(params).__name__}")
        if not prompt:
            raise ConfigError("empty prompt: give at least one token of text")
        if self.on_context_full == "error" and len(prompt) >= self.ctx:
            raise PromptTooLongError(len(prompt), self.ctx)
        if any(r.id == request_id for r in (*self.waiting, *self.running)):
            raise ConfigError(f"request id {request_id!r} is already in use")
        prompt = token_ids(prompt, self.n_vocab, "a prompt")
        # control tokens (one sampled past EOS with ignore_eos) are not shown, as llama.cpp renders none
        r = _Request(request_id, list(prompt), params, fresh_seed(params), StreamDecoder(self.tokenizer, skip_special=True),
                     StopMatcher(params.stop))
        r.drafts = self.speculation.start(r.prompt, params)
        self.waiting.append(r)

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running; its row is free once no step in flight carries it."""
        for q in (self.waiting, self.running):
            for r in list(q):
                if r.id == request_id:
                    q.remove(r)
                    self._end(r)
                    self.aborted.append(RequestOutput(r.id, "", [], True, "abort", len(r.prompt), len(r.generated)))
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.aborted or self.inflight)

    def run_to_completion(self) -> list[RequestOutput]:
        """Step until every request has finished; the outputs in order."""
        outs: list[RequestOutput] = []
        while self.has_unfinished():
            outs += self.step()
        return outs

    # -- one step ---------------------------------------------------------------------------------

    def _decode_token(self, r: _Request) -> int | None:
        """The token a decoding request feeds next: its collected id, -1 for the id a step in flight samples,
        None where it feeds none (NOTE [ one step behind ]) or waits for that id to draft from (NOTE [ speculative decoding ])."""
        if r.ids.ahead:
            sure_end = r.ids.full or len(r.generated) + r.ids.ahead >= r.params.max_tokens
            return None if sure_end or self.speculation.holds_back(r) else -1
        return r.ids.pending

    def _schedule(self) -> list[tuple[_Request, list[int]]]:
        """Decode tokens, short waiting prompts, the running prompts' chunks, then the rest in turn (NOTE [ step size ])."""
        dec = [(r, tok) for r in self.running
               if r.fed == len(r.prompt) and (tok := self._decode_token(r)) is not None]
        most = self.pad_tokens // max(len(dec), 1) - 1  # drafts a sequence, so that B * S fits the step
        spare = self.step_tokens - len(dec)
        plan, prefilling = [], [r for r in self.running if r.fed < len(r.prompt)]
        for r, tok in dec:
            d = self.speculation.propose(r, tok, min(most, spare))
            spare -= len(d)
            plan.append((r, [tok] + d))
        room = max(self.step_tokens - sum(len(t) for _, t in plan), 0)
        width = max((len(t) for _, t in plan), default=0)  # the longest chunk so far

        def chunk(r: _Request, fed: int, cap: int) -> int:
            nonlocal room, width
            n = min(len(r.prompt) - fed, room, cap, self.pad_tokens // (len(plan) + 1))
            if n < 1 or (len(plan) + 1) * max(width, n) > self.pad_tokens:
                return 0
            room, width = room - n, max(width, n)
            return n

        def admit(short: bool) -> None:
            """Rows and first chunks for waiting requests in turn while one fits (`short`: rests <= half a step)."""
            half, held = self.pad_tokens // 2, max((len(self.row_tokens.get(f, ())) for f in self.free_rows), default=0)
            for r in [w for w in self.waiting if not short or len(w.prompt) - held <= half]:  # (no row makes it short: no scan)
                if room < 1 or (len(plan) + 1) * max(width, 1) > self.pad_tokens:  # (none fits: no prefix scans)
                    return
                row, reused = self._row_for(r.prompt) if self.free_rows else (None, 0)
                if short and row is not None and len(r.prompt) - reused > half:
                    continue
                ring = KVRing(self.ctx, self.sink_tokens, self.on_context_full)
                if reused:  # the row holds these tokens' KV already, at the same positions
                    ring.append(reused)
                if row is None or not (n := chunk(r, reused, max(ring.max_chunk(), 1))):
                    return
                self.waiting.remove(r)
                self._claim(row)
                r.row, r.ring, r.fed, self.reused_tokens = row, ring, reused, self.reused_tokens + reused
                self.running.append(r)
                plan.append((r, r.prompt[reused : reused + n]))

        admit(short=True)  # (before the running prompts' chunks, which then make room)
        for r in prefilling:
            if n := chunk(r, r.fed, max(r.ring.max_chunk(), 1)):
                plan.append((r, r.prompt[r.fed : r.fed + n]))
        admit(short=False)  # FIFO, as far as rows and the step's room go
        return plan

    @python_names()
    def step(self) -> list[RequestOutput]:
        """Submit the next step and collect the oldest in flight (NOTE [ one step behind ]);
        returns what each request produced. A request whose logits are not finite finishes with
        finish_reason "error"; when the backend fails, the requests of the steps in flight do so
        too (reported by the next step) and the error is raised."""
        if self.closed:  # (as every other call: a local backend's step read its freed rows)
            raise LayerstreamError("this engine is closed; load another")
        outs, self.aborted = self.aborted, []
        if not self.inflight and not self._submit(outs):
            return outs
        while len(self.inflight) <= self.lookahead and not self._prefix_in_flight() and \
                not any(self.speculation.holds_back(r) for r in self.running):
            if not self._submit(outs):
                break
        self._collect(outs)
        return outs

    def _prefix_in_flight(self) -> bool:
        """Whether a waiting request (any: a short one goes ahead of longer ones, NOTE [ step size ]) would
        take a free row now, though a row that a step in flight still holds (an ended request's) keeps a
        longer prefix of its prompt: then that step is collected first (NOTE [ one step behind ])."""
        if not (self.waiting and self.free_rows):
            return False  # (no row to take now: it is admitted once a collect frees one anyway)
        held = [r.held for st in self.inflight for r, *_ in st.plan if r.done and r.held]
        return bool(held) and any(  # (most steps hold none: no scan of the queue)
            any(min(_common_prefix(h, q.prompt), len(q.prompt) - 1) > have for h in held)
            for q in self.waiting for have in (self._row_for(q.prompt)[1],))

    def _submit(self, outs: list[RequestOutput]) -> bool:
        """Send the scheduled tokens as one backend step; False when there is nothing to run."""
        plan, seqs, sample, starts = [], [], [], []
        for r, toks in self._schedule():
            try:
                slots, pos = r.ring.append(len(toks))
            except ContextFullError:
                if r.ids.ahead:
                    r.ids.full = True  # it ends with the id in flight (after that one is shown)
                else:
                    outs.append(self._finish(r, "context_full"))
                continue
            decode = r.fed == len(r.prompt)
            if not decode:
                r.fed += len(toks)
            samples = len(toks) if decode else int(r.fed == len(r.prompt))  # > 1: drafts to verify
            if not r.started:
                P = r.params
                starts.append(sampler_start(r.row, P, r.seed, r.history()))
                r.started = True
            r.ids.pending = None
            r.ids.steps += 1
            r.ids.ahead += bool(samples)
            if r.drafts is not None:
                r.drafts.verifying = samples > 1
            seqs.append(SeqStep(row=r.row, tokens=toks, slots=slots, positions=pos, kv_pos=r.ring.slot_positions()))
            sample.append(samples)
            plan.append((r, toks, samples, decode))
        if not seqs:
            return False
        self.steps += 1
        self.inflight.append(_Step(plan))
        try:
            self.backend.submit(seqs, sample, starts, "none")
        except BaseException as e:  # (Ctrl-C too: the step in flight here and not there broke the next call)
            self._fail(e, outs)
            raise
        return True

    def _collect(self, outs: list[RequestOutput]) -> None:
        """The oldest step in flight's ids: each request's token taken (or discarded, for one
        that ended meanwhile), its text and whether it ends here, added to `outs`."""
        step = self.inflight[0]
        try:
            res = self.backend.collect()
        except BaseException as e:
            self._fail(e, outs)
            raise
        self.inflight.popleft()
        for i, (r, toks, samples, decode) in enumerate(step.plan):
            r.ids.steps -= 1
            r.ids.ahead -= bool(samples)
            if r.drafts is not None and samples > 1:
                r.drafts.verifying = False
            if r.done:  # its id is discarded (NOTE [ one step behind ])
                r.held = None if samples and res.bad[i] != FINITE else r.held  # (NaN in its KV: no record)
                self._release(r)
                continue
            if not samples:
                continue  # the prompt goes on next step: no token yet
            at = len(r.prompt) + r.ids.sampled  # the tokens its id follows
            r.ids.sampled += 1
            if res.bad[i] != FINITE:
                why = f"sampling failed: {non_finite_error(res.bad[i], at)}"
                outs.append(self._finish(r, "error", error=why, keep=False))
                continue
            if r.drafts is not None and decode:
                out = self.speculation.verified(r, toks[1:], res.ids[i], res.accepted[i] if res.accepted else 0,
                                                lambda tok, r=r: self._accept(r, tok))
            else:
                out = self._accept(r, res.ids[i])
            if out.finished:
                outs.append(out)
            elif r.ids.full and not r.ids.ahead:  # (its last id in flight shown: the ring has no room for more)
                outs += [out, self._finish(r, "context_full")]
            else:
                outs.append(out)

    def _fail(self, e: BaseException, outs: list[RequestOutput]) -> None:
        """A backend call failed: every request of the steps in flight ends with its error, their
        rows free at once (nothing in flight is collected), reported by the next step."""
        why = _reason(e)
        reqs = list(dict.fromkeys(r for st in self.inflight for r, *_ in st.plan))
        self.inflight.clear()
        discard = getattr(self.backend, "discard", None)
        if discard is not None:
            discard()
        for r in reqs:
            r.ids.steps, r.ids.ahead = 0, 0
            if r.drafts is not None:
                r.drafts.verifying = False
            if r.done:  # (aborted with a chunk in flight: its KV may be half written)
                r.held = None
                self._release(r)
            else:
                outs.append(self._finish(r, "error", error=why, keep=False))
        self.aborted = outs

    def _accept(self, r: _Request, tok: int) -> RequestOutput:
        """Take a sampled token: the text it adds, and whether the request ends here."""
        eos = not r.params.ignore_eos and tok in self.tokenizer.eos_ids
        if eos:
            return self._finish(r, "eos", r.stops.flush(r.decoder.flush()))
        r.generated.append(tok)
        if r.drafts is not None:
            r.drafts.extend([tok])
        text, hit = r.stops.push(r.decoder.push(tok))
        if hit:
            return self._finish(r, "stop", text, [tok])
        if len(r.generated) >= r.params.max_tokens:
            return self._finish(r, "length", text + r.stops.flush(r.decoder.flush()), [tok])
        r.ids.pending = tok
        return RequestOutput(r.id, text, [tok], prompt_tokens=len(r.prompt), completion_tokens=len(r.generated))

    def _end(self, r: _Request, keep: bool = True) -> None:
        """The request is over: its row goes back now, or once no step in flight carries it, noting
        the tokens whose KV it holds (if its ring never evicted and `keep`: a failed step may have
        left its KV half written)."""
        r.done = True
        if r.drafts is not None:
            r.drafts.close()
        if r.row is not None:
            r.held = r.fed_tokens() if keep and r.ring.total == r.ring.count else None
            self._release(r)

    def _release(self, r: _Request) -> None:
        if r.row is not None and not r.ids.steps:
            self.give_row(r.row, r.held)
            r.row = None

    def _finish(self, r: _Request, reason: str, text: str = "", toks: list[int] | None = None,
                error: str | None = None, keep: bool = True) -> RequestOutput:
        self.running.remove(r)
        self._end(r, keep)
        return RequestOutput(r.id, text, toks or [], True, reason, len(r.prompt), len(r.generated), error)


def sampler_start(row: int, P: SamplingParams, seed: int, history: list[int]) -> SamplerStart:
    """The SamplerStart that carries a request's parameters to the side that samples."""
    return SamplerStart(row, float(P.temperature), P.top_k, float(P.top_p), float(P.min_p), float(P.repeat_penalty),
                        P.repeat_last_n, seed, history)


def _reason(e: BaseException) -> str:
    """An exception as one line: a LayerstreamError's own message, else its type and message."""
    return str(e) if isinstance(e, LayerstreamError) else f"{type(e).__name__}: {e}"


def _common_prefix(a, b) -> int:
    """How many leading tokens a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
