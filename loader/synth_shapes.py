"""Real models' shapes (ModelShape, SHAPES) and llama.cpp's quant mixes: which type each tensor gets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that fix a Llama-architecture model's tensor shapes."""

    name: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    rope_theta: float = 10000.0
    rope_freqs: bool = False  # Llama 3.1 frequency factors tensor
    context_length: int = 4096
    norm_eps: float = 1e-5
    tied: bool = False
    arch: str = "llama"
    head_size: int = 0  # 0: n_embd // n_head
    n_expert: int = 0  # mixture of experts: experts per layer (0: a dense FFN)
    n_expert_used: int = 0
    n_ff_exp: int = 0  # rows of each expert's gate and up

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head


SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, 500000.0, True, 131072),
    "llama-3.1-70b": ModelShape("llama-3.1-70b", 8192, 28672, 80, 64, 8, 128256, 500000.0, True, 131072),
    # the draft of the Llama 3.1 shapes: their vocabulary, a tied head
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, 500000.0, True, 131072, tied=True),
    "smollm2-135m": ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 100000.0, False, 8192),
    # 128 experts of 768 rows, 8 a token; q/k norms; head size 128 (not 2048 / 32)
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 2048, 6144, 48, 32, 4, 151936, 1000000.0, False, 40960, 1e-6,
                                arch="qwen3moe", head_size=128, n_expert=128, n_expert_used=8, n_ff_exp=768),
}
QUANT_MIXES = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16")

# llama.cpp falls back to these when a row length is not a multiple of 256 (e.g. SmolLM2's 576)
_K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
FILE_TYPES = {"Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
               "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "F16": gguf.LlamaFileType.MOSTLY_F16}  # the file_type key of each mix


MAX_LAYERS = 1024  # layers a written shape may have


def resolve_shape(shape: str | ModelShape, n_layer: int | None = None) -> ModelShape:
    if isinstance(shape, str):
        try:
            shape = SHAPES[shape]
        except KeyError:
            raise ValueError(f"shape {shape!r}: use one of {', '.join(SHAPES)}") from None
    if n_layer is not None:
        if n_layer < 1:
            raise ValueError(f"n_layer={n_layer}: need at least one layer")
        if n_layer > MAX_LAYERS:  # (refused before the tensors are planned: a huge count took minutes and GBs first)
            raise ValueError(f"n_layer={n_layer}: at most {MAX_LAYERS} layers (the largest shape here has "
                             f"{max(s.n_layer for s in SHAPES.values())})")
        shape = replace(shape, n_layer=n_layer)
    return shape


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(mix: str, name: str, cols: int, n_layer: int) -> QT:
    """The type llama.cpp's `mix` gives tensor `name` (full GGUF name) with rows of `cols` values."""
    if name.endswith("norm.weight") or name == "rope_freqs.weight":
        return QT.F32
    if mix == "F16":
        return QT.F16
    if mix == "Q8_0":
        return QT.Q8_0
    if mix not in ("Q4_K_M", "Q5_K_M"):
        raise ValueError(f"quant mix {mix!r}: use one of {', '.join(QUANT_MIXES)}")
    short = name.split(".", 2)[-1] if name.startswith("blk.") else name
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        t = QT.Q6_K
    elif short in ("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight") and _more_bits(layer, n_layer):
        t = QT.Q6_K
    else:  # Q5_K_M: the same choices over Q5_K
        t = QT.Q4_K if mix == "Q4_K_M" else QT.Q5_K
    block, _ = gguf.GGML_QUANT_SIZES[t]
    return _K_FALLBACK[t] if cols % block else t


def llama3_rope_factors(head_dim: int, theta: float, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                        original_ctx: int = 8192) -> np.ndarray:
    """Llama 3.1's rope frequency factors (the converter's rope_freqs tensor), [head_dim / 2] float32."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (original_ctx / wavelen - low) / (high - low)
    f = np.where(wavelen < original_ctx / high, 1.0,
                 np.where(wavelen > original_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return f.astype(np.float32)
