"""Random raw quant blocks and float tensors of a chosen magnitude, for synthetic GGUF files.

Shared by the benchmark models' writer (synth.py) and the tests' tiny-model writer (tests/ggufgen.py).
"""

from __future__ import annotations

import math

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

# Byte offsets of the fp16 fields in one block of each quant type, as (scale fields, min fields).
# Raw random blocks get these overwritten so dequantized weights have a chosen magnitude.
F16_FIELDS: dict[QT, tuple[tuple[int, ...], tuple[int, ...]]] = {
    QT.Q4_0: ((0,), ()),
    QT.Q4_1: ((0,), (2,)),
    QT.Q5_0: ((0,), ()),
    QT.Q5_1: ((0,), (2,)),
    QT.Q8_0: ((0,), ()),
    QT.Q2_K: ((80,), (82,)),  # scales[16] qs[64] d dmin
    QT.Q3_K: ((108,), ()),  # hmask[32] qs[64] scales[12] d
    QT.Q4_K: ((0,), (2,)),  # d dmin scales[12] qs[128]
    QT.Q5_K: ((0,), (2,)),  # d dmin scales[12] qh[32] qs[128]
    QT.Q6_K: ((208,), ()),  # ql[128] qh[64] scales[16] d
    QT.IQ2_XXS: ((0,), ()),  # d qs[64]
    QT.IQ4_NL: ((0,), ()),
}

CALIBRATION_BLOCKS = 4096  # blocks dequantized to calibrate the scales of a large tensor


def as_qtype(q) -> QT:
    return q if isinstance(q, QT) else QT[str(q)]


def random_quant_blocks(rng: np.random.Generator, shape: tuple[int, int], qtype, std: float,
                        sample_blocks: int | None = None) -> np.ndarray:
    """Random raw blocks of `qtype` for a [rows, cols] matrix; dequantized std ~ `std`, mean ~ 0.

    The fp16 scale (and min) fields are set from a calibration that dequantizes the first
    `sample_blocks` blocks (None: all of them, exact but slow for large tensors).
    Returns uint8 [rows, cols // block * type_size].
    """
    qtype = as_qtype(qtype)
    if qtype not in F16_FIELDS:
        raise ValueError(f"no raw block layout known for {qtype.name}")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    k = n_blocks if sample_blocks is None else min(n_blocks, sample_blocks)
    scale_offs, min_offs = F16_FIELDS[qtype]

    def put(blocks: np.ndarray, d: np.ndarray, m: np.ndarray) -> None:
        for off in scale_offs:
            blocks[:, off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        for off in min_offs:
            blocks[:, off : off + 2] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)

    def sample(d: np.ndarray, m: np.ndarray) -> np.ndarray:
        put(raw[:k], d, m)
        return dequantize(raw[:k], qtype).reshape(k, block).astype(np.float64)

    ones, zeros = np.ones(k), np.zeros(k)
    a = sample(ones, zeros)  # the scale part, per block linear in d
    b = sample(zeros, ones) if min_offs else np.zeros_like(a)  # the min part, linear in the min field
    r = -a.mean() / b.mean() if min_offs and abs(b.mean()) > 1e-12 else 0.0  # centre the weights
    u = rng.uniform(0.5, 1.5, size=n_blocks)  # per-block scale variety
    y = u[:k, None] * (a + r * b)
    s = std / max(float(y.std()), 1e-12)
    put(raw, s * u, s * r * u)
    return raw.reshape(rows, cols // block * type_size)


def random_float(rng: np.random.Generator, shape: tuple[int, ...], qtype, std: float) -> np.ndarray:
    """A fast random F16/F32 tensor: uniform values of standard deviation `std` (no normal draws)."""
    dt = {QT.F16: np.float16, QT.F32: np.float32}[as_qtype(qtype)]
    n = math.prod(shape)
    q = rng.integers(-128, 128, size=n, dtype=np.int8)
    return (q.astype(np.float32) * np.float32(std * math.sqrt(3) / 128)).astype(dt).reshape(shape)
