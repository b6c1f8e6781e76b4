"""Routers that route with skew, as real mixture-of-experts models do (NOTE [ skewed routing ])."""

from __future__ import annotations

import numpy as np

# NOTE [ skewed routing ]
# Real MoE models route with skew: on DeepSeekMoE (64 routed experts, 6 a token) "very few
# experts handle over 50% of routing decisions" in English, French and code (Chaudhari et al.,
# "MoE Lens - An Expert Is All You Need", ICLR 2025 workshop on sparsity in LLMs,
# https://www.iclr.cc/virtual/2025/33536). A random router routes uniformly, the worst case for
# the device's expert cache. `--route-skew F` makes a random tenth of each layer's experts (the
# "hot" ones, HOT_SHARE) take about F of the layer's routing decisions (uniform: a tenth; 0.5
# stands for MoE Lens' figure): their router rows are scaled by one factor, found by bisection
# so that on independent normal router inputs the hot experts hold F of the top-k choices. A
# larger row spreads its logit, so it tops the others more often; the share is bounded (a hot
# expert still loses whenever its logit is negative), and a wanted share past the bound is
# refused. The model's own activations are not independent normals: the share a run sees is
# what its `--stats` hit rates report.
HOT_SHARE = 0.1
_SKEW_SAMPLES = 4096


def _hot_share(z: np.ndarray, hot: np.ndarray, n_used: int, a: float) -> float:
    """The share of top-`n_used` choices over rows of logits z [S, E] that go to `hot` experts once
    their logits are scaled by a."""
    s = np.ones(z.shape[1])
    s[hot] = a
    top = np.argpartition(-(z * s), n_used - 1, axis=1)[:, :n_used]
    return float(np.isin(top, hot).mean())


def router_scales(n_expert: int, n_used: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Row scales [n_expert] of a router that make a random HOT_SHARE of the experts take `skew` of
    the routing decisions (NOTE [ skewed routing ]); ValueError where no scale gives it."""
    n_hot = max(1, round(HOT_SHARE * n_expert))
    hot = rng.choice(n_expert, n_hot, replace=False)
    z = np.random.default_rng(0).standard_normal((_SKEW_SAMPLES, n_expert))  # (a fixed calibration sample)
    lo, hi = 1.0, 256.0
    base, top = _hot_share(z, hot, n_used, lo), _hot_share(z, hot, n_used, hi)
    if not base <= skew <= top:
        raise ValueError(f"--route-skew {skew:g}: with {n_used} of {n_expert} experts a token, the hottest "
                         f"{n_hot} can take from {base:.2f} to {top:.2f} of the routing decisions")
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if _hot_share(z, hot, n_used, mid) < skew else (lo, mid)
    s = np.ones(n_expert)
    s[hot] = (lo * hi) ** 0.5
    return s
