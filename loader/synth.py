"""Synthetic GGUF files of real models' shapes with random weights, for benchmarks (never for correctness).

`write_shaped_model` writes a Llama-architecture GGUF whose tensors have the shapes, quant types and
byte sizes of a real model (Llama 3.1 8B / 70B, SmolLM2 135M) and whose bytes are random raw quant
blocks with small finite fp16 scales, so dequantized weights are sane and activations stay finite.
It streams: the tensor table is written first, then each tensor is generated and written alone, so
memory stays at about the largest tensor (the output head) however large the file.

The block-level helpers (`random_quant_blocks`, `tokenizer_vocab`) are shared with the tests'
tiny-model writer (tests/ggufgen.py).

    python -m layerstream.loader.synth OUT.gguf --shape llama-3.1-8b --layers 8 --quant Q4_K_M
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

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


# -- a byte-level GPT-2 style tokenizer -----------------------------------------------------------

_BPE_TEXT = (
    "the quick brown fox jumps over the lazy dog and then the dog sleeps in the sun "
    "there is nothing in the world that the other one knows better than this one thing "
    "hello world hello there in the beginning was the word and the word was with them"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe_merges(n: int) -> list[tuple[str, str]]:
    """Up to n merges learned by plain BPE on a fixed English text (GPT-2 style 'Ġ' spaces)."""
    b2u = bytes_to_unicode()
    words = Counter(tuple(b2u[b] for b in (" " + w).encode()) for w in _BPE_TEXT.split())
    merges: list[tuple[str, str]] = []
    while len(merges) < n:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def tokenizer_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], int, int]:
    """(tokens, token types, merges, bos id, eos id) of a byte-level GPT-2 style vocab of n_vocab tokens.

    Tokens: the byte alphabet (GPT-2's bytes_to_unicode, by byte value), merges learned on a
    fixed text, <|unused_k|> fillers, and the control tokens <|bos|>, <|endoftext|> (eos) last. GGUF
    cannot hold an empty merges array (and llama.cpp requires the key), so there is always
    one merge at least; when n_vocab < 259 the top bytes 0xFF, 0xFE, ... (never found in
    UTF-8 text) give up their slots to the merge and the two control tokens.
    """
    if n_vocab < 256:
        raise ValueError(f"n_vocab={n_vocab}: a byte-level vocab needs at least 256 tokens")
    n_bytes = min(256, n_vocab - 3)
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(n_bytes)]
    types = [int(gguf.TokenType.NORMAL)] * n_bytes
    merges = _bpe_merges(n_vocab - n_bytes - 2)
    assert merges, "the fixed BPE text always yields merges"
    for a, b in merges:
        tokens.append(a + b)
        types.append(int(gguf.TokenType.NORMAL))
    k = 0
    while len(tokens) < n_vocab - 2:
        tokens.append(f"<|unused_{k}|>")
        types.append(int(gguf.TokenType.UNUSED))
        k += 1
    tokens += ["<|bos|>", "<|endoftext|>"]
    types += [int(gguf.TokenType.CONTROL)] * 2
    return tokens, types, [f"{a} {b}" for a, b in merges], n_vocab - 2, n_vocab - 1


# -- model shapes and quant mixes -------------------------------------------------------------------

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


def add_tokenizer(w, n_vocab: int) -> None:
    """Write a minimal gpt2-style byte-level tokenizer of n_vocab tokens into a GGUFWriter."""
    tokens, types, merges, bos, eos = tokenizer_vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)


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


@dataclass(frozen=True)
class _Planned:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # torch order
    make: Callable[[np.random.Generator], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * type_size


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


def _plan(shape: ModelShape, mix: str, route_skew: float = 0.0) -> list[_Planned]:
    """Every tensor of the model in file order (llama.cpp's), with a generator for its data."""
    out: list[_Planned] = []
    L = shape.n_layer

    def mat(name: str, rows: int, cols: int, gain: float = 0.7) -> None:
        qt = tensor_type(mix, name, cols, L)
        std = gain / math.sqrt(cols)
        if qt in (QT.F16, QT.F32):
            make = lambda rng, r=rows, c=cols, q=qt, s=std: random_float(rng, (r, c), q, s)  # noqa: E731
        else:
            make = lambda rng, r=rows, c=cols, q=qt, s=std: random_quant_blocks(  # noqa: E731
                rng, (r, c), q, s, sample_blocks=CALIBRATION_BLOCKS)
        out.append(_Planned(name, qt, (rows, cols), make))

    def vec(name: str, n: int) -> None:
        make = lambda rng, n=n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
        out.append(_Planned(name, QT.F32, (n,), make))

    def experts(name: str, rows: int, cols: int) -> None:  # [E, rows, cols], written as E * rows rows
        mat(name, shape.n_expert * rows, cols)
        t = out.pop()
        out.append(replace(t, shape=(shape.n_expert, rows, cols)))

    def router(name: str) -> None:  # llama.cpp leaves ffn_gate_inp unquantized
        n, e = shape.n_embd, shape.n_expert

        def make(rng: np.random.Generator) -> np.ndarray:
            w = rng.standard_normal((e, n)) / math.sqrt(n)
            if route_skew:  # NOTE [ skewed routing ]
                w *= router_scales(e, shape.n_expert_used, route_skew, rng)[:, None]
            return w.astype(np.float32)

        out.append(_Planned(name, QT.F32, (e, n), make))

    hd = shape.head_dim
    q_dim, kv_dim = shape.n_head * hd, shape.n_head_kv * hd
    mat("token_embd.weight", shape.n_vocab, shape.n_embd, gain=2.0)
    if shape.rope_freqs:
        factors = llama3_rope_factors(hd, shape.rope_theta)
        out.append(_Planned("rope_freqs.weight", QT.F32, (hd // 2,), lambda rng: factors))
    for i in range(L):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", shape.n_embd)
        mat(p + "attn_q.weight", q_dim, shape.n_embd)
        mat(p + "attn_k.weight", kv_dim, shape.n_embd)
        mat(p + "attn_v.weight", kv_dim, shape.n_embd)
        if shape.arch == "qwen3moe":
            vec(p + "attn_q_norm.weight", hd)
            vec(p + "attn_k_norm.weight", hd)
        mat(p + "attn_output.weight", shape.n_embd, q_dim)
        vec(p + "ffn_norm.weight", shape.n_embd)
        if shape.n_expert:
            router(p + "ffn_gate_inp.weight")
            experts(p + "ffn_gate_exps.weight", shape.n_ff_exp, shape.n_embd)
            experts(p + "ffn_up_exps.weight", shape.n_ff_exp, shape.n_embd)
            experts(p + "ffn_down_exps.weight", shape.n_embd, shape.n_ff_exp)
        else:
            mat(p + "ffn_gate.weight", shape.n_ff, shape.n_embd)
            mat(p + "ffn_up.weight", shape.n_ff, shape.n_embd)
            mat(p + "ffn_down.weight", shape.n_embd, shape.n_ff)
    vec("output_norm.weight", shape.n_embd)
    if not shape.tied:
        mat("output.weight", shape.n_vocab, shape.n_embd, gain=2.0)
    return out


def shaped_index(shape: str | ModelShape, mix: str = "Q4_K_M", n_layer: int | None = None):
    """A ModelIndex of `shape` whose tensors lie in a file that is never written: for planning
    (sizes, layouts) at full scale without 40 GB on disk."""
    from layerstream.loader.gguf_index import HParams, ModelIndex, TensorInfo

    shape = resolve_shape(shape, n_layer)
    path = f"/nonexistent/{shape.name}-{mix}.gguf"
    off, layers, glob = 0, [{} for _ in range(shape.n_layer)], {}
    for t in _plan(shape, mix):
        info = TensorInfo(t.name, int(t.qtype), t.shape, path, off, t.nbytes)
        off += -(-t.nbytes // 32) * 32
        if t.name.startswith("blk."):
            _, i, short = t.name.split(".", 2)
            layers[int(i)][short] = info
        else:
            glob[t.name] = info
    hd = shape.head_dim
    hp = HParams(shape.arch, shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv, hd, shape.n_ff, shape.n_vocab,
                 shape.norm_eps, shape.rope_theta, hd, shape.arch != "llama", context_length=shape.context_length,
                 tied_output=shape.tied, has_rope_freqs=shape.rope_freqs, n_expert=shape.n_expert,
                 n_expert_used=shape.n_expert_used, n_ff_exp=shape.n_ff_exp)
    return ModelIndex(path, [path], {}, hp, layers, glob)


def resolve_shape(shape: str | ModelShape, n_layer: int | None = None) -> ModelShape:
    if isinstance(shape, str):
        try:
            shape = SHAPES[shape]
        except KeyError:
            raise ValueError(f"shape {shape!r}: use one of {', '.join(SHAPES)}") from None
    if n_layer is not None:
        if n_layer < 1:
            raise ValueError(f"n_layer={n_layer}: need at least one layer")
        shape = replace(shape, n_layer=n_layer)
    return shape


def write_shaped_model(path: str | os.PathLike, shape: str | ModelShape = "llama-3.1-8b", n_layer: int | None = None,
                       quant: str = "Q4_K_M", seed: int = 0, progress: bool = False, route_skew: float = 0.0) -> str:
    """Write a random-weight GGUF of `shape` (a SHAPES name or a ModelShape) and return its path.

    n_layer overrides the shape's layer count; quant is a llama.cpp-like mix: Q4_K_M, Q8_0 or F16;
    route_skew: the share of each MoE layer's routing decisions its hot tenth of experts takes
    (NOTE [ skewed routing ]; 0: a random router, uniform).
    Tensors are generated and written one at a time (bounded memory); tensor i draws from its own
    random stream (seed, i), so a file with fewer layers holds the same first layers.
    """
    path = os.fspath(path)
    shape = resolve_shape(shape, n_layer)
    if quant not in QUANT_MIXES:
        raise ValueError(f"quant mix {quant!r}: use one of {', '.join(QUANT_MIXES)}")
    if route_skew:
        if not shape.n_expert:
            raise ValueError(f"--route-skew: shape {shape.name} has no experts to route")
        router_scales(shape.n_expert, shape.n_expert_used, route_skew, np.random.default_rng(0))  # (refused before writing)
    tensors = _plan(shape, quant, route_skew)

    w = gguf.GGUFWriter(path, shape.arch)
    w.add_name(f"synthetic {shape.name} {quant}")
    w.add_file_type(_FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(shape.norm_eps)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_vocab_size(shape.n_vocab)
    if shape.head_size:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
        w.add_expert_feed_forward_length(shape.n_ff_exp)
    add_tokenizer(w, shape.n_vocab)
    for t in tensors:  # the table first (torch-order shapes; GGUFWriter reverses them) ...
        w.add_tensor_info(t.name, t.shape, np.float16 if t.qtype == QT.F16 else np.float32, t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is a nicety: write without it
            tqdm = None
        bar = tqdm and tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=os.path.basename(path))
    try:
        for i, t in enumerate(tensors):  # ... then each tensor's data, generated alone
            arr = t.make(np.random.default_rng([seed, i]))
            if arr.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: generated {arr.nbytes} bytes, the table says {t.nbytes}")
            w.write_tensor_data(arr)
            del arr
            if bar:
                bar.update(t.nbytes)
    finally:
        if bar:
            bar.close()
        w.close()
    return path


_FILE_TYPES = {"Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
               "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "F16": gguf.LlamaFileType.MOSTLY_F16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerstream.loader.synth",
                                description="Write a random-weight GGUF of a real model's shape (for benchmarks).")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b", help="model shape (default llama-3.1-8b)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    p.add_argument("--quant", choices=QUANT_MIXES, default="Q4_K_M", help="quant mix, as llama.cpp's (default Q4_K_M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route-skew", type=float, default=0.0, metavar="F",
                   help="mixture-of-experts shapes: a tenth of each layer's experts take about F of its routing "
                        "decisions (0.5: as measured on DeepSeekMoE; default 0: uniform)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        write_shaped_model(args.out, args.shape, args.layers, args.quant, args.seed, progress=True,
                           route_skew=args.route_skew)
    except (ValueError, OSError) as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    size = os.path.getsize(args.out)
    shape = resolve_shape(args.shape, args.layers)
    print(f"wrote {args.out}: {shape.name} {args.quant}, {shape.n_layer} layers, {size / 1e9:.3f} GB "
          f"({size / 2**30:.2f} GiB) in {dt:.1f} s ({size / dt / 1e9:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
