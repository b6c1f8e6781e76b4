"""Tiny synthetic GGUF models for tests, written with gguf.GGUFWriter (llama, qwen2, qwen3)."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from layerstream.loader.synth_blocks import F16_FIELDS, as_qtype, random_quant_blocks  # noqa: F401 - re-exported
from layerstream.loader.synth_vocab import add_tokenizer, bytes_to_unicode, tokenizer_vocab  # noqa: F401 - re-exported

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe")
SPLIT_NAME = "{prefix}-{no:05d}-of-{count:05d}.gguf"  # llama.cpp's gguf-split naming

# Block writing and the tokenizer are shared with the benchmark models' writer.
_F16_FIELDS = F16_FIELDS
_qtype = as_qtype


def _matrix(rng: np.random.Generator, shape: tuple[int, int], qtype: QT, std: float) -> tuple[np.ndarray, QT]:
    """A [rows, cols] weight matrix stored as `qtype`: (array to write, type)."""
    if qtype in (QT.F32, QT.F16):
        return quantize(rng.normal(0.0, std, size=shape).astype(np.float32), qtype), qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[1] % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got shape {shape}")
    try:
        return quantize(rng.normal(0.0, std, size=shape).astype(np.float32), qtype), qtype
    except NotImplementedError:
        return random_quant_blocks(rng, shape, qtype, std), qtype


def _type_picker(qtype):
    """name -> type for the model's matrices, from a type, a per-tensor mapping or a cycling list."""
    if isinstance(qtype, Mapping):
        default = _qtype(qtype.get("*", "Q8_0"))

        def pick(name: str) -> QT:
            short = re.sub(r"^blk\.\d+\.", "", name)
            return _qtype(qtype.get(name, qtype.get(short, default)))

        return pick
    if isinstance(qtype, Sequence) and not isinstance(qtype, str):
        cycle = itertools.cycle([_qtype(q) for q in qtype])
        return lambda name: next(cycle)
    t = _qtype(qtype)
    return lambda name: t


def write_model(
    path: str | os.PathLike,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_ff: int = 128,
    n_vocab: int = 256,
    qtype="Q8_0",
    tied: bool = False,
    rope_freqs: bool = False,
    seed: int = 0,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    context_length: int = 256,
    arch_name: str | None = None,
    omit: Sequence[str] = (),
    swa_window: int = 4,
    swa_pattern: int = 3,
    rope_theta_swa: float = 500.0,
    n_expert: int | None = None,
    n_expert_used: int = 2,
    n_ff_exp: int | None = None,
) -> str:
    """Write a tiny random model of `arch` and return its path.

    qtype: one type name for every matrix, a mapping (full name, short name like
    "attn_q.weight", or "*" for the rest; default Q8_0), or a list cycling over the matrices.
    head_dim: None means n_embd // n_head, except qwen3 where it is twice that (so that
    head_dim != n_embd / n_head). arch_name writes another architecture name over the same
    tensors (bad-input tests); omit leaves out the named tensors. gemma3: local layers attend
    `swa_window` positions back, every `swa_pattern`-th layer globally; local RoPE base
    `rope_theta_swa` (all small, so that a short test crosses the window). n_expert: experts of
    each FFN (qwen3moe: 4 unless given; llama with experts is Mixtral's layout), `n_expert_used`
    of them per token, each of `n_ff_exp` rows (default n_ff).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: ggufgen writes {ARCHS}")
    path = os.fspath(path)
    if head_dim is None:
        head_dim = n_embd // n_head * (2 if arch in ("qwen3", "qwen3moe") else 1)
    if n_expert is None:
        n_expert = 4 if arch == "qwen3moe" else 0
    n_ff_exp = n_ff_exp or n_ff
    name = arch_name or arch
    rng = np.random.default_rng(seed)
    pick = _type_picker(qtype)

    w = gguf.GGUFWriter(path, name)
    w.add_name(f"ggufgen-{arch}")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    if arch == "gemma3":
        w.add_sliding_window(swa_window)
        w.add_uint32(f"{name}.attention.sliding_window_pattern", swa_pattern)
        w.add_float32(f"{name}.rope.freq_base_swa", rope_theta_swa)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(n_ff_exp)
    if arch in ("qwen3", "qwen3moe") or head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    add_tokenizer(w, n_vocab)

    def add(name: str, arr: np.ndarray, qt: QT) -> None:
        if name not in omit:
            w.add_tensor(name, arr, raw_dtype=qt)

    def mat(name: str, rows: int, cols: int, gain: float = 0.7) -> None:
        arr, qt = _matrix(rng, (rows, cols), pick(name), gain / np.sqrt(cols))
        add(name, arr, qt)

    def vec(name: str, n: int, mean: float = 1.0, std: float = 0.1) -> None:
        add(name, (mean + std * rng.standard_normal(n)).astype(np.float32), QT.F32)

    def experts(name: str, rows: int, cols: int, gain: float = 0.7) -> None:
        arr, qt = _matrix(rng, (n_expert * rows, cols), pick(name), gain / np.sqrt(cols))
        add(name, arr.reshape(n_expert, rows, -1), qt)  # [E, N, K] (its bytes, when quantized)

    mat("token_embd.weight", n_vocab, n_embd, gain=2.0)
    if rope_freqs:
        # own stream, so a model with and without factors has the same weights
        factors = np.sort(np.random.default_rng([seed, 1]).uniform(1.0, 8.0, size=head_dim // 2))
        factors = factors.astype(np.float32)
        add("rope_freqs.weight", factors, QT.F32)
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", q_dim, n_embd)
        mat(p + "attn_k.weight", kv_dim, n_embd)
        mat(p + "attn_v.weight", kv_dim, n_embd)
        if arch == "qwen2":
            vec(p + "attn_q.bias", q_dim, 0.0, 0.1)
            vec(p + "attn_k.bias", kv_dim, 0.0, 0.1)
            vec(p + "attn_v.bias", kv_dim, 0.0, 0.1)
        if arch in ("qwen3", "gemma3", "qwen3moe"):
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        mat(p + "attn_output.weight", n_embd, q_dim)
        vec(p + "ffn_norm.weight", n_embd)
        if n_expert:
            add(p + "ffn_gate_inp.weight", (rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)).astype(np.float32),
                QT.F32)
            experts(p + "ffn_gate_exps.weight", n_ff_exp, n_embd)
            experts(p + "ffn_up_exps.weight", n_ff_exp, n_embd)
            experts(p + "ffn_down_exps.weight", n_embd, n_ff_exp)
        else:
            mat(p + "ffn_gate.weight", n_ff, n_embd)
            mat(p + "ffn_up.weight", n_ff, n_embd)
            mat(p + "ffn_down.weight", n_embd, n_ff)
        if arch == "gemma3":
            vec(p + "post_attention_norm.weight", n_embd)
            vec(p + "post_ffw_norm.weight", n_embd)
    vec("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", n_vocab, n_embd, gain=2.0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _copy_kv(w: gguf.GGUFWriter, reader: gguf.GGUFReader, skip: tuple[str, ...] = ()) -> None:
    """Copy every metadata field of `reader` into `w` with its original value types."""
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, list(f.contents()), vtype, sub_type=f.types[1] if len(f.types) > 1 else None)
        else:
            w.add_key_value(key, f.contents(), vtype)


def split_model(path: str | os.PathLike, n_parts: int) -> list[str]:
    """Rewrite `path` as a gguf-split set next to it; returns the part paths in order.

    Layout as llama.cpp's gguf-split writes it: "<stem>-0000K-of-0000N.gguf"; every part
    carries split.no (u16, 0-based), split.count (u16) and split.tensors.count (i32, all
    parts together); part 1 also carries all of the model's metadata, the others nothing
    else; the tensors keep their order and are spread evenly over the parts.
    """
    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    tensors = list(reader.tensors)
    if not 1 <= n_parts <= len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {n_parts} parts")
    stem = path[: -len(".gguf")] if path.endswith(".gguf") else path
    arch = str(reader.fields["general.architecture"].contents())
    bounds = np.linspace(0, len(tensors), n_parts + 1).round().astype(int)
    out = []
    for k in range(n_parts):
        part = SPLIT_NAME.format(prefix=stem, no=k + 1, count=n_parts)
        w = gguf.GGUFWriter(part, arch)
        if k == 0:
            _copy_kv(w, reader, skip=("general.architecture",))
        else:
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # gguf-split: metadata in part 1 only
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, k)
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, n_parts)
        w.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors))
        for t in tensors[bounds[k] : bounds[k + 1]]:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out.append(part)
    return out


def truncate(path: str | os.PathLike, nbytes: int) -> str:
    """Cut the file to its first `nbytes` bytes (negative: drop that many from the end)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    os.truncate(path, nbytes if nbytes >= 0 else size + nbytes)
    return path


def corrupt_magic(path: str | os.PathLike) -> str:
    """Overwrite the 4-byte GGUF magic."""
    path = os.fspath(path)
    with open(path, "r+b") as fh:
        fh.write(b"GGML")
    return path


def write_unknown_arch(path: str | os.PathLike, arch: str = "mamba", **kw) -> str:
    """A llama-shaped model whose general.architecture is `arch`."""
    return write_model(path, arch_name=arch, **kw)


def write_unsupported_quant(
    path: str | os.PathLike, qtype: str = "IQ2_XXS", tensor: str = "blk.0.attn_q.weight", **kw
) -> str:
    """A model whose `tensor` is declared `qtype` (raw random blocks of the right size)."""
    kw.setdefault("n_embd", 256)  # IQ and K types need rows of 256 values
    kw.setdefault("n_ff", 256)
    base = kw.pop("qtype", "Q8_0")
    return write_model(path, qtype={"*": base, tensor: qtype}, **kw)


def write_missing_tensor(path: str | os.PathLike, tensor: str = "blk.1.ffn_up.weight", **kw) -> str:
    """A model without `tensor`."""
    return write_model(path, omit=(tensor,), **kw)


def rewrite_metadata(path: str | os.PathLike, out: str | os.PathLike, changes: dict, drop: Sequence[str] = (),
                     vtypes: dict | None = None) -> str:
    """Copy the model at `path` to `out` with metadata `changes` ({key: value}, written with the
    original key's value type; a new key as a uint32 or string) and without the keys in `drop`.
    vtypes: {key: GGUFValueType, or (ARRAY, element type)} writes a change with another type."""
    reader = gguf.GGUFReader(os.fspath(path))
    arch = reader.fields.get("general.architecture")
    w = gguf.GGUFWriter(os.fspath(out), str(arch.contents()) if arch is not None else "llama")
    if arch is None:  # (a split's later part: gguf-split writes no architecture there)
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    _copy_kv(w, reader, skip=("general.architecture", *changes, *drop))
    for key, value in changes.items():
        f = reader.fields.get(key)
        vtype = f.types[0] if f is not None else (
            gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32)
        vtype = (vtypes or {}).get(key, vtype)
        if isinstance(vtype, tuple):
            w.add_key_value(key, value, vtype[0], sub_type=vtype[1])
        else:
            w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(out)


def poison(path: str | os.PathLike, tensor: str = "output_norm.weight", value: float = float("nan")) -> str:
    """Overwrite one float32 tensor of the file in place with `value` (NaN weights: a corrupt file)."""
    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == tensor)
    if t.tensor_type != QT.F32:
        raise ValueError(f"{tensor} is {t.tensor_type.name}; poison() writes float32 tensors")
    with open(path, "r+b") as fh:
        fh.seek(int(t.data_offset))
        fh.write(np.full(int(t.n_elements), value, dtype=np.float32).tobytes())
    return path
