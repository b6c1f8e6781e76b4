"""Linear layers on weights kept as GGUF blocks: fused kernels for decode, a scratch for prompts.

A `QuantWeight` is a [N, K] matrix held as its quantized bytes on the compute device (resident,
or a view into a streamed layer's VRAM slot). `linear` multiplies by it:
- up to a few rows of activations (FUSED_MAX_TOKENS_BY_TYPE), a fused dequant-matmul Triton kernel reads the
  blocks directly (decode is bound by the bytes read, and these are 3.5x fewer than fp16);
- above that, the matrix is dequantized into one reused scratch buffer and cuBLAS multiplies
  (prompts are bound by arithmetic; the dequantization costs a pass over the blocks).
Dense tensors go straight to `F.linear`, so resident, streamed, quantized and dense weights all
run through the same model code.

On the CPU a QuantWeight made `native` is multiplied by the native kernel (compute/cpu/native.py)
for up to NATIVE_MAX_ROWS rows, every matrix of one `linear_many` or `glu` in one call (NOTE
[ native blocks on the CPU device ]); more rows dequantize row chunks with dequant.py's torch ops
for `F.linear`. A QuantWeight that is not `native` runs the Triton kernels (on the CPU only under
Triton's interpreter, for tests).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from layerstream.compute.dequant import dequantize
from layerstream.compute.kernel_shapes import SMALL_ROWS, small_shape

# Rows of activations up to which the fused kernels are at least as fast as dequantize + cuBLAS,
# per type, measured on an H200 with Llama-3.1-8B's matrices inside CUDA graphs (BENCHMARKS.md,
# "quantized matmul" and "Small batches on the tensor cores"): Q4_K and Q6_K take qsmall's
# tensor-core kernel up to 16 rows (faster than dequantize + cuBLAS on the 8B's larger matrices,
# Q6_K's 1024 x 4096 the exception), and up to SMALL_ROWS[1] on the matrices qsmall was measured
# on (`fused_max_rows`); Q5_K's rows kernel loses to cuBLAS from 5 rows. Types not measured take
# FUSED_MAX_TOKENS. Q4_K matrices outside qsmall's measured shapes (the 70B's FFN, K of 2048)
# take the older fused kernels at 5 to 16 rows, whose speed there against cuBLAS was not measured.
FUSED_MAX_TOKENS = 8
FUSED_MAX_TOKENS_BY_TYPE = {int(QT.Q4_K): 16, int(QT.Q5_K): 4, int(QT.Q6_K): 16}
# qsmall's tile of 32 rows of x: Q4_K well ahead of dequantize + cuBLAS at 17 to 32 rows, Q6_K level
# with it on the larger matrices and behind on 1024 x 4096 (BENCHMARKS.md, "Earlier: 32-token steps"); what it buys
# is a step of up to 32 tokens without the dequantization buffer, which on a tight budget is a
# resident layer (where a plan keeps the buffer anyway, Q6_K's smaller matrices lose a little)
SMALL_TILE_TYPES = frozenset((int(QT.Q4_K), int(QT.Q6_K)))
FUSED_MIN_OF_TYPES = min(FUSED_MAX_TOKENS, *FUSED_MAX_TOKENS_BY_TYPE.values())  # above it, the scratch is used

# Rows of logits computed at once when every position's logits are wanted (evaluation).
HEAD_CHUNK = 64


@dataclass(frozen=True)
class QuantWeight:
    """A [N, K] matrix as contiguous GGUF blocks (uint8) on its device; `native`: multiplied by the
    CPU's native kernel (host bytes of a type it reads), else by the Triton kernels."""

    raw: torch.Tensor
    qtype: int
    shape: tuple[int, int]
    native: bool = False

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device


@functools.cache
def _native():
    """compute.cpu.native, imported on first use."""
    from layerstream.compute.cpu import native

    return native


@functools.cache
def _kernels():
    """compute.qkernels, imported on first use (it needs Triton)."""
    from layerstream.compute import qkernels

    return qkernels


_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_reserved: dict[tuple[torch.device, torch.dtype], int] = {}  # elements reserved up front (the plan's)
_lenders: dict[tuple[torch.device, torch.dtype], object] = {}  # a scratch's lender (its `lent` says when)


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The reused dequantization buffer of `device`, at least `numel` elements (grown, never shrunk)."""
    key = (torch.device(device), dtype)
    buf = _scratch.get(key)
    if getattr(_lenders.get(key), "lent", False):  # (expert_stream.py: steps of more rows take it back)
        raise RuntimeError(f"internal: a step of {numel} scratch elements ran while the expert cache held the scratch")
    if buf is None or buf.numel() < numel:
        _scratch.pop(key, None)
        _lenders.pop(key, None)
        buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def reserve_scratch(device: torch.device, dtype: torch.dtype, numel: int, buf: torch.Tensor | None = None,
                    lender=None) -> None:
    """Allocate the scratch up front, as the plan counted it; larger matrices (the output head
    over many tokens) are then dequantized in row chunks that fit it. `buf`: bytes to hold it
    instead (the expert pool's room), which `lender` lends elsewhere while its `lent` is true
    (expert_stream.py, NOTE [ the layer slots lent to the expert cache ])."""
    key = (torch.device(device), dtype)
    if buf is not None:
        _scratch[key] = buf.view(dtype)[:numel]
        _lenders[key] = lender
    else:
        scratch(device, dtype, numel)
    _reserved[key] = numel


# Largest dequantized piece of one layer matrix (32 MiB in fp16): larger ones are dequantized and
# multiplied in row chunks, each product written into its columns of the output, which keeps the
# prompt path's scratch (reserved for the whole run, counted by the plan) small while each chunk's
# GEMM stays large enough for cuBLAS (Llama-3.1-8B: 4096 rows of gate and up, 1024 of down). The
# chunk also fits an H100/H200's L2 cache, where the GEMM reads what the dequantization wrote.
SCRATCH_MAX_ELEMS = 4096 * 4096
CHUNK_ROUND = 256  # a chunk of more rows than this takes a multiple of it (whole GEMM tiles)
# Where no scratch was reserved (the single-process engine: every layer resident, no budget to
# share), a matrix is dequantized whole up to this (128 MiB in fp16: every matrix of an 8B layer).
# A resident prompt step is bound by the host's launches: in 4096 x 4096 chunks an 8B's 512-token
# step launched 16 dequantizations and 16 matmuls a layer where 7 and 7 do, and took longer on
# the wall clock although the device's time fell (BENCHMARKS.md, "Prompt steps in chunks").
UNPLANNED_MAX_ELEMS = 8192 * 8192
# The same for a prompt's experts, dequantized some experts at a time (moe.py, NOTE [ grouped
# prefill ]): fewer, larger runs cost fewer launches (measured fastest at 256M values of the
# sizes tried, BENCHMARKS.md). 256M values (512 MiB in fp16) also hold one of Mixtral's experts
# (176M).
EXPERT_SCRATCH_MAX_ELEMS = 16 * 4096 * 4096


def chunk_rows(N: int, K: int, cap: int) -> int:
    """Rows of an [N, K] matrix dequantized at once into a scratch of `cap` elements (all of them
    where they fit)."""
    rows = max(1, min(N, cap // K))
    return rows - rows % CHUNK_ROUND if CHUNK_ROUND < rows < N else rows


def dequantized(w: QuantWeight, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
    """Rows of w dequantized into the scratch buffer (valid until the next call)."""
    N, K = w.shape
    r0, r1 = (0, N) if rows is None else (rows.start, rows.stop)
    row_bytes = w.nbytes // N
    out = scratch(w.device, dtype, (r1 - r0) * K).view(r1 - r0, K)
    return _kernels().dequantize_into(w.raw[r0 * row_bytes : r1 * row_bytes], w.qtype, r1 - r0, K, out)


# NOTE [ native blocks on the CPU device ]
# On the CPU a matrix kept as its GGUF blocks is read at 4.5 to 8.5 bits a value where a
# dequantized copy is read at 16 (bf16) or 32, and a plan under a budget holds three to seven
# times the layers. The native kernel (cpu/qdot.c) multiplies up to native.MAX_TOKENS rows straight
# from the blocks. Each call has a fixed cost (the threads' hand-off, x made int16) as large as a
# small matrix's product (576 x 576), so the matrices that one input multiplies (q, k and v; gate
# and up) go in one call. Its integer dots grow with the rows while a float GEMM reads the weights
# once for all of them, so prompt-sized steps (over NATIVE_MAX_ROWS rows) dequantize row chunks
# of CPU_CHUNK_ELEMS values with dequant.py's torch ops (the Triton kernels are the GPU's) for
# F.linear; the chunk's temporaries hold CPU_DEQUANT_BYTES a value (its bit fields, float32
# values, their cast), which the plan counts. Up to NATIVE_MAX_ROWS rows go to the kernel
# native.MAX_TOKENS at a time: a row's result does not depend on the other rows of its call, so
# a token gives the same logits in a one-token step, in a batch, in a small prompt chunk or among
# drafted tokens being verified (greedy text with prompt lookup is the text without it), where
# the two paths differ by the kernel's rounding of x (about 1e-5 a dot product).
CPU_CHUNK_ELEMS = 1 << 20
CPU_DEQUANT_BYTES = 8
NATIVE_MAX_ROWS = 64


def cpu_chunk_elems(shapes) -> int:
    """Values of the largest row chunk the CPU's prompt path dequantizes among these [N, K]
    matrices (NOTE [ native blocks on the CPU device ])."""
    return max((chunk_rows(N, K, CPU_CHUNK_ELEMS) * K for N, K in shapes), default=0)


def _native_rows(x: torch.Tensor, ws) -> bool:
    """Whether x's rows go to the native kernel for all of these matrices (NOTE [ native blocks on
    the CPU device ])."""
    return all(isinstance(w, QuantWeight) and w.native for w in ws) and x.numel() // x.shape[-1] <= NATIVE_MAX_ROWS


def _native_out(x: torch.Tensor, y: torch.Tensor, N: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The native kernel's float32 rows y [T, N] as x's lead shape and dtype, the bias added."""
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], N).to(x.dtype)


def _native_many(x: torch.Tensor, ws: list[QuantWeight]) -> list[torch.Tensor]:
    """[x @ w^T for w in ws] by the native kernel, one call a native.MAX_TOKENS rows, each [T, N] float32."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    step = _native().MAX_TOKENS
    if x2.shape[0] <= step:
        return _native().matmuls([(w.raw, w.qtype, w.shape[0], K, x2) for w in ws])
    parts = [_native().matmuls([(w.raw, w.qtype, w.shape[0], K, x2[r : r + step]) for w in ws])
             for r in range(0, x2.shape[0], step)]
    return [torch.cat(ys) for ys in zip(*parts)]


def _cpu_dequantized_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ w^T for a native matrix and more rows than the kernel takes: row chunks
    dequantized by torch ops, each product written into its columns of the output."""
    N, K = w.shape
    deq = dequantize
    row_bytes = w.nbytes // N
    step = chunk_rows(N, K, CPU_CHUNK_ELEMS)
    if step >= N:
        return F.linear(x, deq(w.raw, w.qtype, (N, K), dtype=x.dtype), bias)
    x2 = x.reshape(-1, K)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        wt = deq(w.raw[r0 * row_bytes : r1 * row_bytes], w.qtype, (r1 - r0, K), dtype=x.dtype).t()  # [K, r1 - r0]
        if bias is None:
            torch.mm(x2, wt, out=out[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x2, wt, out=out[:, r0:r1])
    return out.view(*x.shape[:-1], N)


@functools.cache  # (asked for every eager matmul: one lookup, as the type's bound was)
def fused_max_rows(qtype: int, N: int, K: int) -> int:
    """The most rows of x that an [N, K] matrix of `qtype` takes on a fused kernel on the GPU."""
    if qtype in SMALL_TILE_TYPES and small_shape(SMALL_ROWS[1], N, K):
        return SMALL_ROWS[1]
    return FUSED_MAX_TOKENS_BY_TYPE.get(qtype, FUSED_MAX_TOKENS)


def _fused_rows(x: torch.Tensor, ws) -> bool:
    """Whether x's rows go to the fused kernels for all of these quantized matrices of one type."""
    return x.dim() == 2 and all(x.shape[0] <= fused_max_rows(w.qtype, *w.shape) for w in ws)


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w^T (+ bias) -> [T, N] in x's dtype, for dense or quantized w; `residual` [T, N]:
    residual + that, in the matmul's epilogue where the fused kernel takes it (decode's o and down)."""
    if residual is not None:
        if bias is None and isinstance(w, QuantWeight) and not w.native and _fused_rows(x, [w]):
            out = _kernels().matmul_many(x, [w.raw], w.qtype, [w.shape[0]], w.shape[1], residual=residual)
            if out is not None:
                return out[0]
        return residual + linear(x, w, bias)
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if not isinstance(w, QuantWeight):  # a matrix split between the device and the CPU (cpu/split.py)
        return w.linear(x, bias)
    N, K = w.shape
    if w.native:
        if _native_rows(x, [w]):
            return _native_out(x, _native_many(x, [w])[0], N, bias)
        return _cpu_dequantized_linear(x, w, bias)
    if x.shape[0] <= fused_max_rows(w.qtype, N, K):
        return _kernels().matmul(x, w.raw, w.qtype, N, K, bias)
    step = chunk_rows(N, K, scratch_cap(w.device, x.dtype, UNPLANNED_MAX_ELEMS))
    if step >= N:
        return F.linear(x, dequantized(w, x.dtype), bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        wt = dequantized(w, x.dtype, slice(r0, r1)).t()  # [K, r1 - r0]
        if bias is None:  # the product goes straight into its columns of out (cuBLAS's leading dimension)
            torch.mm(x2, wt, out=out[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x2, wt, out=out[:, r0:r1])
    return out.view(*lead, N)


def linear_many(x: torch.Tensor, ws: list, biases: list | None = None) -> list[torch.Tensor]:
    """`linear` of one input by several matrices; where some are split with the CPU
    (cpu/split.py's SplitWeight), the first split one runs them all, so that their CPU parts
    share one wait for x and run while every device part runs."""
    biases = biases or [None] * len(ws)
    split = next((w for w in ws if not isinstance(w, (torch.Tensor, QuantWeight))), None)
    if split is not None:
        return split.linear_many(x, ws, biases)
    out: list = [None] * len(ws)
    native = [i for i, w in enumerate(ws) if isinstance(w, QuantWeight) and w.native]
    if native and _native_rows(x, [ws[i] for i in native]):  # one native call for them all, of any types
        for i, y in zip(native, _native_many(x, [ws[i] for i in native])):
            out[i] = _native_out(x, y, ws[i].shape[0], biases[i])
    elif all(isinstance(w, QuantWeight) and not w.native for w in ws) and all(b is None for b in biases):
        # those of one type and K in one launch each (NOTE [ several matrices a launch ] in qgemv.py)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, w in enumerate(ws):
            groups.setdefault((w.qtype, w.shape[1]), []).append(i)
        for (qtype, K), idx in groups.items():
            if len(idx) < 2 or len(idx) > 3 or not _fused_rows(x, [ws[i] for i in idx]):
                continue
            ys = _kernels().matmul_many(x, [ws[i].raw for i in idx], qtype, [ws[i].shape[0] for i in idx], K)
            for i, y in zip(idx, ys or []):
                out[i] = y
    return [y if y is not None else linear(x, w, b) for y, w, b in zip(out, ws, biases)]


def takes_int8_x(x: torch.Tensor, ws: list) -> bool:
    """Whether `linear_many` (or `linear`, `glu`) would run any of these matrices on x quantized to
    int8 (qgemv8.py), so that whoever makes x may emit that form with it."""
    if not all(isinstance(w, QuantWeight) and not w.native for w in ws) or x.dim() != 2:
        return False
    return _takes_int8_x(x.shape[0], x.dtype, tuple((w.qtype, w.shape) for w in ws))


@functools.cache
def _takes_int8_x(M: int, dtype: torch.dtype, shapes: tuple) -> bool:
    """takes_int8_x by the matrices' (type, shape), cached (it runs before every decode norm of an
    eager step); their groups as linear_many forms them: one type and K a launch, a group of one alone."""
    if any(M > fused_max_rows(qtype, *shape) for qtype, shape in shapes):
        return False
    groups: dict[tuple[int, int], list[int]] = {}
    for qtype, (N, K) in shapes:
        groups.setdefault((qtype, K), []).append(N)
    x = torch.empty(M, 0, dtype=dtype)  # (what the choice reads of x: its rows and dtype)
    return any(len(Ns) <= 3 and _kernels().takes_int8_x(x, qtype, Ns, K) for (qtype, K), Ns in groups.items())


def glu(x: torch.Tensor, gate, up) -> torch.Tensor | None:
    """SiLU(x @ gate^T) * (x @ up^T) in one launch, gate and up rows paired in each program, where
    the fused kernel takes them (decode rows, one type), or gate and up in one native call on the
    CPU; else None (the caller runs the ops)."""
    if not (isinstance(gate, QuantWeight) and isinstance(up, QuantWeight)) or gate.shape != up.shape:
        return None
    if gate.native or up.native:
        if not _native_rows(x, [gate, up]):
            return None
        g, u = _native_many(x, [gate, up])
        return F.silu(g, inplace=True).mul_(u).view(*x.shape[:-1], gate.shape[0]).to(x.dtype)
    if gate.qtype != up.qtype or not _fused_rows(x, [gate]):
        return None
    y = _kernels().matmul_many(x, [gate.raw, up.raw], gate.qtype, [gate.shape[0], up.shape[0]], gate.shape[1], glu=True)
    return None if y is None else y[0]


def grouped_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, w_off: torch.Tensor,
                   x_row: torch.Tensor) -> torch.Tensor:
    """out[g] = x[x_row[g]] @ W_g^T, W_g the [N, K] blocks w_off[g] bytes from raw (qkernels.grouped_matmul)."""
    return _kernels().grouped_matmul(x, raw, qtype, N, K, w_off, x_row)


def scratch_elems(layer_shapes) -> int:
    """Scratch elements the prompt path needs: the largest row chunk of the layers' [N, K] matrices
    (chunk_rows under SCRATCH_MAX_ELEMS; the head, larger, goes in chunks of what is reserved), and
    [E, N, K] expert tensors (dequantized some experts at a time, moe.py NOTE [ grouped prefill ])
    up to EXPERT_SCRATCH_MAX_ELEMS."""
    def cap(s) -> int:
        if len(s) == 3:
            return min(math.prod(s), max(1, EXPERT_SCRATCH_MAX_ELEMS // s[-1]) * s[-1])
        return chunk_rows(s[0], s[1], SCRATCH_MAX_ELEMS) * s[1]

    return max((cap(s) for s in layer_shapes), default=0)


def model_scratch_elems(index) -> int:
    """`scratch_elems` of a model's layer matrices and expert tensors (the plan and the compute
    process count the same)."""
    return scratch_elems([t.shape for layer in index.layers for t in layer.values() if len(t.shape) in (2, 3)])


def scratch_cap(device: torch.device, dtype: torch.dtype, unplanned: int = SCRATCH_MAX_ELEMS) -> int:
    """Elements of scratch the prompt path may use on `device`: the plan's reservation, or
    `unplanned` where no plan reserved any (no budget)."""
    return _reserved.get((torch.device(device), dtype), unplanned)


def dequantized_experts(ws: list[QuantWeight], n_expert: int, e0: int, e1: int, dtype: torch.dtype,
                        as_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Experts [e0, e1) of each [E * N, K] expert matrix in `ws`, dequantized into the scratch of
    `dtype` (the plan's) as [e1 - e0, N, K] each, valid until the next scratch use; `as_dtype`:
    values of that dtype instead, of the same size (bf16 in the fp16 scratch)."""
    n = e1 - e0
    sizes = [n * (w.shape[0] // n_expert) * w.shape[1] for w in ws]
    buf = scratch(ws[0].device, dtype, sum(sizes))
    if as_dtype is not None and as_dtype != dtype:
        buf = buf.view(as_dtype)  # (raises where the sizes differ)
    out, at = [], 0
    for w, size in zip(ws, sizes):
        N, K = w.shape[0] // n_expert, w.shape[1]
        per = w.nbytes // n_expert
        view = buf[at : at + size].view(n * N, K)
        _kernels().dequantize_into(w.raw[e0 * per : e1 * per], w.qtype, n * N, K, view)
        out.append(view.view(n, N, K))
        at += size
    return out


@functools.cache
def grouped_mm_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype in which this torch's grouped GEMM (torch._grouped_mm) runs on this device for
    activations of `dtype`: CUDA's takes bf16 only (so fp16 runs in bf16, of the same size), the
    CPU's (torch 2.13) any float; None where there is none."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    want = torch.bfloat16 if device_type == "cuda" and dtype.itemsize == 2 else dtype
    try:
        x = torch.ones(4, 16, dtype=want, device=device_type)
        w = torch.ones(2, 16, 16, dtype=want, device=device_type)
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([1, 4], dtype=torch.int32, device=device_type))
        return want if bool((y == 16).all()) else None
    except (RuntimeError, NotImplementedError, TypeError):
        return None
