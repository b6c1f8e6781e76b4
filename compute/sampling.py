"""Token sampling in llama.cpp's default order (penalty, top-k, top-p, min-p, temperature, draw),
as torch ops on the logits' own device: no host round trip until the ids are read back.

`draw` is the one implementation. `Sampler` runs it for a batch with the histories given on the
host (tests, references); `RowSamplers` keeps each KV row's request state where the logits are
(its seeded generator and a window of recent tokens for the penalty) for the compute side."""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from layerstream.bounds import MAX_TEMPERATURE, MAX_WINDOW, REPEAT_PENALTY_RANGE, SEED_RANGE
from layerstream.errors import ConfigError, ModelError

TINY = torch.finfo(torch.float32).tiny  # temperatures below it sample greedily
SEED_MIN, SEED_MAX = SEED_RANGE
# per-row codes of a step's logits (`bad`): finite, or what the row's largest logit is
FINITE, NAN, INF, NO_FINITE = 0, 1, 2, 3


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; temperature 0 means greedy (argmax after the penalty)."""

    temperature: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = 1.0  # llama.cpp style: logit / p if > 0 else logit * p, once per distinct token
    repeat_last_n: int = 64  # window of the history the penalty looks at; 0: off, -1: the whole history
    seed: int | None = None  # None: a fresh random seed
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks, tests)
    lookup: int | None = None  # tokens drafted a step by prompt lookup; None: the engine's default, 0: off

    def __post_init__(self) -> None:
        for names, kind, what in ((("temperature", "top_p", "min_p", "repeat_penalty"), numbers.Real, "a number"),
                                  (("top_k", "repeat_last_n", "max_tokens", "seed", "lookup"), numbers.Integral,
                                   "a whole number")):
            for name in names:
                v = getattr(self, name)
                if (v is not None or name not in ("seed", "lookup")) and (isinstance(v, bool) or not isinstance(v, kind)):
                    raise ConfigError(f"{name}={v!r}: must be {what}")
                if v is not None:  # (numpy's scalars as Python's: np.int64's seed overflowed its modulo)
                    object.__setattr__(self, name, int(v) if kind is numbers.Integral else float(v))
        if not isinstance(self.ignore_eos, bool):  # ("false" is true)
            raise ConfigError(f"ignore_eos={self.ignore_eos!r}: must be True or False")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # (one string is one stop, not its letters)
        try:
            stop = tuple(stop) if not isinstance(stop, Mapping) else (stop,)  # (a dict's keys are not its stops)
        except TypeError:
            stop = (stop,)
        if not all(isinstance(t, str) and t for t in stop):
            raise ConfigError(f"stop={self.stop!r}: give stop strings, each of at least one character")
        for t in stop:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # (a lone surrogate: no generated text can hold it)
                raise ConfigError(f"stop={t!r}: not text a model can generate (a lone surrogate); give valid "
                                  "Unicode") from None
        object.__setattr__(self, "stop", stop)
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ConfigError(f"temperature={self.temperature}: must be from 0 to {MAX_TEMPERATURE:g} (0 means greedy)")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in [0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p}: must be in [0, 1]")
        low, high = REPEAT_PENALTY_RANGE
        if not low <= self.repeat_penalty <= high:  # (1e-40 made a seen token's logit infinite: 'corrupt weights')
            raise ConfigError(f"repeat_penalty={self.repeat_penalty}: must be from {low:g} to {high:g} (1 means off)")
        if not -1 <= self.repeat_last_n <= MAX_WINDOW:  # (2**63 built a list of that many ids: MemoryError)
            raise ConfigError(f"repeat_last_n={self.repeat_last_n}: must be from -1 to {MAX_WINDOW} (-1 means the "
                              "whole history)")
        if not 1 <= self.max_tokens <= MAX_WINDOW:  # (0 still sampled one token: the prompt's pass samples the first)
            raise ConfigError(f"max_tokens={self.max_tokens}: must be from 1 to {MAX_WINDOW}")
        if self.lookup is not None and self.lookup < 0:
            raise ConfigError(f"lookup={self.lookup}: must be >= 0 (0 turns prompt lookup off)")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed={self.seed}: must be in {SEED_MIN}..{SEED_MAX} (a 64-bit seed)")

    @property
    def greedy(self) -> bool:
        return self.temperature < TINY or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 and self.repeat_last_n != 0


def fresh_seed(params: SamplingParams) -> int:
    """The request's seed as a generator takes it (0..2^64-1): its own, else a fresh one."""
    return (params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)) % (1 << 64)


def seeded(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed` (0..2^64-1). Torch's CPU generator keeps only a
    seed's low 32 bits, so seeds that share them would sample alike there (-2 and 2^32-2): on the
    CPU a larger seed is hashed into 32 bits by numpy's SeedSequence; smaller ones are kept as given,
    so their samples are unchanged. CUDA's generator keeps all 64."""
    g = torch.Generator(device=device)
    if torch.device(device).type == "cpu" and seed >= 1 << 32:
        seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return g.manual_seed(seed)


def non_finite_error(code: int, at: int) -> ModelError:
    """The error of a row whose logits are not finite (`code` from `bad_codes`), at its token `at`."""
    what = {NAN: "NaN", INF: "infinite", NO_FINITE: "no finite"}[code]
    return ModelError(f"the model produced {what} logits at token {at}: its weights may "
                      "be corrupt (re-download or re-convert the model file), or its activations "
                      "overflow the --dtype")


def bad_codes(best: torch.Tensor) -> torch.Tensor:
    """[B] int8 per row: FINITE, or NAN / INF / NO_FINITE for a largest logit that is not finite."""
    code = torch.where(torch.isnan(best), NAN, torch.where(best == float("inf"), INF, NO_FINITE))
    return torch.where(torch.isfinite(best), FINITE, code).to(torch.int8)


def bad_code(best: float) -> int:
    """bad_codes of one row's largest logit, on the host."""
    if math.isfinite(best):
        return FINITE
    return NAN if math.isnan(best) else INF if best > 0 else NO_FINITE


def penalize(x: torch.Tensor, seen: torch.Tensor, p: float) -> torch.Tensor:
    """The repetition penalty on the tokens `seen` [B, V] bool of x [B, V] float."""
    return torch.where(seen, torch.where(x > 0, x / p, x * p), x)


def noise_shape(B: int, V: int, P: SamplingParams) -> tuple[int, int]:
    """The shape of the exponential noise `draw` takes for B rows of V logits: [B, candidates]."""
    return (B, P.top_k if 0 < P.top_k < V else V)


def draw(x: torch.Tensor, P: SamplingParams, gen: torch.Generator | None,
         noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row of x [B, V] float32 (penalized already) on x's device, and each row's
    largest logit (NaN where the row holds one, -inf where no token is possible): ([B] long, [B]).
    `noise`: the draw's Exp(1) noise made already (noise_shape), instead of from `gen`."""
    # Through argmax, not amax: on the CPU amax of a [1, V] row ran about 100 times slower than
    # argmax (8 ms against 80 us) while other processes kept the cores busy.
    top = x.argmax(dim=-1)  # (argmax takes NaN as the largest)
    best = x.gather(-1, top[:, None]).squeeze(-1)
    if P.temperature < TINY:  # (a temperature below float32's smallest normal is 0 to the division)
        return top, best
    x = torch.where(torch.isfinite(best)[:, None], x, 0.0)  # a broken row draws harmlessly, then is refused
    probs, idx = candidates(x, P)  # [B, K]
    # torch.multinomial(probs, 1) draws argmax(probs / q), q ~ Exp(1), after checking probs with
    # two .item() calls: a host sync each. The draw without the checks takes the same ids from
    # the same generator state (tests/compute/test_sampling.py), and never stalls the host.
    q = torch.empty_like(probs).exponential_(1, generator=gen) if noise is None else noise
    pick = (probs / q).argmax(dim=-1, keepdim=True)  # [B, 1]
    return idx.gather(-1, pick).squeeze(-1), best


def candidates(x: torch.Tensor, P: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The target distribution of each row of x [B, V] (finite, penalized already) after top-k,
    top-p, min-p and the temperature: (probabilities [B, K], their token ids [B, K]), best first."""
    V = x.shape[-1]
    if 0 < P.top_k < V:
        vals, idx = torch.topk(x, P.top_k, dim=-1)
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[:, 1:] = vals[:, 1:] > float("-inf")
    if P.top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better candidates
        keep &= before < P.top_p  # smallest prefix whose mass reaches top_p
    if P.min_p > 0.0:
        keep &= vals >= vals[:, :1] + math.log(P.min_p)  # p >= min_p * p_max
    keep[:, 0] = True  # min_keep = 1
    vals = torch.where(keep, (vals - vals[:, :1]) / P.temperature, float("-inf"))  # max first: no overflow
    return torch.softmax(vals, dim=-1), idx


def verify(x: torch.Tensor, drafts: torch.Tensor, P: SamplingParams, gen: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """NOTE [ speculative sampling ]
    The ids of a chunk [t, d1..dn] that verifies n drafted tokens: x [n + 1, V] float32 holds the
    logits after t, d1, .., dn (penalized already), drafts [n] the drafts, both on one device.
    Row i < n gives d(i+1) where it is accepted, else a token drawn in its place; row n the token
    after dn. The caller takes the drafts while they equal the rows' ids, then the next id.
    Greedy: each row's argmax, so the output is the argmax's, token for token. Sampling: a draft
    d comes from a deterministic proposer, so (Leviathan et al., Chen et al.) it is accepted with
    probability p(d), p the target's distribution after every filter and the temperature; else
    a token is drawn from p with d removed, renormalised: each token then comes out with
    probability p exactly. Returns ([n + 1] long ids, [n + 1] largest logits) as `draw` does."""
    n = drafts.shape[0]
    top = x.argmax(dim=-1)
    best = x.gather(-1, top[:, None]).squeeze(-1)
    if P.temperature < TINY:
        return top, best
    probs, idx = candidates(torch.where(torch.isfinite(best)[:, None], x, 0.0), P)  # [n + 1, K]
    hit = idx[:n] == drafts[:, None]  # [n, K]
    p_d = (probs[:n] * hit).sum(dim=-1)  # [n]: each draft's probability
    u = torch.rand(n, generator=gen, device=x.device)
    rest = torch.cat([torch.where(hit, 0.0, probs[:n]), probs[n:]])  # [n + 1, K]: without the draft
    q = torch.empty_like(rest).exponential_(1, generator=gen)
    ids = idx.gather(-1, (rest / q).argmax(dim=-1, keepdim=True)).squeeze(-1)  # (argmax(r / q) draws from r / sum r)
    take = torch.cat([u < p_d, torch.zeros(1, dtype=torch.bool, device=x.device)])
    return torch.where(take, torch.cat([drafts, ids[n:]]), ids), best


class Sampler:
    """Draws one token per row of a logits batch with histories given on the host; one seeded
    generator per device, so runs repeat (the reference of RowSamplers)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.seed = fresh_seed(params)
        self._gens: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._gens.get(device)
        if g is None:
            g = self._gens[device] = seeded(device, self.seed)
        return g

    def penalize(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """Apply the repetition penalty to the tokens in each row's recent history. logits: [B, V] float."""
        p, n = self.params.repeat_penalty, self.params.repeat_last_n
        if not self.params.penalized:
            return logits
        V = logits.shape[-1]
        rows, toks = [], []
        for b, h in enumerate(histories):
            recent = {t for t in (h if n < 0 else h[-n:]) if 0 <= t < V}
            rows += [b] * len(recent)
            toks += recent
        if not rows:
            return logits
        dev = logits.device
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev)  # [B, V]
        seen[torch.tensor(rows).to(dev, non_blocking=True), torch.tensor(toks).to(dev, non_blocking=True)] = True
        return penalize(logits, seen, p)

    def sample(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """Next token per row. logits: [B, V] (any float dtype, CPU or CUDA); returns [B] long on the
        host. A row whose logits are not finite (NaN weights, an overflowing dtype) raises ModelError;
        the check rides on the one transfer that brings the tokens to the host."""
        B, V = logits.shape
        if len(histories) != B:
            raise ValueError(f"{len(histories)} histories for {B} rows of logits")
        x = self.penalize(logits.float(), histories)  # [B, V]
        tokens, best = draw(x, self.params, None if self.params.temperature < TINY else self.generator(logits.device))
        host = torch.stack([tokens, bad_codes(best).long()]).cpu()  # [2, B]
        for b, code in enumerate(host[1].tolist()):
            if code != FINITE:
                raise non_finite_error(code, len(histories[b]))
        return host[0]


def rows_of(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a host sync (indexing a CUDA tensor with a list copies it synchronously)."""
    return x.index_select(0, torch.tensor(rows, dtype=torch.long).to(x.device, non_blocking=True))


class RowState:
    """One request's sampler where the logits are: its parameters, its seeded generator, and the
    tokens the penalty looks at (a ring of the last repeat_last_n ids, or every id seen for -1)."""

    def __init__(self, params: SamplingParams, seed: int, history: list[int], V: int, device: torch.device):
        self.params, self.V = params, V
        self.gen = None
        if params.temperature >= TINY:
            self.gen = seeded(device, seed)
        n = params.repeat_last_n
        self.window = self.seen = None
        self.count = 0  # ids written to the window so far
        if not params.penalized:
            return
        if n < 0:  # the whole history: a mask of the ids seen, [V + 1] (V: the slot of nothing)
            self.seen = torch.zeros(V + 1, dtype=torch.bool)
            self.seen[torch.tensor([t for t in history if 0 <= t < V], dtype=torch.long)] = True
            self.seen = self.seen.to(device, non_blocking=True)
        else:  # the last n ids, V where none yet
            tail = [t if 0 <= t < V else V for t in history[-n:]]
            self.window = torch.tensor(tail + [V] * (n - len(tail)), dtype=torch.long).to(device, non_blocking=True)
            self.count = len(tail) % n

    def mask(self) -> torch.Tensor | None:
        """[1, V] bool: the tokens the penalty applies to, or None where it is off."""
        if self.seen is not None:
            return self.seen[None, : self.V]
        if self.window is not None:
            seen = torch.zeros(self.V + 1, dtype=torch.bool, device=self.window.device)
            return seen.scatter_(0, self.window, True)[None, : self.V]
        return None

    def masks(self, drafts: torch.Tensor) -> torch.Tensor | None:
        """[n + 1, V] bool: the penalty's tokens after t, d1, .., dn of a chunk verifying the n
        `drafts` (each row's history holds the drafts before it), or None where it is off."""
        n, V = drafts.shape[0], self.V
        if self.seen is not None:
            before = torch.arange(n + 1, device=drafts.device)[:, None] > torch.arange(n, device=drafts.device)
            m = torch.zeros(n + 1, V + 1, dtype=torch.bool, device=drafts.device)
            m.scatter_(1, torch.where(before, drafts[None, :], V), True)  # [n + 1, n]: d1..di in row i
            return (m | self.seen[None])[:, :V]
        if self.window is not None:
            W = len(self.window)
            ext = torch.cat([self.window.roll(-self.count), drafts])  # oldest first, then the drafts
            at = torch.arange(W, device=ext.device)[None, :] + torch.arange(n + 1, device=ext.device)[:, None]
            m = torch.zeros(n + 1, V + 1, dtype=torch.bool, device=ext.device)
            return m.scatter_(1, ext[at], True)[:, :V]  # row i: the last W ids once d1..di are in
        return None

    def accept(self, ids: torch.Tensor, k: torch.Tensor) -> None:
        """Note the ids a verification gave, ids[0..k] (k: a 0-d device tensor, the drafts
        accepted) in the penalty's window; no sync."""
        if self.seen is not None:
            keep = torch.arange(len(ids), device=ids.device) <= k
            self.seen.index_fill_(0, torch.where(keep, ids, self.V), True)  # (V: the slot of nothing)
        elif self.window is not None:
            W = len(self.window)
            ext = torch.cat([self.window.roll(-self.count), ids])
            # the last W ids once ids[0..k] are in
            self.window = ext.index_select(0, torch.arange(W, device=ext.device) + k + 1)
            self.count = 0

    def push(self, tok: torch.Tensor) -> None:
        """Note a sampled id (a 0-d or [1] device tensor) in the window; no sync."""
        if self.seen is not None:
            self.seen.index_fill_(0, tok.reshape(1), True)
        elif self.window is not None:
            self.window[self.count : self.count + 1] = tok.reshape(1)
            self.count = (self.count + 1) % len(self.window)


class RowSamplers:
    """Each KV row's sampler state on the compute side; samples a step's rows where the logits are.
    Rows sampling greedily without a penalty go through one argmax; the others row by row, each
    with its own generator, so a seed reproduces whatever else shares the batch."""

    def __init__(self, V: int, device: torch.device):
        self.V, self.device = V, torch.device(device)
        self.rows: dict[int, RowState] = {}

    def start(self, row: int, params: SamplingParams, seed: int, history: list[int]) -> None:
        """A new request takes the row: its sampler starts from the prompt's tail `history`."""
        self.rows[row] = RowState(params, seed, history, self.V, self.device)

    def sample(self, logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next id per row of logits [B, V] (row b belongs to KV row rows[b]): ([B] long, [B] int8
        bad codes), both on the logits' device, without a host sync."""
        B = logits.shape[0]
        missing = [r for r in rows if r not in self.rows]
        if missing:
            raise ValueError(f"KV row {missing[0]} samples before its request started (no sampler state)")
        states = [self.rows[r] for r in rows]
        plain = [b for b, s in enumerate(states) if s.gen is None and not s.params.penalized]
        ids, best = [None] * B, [None] * B
        if plain:
            x = logits.float() if len(plain) == B else rows_of(logits, plain).float()
            t, m = draw(x, states[plain[0]].params, None)
            for k, b in enumerate(plain):
                ids[b], best[b] = t[k : k + 1], m[k : k + 1]
        for b, s in enumerate(states):
            if ids[b] is not None:
                continue
            x = logits[b : b + 1].float()
            seen = s.mask()
            if seen is not None:
                x = penalize(x, seen, s.params.repeat_penalty)
            ids[b], best[b] = draw(x, s.params, s.gen)
        out, top = torch.cat(ids), torch.cat(best)
        for b, s in enumerate(states):
            s.push(out[b : b + 1])
        return out, bad_codes(top)

    def verify(self, logits: torch.Tensor, row: int, drafts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sequence's chunk verifying n drafts (NOTE [ speculative sampling ]): logits [n + 1, V]
        after its last n + 1 tokens, drafts [n] long on their device. Returns, without a host sync,
        the id after the accepted drafts [1], how many were accepted [1] and the chunk's bad code [1]
        (the worst of its rows)."""
        s = self.rows.get(row)
        if s is None:
            raise ValueError(f"KV row {row} samples before its request started (no sampler state)")
        x = logits.float()
        seen = s.masks(drafts)
        if seen is not None:
            x = penalize(x, seen, s.params.repeat_penalty)
        ids, best = verify(x, drafts, s.params, s.gen)
        n = drafts.shape[0]
        k = (ids[:n] == drafts).long().cumprod(0).sum()  # 0-d: the drafts taken, in order
        s.accept(ids, k)
        return ids.gather(0, k.reshape(1)), k.reshape(1), bad_codes(best).max().reshape(1)
