"""One transformer block: attention (model.py), then the dense FFN or the mixture of experts (moe.py)."""

from __future__ import annotations

import torch

from layerstream.compute.model import LayerWeights, attention_block, ffn_block
from layerstream.compute.moe import moe_block
from layerstream.compute.step_meta import StepMeta
from layerstream.loader.gguf_index import HParams


def layer_forward(hp: HParams, w: LayerWeights, x: torch.Tensor, meta: StepMeta,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, swa: bool = False) -> torch.Tensor:
    """One transformer block on packed tokens x [T, E]; `swa`: a local (sliding-window) layer."""
    x = attention_block(hp, w, x, meta, k_cache, v_cache, swa)
    return moe_block(hp, w, x) if hp.moe.n_expert else ffn_block(hp, w, x)
