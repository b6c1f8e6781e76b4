"""A text's perplexity over windows, each step's logits reduced as they come."""

from __future__ import annotations

import math

import torch

from layerstream.errors import ModelError

# NOTE [ streamed perplexity ]
# A window's logits [T, V] in float64 took 5.9 GB for a 135M model on 100 KB of text (T = 4096,
# V = 49152, then its log-softmax). The engine core hands each step's logits over as the step
# returns them (EngineCore.score), and each is reduced at once to the negative log-likelihood of
# its rows' next tokens, in float64 a few rows at a time: the memory is one step's logits,
# whatever the window and the text.
NLL_ROWS = 64  # rows of logits taken to float64 at once


def corrupt_logits(what: str, token: int) -> ModelError:
    """The one line for logits that are not finite (`what`: NaN or infinite) at `token`."""
    return ModelError(f"the model produced {what} logits at token {token}: its weights may be corrupt (re-download "
                      "or re-convert the model file), or its activations overflow the --dtype")


def window_nll(logits: torch.Tensor, chunk: list[int], at: int, first: int, base: int = 0) -> float:
    """Sum of -log p(chunk[p + 1]) over the positions p = at.. of `logits` [n, V] that are scored
    (first <= p < len(chunk) - 1), by logsumexp in float64. ModelError where a row's logits are not
    finite (NaN weights: the perplexity would read nan); `base` is chunk[0]'s place in the text."""
    lo, hi = max(at, first), min(at + logits.shape[0], len(chunk) - 1)
    total = 0.0
    for p0 in range(lo, hi, NLL_ROWS):
        p1 = min(hi, p0 + NLL_ROWS)
        rows = logits[p0 - at : p1 - at].double()
        tgt = torch.tensor(chunk[p0 + 1 : p1 + 1], device=rows.device)
        nll = torch.logsumexp(rows, dim=-1) - rows.gather(1, tgt[:, None])[:, 0]  # [p1 - p0]
        part = nll.sum().item()
        if not math.isfinite(part):
            bad = int((~torch.isfinite(rows)).any(dim=-1).int().argmax())  # the first row that is not finite
            raise corrupt_logits("NaN" if torch.isnan(rows).any() else "infinite", base + p0 + bad)
        total += part
    return total


def windows_perplexity(core, ids: list[int], window: int) -> tuple[float, int]:
    """Perplexity of `ids` over non-overlapping windows of `window` tokens through the engine core's
    score (as llama-perplexity): (ppl, tokens scored)."""
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        # score only the second half of each window, as llama-perplexity does, when it is long
        first = len(chunk) // 2 if len(chunk) >= 64 else 0
        total = [0.0]

        def add(at: int, lg: torch.Tensor, chunk=chunk, first=first, total=total, base=start) -> None:
            total[0] += window_nll(lg, chunk, at, first, base)

        core.score(chunk, add)
        nll += total[0]
        n += len(chunk) - 1 - first
    return math.exp(nll / n), n
