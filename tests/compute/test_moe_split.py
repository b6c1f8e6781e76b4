"""A streamed MoE layer's missing experts split between the CPU and the copies (NOTE [ CPU experts ],
NOTE [ the experts' split ]): decoding a tiny qwen3moe and a tiny Mixtral with their Q4_K_M
experts (Q4_K gate and up, Q6_K down) gives the resident layers' tokens and logits (dequantized: torch's matmuls) with every
missing expert on the CPU, none, and a share, at batch 1 and 4; the cost model's choices."""

import numpy as np
import pytest
import torch

import ggufgen
from layerstream.compute.cpu import native
from layerstream.compute.cpu.balancer import Balancer
from layerstream.compute.cpu.config import parse_cpu_share
from layerstream.compute.cpu.expert_split import Cost, ExpertSplit
from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.expert_layout import EXPERT_TENSORS, max_in_flight, slot_bytes, streams_experts
from layerstream.compute.experts import ExpertCache, ExpertSet
from layerstream.compute.runner import ModelRunner
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.weights import GlobalWeights, load_tensor
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import layer_layouts
from layerstream.proto.timeline import Timeline

# a Q4_K_M file's expert types; the other matrices dense (Triton's interpreter runs only the grouped experts)
EXPERT_TYPES = {"ffn_gate_exps.weight": "Q4_K", "ffn_up_exps.weight": "Q4_K", "ffn_down_exps.weight": "Q6_K", "*": "F32"}


class _Layers:
    """A LayerSource: whole resident layers (`streamed` False), or layers whose experts come
    through an ExpertSet from the layer's bytes on the host, as the pipeline's streamed layers.
    The whole layers are dequantized to float32 (gguf blocks expanded once, torch's matmuls): the
    reference runs no Triton kernel, which under the interpreter cost two thirds of each case."""

    def __init__(self, index, cache=None, cpu=None, frac=0.0):
        self.layouts = layer_layouts(index)
        self.whole = {i: {n: load_tensor(index, t, "cpu", torch.float32, False) for n, t in index.layers[i].items()}
                      for i in range(len(self.layouts))}
        self.host = {}
        for i, lay in enumerate(self.layouts):
            host = np.zeros(lay.nbytes, dtype=np.uint8)
            for t in lay.tensors:
                host[t.slot_offset : t.slot_offset + t.nbytes] = index.tensor_bytes(index.layers[i][t.name])
            self.host[i] = host
        self.cache, self.cpu, self.frac = cache, cpu, frac
        self.streamed = False

    def layer(self, i):
        if not self.streamed:
            return self.whole[i]
        dense = {n: w for n, w in self.whole[i].items() if n not in EXPERT_TENSORS}
        return dict(dense, experts=ExpertSet(self.cache, i, self.layouts[i], self.host[i], cpu=self.cpu,
                                             frac=self.frac))

    def release(self, i):
        pass

    times_graphs = False

    def fixed(self, i):
        return None

    def graph_ran(self, first, stop, start, end):
        pass

    def moe_graph_key(self, i):
        return None


def _greedy(path, batch, frac=None, steps=3, share=None):
    """Greedy decode of `batch` sequences: the logits of each step [steps, batch, n_vocab] and the
    layers' source. frac None: resident layers; else streamed experts, the CPU taking that share
    of each layer's missing ones (0: none, every missing expert copied). `share`: a --cpu-share
    value whose fixed share at this batch size the CPU takes instead (frac then ignored)."""
    cfg = parse_cpu_share(share) if share is not None else None
    if cfg is not None:
        frac = cfg.fraction
    index = open_model(path)
    hp = index.hparams
    assert streams_experts(hp.moe.n_expert, hp.moe.n_expert_used, batch)  # (as the pipeline's expert steps)
    layouts = layer_layouts(index)
    tl = Timeline("compute", "t")
    cache = ExpertCache(2 * slot_bytes(layouts), torch.device("cpu"), torch.float32, True, tl, "lfu",
                        slot_bytes(layouts), max_in_flight(hp.moe.n_expert, hp.moe.n_expert_used))
    fixed = cfg.fixed() if cfg is not None else frac
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, frac, fixed=fixed), 1 << 30, torch.float32, tl) if frac else None
    src = _Layers(index, cache, cpu, frac or 0.0)
    r = ModelRunner(hp, GlobalWeights(index, "cpu", torch.float32, quantized=True), src, "cpu", torch.float32,
                    ctx=64, max_seqs=batch)
    seqs = [[5 + b, 17, 33 + 2 * b][: 2 + b % 2] for b in range(batch)]
    r.step([SeqStep(row=b, tokens=t, slots=list(range(len(t))), positions=list(range(len(t))),
                    kv_pos=list(range(len(t)))) for b, t in enumerate(seqs)], "none")
    src.streamed = frac is not None  # decode steps fetch only their chosen experts (a prompt streams whole layers)
    out, last = [], [t[-1] for t in seqs]
    for _ in range(steps):
        if cpu is not None:
            src.frac = cpu.set_step(batch)  # (as ExpertStream.set_step: the step's share at its batch size)
        lg = r.step([SeqStep(row=b, tokens=[last[b]], slots=[len(t)], positions=[len(t)], kv_pos=list(range(len(t) + 1)))
                     for b, t in enumerate(seqs)], "last")
        out.append(lg)
        last = lg.argmax(-1).tolist()
        for b, t in enumerate(seqs):
            t.append(last[b])
    return torch.stack(out), src


# llama with experts is Mixtral's layout. The Triton interpreter's grouped experts make each case
# costly (a decode step's cost grows with its (token, expert) pairs: batch 2 costs twice batch 1),
# so each value of layout, batch and kernel appears rather than every combination: the layout's
# routing and weights are the same at any batch, the batch's pairs per expert the same in either layout.
@pytest.mark.parametrize("arch, batch, kernel", [("qwen3moe", 2, "native"), ("llama", 1, "native"),
                                                 ("qwen3moe", 1, "aten"), ("llama", 4, "native")])
def test_cpu_and_copies_split_gives_the_resident_engines_tokens(tmp_path, arch, batch, kernel, monkeypatch):
    """kernel "native": the CPU reads the experts' blocks (cpu/qdot.c); "aten": the kernel
    unavailable, packed int4 and dequantized Q6_K. Every missing expert on the CPU, then half (the
    all-copy path, which does not reach the CPU, is the pipeline tests' expert streaming)."""
    pytest.importorskip("triton")  # the device's grouped experts (Triton's interpreter on the CPU)
    if kernel == "aten":
        monkeypatch.setattr(native, "library", lambda: None)
    elif not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    path = ggufgen.write_model(str(tmp_path / "moe.gguf"), arch=arch, qtype=EXPERT_TYPES, n_layer=2, n_embd=256,
                               n_head=2, n_head_kv=1, n_ff=256, n_vocab=256, n_expert=16, n_expert_used=2, seed=5)
    want, _ = _greedy(path, batch, steps=2)  # (the second step meets the cache the first left)
    for frac in (1.0, 0.5):  # every missing expert on the CPU, half
        got, src = _greedy(path, batch, frac, steps=2)
        assert torch.equal(got.argmax(-1), want.argmax(-1)), frac  # the same tokens, step after step
        assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item(), frac
        cache, cpu = src.cache, src.cpu
        if frac == 1.0:  # nothing copied: the CPU computed each missing expert
            assert cache.bytes_moved == 0 and cache.misses == 0 and cpu.computed > 0
            forms = {type(m).__name__ for mats in cpu.packed.values() for m in mats}
            assert forms == (set() if kernel == "native" else {"PackedRows", "DenseRows"})  # (native: read in place)
        else:
            assert cache.misses > 0 and cpu.computed > 0


def test_a_share_by_batch_size_leaves_batch_1_to_the_copies_and_gives_batch_2_to_the_cpu(tmp_path):
    """--cpu-share 2:1: steps of one token copy every missing expert, steps of two compute every
    one on the CPU; both give the resident engine's tokens."""
    pytest.importorskip("triton")
    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    path = ggufgen.write_model(str(tmp_path / "moe.gguf"), arch="qwen3moe", qtype=EXPERT_TYPES, n_layer=2, n_embd=256,
                               n_head=2, n_head_kv=1, n_ff=256, n_vocab=256, n_expert=16, n_expert_used=2, seed=5)
    for batch in (1, 2):
        want, _ = _greedy(path, batch, steps=2)
        got, src = _greedy(path, batch, steps=2, share="2:1")
        assert torch.equal(got.argmax(-1), want.argmax(-1)), batch
        assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item(), batch
        if batch == 1:  # no share at batch 1: every missing expert copied
            assert src.cpu.computed == 0 and src.cache.misses > 0
        else:  # the whole share at batch 2: nothing copied
            assert src.cpu.computed > 0 and src.cache.misses == 0 and src.cache.bytes_moved == 0


def test_a_share_by_batch_size_wakes_the_kernels_workers_only_in_the_steps_that_have_one(monkeypatch):
    """--cpu-share 1:0,8:0.5 through the balancer a fixed share uses: none at batch 1 to 4, half
    at 5 to 8, none above (the CPU takes no share of larger steps); the workers spin only where
    there is one, and the words --stats prints say which."""
    from layerstream.compute.cpu import experts as cpu_experts

    spins = []
    monkeypatch.setattr(native, "spin", spins.append)
    cfg = parse_cpu_share("1:0,8:0.5")
    bal = Balancer({}, 0.0, 1.0, 1.0, cfg.fraction, fixed=cfg.fixed(), what="missing experts")
    cpu = CpuExperts(bal, 1 << 30, torch.float32, Timeline("compute", "t"))
    assert [cpu.set_step(t) for t in (1, 4, 5, 8, 9, 1)] == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    assert spins == [0.0, cpu_experts.SPIN_S, 0.0]  # (a library call only where the spin changes)
    assert bal.describe() == "fixed by batch, of the missing experts: batch 1 0%, batch 2 0%, batch 4 0%, batch 8 50%"
    one = Balancer({}, 0.0, 1.0, 1.0, 0.5, fixed=parse_cpu_share("0.5").fixed(), what="missing experts")
    assert one.describe() == "fixed at 50% of the missing experts, batches up to 8"
    assert [one.share(t) for t in (1, 8, 9)] == [0.5, 0.5, 0.0]


def test_the_split_model_copies_all_where_the_cpu_is_slower_and_halves_where_timed_equal():
    """NOTE [ the experts' split ]: the count per layer minimises the slower side's time."""
    s = ExpertSplit({1: 100e-6, 8: 100e-6}, link_s=100e-6)
    assert s.count(1, 8) == 4 and s.count(1, 7) == 3 and s.count(1, 1) == 0  # (a tie: the fewest on the CPU)
    slow = ExpertSplit({1: 1e-3}, link_s=100e-6)
    assert slow.count(1, 8) == 0  # one CPU expert costs more than the eight copies
    assert slow.count(1, 20) == 1  # (twenty copies cost more than one CPU expert)
    fast = ExpertSplit({1: 50e-6}, link_s=100e-6)
    assert fast.count(1, 6) == 4  # max(4 * 50, 2 * 100) us
    assert ExpertSplit({1: 50e-6}, link_s=100e-6, host_s=1e-3).count(1, 6) == 0  # the round trip costs more
    assert s.count(16, 8) == 0  # above the balancer's largest bucket: the CPU takes none
    # beside experts it already holds (held back from the copy ahead), the CPU takes fewer of the rest
    assert s.count(1, 4, already=2) == 1 and s.count(1, 2, already=4) == 0  # max(3, 3); 4 on the CPU already
    assert fast.count(1, 4, already=2) == 2  # max((2 + 2) * 50, 2 * 100) us


def test_a_calls_fixed_cost_is_paid_once_and_fitted_from_the_runs_calls_of_two_sizes():
    """NOTE [ the experts' split ]: a call of m experts costs fixed + m * each, the fixed part paid
    once a call (beside experts the CPU already holds, not again); the run's calls
    of two sizes, timed SEEN_MIN times each, give the line through their medians (a model of
    seconds an expert took 80 us an expert from the calls of four, and 95 from the calls of two)."""
    s = ExpertSplit({1: Cost(100e-6, 50e-6)}, link_s=60e-6)
    assert s.count(1, 8) == 3  # max(100 + 3 * 50, 5 * 60) = 300 us; 2: 360, 4: 300 (a tie: the fewest)
    assert s.count(1, 2) == 0  # one on the CPU: max(150, 60) against two copies' 120
    # beside two it holds already, the fixed part is paid: one more, max(100 + 3 * 50, 5 * 60) against 6 * 60
    assert s.count(1, 6, already=2) == 1
    run = ExpertSplit({1: Cost(0.0, 100e-6)}, link_s=60e-6, window=15)  # (timed at start without a fixed part)
    for _ in range(3):
        run.observe(1, 4, 320e-6)  # 80 us an expert
    assert run.cost[1] == (0.0, pytest.approx(80e-6))  # one size: the start's line scaled through it
    run.observe(1, 2, 5e-3)  # one slow call of another size (a thread off its core) moves nothing
    assert run.cost[1] == (0.0, pytest.approx(80e-6))
    for _ in range(3):
        run.observe(1, 2, 190e-6)  # (the size's median: 190 us, the slow call outvoted)
    assert run.cost[1].each == pytest.approx(65e-6) and run.cost[1].fixed == pytest.approx(60e-6)
    assert run.count(1, 8) == 3  # max(60 + 3 * 65, 5 * 60) = 300 us; 4: max(320, 240)
    assert "batch 1 65 + 60 a call (at start 100; 7 layers timed)" in run.describe()


def test_the_cpus_measured_time_at_each_batch_size_moves_the_split():
    """CpuExperts times its work (a stand-in clock here) into the model, per batch bucket: a
    CPU as fast as a copy takes half a layer's missing experts; once timed ten times slower in
    most of the last layers, none at that batch size, while the other batch sizes keep their own
    timings. One slow layer among fast ones moves nothing (the median of the window)."""

    class Clock:
        def __init__(self):
            self.t, self.step = 0, 0

        def __call__(self):
            self.t += self.step
            return self.t

    clock = Clock()
    split = ExpertSplit({1: 100e-6, 4: 100e-6}, link_s=100e-6, window=5)
    E, n = 8, 64
    g = torch.Generator().manual_seed(0)
    lay, host = _int4_layer(E, n, g)
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1 << 30, torch.float32, Timeline("compute", "t"),
                     split, clock)
    cpu.set_step(4)
    assert cpu.choose(0, lay, list(range(8)), 1.0) == [0, 1, 2, 3]
    h, w = torch.randn(4, n, generator=g), torch.rand(4, 2, generator=g)
    ids = [0, 1, 2, 3, 0, 2, 1, 3]
    clock.step = 400_000  # each reading 0.4 ms after the last: 100 us an expert of four
    for _ in range(4):
        cpu.compute(0, lay, host, [0, 1, 2, 3], ids, h, w)
    clock.step = 40_000_000  # one layer of 10 ms an expert (a thread off its core)
    cpu.compute(0, lay, host, [0, 1, 2, 3], ids, h, w)
    assert split.cost[4].each == pytest.approx(100e-6)
    assert cpu.choose(0, lay, list(range(8)), 1.0) == [0, 1, 2, 3]  # still half
    clock.step = 4_000_000  # then 1 ms an expert, layer after layer
    for _ in range(3):
        cpu.compute(0, lay, host, [0, 1, 2, 3], ids, h, w)
    assert split.cost[4].each == pytest.approx(1e-3)
    assert cpu.choose(0, lay, list(range(8)), 1.0) == []  # ten times a copy: every missing expert copied
    cpu.set_step(1)
    assert cpu.choose(0, lay, list(range(8)), 1.0) == [0, 1, 2, 3]  # batch 1's own timing
    assert cpu.choose(0, lay, list(range(8)), 0.25) == [0, 1]  # and never past the balancer's share


def _int4_layer(E, n, g):
    """A layer of E experts of random Q4_0 blocks, n x n each: its layout and bytes."""
    from gguf import GGMLQuantizationType as QT

    from layerstream.loader.layout import LayerLayout, SlotTensor

    per = n * n // 32 * 18
    tensors = tuple(SlotTensor(name, int(QT.Q4_0), (E, n, n), j * E * per, E * per, "f", 0)
                    for j, name in enumerate(EXPERT_TENSORS))
    blocks = torch.randint(0, 256, (3 * E * n * n // 32, 18), dtype=torch.uint8, generator=g)
    blocks[:, :2] = torch.tensor([0x00, 0x20], dtype=torch.uint8)  # d = 2**-7 (fp16 0x2000)
    return LayerLayout(0, tensors, 3 * E * per), blocks.reshape(-1).numpy()


def test_a_step_with_a_share_keeps_the_native_kernels_workers_awake(monkeypatch):
    """A call a layer: the kernel's workers spin SPIN_S between calls in a step where the CPU
    takes experts, and go back to the kernel's own default (0) in one where it takes none."""
    from layerstream.compute.cpu import experts as cpu_experts

    spins = []
    monkeypatch.setattr(native, "spin", spins.append)
    tl = Timeline("compute", "t")
    on = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 0.5, fixed=0.5), 1 << 30, torch.float32, tl)
    off = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 0.0, fixed=0.0), 1 << 30, torch.float32, tl)
    assert on.set_step(1) == 0.5 and off.set_step(1) == 0.0
    assert spins == [cpu_experts.SPIN_S, 0.0] and cpu_experts.SPIN_S > 0
