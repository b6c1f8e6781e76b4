"""The CPU share's pieces: exact int4 repacking against gguf-py, the split matmul against float64,
the device's copy ranges, and the balance of the share."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, quants

from layerstream.compute.cpu import balancer, native, packing, sizing, split as cpu_split
from layerstream.compute.cpu.balancer import Balancer, balanced_frac, bucket
from layerstream.compute.cpu.packing import cpu_rows, int4_parts, pack_rows
from layerstream.compute.cpu.share import CpuShare, copy_ranges
from layerstream.compute.cpu.split import Meter, SplitWeight
from layerstream.compute.qlinear import QuantWeight, linear
from layerstream.loader.layout import LayerLayout, SlotTensor
from layerstream.proto.timeline import Timeline


@pytest.fixture
def aten_only(monkeypatch):
    """The native kernel unavailable (as without a compiler): the CPU packs int4 for aten."""
    monkeypatch.setattr(native, "library", lambda: None)


def blocks(qt: QT, n: int, K: int, seed: int = 0) -> np.ndarray:
    """n rows of valid blocks: gguf-py's quantizer where it has one, else random bytes with small scales."""
    rng = np.random.default_rng(seed)
    if qt not in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return quants.quantize(rng.standard_normal((n, K)).astype(np.float32), qt)
    bs = {QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}[qt]
    raw = rng.integers(0, 256, (n, K // 256, bs), dtype=np.uint8)
    scales = slice(208, 210) if qt == QT.Q6_K else slice(0, 4)  # (d, and dmin for Q4_K and Q5_K)
    k = scales.stop - scales.start
    raw[..., scales] = (rng.random((n, K // 256, k // 2)) * 0.01).astype(np.float16).view(np.uint8).reshape(n, K // 256, k)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_int4_parts_rebuild_gguf_values(qt):
    n, K = 64, 512
    raw = blocks(qt, n, K)
    ref = quants.dequantize(raw, qt).reshape(n, K).astype(np.float64)
    q, scale, zero = int4_parts(torch.from_numpy(raw.reshape(-1)), int(qt), n, K)
    assert q.min() >= 0 and q.max() <= 15
    rebuilt = (q.double() - 8) * scale.double().repeat_interleave(32, 1) + zero.double().repeat_interleave(32, 1)
    np.testing.assert_allclose(rebuilt.numpy(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_packed_matmul_and_its_tails_match_float64(qt):
    n, K = 192, 512
    raw = blocks(qt, n, K, seed=1)
    ref = torch.from_numpy(quants.dequantize(raw, qt).reshape(n, K)).double()
    p = pack_rows(torch.from_numpy(raw.reshape(-1)), int(qt), n, K, torch.float32)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    want = x.double() @ ref.T
    tol = 1e-5 * want.abs().max().item()
    assert (p.matmul(x).double() - want).abs().max().item() < tol
    for tail in (64, 128):  # the share shrinks without repacking
        assert (p.tail(tail).matmul(x).double() - want[:, n - tail:]).abs().max().item() < tol
    with pytest.raises(ValueError, match="no tail"):
        p.tail(100)


def test_split_weight_joins_device_and_cpu_rows():
    n, K = 192, 256
    raw = blocks(QT.Q4_1, n, K, seed=3)
    dense = torch.from_numpy(quants.dequantize(raw, QT.Q4_1).reshape(n, K))
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5))
    want = x.double() @ dense.double().T + bias.double()
    meter = Meter()
    for n_cpu in (64, 128, 192):
        packed = pack_rows(torch.from_numpy(raw[n - n_cpu:].reshape(-1)), int(QT.Q4_1), n_cpu, K, torch.float32)
        dev = dense[: n - n_cpu] if n_cpu < n else None
        got = linear(x, SplitWeight(dev, packed, meter), bias)
        assert got.shape == (2, n)
        assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()
    seconds, nbytes, _ = meter.take()
    assert nbytes > 0 and seconds > 0
    assert meter.take()[1] == 0


def test_copy_ranges_cover_device_rows_only():
    # two split matrices with a norm between them, 8192 bytes of alignment gap after the first
    a = SlotTensor("attn_q.weight", int(QT.Q4_K), (256, 256), 0, 256 * 144, "f", 0)
    norm = SlotTensor("attn_norm.weight", int(QT.F32), (256,), a.nbytes + 8192, 1024, "f", 0)
    b = SlotTensor("ffn_up.weight", int(QT.Q4_K), (512, 256), norm.slot_offset + 1024, 512 * 144, "f", 0)
    lay = LayerLayout(0, (a, norm, b), b.slot_offset + b.nbytes)
    rows = {"attn_q.weight": 128, "ffn_up.weight": 256}
    ranges = copy_ranges(lay, rows)
    covered = np.zeros(lay.nbytes, bool)
    for off, nb in ranges:
        covered[off : off + nb] = True
    for t, n_cpu in ((a, 128), (norm, 0), (b, 256)):
        dev_bytes = t.nbytes - n_cpu * (t.nbytes // t.shape[0])
        assert covered[t.slot_offset : t.slot_offset + dev_bytes].all()
        assert not covered[t.slot_offset + dev_bytes : t.slot_offset + t.nbytes].any()
    whole = copy_ranges(lay, {})  # no CPU rows: every tensor, the 8 KiB gap left out
    assert whole == [(0, a.nbytes), (norm.slot_offset, lay.nbytes - norm.slot_offset)]


def test_cpu_rows_are_aligned_and_bounded():
    assert cpu_rows(8192, 0.5) == 4096
    assert cpu_rows(1000, 0.5) % packing.ROW_ALIGN == 0
    assert cpu_rows(100, 0.3) == 0
    assert cpu_rows(4096, 1.0) == 4096


def test_balanced_share_equalises_both_sides():
    cpu, link, c, ratio = 70.0, 55.0, 0.8, packing.pack_ratio()
    f = balanced_frac(cpu, link, c, ratio)
    S = 1.0  # a layer's bytes
    t_link = (1 - f * c) * S / link
    t_cpu = f * c * S * ratio / cpu
    assert t_link == pytest.approx(t_cpu)
    assert balanced_frac(1e9, 1.0, 0.1, ratio) == 1.0  # capped: the CPU takes every 4-bit row
    assert balanced_frac(0.0, 55.0, 0.8, ratio) == 0.0


def test_balancer_proposes_less_for_larger_batches():
    ratio = packing.pack_ratio()
    bal = Balancer({1: 70.0, 2: 50.0, 4: 30.0, 8: 10.0}, 55.0, 0.8, ratio, pack_frac=0.9)
    shares = [bal.share(b) for b in (1, 2, 4, 8)]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1] > 0
    assert bal.share(9) == 0.0 and bucket(512) is None  # prompts and large batches: all on the device
    assert bal.share(3) == bal.share(4)  # a step takes the next bucket up


def _passes(bal, tokens, seconds_at):
    """Feed the balancer passes whose time depends on the share it asks for, until it settles."""
    for _ in range(50):
        f = bal.share(tokens)
        cpu_bytes = int(f * 1e9)
        bal.observe(tokens, seconds_at(f), cpu_bytes / 35e9 if f else 0.0, cpu_bytes, 1.0, int(55e9))
        if not bal.trials[balancer.bucket(tokens)]:
            return bal.share(tokens)
    raise AssertionError("the balancer never settled")


def test_balancer_keeps_the_share_only_where_passes_are_faster():
    ratio = packing.pack_ratio()
    proposed = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2).share(1)
    # PCIe-bound passes: time falls with the share -> the best share timed is kept
    bal = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    got = _passes(bal, 1, lambda f: 1.0 - 0.5 * f)
    assert got > 0 and got == max(bal.times[1])
    # the second share tried is the one the passes' own rates (CPU 35 GB/s) balance
    assert any(k == pytest.approx(balanced_frac(35.0, 55.0, 0.8, ratio)) for k in bal.times[1])
    # a bucket's first pass (reading the host cache full, capturing graphs) is left out
    warm = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    seconds = iter([100.0])
    assert _passes(warm, 1, lambda f: next(seconds, 1.0 - 0.5 * f)) == got
    # passes bound by something else: the CPU's matmuls only add -> no share
    bal = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    assert _passes(bal, 1, lambda f: 1.0 + f) == 0.0
    assert set(bal.times[1]) >= {proposed, 0.0}
    # a share within the noise of no share (2% faster) is not kept
    bal = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    assert _passes(bal, 1, lambda f: 0.98 if f else 1.0) == 0.0
    bal = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    assert _passes(bal, 1, lambda f: 0.9 if f else 1.0) > 0
    assert "chosen" in bal.describe()
    # a fixed share is never timed nor changed
    fixed = Balancer({}, 0.0, 0.8, ratio, pack_frac=0.5, fixed=0.5)
    fixed.observe(1, 1.0, 1.0, 1, 1.0, 1)
    assert fixed.share(1) == 0.5 and fixed.share(8) == 0.5 and fixed.share(64) == 0.0


def test_a_chosen_share_is_timed_again_and_dropped_when_it_has_become_slower():
    """Balancer: after a choice, the choice and the other setting are timed again after
    RECHECK_FIRST passes, then at doubling intervals (up to RECHECK_MAX) while the choice holds; a
    share that has become slower than none is dropped, and the interval starts over."""
    ratio = packing.pack_ratio()
    bal = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    slow = {"share": False}

    def seconds(f):
        return (1.3 if slow["share"] else 0.8) if f else 1.0

    share = _passes(bal, 1, seconds)
    assert share > 0 and bal.interval[1] == balancer.RECHECK_FIRST and bal.other[1] == 0.0

    def run(n):
        asked = []
        for _ in range(n):
            f = bal.share(1)
            asked.append(f)
            bal.observe(1, seconds(f), 0.0, 0, 1.0, 1)
        return asked

    asked = run(balancer.RECHECK_FIRST + 4)  # the interval, then both settings `every` passes each
    assert asked[: balancer.RECHECK_FIRST] == [share] * balancer.RECHECK_FIRST
    assert asked[balancer.RECHECK_FIRST :] == [share, share, 0.0, 0.0]
    assert bal.share(1) == share and bal.interval[1] == 2 * balancer.RECHECK_FIRST  # held: twice as long
    for _ in range(8):  # doubling up to the cap while the choice holds
        run(bal.interval[1] + 4)
    assert bal.interval[1] == balancer.RECHECK_MAX and bal.share(1) == share
    slow["share"] = True  # the share now costs more than it saves
    run(bal.left[1])
    assert "re-timing" in bal.describe()
    run(4)
    assert bal.share(1) == 0.0 and bal.other[1] == share and bal.interval[1] == balancer.RECHECK_FIRST
    slow["share"] = False  # and it comes back when it pays again
    run(balancer.RECHECK_FIRST + 4)
    assert bal.share(1) == share and "chosen" in bal.describe()
    # within the margin either way a re-check keeps the choice: a share 2% slower than none stays
    held = Balancer({1: 70.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    assert _passes(held, 1, lambda f: 0.8 if f else 1.0) > 0
    for _ in range(balancer.RECHECK_FIRST + 4):
        f = held.share(1)
        held.observe(1, 1.02 if f else 1.0, 0.0, 0, 1.0, 1)
    assert held.share(1) > 0 and held.interval[1] == 2 * balancer.RECHECK_FIRST
    # a bucket that never timed a share (none proposed) is never timed again
    none = Balancer({1: 0.0}, 55.0, 0.8, ratio, pack_frac=0.9, every=2)
    for _ in range(100):
        none.observe(1, 1.0, 0.0, 0, 1.0, 1)
    assert none.share(1) == 0.0 and not none.trials[1] and 1 not in none.other


def test_the_experts_balancer_re_times_each_batch_size_apart():
    """The CPU experts' balancer (propose=1.0: the cost model's split or none, five passes each):
    steps of another batch size between a bucket's passes leave its count and its re-check alone,
    and each bucket re-times its own choice, with the share it ran at."""
    bal = Balancer({}, 55.0, 1.0, 1.0, 1.0, every=5, propose=1.0)
    seconds = {1: lambda f: 1.0 if f else 0.9, 8: lambda f: 0.5 if f else 1.0}  # batch 1: none; batch 8: the share

    def step(tokens):
        f = bal.share(tokens)
        bal.observe(tokens, seconds[tokens](f), 0.0, 0, 0.0, 0, f)

    for _ in range(40):  # interleaved, as a server's steps of one and of eight sequences may come
        step(1)
        step(8)
    assert (bal.share(1), bal.share(8)) == (0.0, 1.0) and bal.other == {1: 1.0, 8: 0.0}
    left = dict(bal.left)
    for _ in range(3):
        step(8)
    assert bal.left[1] == left[1] and bal.left[8] == left[8] - 3
    iv = bal.interval[8]
    while 8 not in bal.rechecking:
        step(8)
    assert 1 not in bal.rechecking and bal.trials[8] == [1.0, 0.0] and bal.trials[1] == []
    for _ in range(10):  # batch 8's re-check: five passes of each, batch 1's count untouched
        step(8)
    assert 8 not in bal.rechecking and bal.share(8) == 1.0 and bal.interval[8] == min(2 * iv, balancer.RECHECK_MAX)
    assert bal.left[1] == left[1]


def test_a_pass_that_ran_at_another_share_than_the_one_being_timed_counts_for_neither():
    """A pass is observed after the next is launched, so the first pass after a change of setting ran
    at the setting before: given the share it ran at, the balancer leaves it out."""
    bal = Balancer({1: 70.0}, 55.0, 0.8, packing.pack_ratio(), pack_frac=0.9, every=2)
    f = bal.share(1)
    bal.observe(1, 9.0, 0.0, 0, 1.0, 1, f)  # (a bucket's first pass: left out anyway)
    bal.observe(1, 1.0, 0.0, 0, 1.0, 1, f)
    bal.observe(1, 1.0, 0.0, 0, 1.0, 1, f)
    g = bal.share(1)
    assert g != f and bal.times[1] == {f: [1.0, 1.0]}
    bal.observe(1, 5.0, 0.0, 0, 1.0, 1, f)  # launched at f, observed while g is timed: neither's
    assert bal.times[1] == {f: [1.0, 1.0]}
    bal.observe(1, 0.5, 0.0, 0, 1.0, 1, g)
    assert bal.times[1] == {f: [1.0, 1.0], g: [0.5]}


def test_tails_slice_holds_for_this_torch():
    assert packing.tails_slice()


def test_the_direct_int4_layout_is_atens():
    """pack_rows builds aten's CPU int4 layout with uint8 ops (packing._layout) where that is
    aten's layout (`layout_matches`: aten's CPU layout differs between builds and CPUs; on this
    project's AVX2 CI machine with torch 2.13 it differed), else takes aten's own packing: either
    way the bytes the CPU matmul reads are aten's."""
    q = torch.randint(0, 16, (3 * packing.ROW_ALIGN, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(packing.int4_pack(q), want)
    assert packing.layout_matches() == torch.equal(packing._layout(q), want)  # (the check says which it is)


def test_packed_bytes_counts_only_4bit_matrices(aten_only):
    q4 = SlotTensor("ffn_up.weight", int(QT.Q4_K), (1024, 512), 0, 1024 * 2 * 144, "f", 0)
    q6 = SlotTensor("ffn_down.weight", int(QT.Q6_K), (512, 1024), q4.nbytes, 512 * 4 * 210, "f", 0)
    lay = LayerLayout(0, (q4, q6), q4.nbytes + q6.nbytes)
    assert sizing.packed_bytes([lay], 0.5, "rows") == 512 * (512 // 2 + 512 // 32 * 4)
    # the "layers" split: every row of the layer's 4-bit FFN matrices, once the share takes the layer
    assert sizing.packed_bytes([lay], 1.0) == 1024 * (512 // 2 + 512 // 32 * 4)
    assert sizing.packed_bytes([lay], 0.4) == 0  # 0.4 of one layer rounds to none
    assert sizing.int4_fraction([lay]) == pytest.approx(q4.nbytes / (q4.nbytes + q6.nbytes))


def test_packed_bytes_count_every_expert_of_layers_whose_experts_the_cpu_computes(aten_only):
    """NOTE [ CPU experts ]: a layer takes part when gate, up and down are each 4-bit or another
    block type the CPU dequantizes (a Q4_K_M file's Q6_K downs); then any share may pack each of
    its experts in time, so the plan counts them all: 4-bit packed, the others dense."""
    E, N, K = 8, 256, 512

    def layer(down_type, i):
        ts, off = [], 0
        for name, qt, shape in (("ffn_gate_exps.weight", QT.Q4_K, (E, N, K)), ("ffn_up_exps.weight", QT.Q4_K, (E, N, K)),
                                ("ffn_down_exps.weight", down_type, (E, K, N))):
            nbytes = E * shape[1] * shape[2] // 256 * {QT.Q4_K: 144, QT.Q6_K: 210, QT.IQ4_XS: 136}[qt]
            ts.append(SlotTensor(name, int(qt), shape, off, nbytes, "f", 0))
            off += nbytes
        return LayerLayout(i, tuple(ts), off)

    q4, q6, iq = layer(QT.Q4_K, 0), layer(QT.Q6_K, 1), layer(QT.IQ4_XS, 2)
    # a 4-bit attention matrix beside the experts: a MoE layer's share is its experts, not its rows
    attn = SlotTensor("attn_q.weight", int(QT.Q4_K), (K, K), q6.nbytes, K * K // 256 * 144, "f", 0)
    q6 = LayerLayout(1, (*q6.tensors, attn), q6.nbytes + attn.nbytes)
    assert sizing.row_layers([q4, q6]) == [] and sizing.int4_fraction(sizing.row_layers([q6])) == 0
    assert sizing.expert_cpu_layers([q4, q6, iq]) == [q4, q6]  # (no CPU form of IQ4_XS)
    per_matrix = E * N * (K // 2 + K // 32 * 4)  # (N x K and K x N pack to the same bytes)
    dense = E * K * N * 2  # a Q6_K down dequantized to bf16
    assert sizing.expert_packed_bytes([q4, q6, iq]) == 3 * per_matrix + 2 * per_matrix + dense
    assert sizing.expert_packed_bytes([q6], 4) == 2 * per_matrix + 2 * dense  # (float32 on a CPU-only machine)
    assert sizing.packed_bytes([q4, q6], 0.3) == 5 * per_matrix + dense and sizing.packed_bytes([q4, q6], 0) == 0


def test_with_the_native_kernel_experts_read_in_place_pack_nothing():
    """NOTE [ CPU experts ]: where the native kernel reads a layer's three expert types, the CPU
    reads the experts' blocks in the staging slot, and the plan counts no host memory for them; a
    layer with a type it reads only dequantized (Q5_0) still counts its packed experts."""
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    E, N, K = 8, 256, 512

    def layer(down_type, i):
        ts, off = [], 0
        for name, qt, shape in (("ffn_gate_exps.weight", QT.Q4_K, (E, N, K)), ("ffn_up_exps.weight", QT.Q4_K, (E, N, K)),
                                ("ffn_down_exps.weight", down_type, (E, K, N))):
            nbytes = E * shape[1] * shape[2] // 256 * {QT.Q4_K: 144, QT.Q6_K: 210, QT.Q5_0: 22 * 8}[qt]
            ts.append(SlotTensor(name, int(qt), shape, off, nbytes, "f", 0))
            off += nbytes
        return LayerLayout(i, tuple(ts), off)

    q6, q5 = layer(QT.Q6_K, 0), layer(QT.Q5_0, 1)
    assert sizing.expert_cpu_layers([q6, q5]) == [q6, q5]
    assert sizing.expert_packed_bytes([q6]) == 0 and sizing.packed_bytes([q6], 0.9) == 0
    blocks = 2 * E * N * K // 256 * 144  # gate and up: the blocks copied out
    assert sizing.expert_packed_bytes([q6, q5]) == blocks + E * K * N * 2  # (Q5_0 dequantized to bf16)


def test_quantweight_device_rows_are_a_prefix():
    # the device's part of a split quantized matrix is a view of its first rows' blocks
    raw = torch.from_numpy(blocks(QT.Q4_K, 128, 256).reshape(-1))
    w = QuantWeight(raw, int(QT.Q4_K), (128, 256))
    share = CpuShare(Balancer({}, 0.0, 1.0, 1.0, 0.5, fixed=0.5), 0.5, torch.float32, Timeline("compute", "t"))
    lay = LayerLayout(0, (SlotTensor("ffn_up.weight", int(QT.Q4_K), (128, 256), 0, raw.numel(), "f", 0),), raw.numel())
    share.pack(0, lay, raw.numpy())
    rows = share.rows(0, lay, 0.5)
    assert rows == {"ffn_up.weight": 64}
    split = share.split(0, {"ffn_up.weight": w}, rows)["ffn_up.weight"]
    assert split.dev.shape == (64, 256) and split.dev.raw.data_ptr() == raw.data_ptr()
    assert split.cpu.rows == 64


def test_matrices_of_one_input_share_one_wait_and_join_each():
    """linear_many over q, k, v-like matrices: split ones, a plain one, and biases."""
    from layerstream.compute.qlinear import linear_many

    K = 256
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, K, generator=g)
    want, ws, biases = [], [], []
    for i, (n, n_cpu) in enumerate([(192, 64), (128, 0), (64, 64)]):
        raw = blocks(QT.Q4_0, n, K, seed=10 + i)
        dense = torch.from_numpy(quants.dequantize(raw, QT.Q4_0).reshape(n, K))
        b = torch.randn(n, generator=g)
        want.append(x.double() @ dense.double().T + b.double())
        if n_cpu:
            packed = pack_rows(torch.from_numpy(raw[n - n_cpu:].reshape(-1)), int(QT.Q4_0), n_cpu, K, torch.float32)
            ws.append(SplitWeight(dense[: n - n_cpu] if n_cpu < n else None, packed, Meter()))
        else:
            ws.append(dense)
        biases.append(b)
    for got, ref in zip(linear_many(x, ws, biases), want):
        assert got.shape == ref.shape
        assert (got.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_the_layers_split_takes_whole_ffn_matrices_of_layers_spread_evenly(aten_only):
    """NOTE [ the CPU share ], split "layers": a share takes the 4-bit FFN matrices of that share
    of the layers (attention and other types stay on the device), spread evenly, and a smaller
    share chooses among the layers packed for the largest; only the rest of a layer is copied."""
    def layer(i, up_type=QT.Q4_K):
        ts, off = [], 0
        for name, qt, shape in (("attn_q.weight", QT.Q4_K, (256, 256)), ("ffn_gate.weight", QT.Q4_K, (512, 256)),
                                ("ffn_up.weight", up_type, (512, 256)), ("ffn_down.weight", QT.Q6_K, (256, 512))):
            nbytes = shape[0] * shape[1] // 256 * (144 if qt == QT.Q4_K else 210 if qt == QT.Q6_K else 34 * 8)
            ts.append(SlotTensor(name, int(qt), shape, off, nbytes, "f", 0))
            off += nbytes + 4096 * 2  # gaps the copy ranges do not merge across
        return LayerLayout(i, tuple(ts), off)

    lays = [layer(i) for i in range(8)] + [layer(8, QT.Q8_0)]
    assert sizing.cpu_layers(lays, 0.5) == [0, 2, 4, 6, 8]  # 9 layers with a 4-bit FFN matrix: 5 of them
    assert sizing.cpu_layers(lays, 0.25) == [2, 6]
    assert sizing.cpu_layers(lays, 0.25, within=[0, 4, 8]) == [0, 8]
    assert sizing.cpu_layers(lays, 0) == [] and sizing.cpu_layers(lays, 1) == list(range(9))
    share = CpuShare(Balancer({}, 0.0, 1.0, 1.0, 0.5, fixed=0.5), 0.5, torch.float32, Timeline("compute", "t"),
                     "layers", lays)
    assert share.cpu_layers(0.5) == {0, 2, 4, 6, 8} and share.cpu_layers(0.25) == {2, 6}  # (a subset of the packed)
    q, gate, up, down = lays[0].tensors
    assert share.rows(0, lays[0], 0.5) == {"ffn_gate.weight": 512, "ffn_up.weight": 512}  # the Q6_K down stays
    assert share.rows(8, lays[8], 0.5) == {"ffn_gate.weight": 512}  # its up is Q8_0
    assert share.rows(1, lays[1], 0.5) == {} and share.ranges(1, lays[1], 0.5) == [(0, lays[1].nbytes)]
    assert share.ranges(0, lays[0], 0.5) == [(q.slot_offset, q.nbytes), (down.slot_offset, down.nbytes)]
    # NOTE [ early slot ]: only a layer whose whole FFN is the CPU's, and that reads nothing after it
    assert not share.whole_ffn(lays[0], share.rows(0, lays[0], 0.5))  # its Q6_K down reads the slot
    whole = {"ffn_gate.weight": 512, "ffn_up.weight": 512, "ffn_down.weight": 256}
    assert share.whole_ffn(lays[0], whole)
    assert not share.whole_ffn(lays[0], dict(whole, **{"ffn_down.weight": 192}))  # some rows on the device
    post = LayerLayout(0, lays[0].tensors + (SlotTensor("post_ffw_norm.weight", int(QT.F32), (256,), 0, 1024, "f", 0),),
                       lays[0].nbytes)
    assert not share.whole_ffn(post, whole)  # (Gemma 3 reads its post-FFN norm after the FFN)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_a_cpu_layers_ffn_runs_whole_on_the_cpu_against_float64(act, monkeypatch):
    """The "layers" split: where the CPU takes gate, up and down, ffn_block computes the FFN on
    the CPU in one go (one wait for its input); against float64 over gguf-py's dequantization."""
    from types import SimpleNamespace

    from layerstream.compute.model import ffn_block

    E, H = 256, 512
    g = torch.Generator().manual_seed(3)
    raws = {"ffn_gate.weight": blocks(QT.Q4_K, H, E, 1), "ffn_up.weight": blocks(QT.Q4_K, H, E, 2),
            "ffn_down.weight": blocks(QT.Q4_K, E, H, 3)}
    meter = Meter()
    w = {n: SplitWeight(None, pack_rows(torch.from_numpy(r.reshape(-1)), int(QT.Q4_K), r.shape[0],
                                        E if n != "ffn_down.weight" else H, torch.float32), meter)
         for n, r in raws.items()}
    w["ffn_norm.weight"] = torch.ones(E)
    x = torch.randn(3, E, generator=g)

    def matmul_by_matmul(*a):
        raise AssertionError("the FFN went matmul by matmul")

    monkeypatch.setattr(cpu_split, "split_linear", matmul_by_matmul)
    called = []  # NOTE [ early slot ]: the gate's on_host runs once, before the CPU's matmuls
    w["ffn_gate.weight"] = SplitWeight(None, w["ffn_gate.weight"].cpu, meter,
                                       lambda: called.append(meter.nbytes))
    got = ffn_block(SimpleNamespace(norm_eps=1e-6, ffn_act=act), w, x)
    assert called == [0]
    d = {n: torch.from_numpy(quants.dequantize(r, QT.Q4_K)).double().view(r.shape[0], -1) for n, r in raws.items()}
    h = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    a = h @ d["ffn_gate.weight"].T
    a = torch.nn.functional.gelu(a, approximate="tanh") if act == "gelu_tanh" else torch.nn.functional.silu(a)
    want = x.double() + (a * (h @ d["ffn_up.weight"].T)) @ d["ffn_down.weight"].T
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()
    sec, nbytes, _ = meter.take()
    assert nbytes == sum(m.cpu.nbytes for n, m in w.items() if n != "ffn_norm.weight")  # one pass over the three


def test_cpu_share_is_parsed_once_into_a_typed_config():
    from layerstream.compute.cpu.config import AUTO_PACK_MAX, CpuShareConfig, parse_cpu_share
    from layerstream.errors import ConfigError

    auto = parse_cpu_share(" Auto ", "rows")
    assert auto.auto and auto.split == "rows" and auto.pack_max == AUTO_PACK_MAX and str(auto) == "auto"
    assert auto.for_device("cpu") == CpuShareConfig(split="rows") and auto.for_device("cuda") == auto
    assert parse_cpu_share("off").off and parse_cpu_share("0").off and str(parse_cpu_share("0")) == "0"
    half = parse_cpu_share("0.5")
    assert (half.fraction, half.pack_max, str(half)) == (0.5, 0.5, "0.5") and not half.off
    assert half.with_pack_max(0.25).pack_max == 0.25 and half.with_pack_max(0).off  # nothing fits: none
    for bad in ("1.5", "-0.1", "half", "nan"):
        with pytest.raises(ConfigError, match="--cpu-share"):
            parse_cpu_share(bad)
    with pytest.raises(ConfigError, match="--cpu-split 'columns'"):
        parse_cpu_share("0.5", "columns")
    for bad in ("\uff18:0.5", "0.\u0665", "\u0668:0.5",  # fullwidth and Arabic-Indic digits, which int() and float() read
                "0.5_0", "8:0.5_0", "0_8:0.5", "0.5 0"):  # and their underscores (8:0.5_0 was 0.5)
        with pytest.raises(ConfigError, match="--cpu-share"):
            parse_cpu_share(bad)
    with pytest.raises(ConfigError) as e:  # a long value is cut, a newline shown as one
        parse_cpu_share("8:0.5," * 1000 + "\n")
    assert len(str(e.value)) < 400 and "more characters" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--cpu-share 'half\\n': give default"):
        parse_cpu_share("half\n")


def test_the_default_share_is_half_of_a_batch_8_steps_missing_experts_beside_cuda_alone():
    """--cpu-share default (compute/cpu/config.py): steps of 5 to 8 tokens give half their missing
    experts to the CPU, smaller steps none; none at all on a CPU-only machine; never a dense
    layer's rows, and not a share asked for (so --device cpu and --cpu-split take it as none)."""
    from layerstream.compute.cpu.config import CpuShareConfig, parse_cpu_share
    from layerstream.compute.cpu.factory import make_cpu_parts
    from layerstream.loader.layout import layer_layouts
    from layerstream.loader.synth import shaped_index

    d = parse_cpu_share(" Default ", "rows")
    assert d.experts_only and not d.off and not d.asked and str(d) == "default" and d.split == "rows"
    assert d.fixed() == {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.5} and d.pack_max == 0.5
    assert d.for_device("cpu") == CpuShareConfig(split="rows") and d.for_device("cuda") == d
    assert parse_cpu_share("8:0.5").asked and not parse_cpu_share("0").asked and parse_cpu_share("auto").asked
    moe = layer_layouts(shaped_index("qwen3-30b-a3b", n_layer=2))
    dense = layer_layouts(shaped_index("llama-3.2-1b", n_layer=2))
    parts = make_cpu_parts(d, moe + dense, torch.device("cpu"), torch.float32, Timeline("compute", "t"))
    assert parts.share is None  # (the dense layers' rows stay on the device)
    assert parts.experts is not None and [parts.experts.set_step(t) for t in (1, 4, 5, 8, 9)] == [0, 0, 0.5, 0.5, 0]
    ask = make_cpu_parts(parse_cpu_share("8:0.5"), moe + dense, torch.device("cpu"), torch.float32,
                         Timeline("compute", "t"))
    assert ask.share is not None  # (a share asked for splits the dense layers too, as before)


def test_the_share_keeps_its_steps_fraction_and_the_cpus_work():
    share = CpuShare(Balancer({}, 0.0, 1.0, 1.0, 0.5, fixed=0.5), 0.5, torch.float32, Timeline("compute", "t"))
    share.set_step(1)
    assert share.frac == 0.5 and (share.step_s, share.step_bytes) == (0.0, 0)
    tl = Timeline("compute", "t")
    share.meter.add(0, 2_000_000, 4096)
    share.account(3, tl)
    share.account(4, tl)  # nothing read since: nothing added
    assert share.step_s == pytest.approx(0.002) and share.step_bytes == 4096
    share.set_step(64)  # above MAX_TOKENS the CPU takes nothing, and a new step starts from none
    assert share.frac == 0.0 and (share.step_s, share.step_bytes) == (0.0, 0)


def test_with_the_native_kernel_the_share_takes_every_block_type_it_reads_as_its_own_bytes():
    """NOTE [ native blocks ]: the CPU's rows are the blocks themselves (the plan counts their own
    bytes), Q6_K and Q8_0 matrices split like the 4-bit ones, and a layer whose gate and up are
    Q4_K and down Q6_K goes wholly to the CPU (its early slot)."""
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    q4 = SlotTensor("ffn_up.weight", int(QT.Q4_K), (1024, 512), 0, 1024 * 2 * 144, "f", 0)
    q6 = SlotTensor("ffn_down.weight", int(QT.Q6_K), (512, 1024), q4.nbytes, 512 * 4 * 210, "f", 0)
    lay = LayerLayout(0, (q4, q6), q4.nbytes + q6.nbytes)
    assert sizing.packed_bytes([lay], 0.5, "rows") == 512 * 2 * 144 + 256 * 4 * 210
    assert sizing.packed_bytes([lay], 1.0) == q4.nbytes + q6.nbytes
    assert sizing.int4_fraction([lay]) == 1.0
    raw = np.concatenate([blocks(QT.Q4_K, 1024, 512, 1).reshape(-1), blocks(QT.Q6_K, 512, 1024, 2).reshape(-1)])
    share = CpuShare(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1.0, torch.float32, Timeline("compute", "t"),
                     "layers", [lay])
    share.pack(0, lay, raw)
    rows = share.rows(0, lay, 1.0)
    assert rows == {"ffn_up.weight": 1024, "ffn_down.weight": 512}
    got = share.packed[0]
    assert all(isinstance(m, packing.BlockRows) for m in got.values())
    assert got["ffn_down.weight"].raw.numpy().tobytes() == raw[q6.slot_offset:].tobytes()  # the blocks as they are
    raw[:] = 0  # (the staging slot is reused: the CPU's rows are its own copy)
    assert got["ffn_up.weight"].raw.max().item() > 0
    full = {"ffn_gate.weight": 512, "ffn_up.weight": 1024, "ffn_down.weight": 512}
    gate = SlotTensor("ffn_gate.weight", int(QT.Q4_K), (1024, 512), 0, q4.nbytes, "f", 0)
    assert share.whole_ffn(LayerLayout(0, (gate, q4, q6), lay.nbytes), dict(full, **{"ffn_gate.weight": 1024}))


@pytest.mark.parametrize("kernel", ["native", "aten"])
def test_split_rows_of_q4k_and_q6k_against_float64(kernel, monkeypatch):
    """A split matrix's CPU rows through linear_many, with the kernel and without it (where the
    Q6_K matrix cannot be split and stays whole on the device)."""
    from layerstream.compute.qlinear import linear_many

    if kernel == "aten":
        monkeypatch.setattr(native, "library", lambda: None)
    elif not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    K = 512
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, K, generator=g)
    ws, want = [], []
    for qt, n in ((QT.Q4_K, 192), (QT.Q6_K, 131)):
        raw = blocks(qt, n, K, seed=int(qt))
        dense = torch.from_numpy(quants.dequantize(raw, qt).reshape(n, K))
        want.append(x.double() @ dense.double().T)
        n_cpu = 64 if int(qt) in packing.split_types() else 0
        cpu = packing.cpu_matrix(torch.from_numpy(raw[n - n_cpu:].reshape(-1)), int(qt), n_cpu, K, torch.float32) \
            if n_cpu else None
        ws.append(SplitWeight(dense[: n - n_cpu], cpu, Meter()) if n_cpu else dense)
    assert isinstance(ws[1], SplitWeight) == (kernel == "native")
    for got, ref in zip(linear_many(x, ws, [None, None]), want):
        assert got.shape == ref.shape
        assert (got.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.mark.gpu
def test_timing_the_link_leaves_no_device_memory_reserved():
    """The link's timing buffer goes back to the driver: kept in torch's cache, its block was split
    by the plan's later small allocations, and the rest of it, reserved but too small for a resident
    layer, made a plan that filled its budget fail its first step."""
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(dev)
    assert balancer.measure_link_gbs(dev) > 0
    assert torch.cuda.memory_reserved(dev) == before
