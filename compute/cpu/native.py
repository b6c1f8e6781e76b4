"""The CPU's matmuls straight from GGUF blocks (qdot.c): built on first use with the system's C
compiler, cached by source and CPU under the user's cache folder, loaded with ctypes (which
releases the GIL during a call); where it cannot build or load, `library()` is None and callers
keep aten's int4 matmul or dequantized rows (NOTE [ native blocks ] in cpu/packing.py)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qdot.c")
HEADERS = (Path(__file__).with_name("qdot_lanes.h"),)  # (what qdot.c includes: part of the cache key)
NATIVE_TYPES = frozenset(int(t) for t in (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K))
MAX_TOKENS = 16  # rows of x a call is meant for (each weight group is unpacked once for all of them)
# x in int16 steps of 1/(127 * 256) of each block's largest value (levels 2: the precision of an
# int8 row and its int8 residual): the CPU's rows then agree with float32 to about 1e-5 (127
# steps, levels 1: about 0.5% a dot product, 2% of SmolLM2's largest logit with half its rows
# on the CPU; x in a byte a value, half the dots of levels 2: faster where the dots, not memory,
# bound a call, `bin/bench cpu-kernel --levels 1`)
LEVELS = 2
_BLOCK = {int(QT.Q4_0): (32, 18), int(QT.Q4_1): (32, 20), int(QT.Q8_0): (32, 34), int(QT.Q4_K): (256, 144),
          int(QT.Q5_K): (256, 176), int(QT.Q6_K): (256, 210)}


class Job(ctypes.Structure):
    """One matmul of a call (qdot.c's qdot_job)."""

    _fields_ = [("qtype", ctypes.c_int), ("w", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("x", ctypes.c_void_p), ("x_bf16", ctypes.c_int), ("T", ctypes.c_int64), ("y", ctypes.c_void_p)]


class Expert(ctypes.Structure):
    """One expert of a qdot_experts call: its gate's, up's and down's blocks, its tokens' rows and
    their weights."""

    _fields_ = [("w", ctypes.c_void_p * 3), ("n_tok", ctypes.c_int64), ("tok", ctypes.c_void_p),
                ("wt", ctypes.c_void_p)]


def row_bytes(qtype: int, K: int) -> int:
    """Bytes of one row of K values of `qtype`."""
    bk, bs = _BLOCK[qtype]
    return K // bk * bs


def cache_dir() -> Path:
    """Where built libraries are kept: the user's cache folder (XDG's rule), per user."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerstream" / "native"


def compiler() -> str | None:
    """The system's C compiler, or None."""
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_id() -> str:
    """What -march=native compiles for: the machine and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags.strip()}"


def _build(cc: str, out: Path, arch: tuple[list[str], ...] = (["-march=native"], [])) -> None:
    """Compile qdot.c into `out` atomically (a temporary name, then a rename: racing processes
    each build and the last rename wins, with identical bytes), with the first of `arch`'s flag
    lists that compiles (by default the host's vector paths, else the plain one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    # (no floating contraction: every path rounds alike, NOTE [ one rounding for every path ] in qdot.c)
    base = [cc, "-O3", "-ffp-contract=off", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lpthread", "-lm"]
    try:
        for extra in arch:
            r = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                os.replace(tmp, out)
                return
        raise OSError(f"{cc} failed: {r.stderr.strip()[-300:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path(cc: str) -> Path:
    """The cached library for this source, compiler and CPU."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for p in HEADERS:
        h.update(p.read_bytes())
    h.update(f"{cc}\0{_cpu_id()}".encode())
    return cache_dir() / f"qdot-{h.hexdigest()[:20]}.so"


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.qdot_run.argtypes = [ctypes.POINTER(Job), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.qdot_run.restype = ctypes.c_int
    lib.qdot_experts.argtypes = [ctypes.POINTER(Expert), ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_int]
    lib.qdot_experts.restype = ctypes.c_int
    lib.qdot_experts_start.argtypes = lib.qdot_experts.argtypes
    lib.qdot_experts_start.restype = ctypes.c_int
    lib.qdot_experts_routed_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.qdot_experts_routed_start.restype = ctypes.c_int
    lib.qdot_experts_wait.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.qdot_experts_wait.restype = ctypes.c_int
    if hasattr(lib, "qdot_experts_phases"):  # (an older build, `bin/bench cpu-kernel --lib`, has none)
        lib.qdot_experts_phases.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int)]
        lib.qdot_experts_phases.restype = None
    if hasattr(lib, "qdot_experts_post"):  # (likewise)
        lib.qdot_experts_post.argtypes = [ctypes.c_void_p]
        lib.qdot_experts_post.restype = None
    lib.qdot_spin.argtypes = [ctypes.c_int64]
    lib.qdot_spin.restype = None
    lib.qdot_isa.restype = ctypes.c_int
    lib.qdot_claimers.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """qdot.c built and loaded (once a process), or None where it cannot be (no compiler, a failed
    build or load): then the CPU keeps today's path, and says so once at debug level."""
    cc = compiler()
    if cc is None:
        log.debug("native CPU kernel: no C compiler found; the CPU share uses aten's int4 matmul")
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            _build(cc, path)
        return load(path)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("native CPU kernel unavailable (%s); the CPU share uses aten's int4 matmul", e)
        return None


def spin(seconds: float) -> None:
    """Keep the kernel's pool awake `seconds` after each call (0: its default, a few microseconds):
    for calls that come once a layer, whose workers would otherwise sleep between them."""
    lib = library()
    if lib is not None:
        lib.qdot_spin(int(seconds * 1e9))


PHASES = ("gather", "quantize", "gate+up", "SiLU", "quantize", "down", "sum")  # (NOTE [ an experts call's phases ])


def phases(lib: ctypes.CDLL | None = None) -> tuple[list[int], tuple[int, int]] | None:
    """The last experts call's clock at its start and at the end of each of PHASES (monotonic
    nanoseconds, 8 of them), and the workers that claimed a piece of its two rows dispatches; None
    where the build has no record of them."""
    lib = lib or library()
    if lib is None or not hasattr(lib, "qdot_experts_phases"):
        return None
    t, c = (ctypes.c_int64 * 8)(), (ctypes.c_int * 2)()
    lib.qdot_experts_phases(t, c)
    return list(t), (c[0], c[1])


def available() -> bool:
    """Whether the native kernel is built and loaded in this process."""
    return library() is not None


def isa() -> str:
    """The vector path the library was compiled with."""
    lib = library()
    return "none" if lib is None else ("plain C", "AVX2", "AVX2+VNNI")[lib.qdot_isa()]


def _threads(threads: int | None) -> int:
    return threads or torch.get_num_threads()


def matmuls(jobs: list[tuple[torch.Tensor, int, int, int, torch.Tensor]], threads: int | None = None,
            plain: bool = False, levels: int = LEVELS, lib: ctypes.CDLL | None = None) -> list[torch.Tensor]:
    """[x @ W.T for each (raw, qtype, N, K, x)] in one call (the rows of every job split across
    `threads`): raw the N rows' blocks (uint8, contiguous), x [T, K] float32 or bf16 on the host;
    each result [T, N] float32. plain: the C path only (the same bits as the vector ones); levels:
    x's precision (1 or 2, LEVELS); lib: another build of the kernel (tests), else library()."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the native CPU kernel is not available")
    arr = (Job * len(jobs))()
    keep, out = [], []
    for j, (raw, qtype, N, K, x) in enumerate(jobs):
        if qtype not in NATIVE_TYPES:
            raise ValueError(f"the native CPU kernel has no {QT(qtype).name} matmul")
        if raw.dtype != torch.uint8 or not raw.is_contiguous() or raw.numel() < N * row_bytes(qtype, K):
            raise ValueError(f"raw rows of {QT(qtype).name}: need {N * row_bytes(qtype, K)} contiguous bytes")
        x = x.reshape(-1, K)
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x = x.contiguous()
        y = torch.empty(x.shape[0], N, dtype=torch.float32)
        keep.append(x)
        out.append(y)
        arr[j] = Job(qtype, raw.data_ptr(), N, K, x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0],
                     y.data_ptr())
    rc = lib.qdot_run(arr, len(jobs), _threads(threads), int(plain), levels)
    if rc:
        raise ValueError(f"native CPU kernel refused the call (code {rc}: -1 type, -2 K not whole blocks, -3 memory)")
    return out


def linear(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, threads: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] float32, W the N rows of `qtype` blocks in `raw` (host bytes)."""
    return matmuls([(raw, qtype, N, K, x)], threads)[0].view(*x.shape[:-1], N)


class Pairs(NamedTuple):
    """A qdot_experts call's (token, weight) pairs, grouped by expert in the call's order: counts
    [n] int64 (each expert's pairs), tok [P] int64 (rows of x) and wt [P] float32."""

    counts: np.ndarray
    tok: np.ndarray
    wt: np.ndarray


def pairs(toks: list[np.ndarray], wts: list[np.ndarray]) -> Pairs:
    """Pairs from each expert's tokens (int64) and their weights (float32)."""
    for j, (tok, wt) in enumerate(zip(toks, wts, strict=True)):
        if len(tok) != len(wt):
            raise ValueError(f"expert {j}: {len(tok)} tokens and {len(wt)} weights")
    counts = np.array([len(t) for t in toks], dtype=np.int64)
    if not toks:
        return Pairs(counts, np.empty(0, np.int64), np.empty(0, np.float32))
    return Pairs(counts, np.concatenate(toks).astype(np.int64), np.concatenate(wts).astype(np.float32))


def experts(w, qtypes: tuple[int, int, int], n_ff: int, n_embd: int, x: torch.Tensor, got: Pairs,
            threads: int | None = None, levels: int = LEVELS, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A layer's experts in one call (NOTE [ a layer's experts in one call ] in qdot.c): [T, n_embd]
    float32, the sum over the experts e and their pairs (token t, weight a) of a *
    down(SiLU(gate(x[t])) * up(x[t])). w[e] (a sequence of 3-tuples, or an [n, 3] integer array):
    the host addresses of expert e's gate, up and down blocks (of `qtypes`; the caller keeps them
    alive); x [T, n_embd] on the host."""
    call = _ExpertsCall(w, qtypes, n_ff, n_embd, x, got, threads, levels, lib)
    call.check(call.lib.qdot_experts(*call.args))
    return call.out


def experts_start(w, qtypes: tuple[int, int, int], n_ff: int, n_embd: int, x: torch.Tensor, got: Pairs,
                  threads: int | None = None, levels: int = LEVELS, lib: ctypes.CDLL | None = None):
    """As experts(), started on the kernel's own thread (NOTE [ experts beside the device's work ] in
    qdot.c): returns `wait()`, which waits for it and returns (the sum, its start and end in
    time.monotonic_ns()'s clock). One call at a time."""
    call = _ExpertsCall(w, qtypes, n_ff, n_embd, x, got, threads, levels, lib)
    return _begin(call, lambda: call.lib.qdot_experts_start(*call.args))


def experts_routed_start(base: int, off: np.ndarray, per: np.ndarray, experts: np.ndarray, ids: np.ndarray,
                         wts: np.ndarray, qtypes: tuple[int, int, int], n_ff: int, n_embd: int, x: torch.Tensor,
                         threads: int | None = None, levels: int = LEVELS, lib: ctypes.CDLL | None = None,
                         post: tuple[torch.Tensor, torch.Tensor] | None = None):
    """As experts_start(), the kernel's thread making the experts' table (NOTE [ the router's pairs
    grouped by the kernel ] in qdot.c): `experts` (int64) of a layer whose expert e's gate, up and
    down start at base + off[m] + e * per[m] (off, per: [3] int64), and the router's output as it
    is, ids (int64) and wts (float32) [T, k] (pairs of other experts left out); x [T, n_embd].
    `post` (out, flag): the sum goes into `out` ([T, n_embd] float32, contiguous) and the call's end
    to `flag` (int32 [1]): 1 once `out` holds it, 3 where the call failed (NOTE [ the CPU's sum
    posted to the device ] in qdot.c)."""
    out = None if post is None else post[0]
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous() or out.shape != (ids.shape[0], n_embd)):
        raise ValueError(f"the posted sum needs [{ids.shape[0]}, {n_embd}] float32, contiguous")
    call = _Call(lib, qtypes, n_embd, x, (off, per, experts, ids, wts), out=out)
    if post is not None and not hasattr(call.lib, "qdot_experts_post"):
        raise RuntimeError("this build of the native CPU kernel cannot post a call's end (qdot_experts_post)")
    k = ids.shape[1]
    start = call.lib.qdot_experts_routed_start

    def begin() -> int:
        if post is not None:
            call.lib.qdot_experts_post(post[1].data_ptr())
        return start(base, off.ctypes.data, per.ctypes.data, experts.ctypes.data, len(experts), ids.ctypes.data,
                     wts.ctypes.data, k, call.types, n_ff, n_embd, call.x.data_ptr(), ids.shape[0],
                     call.out.data_ptr(), _threads(threads), levels)
    return _begin(call, begin)


def _begin(call, start):
    """A started call's `wait()` (experts_start's): a call left behind first waited for."""
    global _pending
    if _pending is not None:  # one left behind (a step that failed between start and wait): done first
        try:
            _pending()
        except ValueError:
            pass  # (its result was abandoned with its step)
    t = (ctypes.c_int64 * 2)()

    def wait() -> tuple[torch.Tensor, int, int]:
        global _pending
        if _pending is wait:  # (a second wait gives the same result)
            _pending = None
            call.rc = call.lib.qdot_experts_wait(t)  # (`call` holds what the kernel reads until now)
        call.check(call.rc)
        return call.out, t[0], t[1]

    call.check(start())
    _pending = wait
    return wait


_pending = None  # the wait() of the call started and not yet waited for (experts_start)
_TYPES: dict[tuple[int, ...], ctypes.Array] = {}  # qtypes -> their C array (a few a model)


def _types(qtypes) -> ctypes.Array:
    """The C array of an experts call's three block types (made once for each)."""
    types = _TYPES.get(qtypes := tuple(qtypes))
    if types is None:
        if any(q not in NATIVE_TYPES for q in qtypes):
            raise ValueError(f"the native CPU kernel has no {'/'.join(QT(q).name for q in qtypes)} experts")
        types = _TYPES[qtypes] = (ctypes.c_int * 3)(*qtypes)
    return types


class _Call:
    """An experts call's library, its x as the kernel reads it and its sum, and what else the kernel
    reads (`keep`), kept alive with it until its wait; a routed call's whole (experts_routed_start)."""

    def __init__(self, lib, qtypes, n_embd: int, x: torch.Tensor, keep: tuple = (), out: torch.Tensor | None = None):
        self.lib = lib = lib or library()
        if lib is None:
            raise RuntimeError("the native CPU kernel is not available")
        self.rc, self.types, self.keep = -7, _types(qtypes), keep  # (rc: a started call's code, once waited for)
        self.x = x.reshape(-1, n_embd).float().contiguous()
        self.out = torch.empty(self.x.shape[0], n_embd, dtype=torch.float32) if out is None else out

    @staticmethod
    def check(rc: int) -> None:
        if rc:
            raise ValueError(f"native CPU kernel refused the experts (code {rc}: -1 type, -2 K not whole blocks, "
                             "-3 memory, -4 a token outside x, -5 a call started and not waited for, -6 no thread, "
                             "-7 none started)")


class _ExpertsCall(_Call):
    """The arguments of a qdot_experts call, and what they point at, kept alive with them.

    The experts' table (qdot_expert: three addresses, a count and two addresses, each 8 bytes) is
    written by numpy as an [n, 6] int64 array, not as ctypes objects per expert: a call comes once
    a streamed layer, and the Python side's time grew with each expert of it (a batch's call holds
    dozens), where numpy's barely grows."""

    def __init__(self, w, qtypes, n_ff, n_embd, x, got: Pairs, threads, levels, lib):
        super().__init__(lib, qtypes, n_embd, x)
        x = self.x
        counts = np.ascontiguousarray(got.counts, dtype=np.int64)
        self.tok = tok = np.ascontiguousarray(got.tok, dtype=np.int64)
        self.wt = wt = np.ascontiguousarray(got.wt, dtype=np.float32)
        n = len(counts)
        if len(tok) != len(wt) or counts.sum() != len(tok) or (counts < 0).any():
            raise ValueError(f"{n} experts' {int(counts.sum())} pairs: {len(tok)} tokens and {len(wt)} weights")
        self.table = table = np.empty((n, 6), dtype=np.int64)
        table[:, :3] = np.asarray(w, dtype=np.int64).reshape(n, 3)
        table[:, 3] = counts
        first = np.cumsum(counts) - counts  # each expert's first pair
        table[:, 4] = tok.ctypes.data + 8 * first
        table[:, 5] = wt.ctypes.data + 4 * first
        self.args = (table.ctypes.data_as(ctypes.POINTER(Expert)), n, self.types, n_ff, n_embd, x.data_ptr(), x.shape[0],
                     self.out.data_ptr(), _threads(threads), levels)
