"""The stages of the streaming pipeline measured one by one, and the whole pipeline and server.

Every stage is a function of parsed arguments that prints a table of measured figures (median over
--reps); `add_stage_parsers(subparsers)` registers them as subcommands of bin/bench (benchmarks/bench.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from layerstream.compute.device import resolve_device
from layerstream.coordinator.sigmask import start_thread_pools
from layerstream.coordinator.supervisor import join_all, spawning
from layerstream.errors import LayerstreamError

from .flags import device_args, floats, ints, listed, model_args, names, pipeline_args, pipeline_config

GB = 1e9
FLOOR_GBS = 54.0  # host-to-GPU pinned copy on the lent H100 (BENCHMARKS.md, "Measured limits")


# -- shared helpers --------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return f"{model} ({torch.get_num_threads()} threads)"


def print_table(title: str, rows: list[dict], note: str = "") -> None:
    """Rows of {column: value} as an aligned text table."""
    print(title)
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for row in cells:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    if note:
        print(note)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _load() -> str:
    with contextlib.suppress(OSError):
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return ""


@contextlib.contextmanager
def model_for(args):
    """The model a stage measures: --model, a synthetic --shape written to a temp dir, or the default."""
    from layerstream.loader.default_model import default_model_path
    from layerstream.loader.gguf_index import open_model

    if getattr(args, "shape", None):
        from layerstream.loader.synth import write_shaped_model

        with tempfile.TemporaryDirectory(prefix="layerstream-bench-") as d:
            path = write_shaped_model(os.path.join(d, f"{args.shape}.gguf"), args.shape, args.layers, args.quant,
                                      progress=True)
            yield open_model(path)
    else:
        yield open_model(args.model or default_model_path())


def _device(args) -> torch.device:
    if getattr(args, "threads", None):
        start_thread_pools(args.threads)

    return resolve_device(args.device)


def _dtype(args, device):
    from layerstream.compute.device import resolve_dtype

    return resolve_dtype(args.dtype, device)


class _Timer:
    """Seconds of a region: CUDA events on a GPU (no host sync inside), perf_counter on the CPU."""

    def __init__(self, device: torch.device, stream=None):
        self.cuda = device.type == "cuda"
        self.stream = stream

    def __enter__(self):
        if self.cuda:
            self.e0, self.e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.e0.record(self.stream)
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.e1.record(self.stream)
            self.e1.synchronize()
            self.s = self.e0.elapsed_time(self.e1) / 1e3
        else:
            self.s = time.perf_counter() - self.t0


def _median_s(fn, reps: int, device: torch.device, stream=None, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        with _Timer(device, stream) as t:
            fn()
        times.append(t.s)
    return statistics.median(times)


@contextlib.contextmanager
def _collect_waits(backend, waits: list[float] | None):
    """Inside, the seconds each `backend.collect` takes (the host's wait for a step's ids) are
    appended to `waits` (None: nothing timed)."""
    if waits is None:
        yield
        return
    own, collect = vars(backend).get("collect"), backend.collect

    def timed():
        t0 = time.perf_counter()
        try:
            return collect()
        finally:
            waits.append(time.perf_counter() - t0)

    backend.collect = timed
    try:
        yield
    finally:
        if own is None:
            del backend.collect
        else:
            backend.collect = own


def time_decode(core, prompts: list[list[int]], steps: int, sync=lambda: None,
                waits: list[float] | None = None) -> list[float]:
    """Seconds of each of `steps` decode steps of len(prompts) sequences on an engine core, after
    their prefill (greedy, end of sequence ignored): the CLI's own path, sampling on the device,
    ids one step behind (core.py, NOTE [ one step behind ]), detokenizing and stop checks; the
    requests are aborted afterwards. A step's time runs from the last step's return to its own,
    which returns once its ids are on the host; `sync` (the device's) is called only after the
    last one: between steps it would drain the step in flight and time host and device in series.
    `waits`, where given, gets the host's wait for each timed step's ids (the backend's collect
    in that step: a decode step's, never the prefill's nor the drain's)."""
    from layerstream.bounds import MAX_WINDOW
    from layerstream.compute.sampling import SamplingParams

    # a sequence whose prefill ends first decodes while the others' prefill runs: room for those tokens
    params = SamplingParams(temperature=0, max_tokens=min(steps + 1 + sum(map(len, prompts)), MAX_WINDOW),
                            ignore_eos=True)
    names = [f"bench-{i}" for i in range(len(prompts))]
    for n, p in zip(names, prompts):
        core.add_request(n, p, params)
    started: set[str] = set()
    times = []
    try:
        while len(started) < len(names):  # prefill: until every request has its first token
            started |= {o.request_id for o in _step(core, names) if o.token_ids}
        t0 = time.perf_counter()
        with _collect_waits(core.backend, waits):
            for _ in range(steps):
                outs = _step(core, names)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                t0 = t1
                ran = len({o.request_id for o in outs if o.token_ids} & set(names))
                if ran < len(names):  # a step of fewer sequences would time another batch size
                    raise ValueError(f"a decode step ran {ran} of {len(names)} sequences (a step holds "
                                     f"{core.step_tokens} tokens, a sequence {core.ctx}): raise either")
    finally:
        for n in names:
            core.abort(n)
        while core.has_unfinished():  # reports the aborted requests, collects the step in flight
            core.step()
        sync()
    return times


def _step(core, names: list[str]) -> list:
    """core.step()'s outputs, raising where one of the timed requests `names` failed (NaN logits, a
    full context: the engine's one-line error). Such a request ends without a token, and the
    prefill loop waited for its first for ever."""
    outs = core.step()
    for o in outs:
        if o.finished and o.request_id in names:
            o.raise_for_failure("error", core.ctx)
    return outs


# -- reader: disk or page cache to staging -----------------------------------------------------------

_libc = None


def page_cache_fraction(path: str) -> float | None:
    """Share of the file's pages in the page cache (mincore), or None where it cannot be asked."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mmap.restype = ctypes.c_void_p
            _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
            _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return 1.0
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
                if _libc.mincore(addr, size, vec.ctypes.data) != 0:
                    return None
                return float((vec & 1).mean())
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def drop_cache(files) -> None:
    """Ask the kernel to drop the files' clean cached pages (POSIX_FADV_DONTNEED; not root-only)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _reader_worker(r: int, files, direct: bool, threads: int, jobs, results, map_threads: int = 0) -> None:
    """Reader r: per job (an arena and its share of the layers as (slot, ranges)), read each layer
    into its slot; report bytes and times. `map_threads`: map a new arena's pages into this process on
    that many threads from the reads' start, beside them (the time ends with the reads; the mapping is
    joined before the next job): whether a reader should (a page staging made is still missing from the
    reader's own page tables; NOTE [ populating the arena ])."""
    import threading

    from layerstream.loader.arena import Arena
    from layerstream.loader.reader import LayerReader
    from layerstream.proto.signals import ignore_stop_signals

    ignore_stop_signals()  # (the bench stops its readers; a group's Ctrl-C printed each one's traceback)
    arenas: dict[str, Arena] = {}
    try:
        with LayerReader(files, direct, threads) as rd:
            while (job := jobs.get()) is not None:
                desc, share = job
                new = desc.name not in arenas
                if new:
                    arenas[desc.name] = Arena.from_wire(desc)
                arena, mapper = arenas[desc.name], None
                t0 = time.monotonic()
                if new and map_threads:
                    mapper = threading.Thread(target=arena.populate, args=(map_threads,), daemon=True)
                    mapper.start()
                n = 0
                for slot, ranges in share:
                    with arena.slot_view(slot) as view:
                        n += rd.read_into(ranges, view)
                t1 = time.monotonic()
                if mapper is not None:
                    mapper.join()
                results.put((r, n, t0, t1))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as data
        results.put((r, -1, repr(e), 0.0))
    finally:
        for a in arenas.values():
            a.close()


def bench_reader(args) -> list[dict]:
    """cold and warm: each reader reads its layers into one slot of its own, again and again (the
    page cache, or the drive, to memory already mapped); fill: every layer into a slot of its own in
    a new arena, as the first pass fills the host cache (the slots' pages are new: allocated as
    they are written)."""
    from layerstream.loader.arena import Arena
    from layerstream.loader.layout import layer_layouts
    from layerstream.loader.reader import default_threads

    with model_for(args) as index:
        layouts = layer_layouts(index)
        n = args.readers
        threads = args.threads or max(2, default_threads() // n)
        slot_bytes = max(lay.nbytes for lay in layouts)
        arena = Arena.create(n, slot_bytes)
        ctx = mp.get_context("spawn")
        jobs = [ctx.Queue() for _ in range(n)]
        results = ctx.Queue()
        procs = [ctx.Process(target=_reader_worker, args=(r, index.files, args.direct, threads, jobs[r], results,
                                                          args.map_threads),
                             daemon=True) for r in range(n)]

        def one_pass(into: Arena | None = None) -> tuple[int, float]:
            for r in range(n):
                if into is None:  # reader r's layers, one after another into its slot r
                    jobs[r].put((arena.describe(), [(r, lay.ranges()) for lay in layouts[r::n]]))
                else:  # layer i into slot i
                    jobs[r].put((into.describe(), [(i, layouts[i].ranges()) for i in range(r, len(layouts), n)]))
            got = []
            while len(got) < n:  # (a reader killed answers nothing: its death is watched for, not waited out)
                try:
                    got.append(results.get(timeout=0.5))
                except queue.Empty:
                    dead = next((r for r, p in enumerate(procs) if p.exitcode is not None), None)
                    if dead is not None:
                        try:  # (one that failed and ended put its error first)
                            got.append(results.get(timeout=1.0))
                            continue
                        except queue.Empty:
                            raise LayerstreamError(f"reader {dead} died (exit code {procs[dead].exitcode}) during "
                                                   "its reads") from None
            bad = [g for g in got if g[1] < 0]
            if bad:
                raise LayerstreamError(f"reader {bad[0][0]} failed: {bad[0][2]}")
            return sum(g[1] for g in got), max(g[3] for g in got) - min(g[2] for g in got)

        populate_s = []

        def fill_pass(populate: bool) -> tuple[int, float]:
            with Arena.create(len(layouts), slot_bytes) as fresh:
                if populate:  # as the staging process does at start (NOTE [ populating the arena ])
                    t0 = time.monotonic()
                    fresh.populate(default_threads())
                    populate_s.append(time.monotonic() - t0)
                return one_pass(fresh)

        rows, cold_cached = [], []
        try:
            # (the group's Ctrl-C is the bench's alone; its readers ignore it: NOTE [ SIGINT while a child starts ])
            with spawning():  # (the pipeline's own: the resource tracker first, whose start unblocked SIGINT)
                for p in procs:
                    p.start()
            for mode in args.modes:
                times, nbytes = [], 0
                for _ in range(args.reps):
                    if mode == "cold":
                        drop_cache(index.files)
                        cold_cached.append(statistics.fmean(
                            f if (f := page_cache_fraction(x)) is not None else float("nan") for x in index.files))
                    elif not times:
                        one_pass()  # warm the page cache (and the readers)
                    nbytes, dt = fill_pass(mode == "populated") if mode in ("fill", "populated") else one_pass()
                    times.append(dt)
                dt = statistics.median(times)
                rows.append({"mode": mode, "readers": n, "threads": threads, "map": args.map_threads,
                             "io": "O_DIRECT" if args.direct else "buffered",
                             "GB": nbytes / GB, "s": dt, "GB/s": nbytes / dt / GB,
                             "ms/layer": dt / len(layouts) * 1e3, "reps": args.reps})
        finally:
            for q in jobs:
                q.put(None)
            started = [p for p in procs if p.pid is not None]  # (not those stopped before they started)
            join_all(started, 10)  # (10 s in all: each reader's own 10 s added up)
            for p in started:
                if p.is_alive():
                    p.kill()
                    p.join()
            arena.close()
            arena.unlink()
        notes = []
        if cold_cached:
            cached = statistics.fmean(cold_cached)
            verdict = ("looks cold" if cached < 0.05 else
                       "NOT cold: the kernel kept the pages (tmpfs, or dirty/locked pages; drop caches needs root)")
            if cached != cached:  # nan
                verdict = "page-cache residency unknown (mincore failed)"
            notes.append(f"cold = after posix_fadvise(DONTNEED): {cached:.0%} of the file still cached before "
                         f"reading, {verdict}")
        notes.append("fill = every layer into a new arena's own slot (the host cache's first fill)")
        if populate_s:
            t = statistics.median(populate_s)
            notes.append(f"populated = the same after the arena's pages were made on {default_threads()} threads in "
                         f"{t:.3f} s ({len(layouts) * slot_bytes / t / GB:.2f} GB/s), not counted")
        print_table(f"reader: {os.path.basename(index.path)} ({len(layouts)} layers), disk/page cache -> staging "
                    f"arena ({_load()})", rows, "; ".join(notes) + f"; median of {args.reps}")
    return rows


# -- transfer: staging to device ----------------------------------------------------------------------

def bench_transfer(args) -> list[dict]:
    from layerstream.loader.arena import Arena

    device = _device(args)
    if args.size_mb:
        size = int(args.size_mb * 2**20)
    elif args.model or args.shape:
        with model_for(args) as index:
            from layerstream.loader.layout import layer_layouts

            size = max(lay.nbytes for lay in layer_layouts(index))
    else:
        size = 512 * 2**20
    n = args.slots
    rows = []
    with Arena.create(n, size) as arena:
        for i in range(n):
            arena.slot_array(i)[:] = i + 1  # touch every page
        hosts = [torch.from_numpy(arena.slot_array(i)[:size]) for i in range(n)]
        total = n * size
        if device.type == "cuda":
            rows += _transfer_cuda(args, device, arena, hosts, size)
        else:
            local = torch.empty(size, dtype=torch.uint8)

            def copy():
                for h in hosts:
                    local.copy_(h)

            dt = _median_s(copy, args.reps, device)
            rows.append({"source": "shm arena", "path": "CPU memcpy (the CPU pipeline's copy stage)",
                         "MB": size / 2**20, "slots": n, "s": dt, "GB/s": total / dt / GB, "reps": args.reps})
        hosts.clear()  # the arena's memory is unmapped when it closes: no view may outlive it
    print_table(f"transfer: staging -> {device_name(device)} ({_load()})", rows,
                f"{n} slots of {size / 2**20:.1f} MiB per timed pass; median of {args.reps}")
    return rows


def _transfer_cuda(args, device, arena, hosts, size) -> list[dict]:
    n = len(hosts)
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    cudart = torch.cuda.cudart()
    base = arena.slot_address(0)
    err = cudart.cudaHostRegister(base, arena.nbytes, 0)
    if int(err) != 0:
        raise LayerstreamError(f"cudaHostRegister of the arena failed with CUDA error {int(err)}")
    rows = []

    def time_copies(srcs, label, path, to_host=False):
        def run():
            with torch.cuda.stream(side):
                for s in srcs:
                    if to_host:
                        s.copy_(dev, non_blocking=True)
                    else:
                        dev.copy_(s, non_blocking=True)
        dt = _median_s(run, args.reps, device, side)
        rows.append({"source": label, "path": path, "MB": size / 2**20, "slots": len(srcs), "s": dt,
                     "GB/s": len(srcs) * size / dt / GB, "reps": args.reps})

    try:
        time_copies(hosts, "shm arena", "H2D cudaHostRegister, side stream")
        time_copies(hosts, "shm arena", "D2H cudaHostRegister, side stream", to_host=True)
    finally:
        cudart.cudaHostUnregister(base)
    pinned = [torch.empty(size, dtype=torch.uint8).pin_memory() for _ in range(min(n, 2))]
    time_copies(pinned, "torch pin_memory", "H2D, side stream")
    del pinned
    pageable = [torch.ones(size, dtype=torch.uint8)]
    time_copies(pageable, "pageable", "H2D, side stream")
    return rows


# -- dequant: quantized bytes to weights on the device --------------------------------------------------

def bench_dequant(args) -> list[dict]:
    from gguf import GGMLQuantizationType as QT

    from layerstream.compute.dequant import dequantize
    from layerstream.compute.weights import layer_weights
    from layerstream.loader.layout import layer_layouts

    device = _device(args)
    dtype = _dtype(args, device)
    with model_for(args) as index:
        layouts = layer_layouts(index)
        picked = sorted(set(range(min(args.sample_layers, len(layouts)))) | {max(range(len(layouts)),
                                                                                 key=lambda i: layouts[i].nbytes)})
        raws = {}
        for i in picked:
            buf = np.zeros(layouts[i].nbytes, dtype=np.uint8)
            for t in layouts[i].tensors:
                buf[t.slot_offset : t.slot_offset + t.nbytes] = index.tensor_bytes(index.layers[i][t.name])
            raws[i] = torch.from_numpy(buf).to(device)
        rows = []
        by_type: dict[int, list] = {}
        for i in picked:
            for t in layouts[i].tensors:
                by_type.setdefault(t.qtype, []).append((i, t))
        for qt, ts in sorted(by_type.items()):
            def run(ts=ts):
                for i, t in ts:
                    dequantize(raws[i][t.slot_offset : t.slot_offset + t.nbytes], t.qtype, t.shape, t.name, dtype)
            dt = _median_s(run, args.reps, device)
            nb = sum(t.nbytes for _, t in ts)
            nvals = sum(int(np.prod(t.shape)) for _, t in ts)
            rows.append({"what": QT(qt).name, "tensors": len(ts), "MB in": nb / 1e6, "ms": dt * 1e3,
                         "GB/s in": nb / dt / GB, "GB/s out": nvals * dtype.itemsize / dt / GB, "reps": args.reps})
        per_layer = []
        for i in picked:
            dt = _median_s(lambda i=i: layer_weights(raws[i], layouts[i], dtype), args.reps, device)
            per_layer.append((dt, layouts[i].data_nbytes))
        dt = statistics.median(d for d, _ in per_layer)
        nb = statistics.median(b for _, b in per_layer)
        rows.append({"what": "whole layer", "tensors": len(layouts[picked[0]].tensors), "MB in": nb / 1e6,
                     "ms": dt * 1e3, "GB/s in": nb / dt / GB, "GB/s out": "", "reps": args.reps})
        print_table(f"dequant: {os.path.basename(index.path)} layers {picked} on {device_name(device)}, "
                    f"to {str(dtype).split('.')[-1]} ({_load()})", rows,
                    f"whole layer: median over the layers of each one's median ms; "
                    f"{len(layouts)} layers -> {dt * len(layouts) * 1e3:.1f} ms per pass of dequantization")
    return rows


# -- qmatmul: matmuls on GGUF blocks ----------------------------------------------------------------------

QMATMUL_SHAPES = {  # name -> [N, K] of one layer's matrices and the head
    "llama-3.1-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)],
    "llama-3.1-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "tiny": [(64, 256)],  # for a run on the CPU under Triton's interpreter
}
QMATMUL_INNER = 8  # calls per timed region (one launch alone is near the launch latency)


def _kernel_time(fn, reps: int, device: torch.device) -> float:
    """Seconds of fn's kernels alone: captured once in a CUDA graph and replayed (launch costs
    out); on the CPU, fn timed as it is."""
    if device.type != "cuda":
        return _median_s(fn, reps, device, warmup=1)
    fn()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _median_s(g.replay, reps, device, warmup=2)


CONFIGS = ("BMxBNxWARPSxSPLITS, gemv:MRxBNxKBxWARPS, rows:MRxBNxKBxWARPS or small:MPxBNxWARPSxSTAGESxSPLITS, "
           "of whole numbers from 1, the block sizes and warps powers of two")


def _kernel_config(text: str) -> tuple:
    """A --configs entry: BMxBNxWARPSxSPLITS for the split-K kernel, or KIND:AxBx.. for another
    of qkernels.matmul's configurations (gemv:1x1x8x1, gemv8:1x1x8x1, rows:1x2x4x2, small:16x64x4x2x4)."""
    kind, _, dims = text.strip().rpartition(":")
    sizes = {"": 4, "gemv": 4, "gemv8": 4, "rows": 4, "small": 5}  # numbers each kind takes
    blocks = {"": 3, "gemv": 4, "gemv8": 4, "rows": 4, "small": 3}  # of them, the leading block sizes and warps
    try:
        values = tuple(int(v) for v in dims.split("x"))
    except ValueError:
        values = ()
    if len(values) != sizes.get(kind, -1) or min(values, default=0) < 1 or \
            any(v & (v - 1) for v in values[: blocks[kind]]):  # (Triton's blocks and warps: powers of two)
        raise ValueError(f"--configs {text!r}: write {CONFIGS}")
    return (kind, *values) if kind else values


def _kernel_configs(text: str) -> list[tuple]:
    """--configs' type: its entries (_kernel_config), read as the flag is (a bad one had been the
    stage's exit 1 once it had found its device); an empty value: none, the dispatch's own."""
    return listed(text, _kernel_config, CONFIGS, "16x32x4x1,gemv:1x1x8x1") if text else []


def _config_name(cfg: tuple | None) -> str:
    """A configuration as --configs spells it ("auto": the dispatch's)."""
    if cfg is None:
        return "auto"
    kind = f"{cfg[0]}:" if isinstance(cfg[0], str) else ""
    return kind + "x".join(str(v) for v in cfg[1 if kind else 0:])


def bench_qmatmul(args) -> list[dict]:
    """Fused dequant-matmul against dequantize-into-scratch + cuBLAS, per type, shape and batch."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    from layerstream.compute import qkernels

    device = _device(args)
    if device.type != "cuda":  # (Triton's kernels: on a CPU it failed with Triton's "0 active drivers")
        raise ValueError(f"qmatmul times the Triton kernels on a CUDA device; there is none here (--device {args.device})")
    dtype = _dtype(args, device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    configs = args.configs or [None]
    for tname in args.types.split(","):
        qt = QT[tname]
        qk, ts = GGML_QUANT_SIZES[qt]
        for N, K in QMATMUL_SHAPES[args.shape_set]:
            nbytes = N * K // qk * ts
            raws = []
            for _ in range(args.buffers):  # rotate buffers: the L2 (50 MB) must not hold the weights
                r = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
                blocks = r.view(-1, ts)
                for o in {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q6_K: (208,)}.get(qt, (0, 2)):
                    blocks[:, o:o + 2] = torch.full((len(blocks),), 0.01, dtype=torch.float16).view(torch.uint8).view(-1, 2)
                raws.append(r.to(device))
            scratch = torch.empty(N, K, dtype=dtype, device=device)
            for M in args.batch:
                x = torch.randn(M, K, generator=gen).to(device, dtype)
                def dq_run():
                    for j in range(QMATMUL_INNER):
                        qkernels.dequantize_into(raws[j % len(raws)], int(qt), N, K, scratch)
                        torch.nn.functional.linear(x, scratch)
                t_dq = _kernel_time(dq_run, args.reps, device) / QMATMUL_INNER
                for cfg in configs:
                    def fused_run(cfg=cfg):
                        for j in range(QMATMUL_INNER):
                            qkernels.matmul(x, raws[j % len(raws)], int(qt), N, K, config=cfg)
                    t_e = _median_s(fused_run, args.reps, device, warmup=2) / QMATMUL_INNER
                    t_f = _kernel_time(fused_run, args.reps, device) / QMATMUL_INNER
                    rows.append({"type": tname, "N": N, "K": K, "M": M, "config": _config_name(cfg),
                                 "fused us": t_f * 1e6, "fused GB/s": nbytes / t_f / GB, "eager us": t_e * 1e6,
                                 "dequant+mm us": t_dq * 1e6, "faster": "fused" if t_f < t_dq else "dequant+mm"})
    print_table(f"qmatmul: {args.shape_set} matrices on {device_name(device)}, {str(dtype).split('.')[-1]} "
                f"({_load()})", rows, "us: GPU time per call, replayed from a CUDA graph (on CUDA); eager us: "
                "launched one by one from Python; GB/s counts the quantized bytes read once; median of --reps")
    return rows


# -- compute: the layers' forward with weights resident -------------------------------------------------

def bench_compute(args) -> list[dict]:
    from layerstream.compute.block import layer_forward
    from layerstream.compute.device import weights_form
    from layerstream.compute.step_meta import SeqStep, build_step_meta, rope_inv_freq
    from layerstream.compute.weights import ResidentLayers

    device = _device(args)
    dtype = _dtype(args, device)
    with model_for(args) as index:
        hp = index.hparams
        held = list(range(min(args.sample_layers, hp.n_layer)))
        weights = ResidentLayers(index, device, dtype, layers=held, quantized=weights_form(device)).weights
        rf = index.globals.get("rope_freqs.weight")
        inv_freq = rope_inv_freq(hp, None if rf is None else torch.from_numpy(
            np.array(index.tensor_bytes(rf)).view(np.float32).copy()))
        batches = sorted(set(args.batch))
        ctx = max(args.tokens, args.decode_context + 1)
        kshape = (max(batches), ctx, hp.attn.n_head_kv, hp.attn.head_dim)
        K = [torch.zeros(kshape, dtype=dtype, device=device) for _ in held]
        V = [torch.zeros(kshape, dtype=dtype, device=device) for _ in held]
        g = torch.Generator().manual_seed(0)
        rows = []

        def measure(phase: str, seqs: list, n_tok: int, B: int) -> None:
            meta = build_step_meta(hp, inv_freq, seqs, device, dtype)
            x0 = (torch.randn(n_tok, hp.n_embd, generator=g) * 0.5).to(device, dtype)

            @torch.inference_mode()
            def run():
                x = x0
                for i in range(hp.n_layer):  # the held layers in turn, standing for all n_layer
                    j = i % len(held)
                    x = layer_forward(hp, weights[held[j]], x, meta, K[j], V[j])
                if not torch.isfinite(x).all():
                    raise LayerstreamError("non-finite activations in the compute benchmark")

            dt = _median_s(run, args.reps, device)
            rows.append({"phase": phase, "batch": B, "tokens": n_tok, "ms/layer": dt / hp.n_layer * 1e3,
                         "ms/pass": dt * 1e3, "tokens/s": n_tok / dt, "reps": args.reps})

        T = args.tokens
        measure("prompt", [SeqStep(0, [0] * T, list(range(T)), list(range(T)), list(range(T)))], T, 1)
        L = args.decode_context
        for B in batches:
            seqs = [SeqStep(b, [0], [L], [L], list(range(L + 1))) for b in range(B)]
            measure("decode", seqs, B, B)
        print_table(f"compute: {os.path.basename(index.path)} ({hp.n_layer} layers, {len(held)} held resident and "
                    f"cycled) on {device_name(device)}, {str(dtype).split('.')[-1]} ({_load()})", rows,
                    f"decode: one new token per sequence after {L} cached; tokens/s for all {hp.n_layer} layers, "
                    f"without the output head; median of {args.reps}")
    return rows


# -- pipeline: the whole streaming pipeline --------------------------------------------------------------

def decode_sequence(batch: int, passes: int) -> int:
    """Tokens of bench_pipeline's longest decode sequence: its prompt (4), the tokens it decodes
    while the batch's other prompts prefill (step budget below the batch's prompts), then the
    timed or warm passes (flags.model_problem checks it against the model's context)."""
    return 4 + 4 * batch + passes


def bench_pipeline(args) -> list[dict]:
    from layerstream.coordinator.engine import Engine, EngineConfig
    from layerstream.loader.layout import layer_layouts

    batches = sorted(set(args.batch))
    with model_for(args) as index:
        ctx = max(args.tokens, decode_sequence(max(batches), max(args.reps, args.warm_passes)),
                  GENERATE_PROMPT + args.generate_tokens) + 8
        cfg = EngineConfig(model=index.path, device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=max(batches),
                           prefill_chunk=max(args.tokens, *batches))  # (a decode step holds every sequence)
        pcfg = pipeline_config(args, direct=args.direct, trace=bool(args.trace))
        rows = []
        with Engine.open(cfg, pcfg, index=index) as engine:
            backend = engine.backend
            plan = backend.plan
            print(f"plan: {plan.describe()}\nplan, device memory: {plan.breakdown()}", flush=True)
            streamed = sum(lay.nbytes for i, lay in enumerate(layer_layouts(index)) if i not in set(plan.resident))
            floor = streamed / (args.floor_gbs * GB)
            V = index.hparams.n_vocab
            rng = np.random.default_rng(0)

            def ids(k: int) -> list[int]:
                return rng.integers(0, V, size=k).tolist()

            def row(phase: str, B: int, n_tok: int, times: list[float]) -> None:
                dt = statistics.median(times)
                rows.append({"phase": phase, "batch": B, "tokens": n_tok, "s/pass": dt, "tokens/s": n_tok / dt,
                             "streamed GB": streamed / GB, "GB/s": streamed / dt / GB, "floor s": floor,
                             "x floor": dt / floor if floor else "-", "reps": len(times)})  # (-: nothing streams)

            core = engine.core
            time_decode(core, [ids(4) for _ in range(max(batches))], 1)  # warm-up: every layer loaded once
            for B in batches:
                if args.warm_passes:  # untimed: e.g. the CPU share's balancer times its choices
                    time_decode(core, [ids(4) for _ in range(B)], args.warm_passes)
                row("decode", B, B, time_decode(core, [ids(4) for _ in range(B)], args.reps))
            if args.generate_tokens > 1:  # run-pipeline's own path on the same plan: the text as the CLI streams it
                mean, gaps = time_generate(engine, ids(GENERATE_PROMPT), args.generate_tokens)
                row("generate", 1, 1, [mean])
                print(generate_line(mean, gaps), flush=True)
            times = time_prompt(core, lambda k: [k % V] + ids(args.tokens - 1), args.reps,
                                bool(args.warm_passes)) if args.tokens else []
            if times:
                row("prompt", 1, args.tokens, times)
            snaps = backend.collect_stats()
            print_table(f"pipeline: {os.path.basename(index.path)} ({index.hparams.n_layer} layers) on "
                        f"{device_name(resolve_device(args.device))} ({_load()})", rows,
                        f"plan: {plan.describe()}\nfloor = streamed bytes / {args.floor_gbs:g} GB/s; "
                        f"median of the timed passes after a warm-up")
            print(backend.stats_table(snaps))
            if args.trace:
                print(backend.write_trace(args.trace, snaps))
    return rows


def time_prompt(core, prompt: Callable[[int], list[int]], reps: int, warm: bool) -> list[float]:
    """Seconds of each of `reps` prefills (its first token sampled) on an engine core, the k-th of
    `prompt(k)`: prompts that share no first token, since a prompt whose prefix a freed row holds
    prefills only the rest (core.py, NOTE [ prefix reuse ]); `warm`: one untimed first, where its
    kernels compile on a machine's first prompt (the decode rows' warm passes never run a
    prompt-sized step)."""
    from layerstream.compute.sampling import SamplingParams

    times = []
    for k in range(reps + warm):
        t0 = time.perf_counter()
        core.add_request("bench-prompt", prompt(k), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        core.run_to_completion()
        if k >= warm:
            times.append(time.perf_counter() - t0)
    return times


GENERATE_PROMPT = 39  # tokens: the prompt of BENCHMARKS.md's run-pipeline command


def time_generate(engine, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """Seconds a token of one greedy generation of `n` tokens through run-pipeline's own Turn (the
    engine core, sampling on the device, detokenizing, the text pieces), as its --stats decode rate
    counts them: from the first sampled token to the last; and the seconds between each two
    outputs that sampled tokens (one a token at batch 1 without drafts)."""
    from layerstream.compute.sampling import SamplingParams
    from layerstream.coordinator.turn import Turn

    turn = Turn(engine, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for _ in turn.pieces():
        pass
    r = turn.rates
    return r.decode_s / max(r.sampled - 1, 1), list(np.diff(turn.stamps))


def generate_line(mean: float, gaps: list[float], head: int = 32) -> str:
    """The generate row's spread: its mean rate (what --stats prints) beside the median interval's
    (what the decode rows take) and the mean of its first `head` intervals and of the rest, which
    tell a slow start (the device cache and the copies ahead settling) from a slow steady state."""
    if not gaps:
        return "run-pipeline's path: fewer than two outputs timed"

    def rate(xs) -> str:
        return f"{1 / statistics.fmean(xs):.1f}" if len(xs) else "-"

    return (f"run-pipeline's path, {len(gaps)} intervals: mean {1 / mean:.1f} tokens/s (--stats' rate), median "
            f"{1 / statistics.median(gaps):.1f}, first {min(head, len(gaps))} {rate(gaps[:head])}, the rest "
            f"{rate(gaps[head:])}; slowest {max(gaps) * 1e3:.1f} ms, fastest {min(gaps) * 1e3:.1f} ms")


# -- serve: the HTTP server against the bare engine -------------------------------------------------

def _server_clients(port: int, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[float], int]:
    """Stream one completion per prompt, all at once, with the standard library's HTTP client (one
    thread a client). Returns wall seconds, each client's time to its first streamed chunk, and
    the tokens asked for (end of sequence is ignored, so each client gets all of them)."""
    import http.client
    import json
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()

    def one(ids: list[int]) -> tuple[float, int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": True})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise LayerstreamError(f"the server answered {resp.status}: {resp.read()[:200]!r}")
        first = None
        for line in resp:
            if first is None and line.startswith(b"data: "):
                first = time.perf_counter() - t0
            if line.startswith(b"data: {\"error"):
                raise LayerstreamError(f"the server failed a request: {line[:200]!r}")
        conn.close()
        return first if first is not None else float("nan")

    with ThreadPoolExecutor(len(prompts)) as pool:
        ttft = list(pool.map(one, prompts))
    return time.perf_counter() - t0, ttft, len(prompts) * max_tokens


def _bare_engine(core, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[float], int]:
    """The same requests through the engine core directly: wall seconds, times to first token, tokens."""
    from layerstream.compute.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(f"bench-{i}", p, params)
    first: dict[str, float] = {}
    n = 0
    while core.has_unfinished():
        for o in core.step():
            n += len(o.token_ids)
            if o.token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter() - t0
    return time.perf_counter() - t0, list(first.values()), n


def _check_port(port: int) -> None:
    """ValueError where 127.0.0.1:`port` cannot be bound (another server there would be timed)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ValueError(f"127.0.0.1:{port} cannot be bound for the bench's server ({e.strerror}); "
                             "give another --port") from None


def _median_run(runs: list[tuple[float, list[float], int]]) -> tuple[float, list[float], int]:
    """Of rounds (wall seconds, times to first token, tokens), the one of median wall time."""
    return sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]


def _routes(seed: int, passes: int, layers: int, E: int, k: int, batch: int, skew: float):
    """The experts each token of each layer chooses, [layers, batch, k], a pass at a time: top-k
    without replacement from a per-layer popularity ~ 1 / rank^skew (0: uniform), by the Gumbel
    top-k trick. (Drawn whole, a large --passes or -b ran the host out of memory: a traceback.
    A pass at a time the generator's draws come in the same order, so the trace is the same.)"""
    rng = np.random.default_rng(seed)
    logp = np.stack([-skew * np.log1p(rng.permutation(E)) for _ in range(layers)])  # [layers, E]
    for _ in range(passes):
        keys = logp[:, None, :] + rng.gumbel(size=(layers, batch, E))
        yield np.argpartition(-keys, k - 1, axis=-1)[..., :k]


def bench_experts(args) -> list[dict]:
    """Hit rates of the expert cache's policies on routing traces of a shape's experts: the
    bookkeeping of the real ExpertCache over tiny stand-in experts, no device involved."""
    from gguf import GGMLQuantizationType as QT

    from layerstream.compute.expert_layout import EXPERT_TENSORS
    from layerstream.compute.expert_policy import EXPERT_POLICIES
    from layerstream.compute.experts import ExpertCache
    from layerstream.loader.layout import LayerLayout, SlotTensor
    from layerstream.loader.synth import resolve_shape
    from layerstream.proto.timeline import Timeline

    shape = resolve_shape(args.shape, args.layers)
    L, E, k = shape.n_layer, shape.n_expert, shape.n_expert_used
    if not E:
        raise ValueError(f"--shape {shape.name} has no experts")
    lay = LayerLayout(0, tuple(SlotTensor(n, int(QT.F32), (E, 1, 1), j * 4 * E, 4 * E, "-", 0)
                               for j, n in enumerate(EXPERT_TENSORS)), 12 * E)
    host = np.zeros(12 * E, dtype=np.uint8)
    rows = []
    print(f"experts: {shape.name} ({L} layers, {k} of {E} experts a token); {args.passes} passes, the hit rate "
          f"of the second half", flush=True)
    print(f"{'routing':>10} {'batch':>5} {'cache':>6} " + " ".join(f"{p:>6}" for p in EXPERT_POLICIES), flush=True)
    for skew in args.skew:
        for b in args.batch:
            caches = {(share, policy): ExpertCache(round(share * L * E) * 12, torch.device("cpu"), torch.float32,
                                                   False, Timeline("bench", "experts"), policy)
                      for share in args.shares for policy in EXPERT_POLICIES}
            for step, chosen in enumerate(_routes(0, args.passes, L, E, k, b, skew)):  # (one pass drawn for all)
                fetched = [np.unique(chosen[i]).tolist() for i in range(L)]
                for cache in caches.values():
                    if step == args.passes // 2:
                        cache.hits = cache.misses = 0
                    for i in range(L):
                        cache.fetch(i, fetched[i], lay, host)
            for share in args.shares:
                rates = {p: caches[share, p].hits / max(caches[share, p].hits + caches[share, p].misses, 1)
                         for p in EXPERT_POLICIES}
                routing = "uniform" if not skew else f"zipf {skew:g}"
                rows.append({"routing": routing, "batch": b, "cache share": share} | rates)
                print(f"{routing:>10} {b:>5} {share:>6.0%} " + " ".join(f"{rates[p]:>6.1%}" for p in EXPERT_POLICIES),
                      flush=True)
    return rows


def bench_serve(args) -> list[dict]:
    import threading

    import uvicorn

    from layerstream.coordinator.engine import Engine, EngineConfig
    from layerstream.coordinator.server import Server

    clients = sorted(set(args.clients))
    rows = []
    _check_port(args.port)  # (before the model loads: a port in use is one line at once)
    with model_for(args) as index:
        ctx = args.prompt_tokens + args.tokens + 8
        # prompts are chunked as run-pipeline chunks them (the plan's step, at most 512 tokens), so
        # one pass prefills the prompts of many clients
        cfg = EngineConfig(model=index.path, device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=max(clients))
        pcfg = None
        if not args.resident:
            pcfg = pipeline_config(args)
        with Engine.open(cfg, pcfg, index=index) as engine:
            V = index.hparams.n_vocab
            rng = np.random.default_rng(0)
            time_decode(engine.core, [rng.integers(0, V, size=4).tolist()], 1)  # warm-up: every layer once

            def row(path: str, C: int, wall: float, ttft: list[float], n: int) -> dict:
                r = {"clients": C, "path": path, "tokens": n, "wall s": wall, "tokens/s": n / wall,
                     "TTFT median s": statistics.median(ttft), "TTFT max s": max(ttft)}
                rows.append(r)
                print(f"measured: {r}", flush=True)  # a run cut short keeps what it measured
                return r

            def prompts(C: int) -> list[list[int]]:
                """Fresh prompts for each round: a round reusing the KV an earlier one left in its
                rows (core.py, NOTE [ prefix reuse ]) would skip the prefill it is meant to time."""
                return [rng.integers(0, V, size=args.prompt_tokens).tolist() for _ in range(C)]

            def served(C: int) -> tuple[float, list[float], int]:
                """One round through the HTTP server, started for it: the engine belongs to the
                server's worker thread until it stops."""
                http = uvicorn.Server(uvicorn.Config(Server(engine, "bench", max_queue=C).app, host="127.0.0.1",
                                                     port=args.port, log_level="warning", lifespan="on"))
                thread = threading.Thread(target=http.run, daemon=True)
                thread.start()
                while not http.started and thread.is_alive():
                    time.sleep(0.05)
                if not http.started:  # (its bind failed: whatever else holds the port must not be timed)
                    raise ValueError(f"the bench's server did not start on 127.0.0.1:{args.port} (in use?); "
                                     "give another --port")
                try:
                    return _server_clients(args.port, prompts(C), args.tokens)
                finally:
                    http.should_exit = True
                    thread.join(timeout=60)

            for C in clients:
                # untimed, to the full length through both paths: the first round of a batch size
                # may capture graphs for the longer contexts it reaches, and the server samples in
                # graphs of its own; timed once each after a 2-token round, the two paths differed
                # by factors either way (BENCHMARKS.md, R7)
                _bare_engine(engine.core, prompts(C), args.tokens)
                served(C)
                runs: dict[str, list] = {"engine": [], "server": []}
                for _ in range(max(1, args.reps)):  # the two paths alternated, so a drift touches both
                    runs["engine"].append(_bare_engine(engine.core, prompts(C), args.tokens))
                    runs["server"].append(served(C))
                bare = row("engine", C, *_median_run(runs["engine"]))
                r = row("server", C, *_median_run(runs["server"]))
                r["vs engine"] = r["tokens/s"] / bare["tokens/s"]
            name = os.path.basename(index.path)
            print_table(f"serve: {name} ({index.hparams.n_layer} layers) on {device_name(resolve_device(args.device))} "
                        f"({_load()})", rows,
                        f"{args.prompt_tokens}-token prompts, {args.tokens} greedy tokens each (end of sequence "
                        f"ignored); TTFT counts from the moment all clients start; each row the round of median "
                        f"wall time of {max(1, args.reps)}, the two paths alternated after an untimed round of each")
    return rows


@contextlib.contextmanager
def _fd2_quiet():
    """The process's standard error (file descriptor 2, where C++ libraries write) to the null device
    meanwhile: for a library's chatter only, never around work that can fail."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def bench_kernels(args) -> None:
    """The kernels a decode step of the in-VRAM engine launches and the device time each takes
    (torch.profiler; on the CPU, the operators and their CPU time), at batch 1 after a prompt of
    --context tokens. Steps are timed back to back (the host's work overlaps the device's), and
    reading each token back before the next step, as the engine does."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    from layerstream.compute.step_meta import SeqStep
    from layerstream.coordinator.engine import Engine, EngineConfig

    with model_for(args) as index:
        cfg = EngineConfig(model=index.path, device=args.device, dtype=args.dtype,
                           ctx=args.context + 2 * args.steps + 16, max_seqs=1)  # 3 + 2 x steps + 10 decoded
        with Engine.open(cfg, index=index) as eng:
            r, V, n = eng.backend.runner, eng.hparams.n_vocab, args.context  # the bare runner: no sampling
            cuda = r.device.type == "cuda"
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            r.step([SeqStep(0, [(7 * i) % V for i in range(n)], list(range(n)), list(range(n)), list(range(n)))], "none")
            pos = n

            def decode(k: int, each: bool = False) -> None:
                nonlocal pos
                for _ in range(k):
                    logits = r.step([SeqStep(0, [pos % V], [pos], [pos], list(range(pos + 1)))], "last")
                    if each:  # as the engine does: the token is read back before the next step
                        logits.argmax(-1).tolist()
                    pos += 1

            decode(3)
            sync()
            t0 = time.perf_counter()
            decode(args.steps)
            sync()
            dt = (time.perf_counter() - t0) / args.steps
            t0 = time.perf_counter()
            decode(args.steps, each=True)
            dt_each = (time.perf_counter() - t0) / args.steps
            # the CLI's path: the engine core, sampling on the device, detokenizing (a fresh prefill of
            # the same context in the same row), timed from its second decode step on
            waits: list[float] = []  # each decode step's wait for its ids: the device's time left over
            core_s = statistics.median(time_decode(eng.core, [[(7 * i) % V for i in range(n)]], args.steps, sync,
                                                   waits))
            wait_s = statistics.median(waits)
            eng.core.lookahead = False  # the same, each step's ids read before the next step is built
            turn_s = statistics.median(time_decode(eng.core, [[(7 * i) % V for i in range(n)]], args.steps, sync))
            eng.core.lookahead = True
            k = 10
            prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
            with _fd2_quiet():  # (the profiler's own log lines, printed at its start and stop, not the table's)
                prof.start()
            try:
                decode(k)
                sync()
            finally:
                with _fd2_quiet():
                    prof.stop()
    agg: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                a = agg[e.name]
                a[0], a[1] = a[0] + 1, a[1] + e.device_time
    else:
        for e in prof.key_averages():
            agg[e.key] = [e.count, e.self_cpu_time_total]
    total = sum(us for _, us in agg.values())
    print(f"kernels: {os.path.basename(index.path)} on {device_name(r.device)}, {str(r.dtype).split('.')[-1]}, "
          f"decode batch 1 after {n} tokens: {dt * 1e3:.2f} ms a token ({1 / dt:.1f} tokens/s) back to back, "
          f"{dt_each * 1e3:.2f} ms ({1 / dt_each:.1f} tokens/s) reading each token back (the difference: "
          f"host time not overlapped); {core_s * 1e3:.2f} ms ({1 / core_s:.1f} tokens/s) through the engine "
          f"core (sampling on the device, ids one step behind, detokenizing: the CLI's path, median; the "
          f"host waited {wait_s * 1e3:.2f} ms of it for the ids, so its own work took {(core_s - wait_s) * 1e3:.2f} ms), "
          f"{turn_s * 1e3:.2f} ms ({1 / turn_s:.1f} tokens/s) with each step's ids read before the next")
    print(f"{'device' if cuda else 'CPU'} time {total / k / 1e3:.2f} ms a token in "
          f"{sum(c for c, _ in agg.values()) / k:.0f} {'kernels' if cuda else 'operators'}")
    print(f"{'us/token':>9} {'calls/token':>11}  name")
    for name, (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{us / k:9.1f} {c / k:11.1f}  {name[:100]}")


def add_stage_parsers(sub) -> None:
    """Register the stages (reader, transfer, dequant, qmatmul, compute, kernels, pipeline, serve, experts) on `sub`."""
    p = sub.add_parser("reader", help="disk or page cache to the staging arena: cold, warm and first-fill GB/s")
    model_args(p, reps=3)
    p.add_argument("--readers", type=int, default=1, help="reader processes (default 1)")
    p.add_argument("--map-threads", type=int, default=0,
                   help="threads each reader maps a new arena's pages into its own page tables on, beside its "
                        "reads (the pipeline's readers do not; default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of each reader (default: run-pipeline's, half the cores shared among the readers)")
    p.add_argument("--modes", default="cold,warm,fill,populated", type=names("cold", "warm", "fill", "populated",
                                                                            what="passes"),
                   help="which passes to time, of cold, warm, fill, populated (default all)")
    p.add_argument("--direct", action="store_true", help="read with O_DIRECT")
    p.set_defaults(func=bench_reader)

    p = sub.add_parser("transfer", help="staging arena to the device (pinned, pageable); a memcpy on the CPU")
    model_args(p)
    device_args(p)
    p.add_argument("--slots", type=int, default=4, help="arena slots copied per timed pass (default 4)")
    p.add_argument("--size-mb", type=float, default=None,
                   help="slot size in MiB (default: the --model's largest layer, else 512)")
    p.set_defaults(func=bench_transfer)

    p = sub.add_parser("dequant", help="dequantize whole layers on the device: GB/s per quant type, ms per layer")
    model_args(p)
    device_args(p)
    p.add_argument("--sample-layers", type=int, default=2, help="first layers measured, plus the largest (default 2)")
    p.set_defaults(func=bench_dequant)

    p = sub.add_parser("qmatmul", help="matmuls on GGUF blocks: fused kernel against dequantize + cuBLAS")
    device_args(p)
    p.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q5_K", type=str.upper,
                   help="block types, comma separated (q4_k as Q4_K)")
    p.add_argument("--shape-set", choices=sorted(QMATMUL_SHAPES), default="llama-3.1-8b", help="matrix shapes")
    p.add_argument("-b", "--batch", type=ints, default=[1, 2, 4, 8, 16, 32, 64], help="activation rows")
    p.add_argument("--configs", default="", type=_kernel_configs,
                   help="variants of the fused kernel to time, comma separated: BMxBNxWARPSxSPLITS (split-K) or "
                        "KIND:AxBx.. (gemv:1x1x8x1; qkernels.matmul's configurations)")
    p.add_argument("--buffers", type=int, default=4, help="weight copies rotated between calls (default 4)")
    p.add_argument("--reps", type=int, default=20, help="timed calls; the median is reported (default 20)")
    p.set_defaults(func=bench_qmatmul)

    p = sub.add_parser("compute", help="the layers' forward with weights resident: prompt and decode")
    model_args(p)
    device_args(p)
    p.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("-b", "--batch", type=ints, default=[1, 8, 32], help="decode batch sizes (default 1,8,32)")
    p.add_argument("--decode-context", type=int, default=512, help="cached tokens per decoding sequence (default 512)")
    p.add_argument("--sample-layers", type=int, default=4,
                   help="layers held resident and cycled through to stand for every layer (default 4)")
    p.set_defaults(func=bench_compute)

    p = sub.add_parser("kernels", help="the kernels of a resident decode step and the device time of each")
    model_args(p)
    device_args(p)
    p.add_argument("--context", type=int, default=300, help="prompt tokens before decoding (default 300)")
    p.add_argument("--steps", type=int, default=50, help="decode steps timed (default 50)")
    p.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    p.set_defaults(func=bench_kernels)

    p = sub.add_parser("pipeline", help="the whole streaming pipeline: seconds per pass against the PCIe floor")
    model_args(p)
    device_args(p)
    p.add_argument("--tokens", type=int, default=512, help="prompt length timed after decode (0: none; default 512)")
    p.add_argument("-b", "--batch", type=ints, default=[1], help="decode batch sizes (default 1)")
    pipeline_args(p)
    p.add_argument("--direct", action="store_true", help="read with O_DIRECT")
    p.add_argument("--floor-gbs", type=float, default=FLOOR_GBS,
                   help=f"host-to-device GB/s of the floor (default {FLOOR_GBS:g}, the H100 pinned copy)")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome trace / Perfetto JSON of the timed passes")
    p.add_argument("--warm-passes", type=int, default=0,
                   help="untimed decode passes at each batch size before the timed ones, and one untimed "
                        "prompt before the timed prompts (default 0)")
    p.add_argument("--generate-tokens", type=int, default=256,
                   help="tokens of the `generate` row: one generation through run-pipeline's own path, after a "
                        f"{GENERATE_PROMPT}-token prompt, on the same plan (0: none; default 256)")
    p.set_defaults(func=bench_pipeline)

    p = sub.add_parser("serve", help="the HTTP server under N concurrent streaming clients, beside the bare engine")
    model_args(p, reps=3)
    device_args(p)
    pipeline_args(p)
    p.add_argument("--resident", action="store_true", help="the single-process engine instead of the pipeline")
    p.add_argument("-c", "--clients", type=ints, default=[1, 8], help="concurrent clients (default 1,8)")
    p.add_argument("-p", "--prompt-tokens", type=int, default=32, help="prompt length of each client (default 32)")
    p.add_argument("--tokens", type=int, default=16, help="tokens each client generates (default 16)")
    p.add_argument("--port", type=int, default=18080, help="port on 127.0.0.1 (default 18080)")
    p.set_defaults(func=bench_serve)

    p = sub.add_parser("experts", help="hit rates of the expert cache's policies (lfu, lru) on routing traces")
    from layerstream.loader.synth import SHAPES

    moe = sorted(n for n, shape in SHAPES.items() if shape.n_expert)  # (a dense one was the stage's exit 1, as a bogus one)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=moe,
                   help=f"a mixture-of-experts shape: {', '.join(moe)} (default qwen3-30b-a3b)")
    p.add_argument("--layers", type=int, default=None, help="streamed layers (default: the shape's)")
    p.add_argument("-b", "--batch", type=ints, default=[1, 8], help="tokens a step (default 1,8)")
    p.add_argument("--shares", type=floats, default=[0.02, 0.1, 0.25, 0.5],
                   help="cache sizes as shares of every expert (default 0.02,0.1,0.25,0.5)")
    p.add_argument("--skew", type=floats, default=[0.0, 1.0],
                   help="routing skew: expert popularity ~ 1 / rank^skew, 0 uniform (default 0,1)")
    p.add_argument("--passes", type=int, default=100, help="decode passes simulated (default 100)")
    p.set_defaults(func=bench_experts)

