"""The streamed MoE layer's two graphs (NOTE [ decode graphs ] in graphs.py) on the CPU: CUDA
graphs stood in for by functions that replay into the tensors their capture returned, so the
host's part (the fetch, the offsets, the CPU's experts and their weights) is checked in CI
against the same layers run eagerly."""

import numpy as np
import pytest
import torch

import ggufgen
from layerstream.compute.cpu.balancer import Balancer
from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.embedding import mapped_embedding
from layerstream.compute.expert_layout import EXPERT_TENSORS, max_in_flight, slot_bytes
from layerstream.compute.experts import ExpertCache, ExpertSet
from layerstream.compute.runner import ModelRunner
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.weights import GlobalWeights, load_tensor
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import layer_layouts
from layerstream.proto.timeline import Timeline


class _Streamed:
    """A LayerSource whose layers keep all but their experts on the device; the experts come
    through an ExpertSet from the layer's bytes on the host, as the pipeline's StreamedLayers."""

    def __init__(self, index, cache, cpu, frac, ahead=False, resident=0):
        self.layouts = layer_layouts(index)
        # the leading layers kept whole, their experts as blocks (the resident layers' graph)
        self.kept = {i: {n: load_tensor(index, t, "cpu", torch.float32, True) for n, t in index.layers[i].items()}
                     for i in range(resident)}
        self.dense, self.host = {}, {}
        for i, lay in enumerate(self.layouts):
            self.dense[i] = {n: load_tensor(index, t, "cpu", torch.float32, True) for n, t in index.layers[i].items()
                             if n not in EXPERT_TENSORS}
            host = np.zeros(lay.nbytes, dtype=np.uint8)
            for t in lay.tensors:
                host[t.slot_offset : t.slot_offset + t.nbytes] = index.tensor_bytes(index.layers[i][t.name])
            self.host[i] = host
        # (a prompt's whole layers dequantized: the same in every run, and no Triton kernel, which
        # the interpreter runs slowly)
        self.whole = {i: {n: load_tensor(index, t, "cpu", torch.float32, False) for n, t in index.layers[i].items()}
                      for i in range(len(self.layouts))}
        self.cache, self.cpu, self.frac, self.ahead = cache, cpu, frac, ahead
        self.prompt = False  # a prompt step streams whole layers (as in the pipeline)
        self.asked = []  # the experts each prefetch was asked to copy ahead

    def layer(self, i):
        if self.prompt:
            return self.whole[i]
        nxt = i + 1 if self.ahead and i + 1 < len(self.layouts) else None  # NOTE [ expert prefetch ]
        return dict(self.dense[i], experts=ExpertSet(
            self.cache, i, self.layouts[i], self.host[i], dense_fixed=True, cpu=self.cpu, frac=self.frac,
            next_router=None if nxt is None else self.dense[nxt],
            prefetch_next=None if nxt is None else lambda ex: self.asked.append(ex) or self.cache.prefetch(
                nxt, ex, self.layouts[nxt], self.host[nxt]),
            next_lay=None if nxt is None else self.layouts[nxt]))

    def release(self, i):
        pass

    times_graphs = False

    def fixed(self, i):
        return self.kept.get(i)

    def graph_ran(self, first, stop, start, end):
        self.graphed = getattr(self, "graphed", 0) + stop - first

    def moe_graph_key(self, i):
        return None if self.prompt else self.ahead and i + 1 < len(self.layouts)


class _Graph:
    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        new = self.run()
        for o, n in zip(*(x if isinstance(x, tuple) else (x,) for x in (self.out, new))):
            o.copy_(n)


def _decode(path, graphs: bool, frac: float, ahead: bool = False, alternate: bool = False, batch: int = 2,
            resident: int = 0, runner: list | None = None):
    index = open_model(path)
    hp = index.hparams
    layouts = layer_layouts(index)
    tl = Timeline("compute", "t")
    cache = ExpertCache(3 * slot_bytes(layouts), torch.device("cpu"), torch.float32, True, tl, "lfu",
                        slot_bytes(layouts), max_in_flight(hp.moe.n_expert, hp.moe.n_expert_used), 4 if ahead else 0)
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, frac, fixed=frac), 1 << 30, torch.float32, tl) if frac else None
    if alternate:  # the CPU takes its share of a layer's experts every other time it is asked, else none
        choose, calls = cpu.choose, {}

        def every_other(i, *a):
            calls[i] = calls.get(i, 0) + 1
            return choose(i, *a) if calls[i] % 2 else []
        cpu.choose = every_other
    if cpu is not None:  # the experts held back from the copy ahead for the CPU (NOTE [ CPU experts ])
        reserve, cpu.held_back = cpu.reserve, []
        cpu.reserve = lambda *a: (lambda got: cpu.held_back.append(got) or got)(reserve(*a))
    src = _Streamed(index, cache, cpu, frac, ahead, resident)
    glob = GlobalWeights(index, "cpu", torch.float32, quantized=True)
    r = ModelRunner(hp, glob, src, "cpu", torch.float32, ctx=64, max_seqs=batch,
                    embed=mapped_embedding(glob, torch.device("cpu"), torch.float32) if resident else None)
    if runner is not None:
        runner.append(r)
    if graphs:  # the CUDA-only switches, stood in for: graphs on in decode steps, the `resident` leading layers
        r._graph_layers = lambda seqs: (lambda on: (on, resident if on else 0))(all(len(s.tokens) == 1 for s in seqs))
        r.capture.capture = lambda run, what="graph": (lambda out: (_Graph(run, out), out))(run())
        early = r.moe_graphs._next_router_early

        def count_early(*a):
            early(*a)
            src.early = getattr(src, "early", 0) + (r.moe_graphs.early is not None)
        r.moe_graphs._next_router_early = count_early
    seqs = [[5, 17, 33], [9, 3]] + [[(11 * b + 2) % hp.n_vocab] * (1 + b % 3) for b in range(2, batch)]
    src.prompt = True
    r.step([SeqStep(row=b, tokens=t, slots=list(range(len(t))), positions=list(range(len(t))),
                    kv_pos=list(range(len(t)))) for b, t in enumerate(seqs)], "none")
    src.prompt = False
    logits = []
    for j in range(3):
        steps = []
        for b, t in enumerate(seqs):
            p = len(t) + j
            steps.append(SeqStep(row=b, tokens=[(7 * p + b) % hp.n_vocab], slots=[p], positions=[p],
                                 kv_pos=list(range(p + 1))))
        logits.append(r.step(steps, "last"))
    if cpu is not None:
        cpu.asked = src.asked
    return torch.stack(logits), getattr(src, "graphed", 0), cpu, cache, getattr(src, "early", 0)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """The model and its eager decode's logits, which both tests compare with (the tests only read them)."""
    pytest.importorskip("triton")
    # Q4_0 (4-bit, which the CPU's experts need) is the block type the interpreter runs fastest
    path = ggufgen.write_model(str(tmp_path_factory.mktemp("moe") / "moe.gguf"), arch="qwen3moe", qtype="Q4_0",
                               n_layer=2, n_embd=64, n_ff=64, n_expert=8, n_expert_used=2, seed=9)
    return path, _decode(path, graphs=False, frac=0.0)[0]


def test_streamed_moe_graph_path_matches_eager_layers(eager):
    """With and without the CPU's share of the experts (half of each step's missing ones), and
    with the next layer's graph A launched early."""
    path, want = eager
    for frac, ahead in ((0.0, False), (0.5, False), (0.0, True), (0.5, True)):
        got, graphed, cpu, cache, early = _decode(path, graphs=True, frac=frac, ahead=ahead)
        assert graphed == 2 * 3  # every decode step's two layers ran through the graph path
        # layer 1's attention and router ran right after layer 0's experts once its graphs existed
        # (NOTE [ the next router early ] in graphs.py): in the second and third decode steps
        assert early == 2
        if frac:
            assert cpu.computed > 0
            # with the prefetch, the CPU's share is held back from the copy ahead: never copied ahead
            assert any(cpu.held_back) == ahead and len(cpu.held_back) == len(cpu.asked)
            assert all(not set(held) & set(asked) for held, asked in zip(cpu.held_back, cpu.asked))
            # the CPU's inputs came with the ids, in the layer's one sync (NOTE [ one sync a layer ])
            assert cache.tl.count["wait_route"] == 2 * 3 and "cpu_to_host" not in cache.tl.count
            # graph B added the CPU's sum as posted (NOTE [ the CPU's sum posted to the device ]); the
            # host took each call's end after the launches
            assert cache.tl.count["wait_cpu"] == cpu.tl.count["cpu_experts"] > 0
        # with the prefetch, graph A also predicts layer 1's experts from layer 0 (NOTE [ expert prefetch ])
        assert (cache.ahead.copied > 0) == ahead and (cache.ahead.hits > 0) == ahead
        assert (got.argmax(-1) == want.argmax(-1)).all(), frac
        assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item(), frac


def test_the_resident_layers_graph_embeds_the_steps_ids_and_matches_eager_layers(eager):
    """A leading layer kept whole runs in the resident layers' graph, which embeds the step's ids
    itself where the embedding is on the device (runner.step; NOTE [ decode graphs ] in graphs.py),
    and the streamed layer after it through its two graphs: the eager layers' logits."""
    path, want = eager
    runner = []
    got, graphed, _, _, _ = _decode(path, graphs=True, frac=0.0, resident=1, runner=runner)
    assert graphed == 2 * 3  # each decode step: layer 0 in the resident graph, layer 1 through its two
    keys = list(runner[0].layer_graphs.graphs)
    assert keys and all(key[0] == 1 and key[-1] is not None for key in keys)  # (layer 0 alone, the ids embedded)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()


def test_graph_path_when_the_cpu_takes_experts_in_some_steps_only(eager):
    """A layer's graph B weighs the CPU's pairs 0 through its keep weights; where the CPU then
    takes none, they must be 1 again (graphs.py uploads them only when that changes)."""
    path, want = eager
    got, graphed, cpu, _, _ = _decode(path, graphs=True, frac=1.0, alternate=True)
    assert graphed == 2 * 3 and cpu.computed > 0
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()


def test_the_graph_path_at_batch_8_matches_eager_layers(tmp_path):
    """Eight sequences a step, the most a plan captures for a mixture of experts (memory.Sizes.graph_rows),
    with the CPU's share and the next layer's experts predicted: as the same layers run eagerly (32
    experts, so that a step of 8 tokens still streams its chosen ones, as the real shape's 128 do)."""
    pytest.importorskip("triton")
    path = ggufgen.write_model(str(tmp_path / "moe32.gguf"), arch="qwen3moe", qtype="Q4_0", n_layer=2, n_embd=64,
                               n_ff=64, n_expert=32, n_expert_used=2, seed=5)
    want = _decode(path, graphs=False, frac=0.0, batch=8)[0]
    got, graphed, cpu, cache, early = _decode(path, graphs=True, frac=0.5, ahead=True, batch=8)
    assert got.shape[1] == 8 and graphed == 2 * 3 and early == 2 and cpu.computed > 0 and cache.ahead.copied > 0
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()
