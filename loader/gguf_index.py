"""GGUF model index: metadata, hyperparameters and the per-layer table of tensor byte ranges."""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerstream.errors import ModelError
from layerstream.loader import header_cache
from layerstream.loader.header_scan import scan_header
from layerstream.loader.metadata import REQUIRED, meta

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")
NEOX_ARCHS = ("qwen2", "qwen3", "qwen3moe", "gemma3")  # llama.cpp's converter permutes Q/K for llama: NORM rotation

# Tensors every layer must have, by architecture (short names, without "blk.N.").
_LAYER_TENSORS = [
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
    "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
    "ffn_down.weight",
]
REQUIRED_LAYER_TENSORS = {
    "llama": _LAYER_TENSORS,
    "qwen2": _LAYER_TENSORS + ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
    "qwen3": _LAYER_TENSORS + ["attn_q_norm.weight", "attn_k_norm.weight"],
    "qwen3moe": _LAYER_TENSORS[:6] + ["attn_q_norm.weight", "attn_k_norm.weight"],
    "gemma3": _LAYER_TENSORS + ["attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                                "post_ffw_norm.weight"],
}
# A mixture-of-experts layer (llama with experts, i.e. Mixtral; qwen3moe) has these in place of
# ffn_gate / ffn_up / ffn_down: the router, and each projection of every expert as one 3-D tensor.
MOE_TENSORS = ["ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"]
GEMMA3_SWA_PATTERN = 6  # llama.cpp's default for gemma3: every 6th layer attends globally
GEMMA3_ROPE_BASE_SWA = 10000.0  # llama.cpp's (and transformers') rope_local_base_freq
REQUIRED_GLOBAL_TENSORS = ["token_embd.weight", "output_norm.weight"]

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: the unit a reader copies into a staging slot."""

    name: str  # full GGUF name, e.g. "blk.3.attn_q.weight"
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (rows, cols): the reverse of GGUF's ne
    file: str
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass(frozen=True)
class AttentionShape:
    """Attention's geometry: heads, head size, the q.k scale and the sliding window of local layers."""

    n_head: int
    n_head_kv: int
    head_dim: int
    scale: float = 0.0  # scale of q.k (0: 1 / sqrt(head_dim))
    # Gemma 3 (the defaults leave the other architectures as they were):
    swa_window: int = 0  # sliding-window attention span of the local layers (0: none)
    swa_layers: tuple[bool, ...] = ()  # per layer: True where attention is local (sliding window)


@dataclass(frozen=True)
class RopeParams:
    """Rotary position embedding: base, rotated dimensions, pairing and position scaling."""

    theta: float
    dim: int
    neox: bool  # pairs (i, i + dim/2) rotate together (NEOX_ARCHS); else (2i, 2i + 1)
    scale: float = 1.0  # linear position scaling (positions are divided by it)
    has_freqs: bool = False  # Llama 3.1 frequency factors tensor "rope_freqs.weight"
    theta_swa: float = 0.0  # RoPE base of the local layers (unscaled; Gemma 3)


@dataclass(frozen=True)
class MoeParams:
    """Mixture of experts' routing (0 experts: a dense FFN)."""

    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # rows of each expert's gate and up projections
    expert_norm: bool = True  # the chosen experts' softmax weights renormalised to sum to 1

    def prefetch_problem(self, n: int | None) -> str | None:
        """Why `--expert-prefetch n` cannot be (0 turns it off, the model's experts are the most), or None;
        the plan's check and the CLI's, which refuses it before any process starts (exit 2)."""
        return None if n is None or 0 <= n <= self.n_expert else f"use 0 (off) to {self.n_expert} (the model's experts)"


@dataclass(frozen=True)
class HParams:
    """Hyperparameters of a decoder-only transformer, read from GGUF metadata."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    norm_eps: float
    attn: AttentionShape
    rope: RopeParams
    moe: MoeParams = MoeParams()
    context_length: int = 4096
    tied_output: bool = False
    embed_scale: float = 1.0  # token embeddings are multiplied by it (Gemma: sqrt(n_embd))
    ffn_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_tanh (GeGLU)

    def layer_tensors(self) -> list[str]:
        """Tensors every layer of this model must have."""
        moe = self.moe.n_expert
        names = [n for n in REQUIRED_LAYER_TENSORS[self.arch] if not (moe and n.startswith("ffn_")
                                                                       and n != "ffn_norm.weight")]
        return names + (MOE_TENSORS if moe else [])

    def is_swa(self, i: int) -> bool:
        return bool(self.attn.swa_layers) and self.attn.swa_layers[i]


@dataclass
class ModelIndex:
    """An opened GGUF model (one file or a gguf-split set): metadata and tensor byte ranges."""

    path: str
    files: list[str]
    metadata: dict[str, Any]
    hparams: HParams
    layers: list[dict[str, TensorInfo]]  # per layer: short name ("attn_q.weight") -> info
    globals: dict[str, TensorInfo]  # token_embd.weight, output_norm.weight, output.weight, ...
    _maps: dict[str, np.memmap] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelIndex":
        return open_model(path)

    def __getstate__(self) -> dict:
        # a child process gets the parsed index (gguf-py takes about 20 s to parse a 262k-token
        # vocabulary, Gemma 3's) but maps the files itself: memory maps never travel
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _maps={})

    def layer_nbytes(self, i: int) -> int:
        return sum(t.nbytes for t in self.layers[i].values())

    def total_nbytes(self) -> int:
        return sum(self.layer_nbytes(i) for i in range(len(self.layers))) + sum(
            t.nbytes for t in self.globals.values()
        )

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """A read-only uint8 view of one tensor's bytes (memory-mapped, no copy)."""
        m = self._maps.get(t.file)
        if m is None:
            m = self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="c")
        return m[t.offset : t.offset + t.nbytes]


def _field_value(f) -> Any:
    """A GGUF metadata field as a plain Python value (str, int, float, bool or list)."""
    v = f.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def read_metadata(reader, path: str = "the GGUF file") -> dict[str, Any]:
    """The metadata, {key: value}; a string value that is not UTF-8 (as the GGUF format has them) is a
    ModelError naming its key (gguf-py decodes each string when the value is read)."""
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = _field_value(f)
        except UnicodeDecodeError as e:
            raise ModelError(f"{path}: corrupt GGUF file: metadata {name[:80]!r} holds a string that is not "
                             f"UTF-8 ({e.reason} at byte {e.start}); re-download or re-convert the file") from None
    return out


@functools.cache
def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf-py's reader over a plain ndarray view of its memmap (the memmap stays its base): the
        parse's slices, one per element of every metadata array, went through np.memmap's
        Python-level __getitem__ and __array_finalize__, most of a large vocabulary's parse."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return Reader


def _open_reader(path: str):
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory; give the .gguf file inside it")
    if not os.path.isfile(path):
        why = "is not a regular file" if os.path.exists(path) else "no such model file"  # (/dev/null: it exists)
        raise ModelError(f"{path}: {why}; pass --model with the path of a .gguf file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:  # (a failing disk or mount; read access was checked with the arguments)
        raise ModelError(f"{path}: cannot read it ({e.strerror or e}); check the file and the disk it is on") from None
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); pass a .gguf model file")
    scan_header(path)  # counts and lengths against the file, before gguf-py trusts them
    try:
        return _reader_class()(path, "r")
    except MemoryError:
        raise  # not damage: read_header says so
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors on damage
        raise ModelError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e}); re-download or re-convert the file"
        ) from None


def split_files(path: str) -> list[str]:
    """All parts of a gguf-split model, given any part's path (or [path] when not split)."""
    m = _SPLIT_RE.match(path)
    if not m:
        return [path]
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file; pass --model with the path of a .gguf file")
    count = int(m["count"])
    if not 1 <= int(m["no"]) <= count:
        raise ModelError(f"{path}: a split model's part name, but its numbers are not a part of a whole "
                         "(gguf-split names parts -00001-of-0000N.gguf, N at least 1); rename the file")
    files = [f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ModelError(f"{path}: split model is missing part {missing[0]}; put all {count} parts in one folder")
    return files


def _tensors_of(reader, path: str) -> list[TensorInfo]:
    return [TensorInfo(name=t.name, qtype=int(t.tensor_type), shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                       file=path, offset=int(t.data_offset), nbytes=int(t.n_bytes)) for t in reader.tensors]


def _check_extents(tensors: list[TensorInfo], path: str) -> None:
    size = os.path.getsize(path)
    for t in tensors:
        if t.offset + t.nbytes > size:
            raise ModelError(
                f"{path}: truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} "
                f"but the file has {size}; re-download the file"
            )


def read_header(path: str) -> tuple[dict[str, Any], list[TensorInfo]]:
    """One GGUF file's metadata (read_metadata) and tensor table, from the header cache where it
    holds them (NOTE [ the header cache ] in header_cache.py), else parsed by gguf-py and cached."""
    try:
        cache = header_cache.cache_path(path)
    except OSError:
        cache = None  # (a missing or unreadable file: _open_reader says what is wrong)
    cached = header_cache.read_cached(cache) if cache is not None else None
    if cached is not None:
        got = cached[0], [TensorInfo(name, qtype, tuple(shape), path, offset, nbytes)
                          for name, qtype, shape, offset, nbytes in cached[1]]
    else:
        try:
            reader = _open_reader(path)
            got = read_metadata(reader, path), _tensors_of(reader, path)
        except MemoryError:  # within the scan's limits (NOTE [ header sizes ]) but past this process's memory
            raise ModelError(f"{path}: the GGUF header does not fit in the memory this process may take; free "
                             "memory or raise its limit") from None
        if cache is not None:
            header_cache.write_cached(cache, got[0], [[t.name, t.qtype, list(t.shape), t.offset, t.nbytes]
                                                      for t in got[1]])
    _check_extents(got[1], path)
    return got


def _hparams(md: dict[str, Any], tensors: dict[str, TensorInfo], path: str) -> HParams:
    arch = meta(md, "general.architecture", str, path=path)
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{path}: unsupported architecture {arch!r}; layerstream runs {', '.join(SUPPORTED_ARCHS)}"
        )

    def g(k: str, want: type, d: Any = REQUIRED, items: type | None = None) -> Any:
        return meta(md, f"{arch}.{k}", want, d, items=items, path=path)

    def ints(k: str, d: Any) -> Any:
        """An integer, or one a layer (a list of integers)."""
        return g(k, list, items=int) if isinstance(md.get(f"{arch}.{k}"), list) else g(k, int, d)

    n_embd = g("embedding_length", int)
    n_head = g("attention.head_count", int)
    if n_head <= 0:
        raise ModelError(f"{path}: metadata {arch}.attention.head_count = {n_head} is out of range; the file is "
                         "corrupt or was not written by a known converter")
    n_head_kv = ints("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):
        if len(set(n_head_kv)) != 1:
            raise ModelError(f"{path}: per-layer KV head counts {sorted(set(n_head_kv))[:8]} are not supported")
        n_head_kv = n_head_kv[0]
    head_dim = g("attention.key_length", int, n_embd // n_head)
    emb = tensors.get("token_embd.weight")
    n_vocab = g("vocab_size", int, 0) or (emb.shape[0] if emb else len(meta(md, "tokenizer.ggml.tokens", list, [],
                                                                             path=path)))
    scale_type = g("rope.scaling.type", str, "none")
    rope_scale = 1.0
    if scale_type == "linear":
        rope_scale = float(g("rope.scaling.factor", float, 1.0))
    elif scale_type != "none":
        raise ModelError(f"{path}: RoPE scaling {scale_type!r} is not supported (only linear and Llama 3 rope_freqs)")
    n_layer = g("block_count", int)
    moe = MoeParams()
    n_expert = g("expert_count", int, 0)
    if n_expert or arch == "qwen3moe":
        moe = MoeParams(n_expert=n_expert, n_expert_used=g("expert_used_count", int, 0),
                        n_ff_exp=g("expert_feed_forward_length", int, 0) or g("feed_forward_length", int, 0),
                        expert_norm=bool(g("expert_weights_norm", bool, True)))
    attn: dict[str, Any] = {}
    gemma: dict[str, Any] = {}
    theta_swa = 0.0
    if arch == "gemma3":
        key = "attention.sliding_window_pattern"
        if isinstance(md.get(f"{arch}.{key}"), list):  # newer converters: one flag a layer
            swa = tuple(bool(x) for x in g(key, list, items=bool)[:n_layer])
        else:
            pattern = g(key, int, GEMMA3_SWA_PATTERN)
            swa = tuple((i + 1) % pattern != 0 for i in range(n_layer)) if pattern > 0 else ()
        window = g("attention.sliding_window", int, 0)
        attn = dict(
            swa_window=window, swa_layers=swa if window else (),
            # llama.cpp: query_pre_attn_scalar is the head size, but n_embd / n_head for the 27B (62 layers)
            scale=1 / math.sqrt(n_embd / n_head if n_layer == 62 else head_dim),
        )
        theta_swa = float(g("rope.freq_base_swa", float, GEMMA3_ROPE_BASE_SWA))
        gemma = dict(embed_scale=math.sqrt(n_embd), ffn_act="gelu_tanh")
    return HParams(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=g("feed_forward_length", int),
        n_vocab=n_vocab,
        norm_eps=float(g("attention.layer_norm_rms_epsilon", float, 1e-5)),
        attn=AttentionShape(n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, **attn),
        rope=RopeParams(theta=float(g("rope.freq_base", float, 10000.0)), dim=g("rope.dimension_count", int, head_dim),
                        neox=arch in NEOX_ARCHS, scale=rope_scale, has_freqs="rope_freqs.weight" in tensors,
                        theta_swa=theta_swa),
        moe=moe,
        context_length=g("context_length", int, 4096),
        tied_output="output.weight" not in tensors,
        **gemma,
    )


def _check_hparams(hp: HParams, tensors: dict[str, TensorInfo], path: str, n_tokens: int) -> None:
    """Untrusted metadata: each value positive, consistent with the others, with the tensors the
    file holds and with its tokenizer's `n_tokens` (0: none), before anything is sized from it; a
    bad one is one line naming its key."""
    a = hp.arch

    def bad(key: str, value, why: str) -> ModelError:
        return ModelError(f"{path}: metadata {a}.{key} = {value} {why}; the file is corrupt or was not "
                          "written by a known converter")

    at = hp.attn
    for key, v in [("block_count", hp.n_layer), ("embedding_length", hp.n_embd), ("attention.head_count", at.n_head),
                   ("attention.head_count_kv", at.n_head_kv), ("attention.key_length", at.head_dim),
                   ("feed_forward_length", hp.n_ff), ("vocab_size", hp.n_vocab), ("context_length", hp.context_length),
                   ("rope.dimension_count", hp.rope.dim)]:
        if not 0 < v < 1 << 31:
            raise bad(key, v, "is out of range")
    if at.swa_layers and (len(at.swa_layers) != hp.n_layer or not 0 < at.swa_window < 1 << 31):
        raise bad("attention.sliding_window", at.swa_window, f"or its layer pattern ({len(at.swa_layers)} layers) "
                                                             "is out of range")
    if hp.moe.n_expert or a == "qwen3moe":
        if not 0 < hp.moe.n_expert < 1 << 16:
            raise bad("expert_count", hp.moe.n_expert, "is out of range")
        if not 0 < hp.moe.n_expert_used <= hp.moe.n_expert:
            raise bad("expert_used_count", hp.moe.n_expert_used, f"is not from 1 to expert_count {hp.moe.n_expert}")
    if hp.attn.n_head % hp.attn.n_head_kv:
        raise bad("attention.head_count_kv", hp.attn.n_head_kv, f"does not divide head_count {hp.attn.n_head}")
    if hp.rope.dim > hp.attn.head_dim or hp.rope.dim % 2:
        raise bad("rope.dimension_count", hp.rope.dim, f"is odd or above the head size {hp.attn.head_dim}")
    for key, v in [("attention.layer_norm_rms_epsilon", hp.norm_eps), ("rope.freq_base", hp.rope.theta),
                   ("rope.scaling.factor", hp.rope.scale)] + [("rope.freq_base_swa", hp.rope.theta_swa)] * bool(at.swa_layers):
        if not (math.isfinite(v) and v > 0):
            raise bad(key, v, "is not a positive number")
    blocks = {int(m[1]) for m in map(_LAYER_RE.match, tensors) if m}
    if len(blocks) != hp.n_layer or blocks != set(range(hp.n_layer)):
        raise bad("block_count", hp.n_layer, f"does not match the {len(blocks)} blocks of tensors in the file")
    # every block's main tensors, as llama.cpp checks them at load: a shape the metadata does not give
    # failed the first step, deep in a matmul (a probe's)
    e, f_exp = hp.moe.n_expert, hp.moe.n_ff_exp
    shapes = {"attn_q.weight": (at.n_head * at.head_dim, hp.n_embd), "attn_k.weight": (at.n_head_kv * at.head_dim, hp.n_embd),
              "ffn_up.weight": (hp.n_ff, hp.n_embd), "ffn_up_exps.weight": (e, f_exp, hp.n_embd),
              "attn_output.weight": (hp.n_embd, at.n_head * at.head_dim), "ffn_gate.weight": (hp.n_ff, hp.n_embd),
              "ffn_down.weight": (hp.n_embd, hp.n_ff), "ffn_gate_exps.weight": (e, f_exp, hp.n_embd),
              "ffn_down_exps.weight": (e, hp.n_embd, f_exp), "attn_norm.weight": (hp.n_embd,),
              "ffn_norm.weight": (hp.n_embd,)}
    for i in range(hp.n_layer):
        for name, want in shapes.items():
            t = tensors.get(f"blk.{i}.{name}")
            if t is not None and tuple(t.shape) != want:
                raise ModelError(f"{path}: tensor blk.{i}.{name} has shape {list(t.shape)} where the metadata "
                                 f"({a}.embedding_length, head counts, feed_forward_length, experts) say {list(want)}; "
                                 "the file is corrupt or was not written by a known converter")
    # the vocabulary: the tokenizer's tokens, the embedding's and the output's rows and vocab_size
    # all one count, as llama.cpp checks them (more rows than tokens sampled ids the tokenizer cannot
    # spell: a request's ValueError stopped the server; a probe's)
    if n_tokens and n_tokens != hp.n_vocab:
        raise bad("vocab_size", hp.n_vocab, f"does not match the tokenizer's {n_tokens} tokens (tokenizer.ggml.tokens)")
    for name in ("token_embd.weight", "output.weight"):
        t = tensors.get(name)
        if t is not None and list(t.shape) != [hp.n_vocab, hp.n_embd]:
            raise bad("vocab_size", hp.n_vocab, f"or embedding_length {hp.n_embd} does not match {name.split('.')[0]} "
                                                 f"{list(t.shape)}")


def open_model(path: str | os.PathLike) -> ModelIndex:
    """Open a GGUF model (or the first part of a split one) and index its tensors by layer."""
    path = os.fspath(path)
    given = read_header(path)
    # a split set by its header, as llama.cpp tells one: a whole model named like a part loads alone
    files = split_files(path) if (meta(given[0], "split.count", int, 1, path=path) or 1) > 1 else [path]
    headers = [given if f == path else read_header(f) for f in files]
    md = headers[0][0]
    count = meta(md, "split.count", int, 1, path=path) or 1
    if count > 1 and len(files) == 1:
        raise ModelError(
            f"{path}: part of a {count}-part split model, but its name does not end in -00001-of-{count:05d}.gguf; "
            "keep the names gguf-split gave the parts and pass the first one"
        )
    all_tensors: dict[str, TensorInfo] = {}
    for j, (f, (part_md, tensors)) in enumerate(zip(files, headers)):
        if len(files) > 1:  # each part's own numbers, as llama.cpp checks them: a part of another split
            no, of = meta(part_md, "split.no", int, None, path=f), meta(part_md, "split.count", int, None, path=f)
            if (no, of) != (j, len(files)):
                said = "no split.no and split.count" if no is None or of is None else f"part {no + 1} of {of}"
                raise ModelError(f"{f}: named part {j + 1} of {len(files)}, but its metadata says {said}; the parts "
                                 "are not one gguf-split set: put the parts of one model, as gguf-split wrote them, "
                                 "in one folder")
        for t in tensors:
            if t.name in all_tensors:
                raise ModelError(f"{f}: tensor {t.name} is also in {all_tensors[t.name].file}; the parts are not "
                                 "one gguf-split set")
            all_tensors[t.name] = t
    if len(files) > 1:
        want = meta(md, "split.tensors.count", int, None, path=path)
        if want is not None and want != len(all_tensors):
            raise ModelError(f"{path}: split model lists {want} tensors but its parts hold {len(all_tensors)}")
    hp = _hparams(md, all_tensors, path)
    _check_hparams(hp, all_tensors, path, len(meta(md, "tokenizer.ggml.tokens", list, [], path=path)))

    layers: list[dict[str, TensorInfo]] = [{} for _ in range(hp.n_layer)]
    glob: dict[str, TensorInfo] = {}
    for name, t in all_tensors.items():
        m = _LAYER_RE.match(name)
        if m:
            i = int(m[1])
            if i >= hp.n_layer:
                raise ModelError(f"{path}: tensor {name} is past block_count={hp.n_layer}")
            layers[i][m[2]] = t
        else:
            glob[name] = t
    for name in REQUIRED_GLOBAL_TENSORS:
        if name not in glob:
            raise ModelError(f"{path}: tensor {name} is missing; the file is incomplete")
    for i, layer in enumerate(layers):
        for name in hp.layer_tensors():
            if name not in layer:
                raise ModelError(f"{path}: tensor blk.{i}.{name} is missing; the file is incomplete")
    return ModelIndex(path=path, files=files, metadata=md, hparams=hp, layers=layers, globals=glob)
