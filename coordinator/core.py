"""The engine core: requests in, one backend step at a time, outputs out (continuous batching).

Plain logic in the shape of vLLM's EngineCore: `add_request`, `abort`, `step() -> outputs`,
usable in one process with a fake backend. Requests join and leave between steps. Each step
carries the decode token of every running request, then chunks of waiting prompts, up to the
step's token budget (NOTE [ step size ]). A request that finishes or is aborted gives its KV row
back at once. Each request samples with its own parameters and its own seeded generator, so a
seed reproduces whatever else shares the batch. A request whose sampling fails is finished
with an error and the others go on; when the backend's step fails, the requests of that step
are finished with its error (reported by the next step) and the exception goes to the caller,
which knows whether the backend can go on.

NOTE [ step size ]
The backend pads a step to B sequences times its longest chunk S (the attention's queries and
mask are [B, S, ...]), and the plan sizes the step's scratch for max(step_tokens, max_seqs)
tokens. So a step holds every running request's decode token (at most max_seqs) and prompt
chunks of at most step_tokens tokens in all, and B * S stays within max(step_tokens, max_seqs):
a long chunk beside many decoding sequences is cut shorter. A waiting request is admitted
(takes a KV row) only in a step that carries its first chunk; the rest wait in the queue.

NOTE [ prefix reuse ]
A freed row keeps its KV until another sequence writes it, so the core remembers which tokens
a freed row holds (positions 0.. in slots 0.., when its ring never evicted). A new request
takes the free row that holds the longest prefix of its prompt and prefills only the rest: the
next turn of a chat finds its whole conversation so far, and a common system prompt is found
whenever a row that held it is free. Rows without such a record are taken first, then the
least recently freed, so recent prefixes last longest. The KV is not copied between rows: a
prefix held by a running request is not shared.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from layerstream.compute.model import SeqStep
from layerstream.compute.sampling import Sampler, SamplingParams
from layerstream.coordinator.kv_ring import KVRing, context_full
from layerstream.coordinator.tokenizer import StreamDecoder, Tokenizer
from layerstream.errors import ConfigError, ContextFullError, LayerstreamError


class StepBackend(Protocol):
    def step(self, seqs: list[SeqStep], want: str) -> torch.Tensor | None: ...


@dataclass
class RequestOutput:
    """What one step produced for one request: new text, and whether it finished and why."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "eos", "stop", "length", "abort", "context_full", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why, with finish_reason "error"

    def raise_for_failure(self, on_context_full: str, ctx: int) -> None:
        """Raise what a caller that runs one reply at a time reports: the request's own failure
        (e.g. NaN logits), or a full context when the run asked for an error there."""
        if self.finish_reason == "error":
            raise LayerstreamError(self.error or "the request failed")
        if self.finish_reason == "context_full" and on_context_full == "error":
            raise context_full(ctx)


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports when one is hit."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        for s in self.stops:
            k = self.buf.find(s)
            if k >= 0:
                out, self.buf = self.buf[:k], ""
                return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self, text: str = "") -> str:
        out, self.buf = self.buf + text, ""
        for s in self.stops:
            k = out.find(s)
            if k >= 0:
                return out[:k]
        return out


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopMatcher
    row: int | None = None
    ring: KVRing | None = None
    fed: int = 0  # prompt tokens fed so far
    tokens: list[int] = field(default_factory=list)  # every token fed (the penalty's history)
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled and not yet fed


class EngineCore:
    """Schedules requests over a step backend: admission, chunking, sampling, stopping."""

    def __init__(self, backend: StepBackend, tokenizer: Tokenizer, n_vocab: int, *, max_seqs: int, ctx: int,
                 step_tokens: int, on_context_full: str = "error", sink_tokens: int = 4):
        if step_tokens < 1:
            raise ConfigError(f"step_tokens={step_tokens}: must be at least 1")
        self.backend, self.tokenizer, self.n_vocab = backend, tokenizer, n_vocab
        self.max_seqs, self.ctx, self.step_tokens = max_seqs, ctx, step_tokens
        self.on_context_full, self.sink_tokens = on_context_full, sink_tokens
        self.pad_tokens = max(step_tokens, max_seqs)  # B * S of a step at most (NOTE [ step size ])
        self.free_rows = list(range(max_seqs))
        self.row_tokens: dict[int, list[int]] = {}  # free row -> tokens whose KV it still holds (NOTE above)
        self.reused_tokens = 0  # prompt tokens whose KV an earlier request left in its row
        self.waiting: deque[_Request] = deque()  # not yet holding a row
        self.running: list[_Request] = []  # holding a row: prefilling or decoding
        self.aborted: list[RequestOutput] = []  # finished outside a step (abort, failed step): reported by the next
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
        """The free row holding the longest prefix of `prompt`'s KV, and how many tokens of it
        (at most all but the last: a step needs one token); else as take_row (NOTE [ prefix reuse ])."""
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
        if self.running or self.waiting:
            raise ConfigError("evaluation runs while no request is in flight")
        if not tokens:
            raise ValueError("score() needs at least one token")
        row = self.take_row()
        ring = KVRing(self.ctx, self.sink_tokens, self.on_context_full)
        fed, held = 0, None
        try:
            while fed < len(tokens):
                n = min(len(tokens) - fed, self.step_tokens, max(ring.max_chunk(), 1))
                slots, pos = ring.append(n)
                self.steps += 1
                on_logits(fed, self.backend.step([SeqStep(row, tokens[fed : fed + n], slots, pos,
                                                          ring.slot_positions())], "all"))
                fed += n
            held = list(tokens) if ring.total == ring.count else None  # (a failed step keeps no record)
        finally:
            self.give_row(row, held)

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Queue a request; a prompt that cannot fit the context is refused now, before prefill."""
        if not prompt:
            raise ConfigError("empty prompt: give at least one token of text")
        if self.on_context_full == "error" and len(prompt) >= self.ctx:
            raise ContextFullError(f"the prompt is {len(prompt)} tokens, the context size ({self.ctx} tokens) "
                                   "leaves no room to generate; raise --ctx, shorten the prompt, or use "
                                   "--on-context-full slide")
        if any(r.id == request_id for r in (*self.waiting, *self.running)):
            raise ConfigError(f"request id {request_id!r} is already in use")
        bad = [t for t in prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        self.waiting.append(_Request(request_id, list(prompt), params, Sampler(params, self.n_vocab),
                                     StreamDecoder(self.tokenizer), StopMatcher(params.stop)))

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running; its row is free for the next step."""
        for q in (self.waiting, self.running):
            for r in list(q):
                if r.id == request_id:
                    q.remove(r)
                    self._free(r)
                    self.aborted.append(RequestOutput(r.id, "", [], True, "abort", len(r.prompt), len(r.generated)))
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    def run_to_completion(self) -> list[RequestOutput]:
        """Step until every request has finished; the outputs in order."""
        outs: list[RequestOutput] = []
        while self.has_unfinished():
            outs += self.step()
        return outs

    # -- one step ---------------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[_Request, list[int]]]:
        """Decode tokens of the running requests first, then prompt chunks of the running, then of
        waiting requests admitted while a row is free and the step has room (NOTE [ step size ])."""
        plan = [(r, [r.pending]) for r in self.running if r.pending is not None]
        room = max(self.step_tokens - len(plan), 0)
        width = 1 if plan else 0  # the longest chunk so far

        def chunk(r: _Request, fed: int, cap: int) -> int:
            nonlocal room, width
            n = min(len(r.prompt) - fed, room, cap, self.pad_tokens // (len(plan) + 1))
            if n < 1 or (len(plan) + 1) * max(width, n) > self.pad_tokens:
                return 0
            room, width = room - n, max(width, n)
            return n

        for r in self.running:
            if r.pending is None and r.fed < len(r.prompt):
                n = chunk(r, r.fed, max(r.ring.max_chunk(), 1))
                if n:
                    plan.append((r, r.prompt[r.fed : r.fed + n]))
        while self.waiting and self.free_rows:  # admission: FIFO, as far as rows and the step's room go
            r = self.waiting[0]
            row, reused = self._row_for(r.prompt)
            ring = KVRing(self.ctx, self.sink_tokens, self.on_context_full)
            if reused:  # the row holds these tokens' KV already, at the same positions
                ring.append(reused)
            n = chunk(r, reused, max(ring.max_chunk(), 1))
            if not n:
                break
            self.waiting.popleft()
            self._claim(row)
            r.row, r.ring = row, ring
            r.fed, r.tokens = reused, r.prompt[:reused]
            self.reused_tokens += reused
            self.running.append(r)
            plan.append((r, r.prompt[reused : reused + n]))
        return plan

    def step(self) -> list[RequestOutput]:
        """Run one backend step over the scheduled tokens; returns what each request produced.
        A request whose sampling fails finishes with finish_reason "error"; when the backend
        fails, the step's requests do so too (reported by the next step) and the error is raised."""
        outs, self.aborted = self.aborted, []
        plan, steps = [], []
        for r, toks in self._schedule():
            try:
                slots, pos = r.ring.append(len(toks))
            except ContextFullError:
                outs.append(self._finish(r, "context_full"))
                continue
            steps.append(SeqStep(row=r.row, tokens=toks, slots=slots, positions=pos, kv_pos=r.ring.slot_positions()))
            plan.append((r, toks))
        if not steps:
            return outs
        self.steps += 1
        try:
            logits = self.backend.step(steps, "last")
        except Exception as e:
            why = _reason(e)
            self.aborted = outs + [self._finish(r, "error", error=why, keep=False) for r, _ in plan]
            raise
        for i, (r, toks) in enumerate(plan):
            r.tokens += toks
            if r.pending is not None:
                r.pending = None
            else:
                r.fed += len(toks)
                if r.fed < len(r.prompt):
                    continue  # the prompt goes on next step: no token to sample yet
            try:
                tok = int(r.sampler.sample(logits[i : i + 1], [r.tokens])[0])
                out = self._accept(r, tok)
            except Exception as e:  # this request's parameters or logits: it alone ends
                out = self._finish(r, "error", error=f"sampling failed: {_reason(e)}", keep=False)
            if out is not None:
                outs.append(out)
        return outs

    def _accept(self, r: _Request, tok: int) -> RequestOutput | None:
        """Take a sampled token: the text it adds, and whether the request ends here."""
        eos = not r.params.ignore_eos and tok in self.tokenizer.eos_ids
        if eos:
            return self._finish(r, "eos", r.stops.flush(r.decoder.flush()))
        r.generated.append(tok)
        text, hit = r.stops.push(r.decoder.push(tok))
        if hit:
            return self._finish(r, "stop", text, [tok])
        if len(r.generated) >= r.params.max_tokens:
            return self._finish(r, "length", text + r.stops.flush(r.decoder.flush()), [tok])
        r.pending = tok
        return RequestOutput(r.id, text, [tok], prompt_tokens=len(r.prompt), completion_tokens=len(r.generated))

    def _free(self, r: _Request, keep: bool = True) -> None:
        """Give the request's row back, noting the tokens whose KV it holds (if its ring never
        evicted and `keep`: a failed step may have left its KV half written)."""
        if r.row is not None:
            self.give_row(r.row, list(r.tokens) if keep and r.ring.total == r.ring.count else None)
            r.row = None

    def _finish(self, r: _Request, reason: str, text: str = "", toks: list[int] | None = None,
                error: str | None = None, keep: bool = True) -> RequestOutput:
        self.running.remove(r)
        self._free(r, keep)
        return RequestOutput(r.id, text, toks or [], True, reason, len(r.prompt), len(r.generated), error)


def _reason(e: BaseException) -> str:
    """An exception as one line: a LayerstreamError's own message, else its type and message."""
    return str(e) if isinstance(e, LayerstreamError) else f"{type(e).__name__}: {e}"


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
