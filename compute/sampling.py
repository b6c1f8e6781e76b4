"""Batched token sampling in llama.cpp's default order: penalty, top-k, top-p, min-p, temperature, draw."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from layerstream.errors import ConfigError, ModelError

TINY = torch.finfo(torch.float32).tiny  # temperatures below it sample greedily


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in [0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p}: must be in [0, 1]")
        if not self.repeat_penalty > 0:
            raise ConfigError(f"repeat_penalty={self.repeat_penalty}: must be > 0 (1 means off)")
        if self.repeat_last_n < -1:
            raise ConfigError(f"repeat_last_n={self.repeat_last_n}: must be >= -1 (-1 means the whole history)")
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens={self.max_tokens}: must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < TINY or self.top_k == 1


class Sampler:
    """Draws one token per row of a logits batch; one seeded generator per device, so runs repeat."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
        self._gens: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._gens.get(device)
        if g is None:
            g = self._gens[device] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    def penalize(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """Apply the repetition penalty to the tokens in each row's recent history. logits: [B, V] float."""
        p, n = self.params.repeat_penalty, self.params.repeat_last_n
        if p == 1.0 or n == 0:
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
        penalized = torch.where(logits > 0, logits / p, logits * p)
        return torch.where(seen, penalized, logits)

    def sample(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """Next token per row. logits: [B, V] (any float dtype, CPU or CUDA); returns [B] long on the
        host. A row whose logits are not finite (NaN weights, an overflowing dtype) raises ModelError;
        the check rides on the one transfer that brings the tokens to the host."""
        B, V = logits.shape
        if len(histories) != B:
            raise ValueError(f"{len(histories)} histories for {B} rows of logits")
        P = self.params
        x = self.penalize(logits.float(), histories)  # [B, V]
        # [B]: each row's largest logit, NaN where the row holds one (argmax takes NaN as the
        # largest), +inf likewise, -inf where no token is possible. Through argmax, not amax:
        # on the CPU amax of a [1, V] row ran about 100 times slower than argmax (8 ms against
        # 80 us) while other processes kept the cores busy, and the coordinator samples there.
        top = x.argmax(dim=-1)
        best = x.gather(-1, top[:, None]).squeeze(-1)
        if P.temperature < TINY:  # (a temperature below float32's smallest normal is 0 to the division)
            return self._checked(top, best, histories)
        x = torch.where(torch.isfinite(best)[:, None], x, 0.0)  # a broken row draws harmlessly, then is refused

        # Candidates sorted by logit, best first: [B, K]
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
        probs = torch.softmax(vals, dim=-1)
        pick = torch.multinomial(probs, 1, generator=self.generator(logits.device))  # [B, 1]
        return self._checked(idx.gather(-1, pick).squeeze(-1), best, histories)

    @staticmethod
    def _checked(tokens: torch.Tensor, best: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """tokens [B] on the host, after one transfer of tokens and row maxima; ModelError for a
        row whose maximum is not finite."""
        host = torch.stack([tokens.double(), best.double()]).cpu()  # [2, B] (ids < 2^53: exact)
        for b, m in enumerate(host[1].tolist()):
            if not math.isfinite(m):
                what = "NaN" if math.isnan(m) else "infinite" if m > 0 else "no finite"
                raise ModelError(f"the model produced {what} logits at token {len(histories[b])}: its weights may "
                                 "be corrupt (re-download or re-convert the model file), or its activations "
                                 "overflow the --dtype")
        return host[0].long()
