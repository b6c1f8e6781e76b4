"""A step's batch, packed once for every layer: the sequences' new tokens, their KV slots,
positions, RoPE tables and attention masks (StepMeta), built from each sequence's SeqStep."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from layerstream.loader.gguf_index import HParams

_NP = {torch.long: np.int64, torch.bool: np.bool_}
_BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}  # a floating part's bits, by its itemsize
ALIGN = 16  # bytes: each part of the step's buffer starts at a multiple (any dtype's view is aligned)


# NOTE [ one buffer a step ]
# A step's meta is a dozen small tensors. Copied one by one from pageable memory, each cost a
# driver call that stages the bytes; built in one pinned buffer, they cross in one copy that
# never waits, and a captured graph's copy of them is refreshed by one device copy too
# (graphs.fill_meta). The tensor fields are views of `Storage.buf` (the device's copy);
# `host_buf` holds the same bytes on the host, where `on_host` reads a field without waiting
# for the device.
@dataclass(frozen=True)
class Tokens:
    """The step's new tokens, packed: [T] each."""

    id: torch.Tensor  # each new token's id; -1: its row's last sampled id (NOTE [ ids one step behind ])
    row: torch.Tensor  # KV-cache row (sequence slot) of each new token
    b: torch.Tensor  # batch index of each new token
    slot: torch.Tensor  # physical KV slot each new token writes
    known: bool = True  # no id is -1


@dataclass(frozen=True)
class Queries:
    """The queries padded to [B, S], and the KV rows and length they attend."""

    index: torch.Tensor  # [B, S] index of each padded query into the packed tokens
    valid: torch.Tensor  # [B, S] bool, False on padding
    out_index: torch.Tensor  # [T] index of each packed token in the flattened [B*S] padded layout
    rows: torch.Tensor  # [B] KV-cache row of each sequence
    used: torch.Tensor  # [B] slots in use in each row (len(kv_pos)): none further is attended
    kv_len: int  # slots 0..kv_len-1 of the rows are read by attention


@dataclass(frozen=True)
class Tables:
    """What one kind of layer attends with: its RoPE tables and its mask."""

    cos_q: torch.Tensor  # [T, rope_dim/2]
    sin_q: torch.Tensor
    cos_k: torch.Tensor | None  # [B, kv_len, rope_dim/2]; None when K is stored rotated
    sin_k: torch.Tensor | None
    mask: torch.Tensor  # [B, 1, S, kv_len] bool, True where a query may attend


@dataclass(frozen=True)
class Kernels:
    """Triton kernels of attn_kernels.py, where Triton runs the matmuls (build_step_meta's
    `triton_attention`): RoPE with the cache write in one launch, and, when every sequence adds
    one token and K is stored rotated, attention read from the cache in place (NOTE [ decode
    attention ])."""

    rope: bool = False
    decode: bool = False


@dataclass(frozen=True)
class Storage:
    """The one buffer every tensor field is a view of (NOTE [ one buffer a step ])."""

    buf: torch.Tensor  # [bytes] uint8 on the device
    host_buf: torch.Tensor | None  # the same bytes on the host (pinned on CUDA); None in a graph's copy
    layout: tuple  # where each field lies in buf: metas of one layout fill each other's buf


_TENSOR_GROUPS = ("tok", "q", "attn", "swa")


@dataclass(frozen=True)
class StepMeta:
    """What every layer of one forward step needs to know about the batch (built once a step)."""

    tok: Tokens
    q: Queries
    attn: Tables  # every layer's, but the local ones'
    swa: Tables | None = None  # the local (sliding-window) layers' (Gemma 3); None without such layers
    kernels: Kernels = Kernels()
    store: Storage | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by its path ("tok.row"), the storage aside."""
        out = {}
        for g in _TENSOR_GROUPS:
            part = getattr(self, g)
            if part is not None:
                out |= {f"{g}.{f.name}": t for f in dataclasses.fields(part)
                        if isinstance(t := getattr(part, f.name), torch.Tensor)}
        return out

    def with_tensors(self, new: dict[str, torch.Tensor], **top) -> "StepMeta":
        """A copy whose fields at `new`'s paths ("tok.row") hold its tensors; `top` replaces whole fields."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for path, t in new.items():
            g, name = path.split(".")
            groups.setdefault(g, {})[name] = t
        return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **kw)
                                            for g, kw in groups.items()}, **top)

    def on_host(self, t: torch.Tensor) -> torch.Tensor:
        """Field t's host copy (from host_buf: no device sync)."""
        if self.store is None or self.store.host_buf is None:  # a graph's own copy (graphs.static_meta)
            return t.cpu()
        buf = self.store.buf
        off = -1 if t.device.type == "cpu" else t.data_ptr() - buf.data_ptr()
        if not 0 <= off <= buf.numel() - t.nbytes:  # (a field set apart from the buffer)
            return t.cpu()
        return self.store.host_buf[off : off + t.nbytes].view(t.dtype).view(t.shape)


@dataclass
class SeqStep:
    """One sequence's part of a step: its cache row, new tokens' slots/positions, all slots' positions."""

    row: int
    tokens: list[int]
    slots: list[int]  # physical slot of each new token
    positions: list[int]  # RoPE position of each new token
    kv_pos: list[int] | range  # position held by each slot 0..n-1 after the writes (-1: empty)


def rope_inv_freq(hp: HParams, freq_factors: torch.Tensor | None = None, theta: float | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] in float64; Llama 3.1 factors divide them."""
    i = torch.arange(0, hp.rope.dim, 2, dtype=torch.float64)
    inv = (theta or hp.rope.theta) ** (-i / hp.rope.dim)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64).cpu()
    return inv


def rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin of shape [*pos.shape, rope_dim/2] for integer positions."""
    ang = (pos.to(torch.float64) / scale).unsqueeze(-1) * inv_freq.to(pos.device)
    return ang.cos().to(dtype), ang.sin().to(dtype)


# (inverse frequencies' bytes, scale, dtype) -> the bits of cos and sin of positions 0..n-1 (rope_rows_into)
_ROPE_ROWS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def rope_rows_into(inv_freq: torch.Tensor, pos: np.ndarray, scale: float, dtype: torch.dtype,
                   cos: np.ndarray, sin: np.ndarray) -> None:
    """rope_tables' cos and sin of the host positions `pos` written into `cos` and `sin` [*pos.shape,
    R], a step's buffer's parts as their bits (`_Layout.numpy_views`), gathered from a table of every
    position up to the largest asked (made by rope_tables once, grown by doubling): the same bits,
    one gather a step straight into the buffer, where a decode step's eight small operators cost
    the host more than the device's whole step on a small model."""
    key = (inv_freq.numpy().tobytes(), scale, dtype)
    top = int(pos.max()) + 1 if pos.size else 1
    got = _ROPE_ROWS.get(key)
    if got is None or got[0].shape[0] < top:
        bits = getattr(torch, f"int{8 * dtype.itemsize}")  # (numpy has no bfloat16: the tables as their bits)
        got = _ROPE_ROWS[key] = tuple(t.view(bits).numpy() for t in rope_tables(
            inv_freq, torch.arange(max(1024, 1 << (top - 1).bit_length())), scale, dtype))
    np.take(got[0], pos, axis=0, out=cos, mode="clip")  # (in range: the table covers them; "clip" writes
    np.take(got[1], pos, axis=0, out=sin, mode="clip")  # into `out` directly, where "raise" buffers it)


class _Layout:
    """Where each part of a step's meta lies in its one buffer (ALIGN-aligned byte offsets)."""

    def __init__(self):
        self.parts: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}  # name -> dtype, shape, offset
        self.size = 0

    def add(self, name: str, dtype: torch.dtype, *shape: int) -> None:
        self.parts[name] = (dtype, shape, self.size)
        self.size += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN

    @functools.cached_property
    def key(self) -> tuple:
        """Where each part lies: (name, offset) of each, in order."""
        return tuple((k, v[2]) for k, v in self.parts.items())

    @functools.cached_property
    def _torch_parts(self) -> list[tuple[str, torch.dtype, tuple[int, ...], tuple[int, ...], int]]:
        """Every part: name, dtype, shape, contiguous strides, first element in the buffer viewed as
        its dtype (kept: a layout serves every step of its shape)."""
        out = []
        for name, (dt, shape, off) in self.parts.items():
            strides = tuple(math.prod(shape[k + 1:]) for k in range(len(shape)))
            out.append((name, dt, shape, strides, off // dt.itemsize))
        return out

    @functools.cached_property
    def _torch_dtypes(self) -> frozenset:
        return frozenset(p[1] for p in self._torch_parts)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every part as a view of `buf` [size] uint8: the buffer viewed once as each dtype, then one
        strided view a part (not each part's own slice, view and reshape: this runs every step)."""
        typed = {dt: buf[: self.size].view(dt) for dt in self._torch_dtypes}
        return {name: typed[dt].as_strided(shape, strides, typed[dt].storage_offset() + i)
                for name, dt, shape, strides, i in self._torch_parts}

    @functools.cached_property
    def _np_parts(self) -> list[tuple[str, type, int, int, tuple[int, ...]]]:
        """Every part as numpy sees it: name, numpy type (an integer or boolean part's own, a
        floating part's bits: `_BITS`), first element and count in the buffer viewed as that type,
        shape (kept: a layout serves every step of its shape)."""
        return [(name, _NP.get(dt) or _BITS[dt.itemsize], off // dt.itemsize, math.prod(shape), shape)
                for name, (dt, shape, off) in self.parts.items()]

    @functools.cached_property
    def _np_types(self) -> frozenset:
        return frozenset(p[1] for p in self._np_parts)

    def numpy_views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Every part as a numpy view of `buf` [size] uint8 (a floating part as its bits): the buffer
        viewed once as each type, then a slice and a reshape a part (not each part's own slice, view
        and reshape: this runs on the host every step)."""
        typed = {t: buf[: self.size].view(t) for t in self._np_types}
        return {name: typed[t][i : i + n].reshape(shape) for name, t, i, n, shape in self._np_parts}


@functools.lru_cache(maxsize=64)
def _layout(B: int, S: int, T: int, L: int, R: int, swa: bool, tables: tuple, dtype: torch.dtype) -> _Layout:
    """The parts of a step's buffer for its shape (kept: a decode step's shape repeats every step)."""
    lay = _Layout()
    for name in ("tok_id", "tok_row", "tok_b", "tok_slot", "out_index"):
        lay.add(name, torch.long, T)
    lay.add("rows", torch.long, B)
    lay.add("q_used", torch.long, B)
    lay.add("q_index", torch.long, B, S)
    lay.add("q_valid", torch.bool, B, S)
    lay.add("mask", torch.bool, B, 1, S, L)
    if swa:
        lay.add("mask_swa", torch.bool, B, 1, S, L)
    for cos, sin, *shape in tables:
        lay.add(cos, dtype, *shape, R)
        lay.add(sin, dtype, *shape, R)
    return lay


def build_step_meta(hp: HParams, inv_freq: torch.Tensor, seqs: list["SeqStep"], device: torch.device,
                    dtype: torch.dtype, kv_len: int | None = None, rotate_k_at_read: bool = True,
                    inv_freq_swa: torch.Tensor | None = None, triton_attention: bool = False) -> StepMeta:
    """Pack the step's sequences; positions come from the KV ring of each sequence.

    kv_len pads the attended slots to a fixed length (masked), for captured CUDA graphs. With
    local layers (hp.attn.swa_window), their mask also hides keys `swa_window` or more positions
    back, and their RoPE tables come from `inv_freq_swa`, unscaled. `triton_attention`: attention
    through attn_kernels.py (its decode kernel where every sequence adds one token and K is stored
    rotated). Every tensor is built in one host buffer (pinned for a CUDA device) and reaches the
    device in one copy (NOTE [ one buffer a step ]).
    """
    B = len(seqs)
    lens = [len(s.slots) for s in seqs]
    S, T = max(lens), sum(lens)
    L = max(kv_len or 0, max(len(s.kv_pos) for s in seqs))
    R = inv_freq.shape[0]  # rope_dim / 2
    swa = bool(hp.attn.swa_window)
    tables = [("cos_q", "sin_q", T)] + ([("cos_k", "sin_k", B, L)] if rotate_k_at_read else [])
    if swa:
        tables += [("cos_q_swa", "sin_q_swa", T)] + ([("cos_k_swa", "sin_k_swa", B, L)] if rotate_k_at_read else [])
    lay = _layout(B, S, T, L, R, swa, tuple(tables), dtype)
    cuda = device.type == "cuda"
    host_buf = torch.empty(max(lay.size, ALIGN), dtype=torch.uint8, pin_memory=cuda)
    n = lay.numpy_views(host_buf.numpy())  # every part, filled through numpy (cheaper to make and fill than tensors)
    n["q_index"][:] = 0
    n["q_valid"][:] = False
    q_pos = np.full((B, S), -1, dtype=np.int64)
    kv_pos = np.full((B, L), -1, dtype=np.int64)
    t = 0
    for b, s in enumerate(seqs):
        k = lens[b]
        n["tok_id"][t : t + k] = s.tokens
        n["tok_row"][t : t + k] = s.row
        n["tok_b"][t : t + k] = b
        n["tok_slot"][t : t + k] = s.slots
        n["q_index"][b, :k] = np.arange(t, t + k)
        n["q_valid"][b, :k] = True
        q_pos[b, :k] = s.positions
        kp = s.kv_pos  # a range (slot i holds position i) or a list (numpy converts a long list far faster)
        kv_pos[b, : len(kp)] = np.arange(kp.start, kp.stop, kp.step) if isinstance(kp, range) else np.array(kp, dtype=np.int64)
        t += k
    n["rows"][:] = [s.row for s in seqs]
    n["q_used"][:] = [len(s.kv_pos) for s in seqs]
    n["out_index"][:] = np.flatnonzero(n["q_valid"])
    # a query sees the filled slots at or before it; padded queries see everything (finite; dropped
    # later): one comparison written in place, positions read as unsigned, where an empty slot's and
    # a padded query's -1 is the largest value (so an empty slot passes no real query, and a padded
    # query passes every slot)
    mask = n["mask"][:, 0]  # [B, S, L]
    np.less_equal(kv_pos.view(np.uint64)[:, None, :], q_pos.view(np.uint64)[:, :, None], out=mask)
    tok_pos = q_pos[n["q_valid"]]  # [T], in packed order
    kv_at = np.maximum(kv_pos, 0) if rotate_k_at_read else None
    for cos, sin, *shape in tables:
        local = cos.endswith("_swa")
        inv, scale = (inv_freq_swa, 1.0) if local else (inv_freq, hp.rope.scale)
        rope_rows_into(inv, tok_pos if len(shape) == 1 else kv_at, scale, dtype, n[cos], n[sin])
    if swa:
        near = (q_pos[:, :, None] - kv_pos[:, None, :]) < hp.attn.swa_window
        n["mask_swa"][:, 0] = (mask & near) | ~n["q_valid"][:, :, None]
    buf = host_buf.to(device, non_blocking=True) if cuda else host_buf  # the one copy
    d = lay.views(buf)  # (on the CPU the host's bytes are the step's tensors)
    return StepMeta(
        tok=Tokens(d["tok_id"], d["tok_row"], d["tok_b"], d["tok_slot"], known=bool(n["tok_id"].min() >= 0)),
        q=Queries(d["q_index"], d["q_valid"], d["out_index"], d["rows"], d["q_used"], kv_len=L),
        attn=_tables(d, ""), swa=_tables(d, "_swa") if swa else None,
        kernels=Kernels(rope=triton_attention,
                        decode=triton_attention and all(k == 1 for k in lens) and not rotate_k_at_read),
        store=Storage(buf, host_buf, layout=lay.key + ((L, lay.size),)),
    )


def _tables(d: dict[str, torch.Tensor], suffix: str) -> Tables:
    """One kind of layer's tables from the buffer's parts (`suffix` "_swa": the local layers')."""
    return Tables(d[f"cos_q{suffix}"], d[f"sin_q{suffix}"], d.get(f"cos_k{suffix}"), d.get(f"sin_k{suffix}"),
                  d[f"mask{suffix}"])
