"""The CPU experts' timing at start (cpu/calibrate.py) and what the split makes of it (NOTE [ the
experts' split ]): warmed, the median of the timed rounds, on the run's own path; the CPU taken
where it is timed faster than a copy, none where slower; what --stats prints."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from layerstream.compute.cpu import calibrate, native
from layerstream.compute.cpu.config import BUCKETS
from layerstream.compute.cpu.expert_split import ExpertSplit
from layerstream.compute.expert_layout import EXPERT_TENSORS


def _layer(E=8, N=256, K=512, types=(QT.Q4_K, QT.Q4_K, QT.Q6_K)):
    """A layout of E experts (gate and up N x K, down K x N) of `types`; no bytes."""
    return calibrate.expert_layout(E, N, K, tuple(int(t) for t in types), layer=3)


def test_an_expert_layout_has_each_matrix_of_its_type_and_shape():
    lay = _layer(types=(QT.Q4_K, QT.Q8_0, QT.Q6_K))
    got = [(t.name, t.qtype, t.shape, t.slot_offset, t.nbytes) for t in lay.tensors]
    q4, q8, q6 = 8 * 256 * 2 * 144, 8 * 256 * 16 * 34, 8 * 512 * 1 * 210
    assert got == [(EXPERT_TENSORS[0], int(QT.Q4_K), (8, 256, 512), 0, q4),
                   (EXPERT_TENSORS[1], int(QT.Q8_0), (8, 256, 512), q4, q8),
                   (EXPERT_TENSORS[2], int(QT.Q6_K), (8, 512, 256), q4 + q8, q6)]
    assert lay.nbytes == q4 + q8 + q6 and lay.layer == 3


class Clock:
    """A stand-in clock: each call pair (start, end) of the i-th timed compute lasts durations[i]."""

    def __init__(self, durations):
        self.durations, self.calls, self.t = list(durations), 0, 0.0

    def __call__(self):
        if self.calls % 2:  # an end: the compute took its duration
            self.t += self.durations[(self.calls // 2) % len(self.durations)]
        self.calls += 1
        return self.t


def test_tokens_an_expert_is_the_steps_pairs_over_its_distinct_experts():
    """Against routing drawn at random: a step's (token, choice) pairs over the experts it touches."""
    rng = np.random.default_rng(0)
    for E, k in ((128, 8), (8, 2), (64, 6)):
        for b in BUCKETS:
            distinct = np.mean([len({e for _ in range(b) for e in rng.choice(E, k, replace=False)})
                                for _ in range(400)])
            assert calibrate.tokens_an_expert(b, E, k) == max(1, min(b, round(b * k / distinct))), (E, k, b)
    assert [calibrate.tokens_an_expert(b, 128, 8) for b in BUCKETS] == [1, 1, 1, 1]  # Qwen3-30B-A3B
    assert calibrate.tokens_an_expert(8, 8, 2) == 2  # Mixtral: 16 pairs over about 7 experts
    assert calibrate.tokens_an_expert(8, 128, None) == 1  # (k not known)


@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q8_0, QT.Q4_0, QT.Q4_K)])
def test_random_experts_have_the_layers_types_and_shapes_and_finite_values(types):
    """Random blocks with their scales set to 2**-7: every value finite and bounded (random scale
    bytes hold infinities, NaNs and subnormals, which would time a path real weights never take)."""
    lay = _layer(types=types)
    fake, host = calibrate.random_expert_layer(lay, 5)
    for name in EXPERT_TENSORS:
        t, f = lay.tensor(name), fake.tensor(name)
        assert (f.qtype, f.shape[1:], f.nbytes) == (t.qtype, t.shape[1:], 5 * t.nbytes // t.shape[0])
        vals = dequantize(host[f.slot_offset : f.slot_offset + f.nbytes], QT(f.qtype))
        assert vals.size == 5 * t.shape[1] * t.shape[2]
        # (at most a 6-bit scale times a 4-bit value, Q6_K's 8-bit scale times a 6-bit one, times 2**-7)
        assert np.isfinite(vals).all() and 0 < np.abs(vals).max() <= 128 * 32 / 128
    assert fake.nbytes == sum(fake.tensor(n).nbytes for n in EXPERT_TENSORS) == host.nbytes


def test_the_timing_at_start_is_warmed_and_the_median_of_the_timed_rounds():
    """Each bucket's first two rounds of each call size (the kernel's scratch, threads, pages) are
    left out and the median of the rest is kept: one slow round moves nothing. A call of
    CPU_EXPERTS experts and one of a single expert give the line: a fixed part and a part an expert."""
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    four = [1.0, 1.0, 4e-4, 4e-4, 9.0]  # seconds of a compute of calibrate.CPU_EXPERTS experts (reps=3: 5 calls)
    one = [1.0, 1.0, 1.6e-4, 1.6e-4, 9.0]  # then of one expert
    got = calibrate.expert_seconds(_layer(), torch.float32, n_used=2, reps=3, clock=Clock(four + one))
    each = (4e-4 - 1.6e-4) / (calibrate.CPU_EXPERTS - 1)
    assert sorted(got) == list(BUCKETS)
    for c in got.values():
        assert c.each == pytest.approx(each) and c.fixed == pytest.approx(1.6e-4 - each)
    # one expert's call costing less an expert than the larger call: no fixed part (the line through 0)
    got = calibrate.expert_seconds(_layer(), torch.float32, n_used=2, reps=1, clock=Clock([4e-4] * 3 + [0.5e-4] * 3))
    assert all(c == (0.0, pytest.approx((4 * 4e-4 + 0.5e-4) / 17)) for c in got.values()), got


def test_the_timing_at_start_runs_the_real_path_at_each_bucket():
    """On this CPU (no stand-in clock): a positive time for a call of one expert at every bucket,
    from the experts read in place as blocks."""
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    got = calibrate.expert_seconds(_layer(), torch.float32, n_used=2, reps=1)
    assert sorted(got) == list(BUCKETS) and all(0 < c.of(1) < 1 and c.each > 0 and c.fixed >= 0 for c in got.values())


@pytest.mark.parametrize("cpu_us, link_us, on_cpu", [
    (20, 60, 6),   # the CPU three times a copy's speed: 6 of 8 missing (max(120, 120) us)
    (60, 60, 4),   # timed equal: an even split
    (600, 60, 0),  # ten times slower: every missing expert copied
])
def test_the_split_takes_the_cpu_where_it_is_timed_faster(cpu_us, link_us, on_cpu):
    """The timing at start (a stand-in clock) is the split's cost model until the run's own."""
    per_call = [cpu_us * 1e-6 * calibrate.CPU_EXPERTS]
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    t = calibrate.expert_seconds(_layer(), torch.float32, n_used=2, reps=1, clock=Clock(per_call))
    split = ExpertSplit(t, link_s=link_us * 1e-6)
    assert [split.count(b, 8) for b in BUCKETS] == [on_cpu] * len(BUCKETS)


def test_stats_print_the_timing_at_start_and_the_runs_own():
    """--stats: each bucket's time an expert, from start and from the run's layers once timed."""
    split = ExpertSplit({1: 180e-6, 8: 300e-6}, link_s=57e-6, host_s=67e-6, window=5)
    for s in (400e-6, 420e-6, 9e-3):
        split.observe(1, 2, 2 * s)
    split.observe(8, 1, 1e-3)  # (one layer: not yet the run's figure)
    text = split.describe()
    assert "batch 1 420 (at start 180; 3 layers timed)" in text
    assert "batch 8 300 (at start 300; 1 layers timed)" in text
    assert "copied 57 us, round trip 67 us" in text


# Mixtral 8x7B's experts in a Q4_K_M file: 8 of them, gate and up 14336 x 4096 (Q4_K), down 4096 x 14336 (Q6_K)
MIXTRAL = (8, 14336, 4096, (QT.Q4_K, QT.Q4_K, QT.Q6_K))


@pytest.mark.parametrize("path", ["in place", "packed blocks", "int4 and dense"])
def test_timing_mixtral_sized_experts_holds_at_most_256_mib(monkeypatch, path):
    """Eight whole Mixtral experts would be 0.85 GiB of blocks (more with packed copies): the
    timing at start holds at most 256 MiB of experts and their copies, on each of the CPU's paths
    (the native kernel reading blocks in place; blocks copied; aten's int4 and dequantized float32
    copies), and its figure is a timed expert's seconds times a whole expert's bytes over the timed
    one's."""
    from gguf import GGML_QUANT_SIZES

    from layerstream.compute.cpu import experts as cpu_experts, packing

    if not native.available() and path != "int4 and dense":
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    if path != "in place":
        monkeypatch.setattr(cpu_experts, "experts_in_place", lambda lay: False)
    if path == "int4 and dense":
        monkeypatch.setattr(packing, "native_blocks", lambda: False)
    made, held = [], []
    real_random = calibrate.random_expert_layer

    def random_layer(lay, n, seed=0):
        made.append(real_random(lay, n, seed) + (n,))
        return made[-1][:2]

    class Recorded(calibrate.CpuExperts):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            held.append(self)

    monkeypatch.setattr(calibrate, "random_expert_layer", random_layer)
    monkeypatch.setattr(calibrate, "CpuExperts", Recorded)
    E, n_ff, n_embd, types = MIXTRAL
    lay = calibrate.expert_layout(E, n_ff, n_embd, tuple(int(t) for t in types))
    per_call = 2e-3
    got = calibrate.expert_seconds(lay, torch.float32, n_used=2, reps=1, clock=Clock([per_call]))
    [(fake, host, n)], [cpu] = made, held
    assert host.nbytes + cpu.packed_bytes <= 256 << 20, (host.nbytes, cpu.packed_bytes)
    assert (cpu.packed_bytes > 0) == (path != "in place")
    whole = 2 * n_ff * n_embd // 256 * GGML_QUANT_SIZES[QT.Q4_K][1] + n_embd * n_ff // 256 * GGML_QUANT_SIZES[QT.Q6_K][1]
    timed = fake.nbytes // n
    assert timed < whole and fake.tensor(EXPERT_TENSORS[2]).shape[1] == n_embd  # cut in the FFN's width only
    # (every call the same time: no fixed part, each expert a quarter of a call of four)
    assert got == {b: (0.0, pytest.approx(per_call / calibrate.CPU_EXPERTS * whole / timed)) for b in BUCKETS}


def test_experts_that_fit_are_timed_whole():
    """Qwen3-30B-A3B's experts (768 wide, 3 MB) fit: timed as they are, as many as it cycles at most."""
    lay = calibrate.expert_layout(128, 768, 2048, (int(QT.Q4_K), int(QT.Q4_K), int(QT.Q6_K)))
    assert calibrate.timed_layout(lay, in_place=True, dtype_size=2) == (lay, 16 * calibrate.CPU_EXPERTS)
