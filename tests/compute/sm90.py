"""Every Triton kernel of the CUDA decode path compiled for Hopper (sm_90) on a machine with no GPU.

Run as `python -m tests.compute.sm90 [CASE ...]` without TRITON_INTERPRET (the kernels must be
defined as compiled ones; tests/compute/test_sm90.py runs it in a child process). A driver that
names sm_90 and launches nothing stands in for CUDA's: each case calls the product's own wrapper
on CPU tensors of real decode shapes, so the wrapper picks the configuration it picks on CUDA
(qkernels.INTERPRET is False), and each launch is compiled by Triton and ptxas, then skipped.
The interpreter runs the kernels' arithmetic on the CPU but compiles nothing: a construct the
compiler refuses, or a type it cannot unify, showed first on a GPU machine. Prints one line a
case, `CASE ok KERNEL ...` or `CASE failed: ERROR`; exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests.compute.sm90: run without TRITON_INTERPRET=1 (it compiles the kernels)")

import torch  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnly:
    """Triton's active driver: names sm_90, device 0 and stream 0, and is never asked to launch."""

    target = GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list[str] = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    """JITFunction.run as a warm-up: compile (Triton's cache keeps it), never launch."""
    kernel = _RUN(self, *args, grid=grid, warmup=True, **kwargs)
    assert kernel is not None and kernel.asm.get("cubin"), f"{self.fn.__name__}: no cubin"
    COMPILED.append(self.fn.__name__)


_RUN = JITFunction.run
Q4_K, Q6_K, Q8_0 = int(QT.Q4_K), int(QT.Q6_K), int(QT.Q8_0)


def _blocks(qtype: int, N: int, K: int) -> torch.Tensor:
    from layerstream.compute.qkernels import geometry

    return torch.zeros(N * geometry(qtype, K)[2], dtype=torch.uint8)


def experts(dt):  # Qwen3-30B-A3B's experts at batch 1 and 8: moe_block's and graph B's calls
    from layerstream.compute import qgemv_grouped

    N, K, k = 768, 2048, 8
    parts = ((Q4_K, N, K), (Q4_K, N, K), (Q6_K, K, N))
    pool = torch.zeros(4 * 3_200_000, dtype=torch.uint8)
    for T in (1, 8):
        h, w = torch.zeros(T, K, dtype=dt), torch.rand(T, k)
        offs = torch.zeros(3, T * k, dtype=torch.int64)
        qgemv_grouped.experts(h, w, pool, offs, parts)
        qgemv_grouped.experts(h, w, pool, offs, parts, res=torch.zeros(T, K, dtype=dt), out=torch.empty(T, K, dtype=dt))
        qgemv_grouped.experts(h, w, pool, offs[0], parts, places=((1, 0), (1, -1 << 33), (1, 1 << 33)),
                              res=torch.zeros(T, K, dtype=dt))


def rope(dt):  # Qwen3's heads (32 query, 4 KV, 128 wide) with their norms; Llama's without
    from layerstream.compute import attn_kernels

    for T in (1, 8):
        q, k, v = (torch.zeros(T, n, 128, dtype=dt) for n in (32, 4, 4))
        cos = sin = torch.zeros(T, 64, dtype=dt)
        kc = vc = torch.zeros(T, 64, 4, 128, dtype=dt)
        rows = slots = torch.zeros(T, dtype=torch.int64)
        attn_kernels.rope_and_store(q, k, v, cos, sin, kc, vc, rows, slots, True, norms=(q[0, 0], k[0, 0], 1e-6))
        attn_kernels.rope_and_store(q, k, v, cos, sin, kc, vc, rows, slots, False)


def attention(dt):  # decode attention over a 4096-slot row, Llama-3.1-8B's heads, with and without int8 output
    from layerstream.compute import attn_kernels

    for T, L in ((1, 4096), (8, 700)):
        q = torch.zeros(T, 32, 128, dtype=dt)
        kc = vc = torch.zeros(T, L, 8, 128, dtype=dt)
        mask = torch.ones(T, L, dtype=torch.bool)
        rows = torch.arange(T)
        attn_kernels.decode_attention(q, kc, vc, mask, rows, L, 0.088)
        attn_kernels.decode_attention(q, kc, vc, mask, rows, L, 0.088, x8=True)


def norms(dt):
    from layerstream.compute import norm_kernels

    x, w = torch.zeros(1, 4096, dtype=dt), torch.ones(4096, dtype=dt)
    norm_kernels.rms_norm(x, w, 1e-5)
    norm_kernels.rms_norm(x, w, 1e-5, residual=torch.zeros(1, 4096, dtype=dt), x8=True)


def matmuls(dt):  # decode's matrices of an 8B (Q4_K, Q6_K, Q8_0) at batch 1 and 8: one, several, GLU, residual;
    from layerstream.compute import qkernels  # launched eagerly and as a graph captures them (split K there)

    for M, capturing in ((1, False), (1, True), (8, False), (8, True)):
        torch.cuda.is_current_stream_capturing = lambda: capturing
        x = torch.zeros(M, 4096, dtype=dt)
        for qt, N in ((Q4_K, 4096), (Q6_K, 14336), (Q8_0, 1024)):
            qkernels.matmul(x, _blocks(qt, N, 4096), qt, N, 4096)
        qkv = torch.zeros(3 * _blocks(Q4_K, 4096, 4096).numel(), dtype=torch.uint8)
        third = qkv.numel() // 3
        raws = [qkv[:third], qkv[third:third + third // 4], qkv[2 * third:2 * third + third // 4]]
        qkernels.matmul_many(x, raws, Q4_K, [4096, 1024, 1024], 4096)
        qkernels.matmul_many(x, [qkv[:third], qkv[third:2 * third]], Q4_K, [4096, 4096], 4096, glu=True)
        qkernels.matmul_many(x, [qkv[:third]], Q4_K, [4096], 4096, residual=torch.zeros(M, 4096, dtype=dt))


def others(dt):  # the rows kernel, tl.dot's tiles, other types' split kernel, a prompt's dequantization,
    from layerstream.compute import host_wait, qkernels  # the grouped kernel, the CPU share's post

    Q2_K, Q5_K = int(QT.Q2_K), int(QT.Q5_K)
    x = torch.zeros(64, 4096, dtype=dt)
    for M, qt in ((12, Q4_K), (12, Q6_K), (4, Q5_K), (12, Q5_K), (64, Q4_K), (1, Q2_K)):  # (small, rows, tl.dot's)
        qkernels.matmul(x[:M], _blocks(qt, 4096, 4096), qt, 4096, 4096)
    x = x[:12]
    for qt in (Q4_K, Q6_K, Q2_K):
        qkernels.dequantize_into(_blocks(qt, 1024, 4096), qt, 1024, 4096, torch.empty(1024, 4096, dtype=dt))
    qkernels.grouped_matmul(x, _blocks(Q2_K, 768, 4096), Q2_K, 768, 4096, torch.zeros(4, dtype=torch.int64),
                            torch.zeros(4, dtype=torch.int32))
    host_wait.add_posted(torch.zeros(1, dtype=torch.int32), torch.zeros(4096), torch.zeros(4096, dtype=dt))


def route(dt):  # Qwen3-MoE's router (8 of 128, renormalised) and Mixtral's float32 logits (2 of 8)
    from layerstream.compute import route_kernels

    for T in (1, 8):
        route_kernels.route(torch.zeros(T, 128, dtype=dt), 8, True)
        route_kernels.route(torch.zeros(T, 8, dtype=torch.float32), 2, False)


def control(dt):  # (not a product kernel: one the compiler must refuse, tests/compute/sm90_control.py)
    from tests.compute import sm90_control

    sm90_control.total(torch.zeros(64, dtype=torch.float32))


CASES = {f"{f.__name__}-{n}": (f, dt) for f in (experts, rope, attention, norms, matmuls, others, route)
         for n, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16))}
CONTROL = {"control": (control, torch.float32)}


def main(names: list[str]) -> int:
    driver.set_active(CompileOnly())
    JITFunction.run = _compile_only
    torch.cuda.is_current_stream_capturing = lambda: False  # (eager launches unless a case says otherwise)
    failed = 0
    for name in names or list(CASES):
        fn, dt = {**CASES, **CONTROL}[name]
        COMPILED.clear()
        try:
            fn(dt)
        except Exception as e:  # (each case's error on its line; the run goes on)
            failed += 1
            last = traceback.extract_tb(e.__traceback__)[-1]
            lines = [v.strip() for v in str(e).splitlines() if v.strip()]  # (a CompilationError ends on its cause)
            print(f"{name} failed: {type(e).__name__}: {lines[-1] if lines else ''} "
                  f"({os.path.basename(last.filename)}:{last.lineno})", flush=True)
            continue
        print(f"{name} ok {' '.join(sorted(set(COMPILED)))}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
