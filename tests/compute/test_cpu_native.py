"""The native CPU kernel (compute/cpu/qdot.c) against float64 over gguf-py's dequantizer, each
type it reads, its paths (plain C, token by token, tokens in lanes; builds for other vector
instruction sets) giving the same bits, and the fallback where it cannot build."""

import ctypes
import platform
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, quants

from layerstream.compute.cpu import native, packing

TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


@pytest.fixture(autouse=True)
def _needs_compiler():
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")


def rows(qt: QT, n: int, K: int, seed: int) -> np.ndarray:
    """n rows of blocks: gguf-py's quantizer where it has one, else random bytes with small scales
    (every bit pattern of the values, the high bits included)."""
    rng = np.random.default_rng(seed)
    if qt in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
        return quants.quantize(rng.standard_normal((n, K)).astype(np.float32), qt)
    bs = {QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}[qt]
    raw = rng.integers(0, 256, (n, K // 256, bs), dtype=np.uint8)
    at = slice(208, 210) if qt == QT.Q6_K else slice(0, 4)
    k = at.stop - at.start
    raw[..., at] = (rng.random((n, K // 256, k // 2)) * 0.02).astype(np.float16).view(np.uint8).reshape(n, K // 256, k)
    return raw.reshape(n, -1)


def exact_x(T: int, K: int, g: torch.Generator) -> torch.Tensor:
    """x the kernel's int8 blocks hold exactly: integers in -127..127 times 2**-6, each block of 32
    reaching 127 (so its scale is 2**-6)."""
    q = torch.randint(-127, 128, (T, K), generator=g)
    q[:, ::32] = 127
    return q.float() * 2.0**-6


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("T", [1, 3, 7, 16])
def test_each_type_matches_float64_over_gguf_dequantize(qt, T):
    N, K = 67, 768  # (an odd N; K three super-blocks, and 24 blocks of 32: a remainder after groups of 8)
    raw = rows(qt, N, K, seed=int(qt) + T)
    w = torch.from_numpy(quants.dequantize(raw, qt).reshape(N, K)).double()
    g = torch.Generator().manual_seed(T)
    flat = torch.from_numpy(raw.reshape(-1))
    x = exact_x(T, K, g)
    want = x.double() @ w.T
    for plain in (False, True):  # the vector path and the plain C one (aarch64's)
        got = native.matmuls([(flat, int(qt), N, K, x)], threads=2, plain=plain)[0]
        assert got.shape == (T, N) and got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() < 2e-6 * want.abs().max().item(), plain
    # any x: one int8 row a token, its rounding bounds the error (half a step of amax / 127 a
    # value); two (the residual's too), about 127 times less
    xg = torch.randn(T, K, generator=g)
    want = xg.double() @ w.T
    bound = (w.abs().sum(1) * xg.abs().view(T, -1, 32).amax(-1).max() / 254).max().item()  # worst case a row
    one = (native.matmuls([(flat, int(qt), N, K, xg)], levels=1)[0].double() - want).abs().max().item()
    two = (native.matmuls([(flat, int(qt), N, K, xg)], levels=2)[0].double() - want).abs().max().item()
    assert one < bound and one < 2e-2 * want.abs().max().item()
    assert two < bound / 100 and two < 1e-4 * want.abs().max().item()
    # bf16 x: the same as its float32 values
    xb = xg.bfloat16()
    assert torch.equal(native.linear(xb, flat, int(qt), N, K), native.linear(xb.float(), flat, int(qt), N, K))


def same_bits_cases(lib=None):
    """(what, got, want) for each type and count of tokens: the vector paths of `lib` (else this
    host's build) against this host's plain C path, both levels (levels 1: the token path's dots
    of x's low bytes alone, then x in lanes of bytes). The extremes of the bytes dotted: Q8_0's
    rows of -128 (no quantizer writes it) and of 127, against a token's blocks of x all at its
    largest value, all one sign and in alternate signs."""
    for qt in TYPES:
        N, K = 37, (576 if qt in (QT.Q4_0, QT.Q4_1, QT.Q8_0) else 512)  # (a row's last group 2 blocks of 8)
        r = rows(qt, N, K, seed=int(qt))
        if qt == QT.Q8_0:
            r.reshape(N, K // 32, 34)[0, :, 2:] = 0x80
            r.reshape(N, K // 32, 34)[1, :, 2:] = 127
        raw = torch.from_numpy(r.reshape(-1))
        for T in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33):  # (the token path, lanes of 8 and 16, a chunk and more)
            x = torch.randn(T, K, generator=torch.Generator().manual_seed(T))
            x[0, :32] = 3.0
            x[0, 32:64:2], x[0, 33:64:2] = 3.0, -3.0
            for levels in (1, 2):
                got = native.matmuls([(raw, int(qt), N, K, x)], threads=2, levels=levels, lib=lib)[0]
                want = native.matmuls([(raw, int(qt), N, K, x)], threads=1, plain=True, levels=levels)[0]
                yield f"{qt.name} T={T} levels={levels}", got, want


def test_every_path_and_every_count_of_tokens_gives_the_same_bits():
    """NOTE [ one rounding for every path ] in qdot.c: the plain, token and lanes paths, and a row
    alone or among others of its call."""
    for what, got, want in same_bits_cases():
        assert torch.equal(got, want), what
    qt, N, K = QT.Q4_K, 37, 512
    raw = torch.from_numpy(rows(qt, N, K, seed=3).reshape(-1))
    x = torch.randn(33, K)
    for levels in (1, 2):
        alone = torch.cat([native.matmuls([(raw, int(qt), N, K, x[t : t + 1])], levels=levels)[0] for t in range(33)])
        for T in (2, 5, 7, 9, 16, 33):
            assert torch.equal(native.matmuls([(raw, int(qt), N, K, x[:T])], levels=levels)[0], alone[:T]), (T, levels)


# other vector paths than this host's: (the compiler's flags, the CPU flags they need to run)
ARCHES = {
    "AVX2 without VNNI": (["-march=haswell"], {"avx2", "fma", "f16c"}),
    "AVX-VNNI": (["-march=haswell", "-mavxvnni"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "AVX-512 without VNNI": (["-march=skylake-avx512"], {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                          "avx512dq", "avx512cd"}),
    "plain C": (["-march=x86-64"], set()),
}


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next((ln for ln in f if ln.startswith("flags")), ":").split(":", 1)[1].split())


@pytest.mark.parametrize("arch", list(ARCHES))
def test_builds_for_other_vector_paths_give_the_same_bits(arch, tmp_path):
    """AVX2's saturating byte multiply-adds, the 8-lane path for more than 8 tokens, AVX-512
    without VNNI: the bits of this host's plain C path."""
    flags, needs = ARCHES[arch]
    if platform.machine() not in ("x86_64", "AMD64") or not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run a build for {arch}")
    cc, probe = native.compiler(), tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([cc, *flags, "-o", str(tmp_path / "probe"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{cc} does not take {' '.join(flags)}")
    path = tmp_path / "qdot.so"
    native._build(cc, path, arch=(flags,))  # (any failure here is the source's)
    lib = native.load(path)
    assert lib.qdot_isa() == {"plain C": 0, "AVX2 without VNNI": 1, "AVX-512 without VNNI": 1}.get(arch, 2)
    for what, got, want in same_bits_cases(lib):
        assert torch.equal(got, want), what


def test_one_call_of_several_jobs_and_threads_gives_each_jobs_rows():
    K = 512
    g = torch.Generator().manual_seed(1)
    x1, x2 = exact_x(2, K, g), exact_x(2, K, g)
    jobs, want = [], []
    for i, (qt, n, x) in enumerate([(QT.Q4_K, 33, x1), (QT.Q6_K, 7, x1), (QT.Q8_0, 130, x2)]):
        raw = rows(qt, n, K, seed=i)
        jobs.append((torch.from_numpy(raw.reshape(-1)), int(qt), n, K, x))
        want.append(x.double() @ torch.from_numpy(quants.dequantize(raw, qt).reshape(n, K)).double().T)
    for threads in (1, 2, 5):
        for got, ref in zip(native.matmuls(jobs, threads=threads), want):
            assert (got.double() - ref).abs().max().item() < 2e-6 * ref.abs().max().item()


def test_pieces_claimed_by_any_threads_give_the_bits_of_one_thread():
    """NOTE [ pieces claimed, not handed out ] in qdot.c: calls of many pieces (rows cut at 4, jobs
    ending inside a piece), of more threads than pieces, after a larger pool and from two Python
    threads at once (ctypes lets both into the library; one call runs at a time) give the bits of
    one thread."""
    import threading

    K = 512
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, K, generator=g)
    jobs = [(torch.from_numpy(rows(qt, n, K, seed=n).reshape(-1)), int(qt), n, K, x)
            for qt, n in ((QT.Q4_K, 150), (QT.Q6_K, 3), (QT.Q8_0, 1021), (QT.Q4_K, 17))]
    want = native.matmuls(jobs, threads=1)
    for threads in (16, 2, 7, 64, 3):  # (1,191 rows: 74 pieces at most; 64 threads: more than the pieces)
        assert all(torch.equal(a, b) for a, b in zip(native.matmuls(jobs, threads=threads), want)), threads
    bad = []

    def loop(threads):
        for _ in range(40):
            if not all(torch.equal(a, b) for a, b in zip(native.matmuls(jobs, threads=threads), want)):
                bad.append(threads)

    ts = [threading.Thread(target=loop, args=(n,)) for n in (4, 9)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not bad and not any(t.is_alive() for t in ts)


def test_bad_calls_say_what_was_wrong():
    raw = torch.zeros(10 * 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no IQ4_XS"):
        native.linear(torch.zeros(1, 256), raw, int(QT.IQ4_XS), 10, 256)
    with pytest.raises(ValueError, match="contiguous bytes"):
        native.linear(torch.zeros(1, 256), raw[:100], int(QT.Q4_K), 10, 256)
    with pytest.raises(ValueError, match="K not whole blocks"):
        native.linear(torch.zeros(1, 128), raw, int(QT.Q4_K), 10, 128)


def test_a_build_lands_atomically_in_its_cache_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path / "cache")
    path = native.library_path(native.compiler())
    assert path.parent == tmp_path / "cache" and path.name.startswith("qdot-")
    native._build(native.compiler(), path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # (no temporary left)
    assert ctypes.CDLL(str(path)).qdot_isa() in (0, 1, 2)


def test_without_a_compiler_the_cpu_keeps_atens_int4_and_dequantized_rows(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "compiler", lambda: None)
    native.library.cache_clear()
    try:
        with caplog.at_level("DEBUG", logger=native.__name__):
            assert not native.available() and native.isa() == "none"
        assert [r.levelname for r in caplog.records] == ["DEBUG"]
        raw = torch.from_numpy(rows(QT.Q4_K, 64, 256, 0).reshape(-1))
        assert isinstance(packing.cpu_matrix(raw, int(QT.Q4_K), 64, 256, torch.float32), packing.PackedRows)
        raw6 = torch.from_numpy(rows(QT.Q6_K, 64, 256, 0).reshape(-1))
        assert isinstance(packing.cpu_matrix(raw6, int(QT.Q6_K), 64, 256, torch.float32), packing.DenseRows)
        assert packing.split_types() == packing.INT4_TYPES and packing.pack_ratio() > 1
        with pytest.raises(RuntimeError, match="not available"):
            native.linear(torch.zeros(1, 256), raw, int(QT.Q4_K), 64, 256)
        # a compiler that fails: the same fallback
        monkeypatch.setattr(native, "compiler", lambda: "/bin/false")
        monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
        native.library.cache_clear()
        assert not native.available()
    finally:
        native.library.cache_clear()  # (the next caller loads it again, the compiler restored)


def test_a_forked_child_computes_with_its_own_threads():
    """The pool's workers do not survive fork(): a child starts its own (it would wait forever on
    the parent's)."""
    import os

    raw = torch.from_numpy(rows(QT.Q4_K, 64, 256, 0).reshape(-1))
    x = torch.randn(2, 256)
    want = native.linear(x, raw, int(QT.Q4_K), 64, 256, threads=2)  # (the parent's pool started)
    pid = os.fork()
    if pid == 0:
        ok = torch.equal(native.linear(x, raw, int(QT.Q4_K), 64, 256, threads=2), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("T", [1, 9])  # the token path and the lanes path
@pytest.mark.parametrize("levels", [1, 2])
def test_a_nan_or_inf_in_x_makes_its_rows_outputs_nan(qt, T, levels, _needs_compiler):
    """A NaN in x fell out of the block's largest value, and its int16 became the clamp: finite
    logits from NaN weights (tests/coordinator/test_nan_weights.py). Now the row's outputs are NaN
    (an inf too), and the other rows are as before."""
    N, K = 40, 512
    raw = torch.from_numpy(rows(qt, N, K, seed=4).reshape(-1))
    x = exact_x(T, K, torch.Generator().manual_seed(5))
    want = native.matmuls([(raw, int(qt), N, K, x)], levels=levels)[0]
    bad = x.clone()
    bad[0, 37] = float("nan")
    bad[T - 1, 300] = float("inf") if T > 1 else bad[T - 1, 300]
    got = native.matmuls([(raw, int(qt), N, K, bad)], levels=levels)[0]
    assert got[0].isnan().all()
    if T > 1:
        assert not got[T - 1].isfinite().any()
        assert torch.equal(got[1 : T - 1], want[1 : T - 1])


def test_a_call_of_fewer_threads_than_the_pool_runs_on_that_many():
    """After a call has grown the pool to 15 workers, a call of 2 or 4 threads is claimed by at most
    1 or 3 of them besides the caller (workers wake for every dispatch: each claims only where its
    index is below the call's threads), and a call of 1 thread by none."""
    lib = native.library()
    if lib is None:
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    K = 512
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(3))
    jobs = [(torch.from_numpy(rows(QT.Q4_K, 4096, K, seed=1).reshape(-1)), int(QT.Q4_K), 4096, K, x)]
    native.matmuls(jobs, threads=16)
    for threads in (2, 4, 1, 2):
        for _ in range(20):
            native.matmuls(jobs, threads=threads)
            assert lib.qdot_claimers() <= threads - 1, threads


@pytest.mark.parametrize("T", [1, 3, 8])
def test_a_layers_experts_in_one_call_match_float64_and_the_matmul_calls(T):
    """NOTE [ a layer's experts in one call ]: out[t] = the sum over the experts that chose token t
    of weight * down(SiLU(gate(x[t])) * up(x[t])), against float64 over gguf-py's dequantizer and
    against the same matmuls driven one call at a time (Q4_K gate and up, Q6_K down: a Q4_K_M
    file's experts); a token outside x is refused."""
    n_ff, n_embd, E = 256, 512, 3
    types = (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K))
    shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
    raws = [[rows(QT(q), N, K, seed=10 * e + j) for j, (q, (N, K)) in enumerate(zip(types, shapes))] for e in range(E)]
    flat = [[torch.from_numpy(r.reshape(-1)) for r in ex] for ex in raws]
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, n_embd, generator=g)
    rng = np.random.default_rng(T)
    toks = [np.sort(rng.choice(T, size=max(1, T - e), replace=False)).astype(np.int64) for e in range(E)]
    wts = [rng.random(len(t)).astype(np.float32) for t in toks]
    got = native.experts([tuple(m.data_ptr() for m in ex) for ex in flat], types, n_ff, n_embd, x,
                         native.pairs(toks, wts), threads=2)
    want = torch.zeros(T, n_embd, dtype=torch.float64)
    calls = torch.zeros(T, n_embd)
    for ex, raw, tok, wt in zip(flat, raws, toks, wts):
        gate, up, down = (torch.from_numpy(quants.dequantize(r, QT(q)).reshape(N, K)).double()
                          for r, q, (N, K) in zip(raw, types, shapes))
        xe = x[torch.from_numpy(tok)]
        want[torch.from_numpy(tok)] += torch.from_numpy(wt).double()[:, None] * (
            (torch.nn.functional.silu(xe.double() @ gate.T) * (xe.double() @ up.T)) @ down.T)
        gu = native.matmuls([(ex[0], types[0], n_ff, n_embd, xe), (ex[1], types[1], n_ff, n_embd, xe)], threads=2)
        y = native.matmuls([(ex[2], types[2], n_embd, n_ff, torch.nn.functional.silu(gu[0]) * gu[1])], threads=2)[0]
        calls.index_add_(0, torch.from_numpy(tok), torch.from_numpy(wt)[:, None] * y)
    assert got.shape == (T, n_embd) and got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 2e-4 * want.abs().max().item()
    assert (got - calls).abs().max().item() <= 1e-6 * calls.abs().max().item()
    with pytest.raises(ValueError, match="a token outside x"):
        native.experts([tuple(m.data_ptr() for m in flat[0])], types, n_ff, n_embd, x,
                       native.pairs([np.array([T])], [np.ones(1, np.float32)]), threads=2)


@pytest.mark.parametrize("T", [1, 4])
def test_the_runs_call_groups_each_experts_pairs_from_the_routers_ids_against_float64(T):
    """CpuExperts.start reads the experts in place in the layer's staging bytes and the kernel's
    thread makes the call's table from the router's ids (NOTE [ the router's pairs grouped by the
    kernel ]): the experts given out of order,
    ids naming experts that are not the CPU's and one expert twice for a token's other choice;
    the sum against float64 over gguf-py's dequantizer, each expert's bytes its own."""
    from layerstream.compute.cpu.balancer import Balancer
    from layerstream.compute.cpu.calibrate import expert_layout
    from layerstream.compute.cpu.experts import CpuExperts
    from layerstream.compute.expert_layout import expert_parts
    from layerstream.proto.timeline import Timeline

    E, n_ff, n_embd, k = 12, 256, 512, 3
    types = (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K))
    lay = expert_layout(E, n_ff, n_embd, types)
    host = np.zeros(lay.nbytes, dtype=np.uint8)
    mats = {}
    for j, (t, per, _, N, K) in enumerate(expert_parts(lay)):
        for e in range(E):
            raw = rows(QT(t.qtype), N, K, seed=100 * j + e)
            host[t.slot_offset + e * per : t.slot_offset + (e + 1) * per] = raw.reshape(-1)
            mats[e, j] = torch.from_numpy(quants.dequantize(raw, QT(t.qtype)).reshape(N, K)).double()
    rng = np.random.default_rng(T)
    ids = [int(e) for e in rng.choice(E, size=T * k)]  # (a token may name an expert twice: a weight each)
    ids[0] = ids[1] = 9
    mine = [9, 2, 5, 7]  # the CPU's, out of order
    x = torch.randn(T, n_embd, generator=torch.Generator().manual_seed(T))
    weight = torch.rand(T, k, generator=torch.Generator().manual_seed(T + 1))
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1 << 30, torch.float32, Timeline("compute", "t"))
    assert cpu.in_place(0, lay)
    got = cpu.compute(0, lay, host, mine, ids, x, weight)
    want = torch.zeros(T, n_embd, dtype=torch.float64)
    for p, e in enumerate(ids):
        if e in mine:
            xt = x[p // k].double()
            y = (torch.nn.functional.silu(mats[e, 0] @ xt) * (mats[e, 1] @ xt)) @ mats[e, 2].T
            want[p // k] += weight.reshape(-1)[p].double() * y
    assert got.shape == (T, n_embd)
    assert (got.double() - want).abs().max().item() < 2e-4 * want.abs().max().item()
    assert cpu.computed == len(mine)


def test_experts_started_on_the_kernels_thread_give_the_calls_bits():
    """NOTE [ experts beside the device's work ]: a call started returns at once and its wait gives
    the synchronous call's very bits and the kernel's start and end times; a call left without its
    wait (a step that failed between them) is waited for by the next start; the library itself
    refuses a second start before the wait, and a wait with none started."""
    import time

    n_ff, n_embd, T = 256, 512, 3
    types = (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K))
    shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
    flat = [[torch.from_numpy(rows(QT(q), N, K, seed=7 * e + j).reshape(-1)) for j, (q, (N, K)) in
             enumerate(zip(types, shapes))] for e in range(2)]
    w = [tuple(m.data_ptr() for m in ex) for ex in flat]
    x = torch.randn(T, n_embd, generator=torch.Generator().manual_seed(3))
    toks, wts = [np.array([0, 2]), np.array([1])], [np.array([0.25, 0.5], np.float32), np.array([1.0], np.float32)]
    pr = native.pairs(toks, wts)
    want = native.experts(w, types, n_ff, n_embd, x, pr, threads=2)
    t0 = time.monotonic_ns()
    wait = native.experts_start(w, types, n_ff, n_embd, x, pr, threads=2)
    got, c0, c1 = wait()
    assert torch.equal(got, want) and t0 <= c0 <= c1 <= time.monotonic_ns()
    assert wait()[0] is got  # (a second wait: the same result)
    native.experts_start(w[:1], types, n_ff, n_embd, x, native.pairs(toks[:1], wts[:1]), threads=2)  # never waited for
    again = native.experts_start(w, types, n_ff, n_embd, x, pr, threads=2)
    assert torch.equal(again()[0], want)
    lib, call = native.library(), native._ExpertsCall(w, types, n_ff, n_embd, x, pr, 2, native.LEVELS, None)
    assert lib.qdot_experts_start(*call.args) == 0
    assert lib.qdot_experts_start(*call.args) == -5
    t = (ctypes.c_int64 * 2)()
    assert lib.qdot_experts_wait(t) == 0 and torch.equal(call.out, want)
    assert lib.qdot_experts_wait(t) == -7


def test_a_calls_silu_and_sum_on_several_threads_give_the_bits_of_one():
    """SiLU(gate) * up and the weighted sum run on the pool's threads in pieces (qdot.c's epilogue):
    each element's arithmetic and each output's order over the pairs are the one thread's, so any
    count of threads gives the same bits (here enough pairs for several pieces of each)."""
    n_ff, n_embd, E, T = 256, 512, 4, 8
    types = (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K))
    shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
    flat = [[torch.from_numpy(rows(QT(q), N, K, seed=20 * e + j).reshape(-1)) for j, (q, (N, K)) in
             enumerate(zip(types, shapes))] for e in range(E)]
    w = [tuple(m.data_ptr() for m in ex) for ex in flat]
    x = torch.randn(T, n_embd, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(5)
    pr = native.pairs([np.arange(T)] * E, [rng.random(T).astype(np.float32) for _ in range(E)])
    one = native.experts(w, types, n_ff, n_embd, x, pr, threads=1)
    for threads in (2, 3, 5):
        assert torch.equal(native.experts(w, types, n_ff, n_embd, x, pr, threads=threads), one), threads
        assert torch.equal(native.experts_start(w, types, n_ff, n_embd, x, pr, threads=threads)()[0], one), threads


def _routed_layer(E=6, n_ff=256, n_embd=512):
    """A layer of E experts' staging bytes (Q4_K gate and up, Q6_K down) for routed calls: its types,
    bytes, and the slot offsets and bytes an expert of its three parts."""
    from layerstream.compute.cpu.calibrate import expert_layout
    from layerstream.compute.expert_layout import expert_parts

    types = (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K))
    lay = expert_layout(E, n_ff, n_embd, types)
    host = np.zeros(lay.nbytes, dtype=np.uint8)
    parts = expert_parts(lay)
    for j, (t, per, _, N, K) in enumerate(parts):
        for e in range(E):
            host[t.slot_offset + e * per : t.slot_offset + (e + 1) * per] = rows(QT(t.qtype), N, K, seed=10 * j + e).reshape(-1)
    off = np.array([t.slot_offset for t, *_ in parts], dtype=np.int64)
    per = np.array([p for _, p, *_ in parts], dtype=np.int64)
    return types, host, off, per


def test_a_routed_call_posts_its_end_where_asked():
    """NOTE [ the CPU's sum posted to the device ]: a routed call given (out, flag) writes its sum
    into `out` and stores 1 in the flag by the time its wait returns, the bits of the call without
    them; a call that fails stores 3, and a start refused (another call waiting) posts nothing, nor
    leaves the flag to the call after it."""
    n_ff, n_embd, T, k = 256, 512, 2, 2
    types, host, off, per = _routed_layer()
    ids = np.array([[4, 1], [1, 0]], dtype=np.int64)
    wts = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    mine = np.array([4, 1], dtype=np.int64)
    x = torch.randn(T, n_embd, generator=torch.Generator().manual_seed(3))
    want = native.experts_routed_start(host.ctypes.data, off, per, mine, ids, wts, types, n_ff, n_embd, x,
                                       threads=2)()[0]
    out, flag = torch.zeros(T, n_embd), torch.zeros(1, dtype=torch.int32)
    wait = native.experts_routed_start(host.ctypes.data, off, per, mine, ids, wts, types, n_ff, n_embd, x,
                                       threads=2, post=(out, flag))
    lib, other = native.library(), torch.zeros(1, dtype=torch.int32)
    lib.qdot_experts_post(other.data_ptr())  # refused while the first waits
    assert lib.qdot_experts_routed_start(host.ctypes.data, off.ctypes.data, per.ctypes.data, mine.ctypes.data, 2,
                                         ids.ctypes.data, wts.ctypes.data, k, native._types(types), n_ff, n_embd,
                                         x.data_ptr(), T, torch.empty(T, n_embd).data_ptr(), 2, native.LEVELS) == -5
    got = wait()[0]
    assert got is out and flag.item() == 1 and torch.equal(out, want) and out.abs().sum() > 0
    assert other.item() == 0
    flag.zero_()
    native.experts_routed_start(host.ctypes.data, off, per, mine, ids, wts, types, n_ff, n_embd, x, threads=2)()
    assert flag.item() == 0 and other.item() == 0  # (the refused call's flag went with it)
    bad = native.experts_routed_start(host.ctypes.data, off, per, mine, ids, wts, types, n_ff, n_embd - 32, x[:, :-32],
                                      threads=2, post=(torch.zeros(T, n_embd - 32), flag))
    with pytest.raises(ValueError, match="code -2"):  # K not whole blocks: refused by the leader, posted 3
        bad()
    assert flag.item() == 3
    with pytest.raises(ValueError, match=r"\[2, 512\] float32"):
        native.experts_routed_start(host.ctypes.data, off, per, mine, ids, wts, types, n_ff, n_embd, x,
                                    post=(torch.zeros(T, n_embd, dtype=torch.float64), flag))


def test_a_routed_call_gives_the_bits_of_the_call_whose_pairs_python_grouped():
    """NOTE [ the router's pairs grouped by the kernel ]: a routed call (the experts, the layer's
    staging bytes and the router's [T, k] ids and weights as they are) gives the very bits of
    experts_start over the pairs grouped in Python (the old path), pairs of other experts left out;
    it is refused while another call waits, as any start is."""
    n_ff, n_embd, T, k = 256, 512, 3, 2
    types, host, off, per = _routed_layer()
    ids = np.array([[4, 1], [1, 0], [5, 4]], dtype=np.int64)
    wts = np.array([[0.25, 0.75], [0.5, 0.5], [0.125, 0.875]], dtype=np.float32)
    mine = np.array([4, 1], dtype=np.int64)  # (0 and 5 are the device's)
    x = torch.randn(T, n_embd, generator=torch.Generator().manual_seed(2))
    toks = [np.nonzero(ids.reshape(-1) == e)[0] for e in mine]
    old = native.experts_start([tuple(host.ctypes.data + off + e * per) for e in mine], types, n_ff, n_embd, x,
                               native.pairs([p // k for p in toks], [wts.reshape(-1)[p] for p in toks]), threads=2)()[0]
    wait = native.experts_routed_start(host.ctypes.data, off, per, mine, ids, wts, types, n_ff, n_embd, x, threads=2)
    lib = native.library()
    assert lib.qdot_experts_routed_start(host.ctypes.data, off.ctypes.data, per.ctypes.data, mine.ctypes.data, 2,
                                         ids.ctypes.data, wts.ctypes.data, k, native._types(types), n_ff, n_embd,
                                         x.data_ptr(), T, torch.empty(T, n_embd).data_ptr(), 2, native.LEVELS) == -5
    got = wait()[0]
    assert torch.equal(got, old) and got.abs().sum() > 0


def test_an_experts_calls_phases_lie_inside_it_in_order():
    """NOTE [ an experts call's phases ]: the last call's eight clock readings lie between its start
    and its wait's return, in order (on the leader thread for a started call), and its dispatches'
    claimers are workers of the call's threads."""
    import time

    n_ff, n_embd, T = 256, 512, 2
    types = (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K))
    shapes = ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
    flat = [torch.from_numpy(rows(QT(q), N, K, seed=j).reshape(-1)) for j, (q, (N, K)) in enumerate(zip(types, shapes))]
    w = [tuple(m.data_ptr() for m in flat)]
    x = torch.randn(T, n_embd, generator=torch.Generator().manual_seed(1))
    pr = native.pairs([np.array([0, 1])], [np.array([0.5, 1.0], np.float32)])
    for threads, start in ((1, False), (2, True)):
        t0 = time.monotonic_ns()
        if start:
            native.experts_start(w, types, n_ff, n_embd, x, pr, threads=threads)()
        else:
            native.experts(w, types, n_ff, n_embd, x, pr, threads=threads)
        t1 = time.monotonic_ns()
        t, claimers = native.phases()
        assert len(t) == 8 == len(native.PHASES) + 1 and t0 <= t[0] and t[-1] <= t1, (t0, t, t1)
        assert t == sorted(t) and all(0 <= c <= threads - 1 for c in claimers), (t, claimers)
