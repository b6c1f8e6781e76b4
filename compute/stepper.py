"""A step launched where the logits are: sampling on their device, the ids back to the host
through one pinned copy and an event, so the host never waits for the GPU to build the next step.

NOTE [ ids one step behind ]
A decode token whose id the coordinator does not know yet travels as -1: the runner takes it
from `last_ids` [max_seqs], the ids the previous step sampled, on the device. So step n + 1 is
launched while step n still runs, and the host reads step n's ids (and its per-row "not
finite" codes) once n's event has completed. On the CPU the same calls run synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from layerstream.compute.sampling import FINITE, RowSamplers, SamplingParams, bad_code, rows_of
from layerstream.compute.step_meta import SeqStep
from layerstream.proto.messages import SamplerStart

# step(seqs, want, last_ids[, tails]) -> logits [B, V] ("last"; [sum(tails), V] with tails), [T, V]
# ("all") or None ("none")
StepFn = Callable[[list[SeqStep], str, torch.Tensor], torch.Tensor | None]


@dataclass
class StepResult:
    """What a step gave the host: per sequence its sampled id (-1 where it sampled none; after a
    verified chunk, the id after its accepted drafts), its logits' code (sampling.FINITE or what is
    wrong) and how many of its drafts were accepted, and the logits when asked."""

    ids: list[int]
    bad: list[int]
    logits: torch.Tensor | None = None
    accepted: list[int] | None = None  # None: no drafts (0 each)


@dataclass
class Launched:
    """A step on its way: where its ids land on the host and the event that says they did."""

    n: int  # sequences
    host: torch.Tensor | None  # [3, n] int64: ids, bad codes, drafts accepted (pinned on CUDA)
    event: torch.cuda.Event | None
    logits: torch.Tensor | None
    best: torch.Tensor | None = None  # an all-greedy step: [n] float32, each row's largest logit (host[1] unused)
    buf: "_HostBuf | None" = None  # the pinned buffer host (and best) are views of, lent until result()
    pool: list | None = None  # where buf goes back
    rows: tuple[int, ...] = ()  # each sequence's KV row
    broken: set | None = None  # where result() names the rows whose logits were not finite (the Stepper's)
    finite: bool = True  # whether the logits asked for were all finite (checked on the step's device)


class _HostBuf:
    """Pinned memory a step's ids land in (NOTE [ ids one step behind ]); lent to one step at a time."""

    def __init__(self, max_seqs: int, pin: bool):
        self.ids = torch.empty(3 * max_seqs, dtype=torch.long, pin_memory=pin)  # ids, bad codes, drafts accepted
        self.best = torch.empty(max_seqs, dtype=torch.float32, pin_memory=pin)


def params_of(s: SamplerStart) -> SamplingParams:
    """The sampling parameters a SamplerStart carries."""
    return SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                          repeat_penalty=s.repeat_penalty, repeat_last_n=s.repeat_last_n, seed=s.seed)


# NOTE [ a row left non-finite ]
# Attention reads a row's slots up to the step's padded length and masks those past a sequence's
# own: a masked slot weighs zero, but zero times NaN is NaN. So a sequence whose logits were not
# finite (a damaged model, an overflow in the dtype) left NaN in its row's slots beyond where the
# row's next sequence writes, and that sequence, a clean one, failed in turn. The core keeps no
# prefix of such a row (its record is dropped with the request), so the row's next sequence starts
# fresh; the step that starts it zeroes the row first (clear_row: the runner's KV, on the compute
# stream after the failed sequence's steps still in flight).
class Stepper:
    """Launches steps of a runner with sampling on its device; reads their ids back later."""

    def __init__(self, step: StepFn, n_vocab: int, max_seqs: int, device, capture=None,
                 clear_row: Callable[[int], None] | None = None):
        self.step_fn, self.device = step, torch.device(device)
        self.clear_row = clear_row  # NOTE [ a row left non-finite ]
        self.broken: set[int] = set()
        self.samplers = RowSamplers(n_vocab, self.device)
        self.last_ids = torch.zeros(max_seqs, dtype=torch.long, device=self.device)  # NOTE above
        self.max_seqs = max_seqs
        self.pool: list[_HostBuf] = []  # pinned buffers of steps already read
        # one row's draw as a graph (NOTE [ a row's sampling in a graph ]), captured by `capture` (the
        # runner's GraphCapture) where one is given on CUDA
        self.graphs = None
        if capture is not None and self.device.type == "cuda":
            from layerstream.compute.sample_graphs import SampleGraphs

            self.graphs = SampleGraphs(capture, self.last_ids)

    def _host_buf(self) -> _HostBuf:
        return self.pool.pop() if self.pool else _HostBuf(self.max_seqs, self.device.type == "cuda")

    def _set_last(self, rows: list[int], ids: torch.Tensor) -> None:
        """last_ids[rows] = ids on the device; a run of rows by a slice (no index to upload)."""
        r0 = rows[0]
        if rows == list(range(r0, r0 + len(rows))):
            self.last_ids[r0 : r0 + len(rows)].copy_(ids)
        else:
            self.last_ids.index_copy_(0, torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True), ids)

    def _greedy(self, logits: torch.Tensor, seqs: list[SeqStep]) -> Launched:
        """Every sequence picks its argmax (no penalty, no generator): the ids and each row's
        largest logit go to the host as they are (the codes are made there, sampling.bad_code),
        in four launches (one reduction, one copy on the device, two to the host) where the general
        path takes about twenty."""
        n = len(seqs)
        # one reduction gives both (max takes NaN as the largest, as draw does, and the first of ties)
        best, top = logits.max(dim=-1)  # [n] each
        best = best.float()
        self._set_last([s.row for s in seqs], top)
        buf = self._host_buf()
        ids, bests = buf.ids[:n], buf.best[:n]
        ids.copy_(top, non_blocking=True)
        bests.copy_(best, non_blocking=True)
        return Launched(n, ids, None, None, best=bests, buf=buf, pool=self.pool)

    def _all_greedy(self, rows: list[int]) -> bool:
        states = [self.samplers.rows.get(r) for r in rows]
        return all(st is not None and st.gen is None and not st.params.penalized for st in states)

    def launch(self, seqs: list[SeqStep], sample: list[int], starts: list[SamplerStart], want: str) -> Launched:
        """Start a step: new requests' samplers, the forward pass, sampling of the sequences that
        `sample` (1: after the last token; k > 1: the chunk's last k - 1 tokens are drafts to
        verify, NOTE [ speculative sampling ] in sampling.py), the ids' copy to the host; logits
        come back only when `want` asks ("last", "all")."""
        if len(sample) != len(seqs):
            raise ValueError(f"{len(sample)} sampling flags for {len(seqs)} sequences")
        k = [int(f) for f in sample]
        picks = [b for b, f in enumerate(k) if f == 1]
        checks = [b for b, f in enumerate(k) if f > 1]
        if (picks or checks) and want == "all":
            raise ValueError("a step that samples returns the last tokens' logits, not every token's")
        for st in starts:
            self.samplers.start(st.row, params_of(st), st.seed, list(st.history))
        self._clear_broken(seqs)
        rows = tuple(s.row for s in seqs)
        if checks:
            tails = [max(f, 1) for f in k]
            logits = self.step_fn(seqs, "last", self.last_ids, tails=tails)
            at = [sum(tails[:b]) for b in range(len(seqs))]  # each sequence's first row of logits
        else:
            logits = self.step_fn(seqs, "last" if picks else want, self.last_ids)
            at = list(range(len(seqs)))
        n = len(seqs)
        host = event = None
        if len(picks) == n and logits.shape[0] == n and self._all_greedy([s.row for s in seqs]):
            launched = self._greedy(logits, seqs)
            launched.rows, launched.broken = rows, self.broken
            launched.logits = None if want == "none" else logits.to("cpu", torch.float32)
            launched.finite = launched.logits is None or _finite(logits)
            if self.device.type == "cuda":
                launched.event = torch.cuda.Event(enable_timing=True)
                launched.event.record(torch.cuda.current_stream(self.device))  # (not the current device's)
            return launched
        buf = None
        if picks or checks:
            if self.graphs is not None and picks == [0] and n == 1 and self.graphs.takes(
                    state := self.samplers.rows.get(seqs[0].row), logits):
                out = self.graphs.launch(logits, seqs[0].row, state)  # (NOTE [ a row's sampling in a graph ])
            else:
                out = self._sampled(logits, seqs, k, picks, checks, at)
            if self.device.type == "cuda":
                buf = self._host_buf()
                host = buf.ids[: 3 * n].view(3, n)
                host.copy_(out, non_blocking=True)
            else:
                host = out
        if self.device.type == "cuda":  # the step's end: its ids' copy, else its last kernel
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
        # logits asked for are read now (a graph's output buffer is the next step's too): evaluation
        # steps are collected at once anyway
        kept = None if want == "none" or logits is None else logits.to("cpu", torch.float32)
        return Launched(n, host, event, kept, buf=buf, pool=self.pool, rows=rows, broken=self.broken,
                        finite=kept is None or _finite(logits))

    def _clear_broken(self, seqs: list[SeqStep]) -> None:
        """Zero the KV of each row a step starts a fresh sequence on where an earlier one's logits were
        not finite (NOTE [ a row left non-finite ])."""
        if not self.broken or self.clear_row is None:
            return
        for s in seqs:
            if s.row in self.broken and len(s.kv_pos) == len(s.tokens):  # (nothing before its tokens: a new one)
                self.clear_row(s.row)
                self.broken.discard(s.row)

    def _sampled(self, logits: torch.Tensor, seqs: list[SeqStep], k: list[int], picks: list[int],
                 checks: list[int], at: list[int]) -> torch.Tensor:
        """Sample the `picks` and verify the `checks` eagerly, each row with its own sampler: [3, n] long
        on the device (ids, -1 where none; bad codes; drafts accepted), each id also in last_ids."""
        n = len(seqs)
        out = torch.zeros((3, n), dtype=torch.long, device=self.device)
        out[0] = -1
        done, ids, bad, acc = [], [], [], []
        if picks:
            x = logits if len(picks) == logits.shape[0] else rows_of(logits, [at[b] for b in picks])
            i, c = self.samplers.sample(x, [seqs[b].row for b in picks])
            done, ids, bad = list(picks), [i], [c.long()]
            acc.append(torch.zeros(len(picks), dtype=torch.long, device=self.device))
        for b in checks:
            drafts = seqs[b].tokens[len(seqs[b].tokens) - k[b] + 1 :]
            if len(seqs[b].tokens) < k[b] or min(drafts) < 0:
                raise ValueError(f"KV row {seqs[b].row}: {k[b] - 1} drafts to verify in a chunk of "
                                 f"{seqs[b].tokens}")
            d = torch.tensor(drafts, dtype=torch.long).to(self.device, non_blocking=True)
            i, a, c = self.samplers.verify(logits[at[b] : at[b] + k[b]], seqs[b].row, d)
            done.append(b)
            ids.append(i)
            bad.append(c.long())
            acc.append(a)
        ids, bad, acc = torch.cat(ids), torch.cat(bad), torch.cat(acc)
        rows = torch.tensor([seqs[b].row for b in done], dtype=torch.long).to(self.device, non_blocking=True)
        self.last_ids.index_copy_(0, rows, ids)
        if done == list(range(n)):
            out[0], out[1], out[2] = ids, bad, acc
        else:
            where = torch.tensor(done, dtype=torch.long).to(self.device, non_blocking=True)
            for r, v in enumerate((ids, bad, acc)):
                out[r].index_copy_(0, where, v)
        return out

    @staticmethod
    def done(launched: Launched) -> bool:
        """Whether the step's ids are on the host (never blocks)."""
        return launched.event is None or launched.event.query()

    @staticmethod
    def result(launched: Launched) -> StepResult:
        """The step's ids, codes and asked-for logits on the host (waits for its event)."""
        if launched.event is not None:
            launched.event.synchronize()
        if launched.host is None:
            ids, bad, acc = [-1] * launched.n, [0] * launched.n, [0] * launched.n
        elif launched.best is not None:
            ids, bad, acc = launched.host.tolist(), [bad_code(v) for v in launched.best.tolist()], [0]
        else:
            ids, bad, acc = launched.host.tolist()
        if launched.pool is not None and launched.buf is not None:  # read: the buffer may take another step
            launched.pool.append(launched.buf)
            launched.pool = None
        if launched.broken is not None:
            launched.broken.update(r for r, c in zip(launched.rows, bad) if c != FINITE)
            if not launched.finite:
                launched.broken.update(launched.rows)  # (an evaluation step's: which rows, not asked)
        return StepResult(ids, bad, launched.logits, acc if any(acc) else None)


def _finite(logits: torch.Tensor) -> bool:
    """Whether every logit is finite, read where they were computed: on a GPU one reduction beside the
    copy that waits for the step anyway, not a pass over their host copy (an evaluation's are every
    position's, a chunk's hundreds of MB). A sum, with no temporary of their size on a device the plan
    budgets (NaN or an infinity makes it non-finite; finite half-precision logits cannot overflow it)."""
    return bool(torch.isfinite(logits.sum(dtype=torch.float32)))
