"""The CPU's form of GGUF rows and its matmuls on them: the blocks themselves where the native
kernel is built (BlockRows), else 4-bit rows repacked into aten's CPU int4 layout (PackedRows)
and other block types dequantized (DenseRows).

NOTE [ native blocks ]
aten's int4 matmul needs its own layout (a repacked copy, 11% larger than Q4_K's blocks, made
in the compute process at tens of ms a matrix) and takes only 4-bit types; Q6_K, Q5_K and
Q8_0 went to a dequantized copy read at 2 bytes a value. The native kernel (cpu/qdot.c via
cpu/native.py) reads the file's blocks as they are, every type of NATIVE_TYPES, so the CPU's
copy of its rows is the rows' own bytes (copied out of the staging slot, which is reused) and
its matmul reads the fewest bytes there are. Where the kernel cannot be built, everything
stays as it was (`native_blocks()` False), in the plan's sizing as in the compute process.
x is rounded per call to int16 steps of 1/(127 * 256) of each block of 32's largest value
(native.LEVELS), which agree with float32 to about 1e-5 of a dot product."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from layerstream.compute.cpu import native
from layerstream.compute.dequant import dequantize

INT4_TYPES = frozenset(int(t) for t in (QT.Q4_0, QT.Q4_1, QT.Q4_K))
# block types the CPU computes from a dequantized copy (no int4 form holds them exactly: Q6_K's
# 6-bit values with a scale per 16, Q8_0's 8-bit ones, ...; DenseRows)
DENSE_TYPES = frozenset(int(t) for t in (QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q5_K, QT.Q6_K))
CPU_TYPES = INT4_TYPES | DENSE_TYPES
GROUP = 32  # values per (scale, zero): every 4-bit type's sub-block
ROW_ALIGN = 64  # CPU rows come in multiples of this: aten's CPU int4 pack holds rows in blocks of 64,
# so a tail of a packed matrix is a row slice only at such a boundary (tails_slice() checks it)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> float32 (little-endian half)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def int4_parts(raw: torch.Tensor, qtype: int, n: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n rows of 4-bit blocks -> (q [n, K] uint8 in 0..15, scale [n, K/32], zero [n, K/32]) in
    float32, with value = (q - 8) * scale + zero."""
    if qtype == QT.Q4_K:
        b = raw.view(n, K // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16]  # (uint8 throughout: a mixed int and float product costs several times more)
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1).float()
        m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1).float()
        qs = b[..., 16:].reshape(n, K // 256, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], 3).reshape(n, K)  # a chunk of 64: 32 low, 32 high
        scale = (d.unsqueeze(-1) * sc).reshape(n, K // GROUP)
        zero = (8 * d.unsqueeze(-1) * sc - dmin.unsqueeze(-1) * m).reshape(n, K // GROUP)
        return q, scale, zero
    bs = 18 if qtype == QT.Q4_0 else 20
    b = raw.view(n, K // 32, bs)
    d = _f16(b[..., 0:2])
    qs = b[..., bs - 16:].unsqueeze(2)
    q = torch.cat([qs & 15, qs >> 4], 2).reshape(n, K)
    if qtype == QT.Q4_0:
        return q, d, torch.zeros_like(d)
    return q, d, _f16(b[..., 2:4]) + 8 * d


@dataclass
class PackedRows:
    """Rows of a matrix in aten's CPU int4 layout; `tail(n)` is its last n rows (cached)."""

    w: torch.Tensor  # [n, K / 2] uint8
    sz: torch.Tensor  # [K / 32, n, 2] scale and zero
    _tails: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.w.shape[0]

    @property
    def nbytes(self) -> int:
        return self.w.numel() + self.sz.numel() * self.sz.element_size()

    def tail(self, n: int) -> "PackedRows":
        if n == self.rows:
            return self
        if n % ROW_ALIGN or not tails_slice():
            raise ValueError(f"no tail of {n} rows of a packed matrix of {self.rows}")
        t = self._tails.get(n)
        if t is None:
            self._tails.clear()  # one share in use at a time
            t = self._tails[n] = PackedRows(self.w[self.rows - n:], self.sz[:, self.rows - n:].contiguous())
        return t

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.sz.dtype), self.w, GROUP, self.sz)


@functools.cache
def tails_slice() -> bool:
    """Whether the last rows of a packed matrix (from a ROW_ALIGN boundary) are the packing of
    those rows: true of the layouts measured (torch 2.11, 2.13); checked once per process, as
    the layout is aten's own. Without it the share cannot shrink below the packed rows."""
    q = torch.randint(0, 16, (3 * ROW_ALIGN, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return torch.equal(whole[ROW_ALIGN:], torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[ROW_ALIGN:], 1))


def _layout(q: torch.Tensor) -> torch.Tensor:
    """aten's CPU int4 layout of q [N, K] (uint8 in 0..15, N a multiple of 64), in uint8 ops:
    each 64 rows are K x 32 bytes, byte (k, j) holding row j's value k in its low nibble and
    row j + 32's in its high one."""
    N, K = q.shape
    qb = q.view(N // ROW_ALIGN, 2, ROW_ALIGN // 2, K)
    return (qb[:, 0] | (qb[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


@functools.cache
def layout_matches() -> bool:
    """Whether `_layout` is aten's packing (`_convert_weight_to_int4pack_for_cpu`): true of the
    layouts read with torch 2.13 on AVX-512 hosts, not on an AVX2 one; checked once per process,
    as the layout is aten's own."""
    q = torch.randint(0, 16, (2 * ROW_ALIGN, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.equal(_layout(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (uint8 in 0..15) in aten's CPU int4 layout: built directly where `_layout` is
    aten's (several times faster than widening q to int32 for aten's own packing), else by aten."""
    if q.shape[0] % ROW_ALIGN == 0 and layout_matches():
        return _layout(q)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


@dataclass
class DenseRows:
    """Rows of a matrix dequantized once into the CPU's dtype: how the CPU computes block types
    that have no exact int4 form (DENSE_TYPES). Exact but for the rounding of each value to that
    dtype (bf16: a relative error of at most 2**-9 a value; float32: none beyond float32's own),
    and read as dense rows (bf16: 2 bytes a value against Q6_K's 0.82)."""

    w: torch.Tensor  # [n, K] in the CPU's dtype

    @property
    def rows(self) -> int:
        return self.w.shape[0]

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.w.dtype), self.w)


@dataclass
class BlockRows:
    """Rows of a matrix in their GGUF blocks (a private copy), computed by the native kernel
    (NOTE [ native blocks ]); `tail(n)` is its last n rows, a view."""

    raw: torch.Tensor  # [n * row_bytes] uint8
    qtype: int
    K: int

    @property
    def rows(self) -> int:
        return self.raw.numel() // native.row_bytes(self.qtype, self.K)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def tail(self, n: int) -> "BlockRows":
        if n == self.rows:
            return self
        if not 0 < n < self.rows:
            raise ValueError(f"no tail of {n} rows of a matrix of {self.rows}")
        return BlockRows(self.raw[(self.rows - n) * native.row_bytes(self.qtype, self.K):], self.qtype, self.K)

    def job(self, x: torch.Tensor) -> tuple:
        """This matmul for native.matmuls."""
        return (self.raw, self.qtype, self.rows, self.K, x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, rows] float32."""
        return native.matmuls([self.job(x)])[0]


def native_blocks() -> bool:
    """Whether the CPU computes from the blocks themselves (the native kernel is built and loaded)."""
    return native.available()


def cpu_types() -> frozenset[int]:
    """Block types the CPU computes: the native kernel's and the dequantized ones, or without it
    the 4-bit ones packed and the others dequantized."""
    return CPU_TYPES | native.NATIVE_TYPES if native_blocks() else CPU_TYPES


def split_types() -> frozenset[int]:
    """Block types whose rows the CPU share takes from dense layers: every type the native kernel
    reads, or without it the 4-bit ones (a dequantized copy reads 2 to 3.5 times the bytes)."""
    return native.NATIVE_TYPES if native_blocks() else INT4_TYPES


def cpu_matrix(raw: torch.Tensor, qtype: int, n: int, K: int,
               dtype: torch.dtype) -> "BlockRows | PackedRows | DenseRows":
    """n rows of GGUF blocks (host bytes) in the form the CPU computes them: the blocks (copied)
    where the native kernel reads them, else aten's int4 layout for the 4-bit types and a
    dequantized copy for the other block types (CPU_TYPES)."""
    if qtype in native.NATIVE_TYPES and native_blocks():
        return BlockRows(raw[: n * native.row_bytes(qtype, K)].clone(), qtype, K)
    if qtype in INT4_TYPES:
        return pack_rows(raw, qtype, n, K, dtype)
    if qtype not in DENSE_TYPES:
        raise ValueError(f"the CPU computes no {QT(qtype).name} matrices")
    return DenseRows(dequantize(raw.contiguous(), qtype, (n, K), dtype=dtype, fused=False))


def cpu_matrix_bytes(qtype: int, n: int, K: int, dtype_size: int = 2) -> int:
    """Host bytes of `cpu_matrix` of an [n, K] matrix of `qtype` (dense values of `dtype_size` bytes)."""
    if qtype in native.NATIVE_TYPES and native_blocks():
        return n * native.row_bytes(qtype, K)
    return n * (K // 2 + K // GROUP * 4) if qtype in INT4_TYPES else n * K * dtype_size


def pack_rows(raw: torch.Tensor, qtype: int, n: int, K: int, dtype: torch.dtype) -> PackedRows:
    """Repack n rows of 4-bit GGUF blocks (host bytes) for the CPU's int4 matmul."""
    q, scale, zero = int4_parts(raw, qtype, n, K)
    w = int4_pack(q)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).to(dtype).contiguous()
    return PackedRows(w, sz)


def cpu_rows(N: int, frac: float) -> int:
    """Rows of an N-row matrix the CPU computes at share `frac` (a multiple of ROW_ALIGN)."""
    return min(N, int(N * frac) // ROW_ALIGN * ROW_ALIGN)


def random_packed(N: int, K: int, g: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> PackedRows:
    """An [N, K] matrix of random 4-bit values and small scales in the CPU's packed form (for
    timing the CPU's matmuls: measured at start)."""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    return PackedRows(int4_pack(q), (torch.rand(K // GROUP, N, 2, generator=g) / 64).to(dtype))


def random_cpu_matrix(qtype: int, N: int, K: int, g: torch.Generator,
                      dtype: torch.dtype = torch.bfloat16) -> "BlockRows | PackedRows | DenseRows":
    """An [N, K] matrix of `qtype` in the CPU's form with random values (for timing the CPU's
    matmuls at start): blocks of random bytes with small scales where the native kernel reads them."""
    if qtype in native.NATIVE_TYPES and native_blocks():
        raw = torch.randint(0, 256, (N * native.row_bytes(qtype, K),), dtype=torch.uint8, generator=g)
        return BlockRows(raw, qtype, K)
    if qtype in INT4_TYPES:
        return random_packed(N, K, g, dtype)
    return DenseRows((torch.randn(N, K, generator=g) / 64).to(dtype))


def packed_swiglu(gate, up, down, x: torch.Tensor, act=F.silu) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) on the CPU's matrices: an FFN or an expert (gate and up in one
    native call where both are blocks)."""
    if isinstance(gate, BlockRows) and isinstance(up, BlockRows):
        g, u = native.matmuls([gate.job(x), up.job(x)])
        return down.matmul(act(g) * u)
    return down.matmul(act(gate.matmul(x)) * up.matmul(x))


def swiglu_many(mats: list[tuple], xs: list[torch.Tensor], act=F.silu) -> list[torch.Tensor]:
    """packed_swiglu of several experts (gate, up, down) on their inputs: where every matrix is
    blocks, all gates and ups in one native call and all downs in another (each call splits its
    rows over the threads: a small expert alone keeps few of them busy)."""
    if not all(isinstance(m, BlockRows) for ms in mats for m in ms):
        return [packed_swiglu(g, u, d, x, act) for (g, u, d), x in zip(mats, xs)]
    gu = native.matmuls([j for (g, u, _), x in zip(mats, xs) for j in (g.job(x), u.job(x))])
    hs = [act(gu[2 * e]) * gu[2 * e + 1] for e in range(len(mats))]
    return native.matmuls([d.job(h) for (_, _, d), h in zip(mats, hs)])


def pack_ratio() -> float:
    """CPU bytes per GGUF byte: 1 for blocks read natively; packed Q4_K, 4 bits + a bf16 scale and
    zero per 32 values against 4.5 bits (the other 4-bit types are within a few percent)."""
    if native_blocks():
        return 1.0
    return (0.5 + 4 / GROUP) / (144 / 256)
