"""bin/bench cpu-kernel: the CPU's matmul GB/s of the bytes it reads: the native kernel on GGUF
blocks (compute/cpu/qdot.c) against aten's int4 layout and a dequantized bf16 matmul."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from layerstream.compute.cpu import native
from layerstream.compute.cpu.packing import BlockRows, random_packed
from layerstream.coordinator.sigmask import start_thread_pools

from .flags import ints, shapes

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (768, 2048), (2048, 768)]  # [N, K]: the 8B's, the MoE experts'


def _time_s(fn, reps: int, stat: str) -> float:
    """The median of `reps` timed runs, or the best (on a shared machine, others only add time)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) if stat == "best" else statistics.median(ts)


def bench_cpu_kernel(args) -> None:
    """One row per (shape, path, type, tokens, threads): microseconds and GB/s of the bytes read."""
    lib = _lib(args.lib)
    if lib is None and not native.available():
        print("bin/bench cpu-kernel: the native kernel is not built here (no C compiler?); aten's rows only")
    types = [QT[t.strip()] for t in args.types.split(",")]
    threads_all = args.threads or sorted({1, max(1, torch.get_num_threads() // 2), torch.get_num_threads()})
    g = torch.Generator().manual_seed(0)
    isa = ("plain C", "AVX2", "AVX2+VNNI")[lib.qdot_isa()] if lib else native.isa()
    print(f"native: {isa}{f' ({args.lib})' if lib else ''}, levels {args.levels}; torch threads {torch.get_num_threads()}")
    print(f"{'N x K':>12} {'path':>12} {'T':>3} {'thr':>4} {'us':>9} {'GB/s':>7}")
    saved = torch.get_num_threads()
    try:
        for N, K in args.shapes or SHAPES:
            mats = []
            if lib or native.available():
                for qt in types:
                    if K % 256 == 0 or qt in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
                        raw = torch.randint(0, 256, (N * native.row_bytes(int(qt), K),), dtype=torch.uint8, generator=g)
                        mats.append((f"native {qt.name}", BlockRows(raw, int(qt), K)))
            if not args.native_only:
                mats.append(("aten int4", random_packed(N, K, g)))
            dense = (torch.randn(N, K, generator=g) / 64).bfloat16()
            for T in args.tokens:
                x = torch.randn(T, K, generator=g).bfloat16()
                for th in threads_all:
                    start_thread_pools(th)
                    for name, m in mats:
                        s = _time_s(lambda: m.matmul(x) if name.startswith("aten") else
                                    native.matmuls([m.job(x)], threads=th, levels=args.levels, lib=lib), args.reps, args.stat)
                        print(f"{N:>6}x{K:<5} {name:>12} {T:>3} {th:>4} {s * 1e6:>9.0f} {m.nbytes / s / 1e9:>7.1f}")
                    if args.native_only:
                        continue
                    s = _time_s(lambda: F.linear(x, dense), args.reps, args.stat)
                    print(f"{N:>6}x{K:<5} {'bf16 dense':>12} {T:>3} {th:>4} {s * 1e6:>9.0f} {dense.numel() * 2 / s / 1e9:>7.1f}")
    finally:
        torch.set_num_threads(saved)


def _lib(path: str | None):
    """--lib's build of qdot.c, loaded (None: this source's); a file that is not one is refused in one
    line. A relative path names a file here (the loader alone would search the library path)."""
    if not path:
        return None
    try:
        return native.load(Path(path).resolve())
    except (OSError, AttributeError) as e:  # (AttributeError: a library without qdot's functions)
        raise ValueError(f"--lib {path}: not a build of compute/cpu/qdot.c ({e})") from None


def bench_cpu_experts(args) -> None:
    """--experts: a layer's CPU experts as a decode pass calls them, once a layer (`--gap-ms` apart),
    each call on other experts of a working set larger than the host's caches: microseconds a call
    through the run's path (CpuExperts.compute) and through the native call alone, and GB/s."""
    from layerstream.compute.cpu.balancer import Balancer
    from layerstream.compute.cpu.calibrate import expert_layout, random_expert_layer
    from layerstream.compute.cpu.experts import SPIN_S, CpuExperts
    from layerstream.compute.expert_layout import expert_parts
    from layerstream.proto.timeline import Timeline

    n_ff, n_embd = (args.shapes or [(768, 2048)])[0]  # Qwen3-30B-A3B's
    lib = _lib(args.lib)  # (the native path's build; `run` is the run's)
    lay = expert_layout(128, n_ff, n_embd, (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K)))
    per = sum(p[1] for p in expert_parts(lay))
    pool = max(2 * max(args.experts), (256 << 20) // per)
    fake, host = random_expert_layer(lay, pool)
    parts = expert_parts(fake)  # (the pool's own offsets)
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1 << 62, torch.bfloat16, Timeline("bench", "t"))
    if not cpu.in_place(0, fake):
        print("bin/bench cpu-kernel --experts: the native kernel is not built here")
        return
    saved = torch.get_num_threads()
    # the kernel's threads kept awake between calls, as a decode step with a CPU share keeps them
    # (CpuExperts.set_step): without it both paths timed waking them, and the run's path its own thread too
    native.spin(SPIN_S)
    if lib is not None:
        lib.qdot_spin(int(SPIN_S * 1e9))
    try:
        for th in args.threads or [saved]:
            start_thread_pools(th)  # (both paths' threads: native._threads, the CPU share's)
            _experts_rows(args, cpu, fake, host, parts, per, pool, n_ff, n_embd, lib)
    finally:
        torch.set_num_threads(saved)
        native.spin(0.0)  # (0: the library's default)
        if lib is not None:
            lib.qdot_spin(0)


def _experts_rows(args, cpu, fake, host, parts, per: int, pool: int, n_ff: int, n_embd: int, lib) -> None:
    """bench_cpu_experts' rows at torch's threads now."""
    print(f"experts {n_ff}x{n_embd} (Q4_K gate and up, Q6_K down, {per / 1e6:.2f} MB each), {pool} cycled, "
          f"{torch.get_num_threads()} threads, calls {args.gap_ms:g} ms apart" + (f"; native: {args.lib}" if lib else ""))
    print(f"{'T':>3} {'experts':>7} {'path':>8} {'us a call':>10} {'us an expert':>13} {'GB/s':>6}"
          + ("  phases, us (median): " + " | ".join(("before",) + native.PHASES + ("after",))
             + "; the run's start() returned after, us" if args.phases else ""))
    g, nxt = torch.Generator().manual_seed(0), 0
    for T in args.tokens:
        h, w = torch.randn(T, n_embd, generator=g), torch.rand(T, 8, generator=g)
        for n in args.experts:
            for path in ("run", "native"):
                ts, spans, returned = [], [], []
                for rep in range(args.reps + 2):
                    experts = [(nxt + j) % pool for j in range(n)]
                    nxt = (nxt + n) % pool
                    ids = [experts[(t * 8 + c) % n] if c < min(n, 8) else -1 for t in range(T) for c in range(8)]
                    time.sleep(args.gap_ms / 1e3)
                    t0 = time.perf_counter()
                    if path == "run":  # (start() apart: its Python, against `before`, which adds the handoff)
                        finish = cpu.start(0, fake, host, experts, ids, h, w)
                        returned.append(time.perf_counter() - t0)
                        finish()
                    else:
                        base = host.ctypes.data
                        native.experts([tuple(base + t.slot_offset + e * p for t, p, *_ in parts) for e in experts],
                                       tuple(t.qtype for t, *_ in parts), n_ff, n_embd, h,
                                       native.pairs([np.arange(T)] * n, [np.ones(T, np.float32)] * n), lib=lib)
                    ts.append(time.perf_counter() - t0)
                    if args.phases:
                        spans.append(_spans(t0, ts[-1], lib))
                s = (min if args.stat == "best" else statistics.median)(ts[2:])
                # (GB/s in 3 figures: a tiny shape on a busy machine is well below 0.1)
                print(f"{T:>3} {n:>7} {path:>8} {s * 1e6:>10.0f} {s / n * 1e6:>13.0f} {n * per / s / 1e9:>6.3g}"
                      + (_phase_cells(spans[2:]) if args.phases else "")
                      + (f"; {statistics.median(returned[2:]) * 1e6:.0f}" if args.phases and returned else ""))


def _spans(t0: float, dt: float, lib) -> list[float] | None:
    """One call's phases in microseconds (NOTE [ an experts call's phases ] in qdot.c): from its
    start here to the kernel's, each of native.PHASES, and from the kernel's end to its return
    here; then the two rows dispatches' claimers. None where the build keeps none."""
    got = native.phases(lib)
    if got is None:
        return None
    t, claimers = got
    # (perf_counter and the kernel's CLOCK_MONOTONIC share no origin: the call's own start and end
    # come from time.monotonic_ns, read beside them, less the call's length)
    end = time.monotonic_ns() - (time.perf_counter() - t0 - dt) * 1e9
    start = end - dt * 1e9
    edges = [start, *t, end]
    return [(b - a) / 1e3 for a, b in zip(edges, edges[1:])] + list(claimers)


def _phase_cells(spans: list) -> str:
    """The runs' median of each phase (and of each dispatch's claimers)."""
    if not spans or any(s is None for s in spans):
        return "  (this build keeps no phases)"
    cols = [statistics.median(c) for c in zip(*spans)]
    return "  " + " | ".join(f"{v:.0f}" for v in cols[:-2]) + f"  (claimers {cols[-2]:.0f}, {cols[-1]:.0f})"


def add_parser(sub) -> None:
    p = sub.add_parser("cpu-kernel", help="the CPU's matmuls: native kernel on GGUF blocks vs aten int4 vs bf16")
    p.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q5_K,Q4_0", type=str.upper,
                   help="block types, comma separated (q4_k as Q4_K)")
    p.add_argument("-t", "--tokens", type=ints, default=[1, 8],
                   help="rows of x, comma separated (default 1,8)")
    p.add_argument("--threads", type=ints, default=None,
                   help="thread counts, comma separated (default 1, half and all of torch's; with --experts torch's)")
    p.add_argument("--shapes", type=shapes, default=None,
                   help="matrices N x K, comma separated (default the 8B's and the MoE experts'; e.g. 1536x576)")
    p.add_argument("--levels", type=int, choices=(1, 2), default=native.LEVELS,
                   help=f"x's precision in the native kernel: 1 (127 steps a block) or 2 (default {native.LEVELS})")
    p.add_argument("--lib", default=None,
                   help="time this build of qdot.c instead of this source's (e.g. an older revision's, for a before/after)")
    p.add_argument("--native-only", action="store_true", help="the native kernel's rows only (no aten int4, no bf16)")
    p.add_argument("--reps", type=int, default=10, help="timed runs per figure (default 10)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="the runs' median, or their best (a machine others use) (default median)")
    p.add_argument("--experts", type=ints, default=None,
                   help="time a layer's CPU experts instead, this many a call, comma separated (e.g. 1,2,4; "
                        "--shapes gives n_ff x n_embd, default 768x2048)")
    p.add_argument("--phases", action="store_true",
                   help="with --experts: where a call's time goes, the median of each phase (NOTE [ an experts "
                        "call's phases ] in compute/cpu/qdot.c)")
    p.add_argument("--gap-ms", type=float, default=1.0,
                   help="with --experts: milliseconds between calls, as a pass's layers space them (default 1)")
    p.set_defaults(func=lambda a: bench_cpu_experts(a) if a.experts else bench_cpu_kernel(a))
