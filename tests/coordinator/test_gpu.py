"""On a CUDA device: the engine against the CPU, and the pipeline streaming through a small VRAM budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ggufgen
import reference
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import (
    Budget,
    CpuOptions,
    ExpertOptions,
    PipelineConfig,
    ProcessOptions,
    ReaderOptions,
)
from layerstream.loader.gguf_index import open_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

TOKENS = [5, 17, 33, 80, 81, 90, 100, 7, 3, 250, 11, 42]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpu") / "tiny.gguf")
    ggufgen.write_model(path, arch="llama", n_layer=6, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                        qtype=["Q4_K", "Q6_K", "Q8_0", "Q5_K"], seed=5)
    return path


def _engine(path, pcfg=None, dtype="float32", **kw):
    index = open_model(path)
    cfg = EngineConfig(device="cuda", dtype=dtype, ctx=kw.pop("ctx", 128), max_seqs=2, **kw)
    return Engine.open(cfg, pcfg, index=index)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3moe", "gemma3"])
def test_cuda_logits_match_the_float64_reference(tmp_path, arch):
    path = ggufgen.write_model(str(tmp_path / f"{arch}.gguf"), arch=arch, n_layer=2, n_embd=256, n_ff=512,
                               qtype=["Q4_K", "Q8_0"], seed=2)
    want = reference.reference_logits(path, TOKENS)
    with _engine(path) as e:
        got = e.logits(TOKENS).double().numpy()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    with _engine(path, dtype=None) as e:  # CUDA's default half precision: float16, bfloat16 for gemma3
        assert e.backend.dtype == (torch.bfloat16 if arch == "gemma3" else torch.float16)
        got16 = e.logits(TOKENS).double().numpy()
    assert (got16.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_pipeline_on_cuda_streams_and_matches(tmp_path):
    # layers of 70 MB: a copy takes longer than a layer's compute, so copies run under compute
    model = ggufgen.write_model(str(tmp_path / "wide.gguf"), arch="llama", n_layer=4, n_embd=2048, n_ff=8192,
                                n_head=16, n_head_kv=4, qtype="Q8_0", seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with _engine(model, dtype="float16") as e:
        want = e.generate_batch([TOKENS[:7], TOKENS[:3]], params)
    pcfg = PipelineConfig(budget=Budget(resident_layers=1, kv_on_host=False, host_cache_gb=0), procs=ProcessOptions(trace=True))
    with _engine(model, pcfg, dtype="float16") as e:
        assert e.backend.plan.streamed, "the plan must stream layers for this test"
        assert e.generate_batch([TOKENS[:7], TOKENS[:3]], params) == want
        snaps = e.backend.collect_stats()
        path = str(tmp_path / "gpu.trace.json")
        e.backend.write_trace(path, snaps)
        compute_snap = next(s for s in snaps if s.get("role") == "compute")
        assert compute_snap.get("pinned"), "the staging arena was not registered with CUDA"
        # decode steps replayed the resident layer 0 from a graph (NOTE [ decode graphs ])
        assert compute_snap["count"].get("graph_layers", 0) >= 15, compute_snap["count"]
    with open(path) as f:
        ev = [x for x in json.load(f)["traceEvents"] if x["ph"] == "X"]
    copies = [(x["ts"], x["ts"] + x["dur"], x["args"].get("layer")) for x in ev if x["cat"] == "copy"]
    computes = [(x["ts"], x["ts"] + x["dur"], x["args"].get("layer")) for x in ev if x["cat"] == "compute"
                and "layer" in x["args"]]
    assert copies and computes
    overlap = sum(1 for a0, a1, la in copies for b0, b1, lb in computes if la != lb and a0 < b1 and b0 < a1)
    assert overlap > 0, "no copy overlapped the compute of another layer"


def test_pipeline_kv_on_host_matches_on_cuda(model):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with _engine(model, dtype="float16") as e:
        want = e.generate_batch([TOKENS[:5]], params)
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0, kv_on_host=True), readers=ReaderOptions(count=2)), dtype="float16") as e:
        assert e.generate_batch([TOKENS[:5]], params) == want


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_cuda_graph_decode_matches_eager(model, tmp_path, arch):
    """Decode steps replay graphs; a MoE model's layers too, their experts grouped on the device;
    the in-VRAM engine's graphs embed the step's ids themselves (a -1 read from the sampled ids)."""
    if arch != "llama":
        model = ggufgen.write_model(str(tmp_path / f"{arch}.gguf"), arch=arch, n_layer=3, n_embd=256, n_ff=512,
                                    n_expert=16, n_expert_used=2, qtype=["Q4_K", "Q8_0"], seed=6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with _engine(model, dtype="float16") as e:
        e.backend.runner.use_graphs = False
        want = e.generate_batch([TOKENS[:7], TOKENS[:3]], params)
    with _engine(model, dtype="float16", warm_up=False) as e:  # (the warm-up would capture one first)
        assert e.generate_batch([TOKENS[:7], TOKENS[:3]], params) == want
        graphs = e.backend.runner.layer_graphs.graphs
        assert graphs, "decode steps did not use a captured graph"
        assert all(key[-1] is not None for key in graphs), "a graph took its input rows from the host's embedding"


def test_the_warm_up_captures_the_first_decode_graph_before_any_request(model):
    """On a GPU the engine warms up at start (warm_up.py, NOTE [ warm-up ]): the batch-1 decode graph
    exists before any request, a reply's decode steps replay it (no capture of their own), and
    replies, in one process and in a pipeline that streams nothing, are as without the warm-up."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with _engine(model, dtype="float16", warm_up=False) as e:
        assert not e.backend.runner.layer_graphs.graphs
        want = e.generate_batch([TOKENS[:7]], params)
    with _engine(model, dtype="float16") as e:
        graphs = e.backend.runner.layer_graphs.graphs
        warmed = set(graphs)
        assert [key[1] for key in warmed] == [1]
        assert e.generate_batch([TOKENS[:7]], params) == want
        assert set(graphs) == warmed
    with _engine(model, PipelineConfig(), dtype="float16") as e:
        assert e.backend.warm_up_pays and e.core.lookahead == 2
        assert e.generate_batch([TOKENS[:7]], params) == want


def test_a_pipeline_that_streams_nothing_embeds_its_ids_in_the_decode_graph_and_matches(model):
    """The pipeline's whole-step graph gathers the step's rows from its pinned table itself
    (runner.py; NOTE [ decode graphs ] in graphs.py): one sequence seeded (its draw a graph too:
    sample_graphs.py), then two sequences greedy past the first KV bucket (a second graph), as the
    single-process engine gives them."""
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7, max_tokens=300, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=1030, ignore_eos=True)
    runs = [([TOKENS[:7]], seeded), ([TOKENS[:7], TOKENS[:3]], greedy)]
    with _engine(model, ctx=2048) as e:
        want = [e.generate_batch(prompts, p) for prompts, p in runs]
    pcfg = PipelineConfig(procs=ProcessOptions(trace=True))
    with _engine(model, pcfg, ctx=2048) as e:
        assert not e.backend.plan.streamed
        assert [e.generate_batch(prompts, p) for prompts, p in runs] == want
        compute = next(s for s in e.backend.collect_stats() if s.get("role") == "compute")
        assert compute["count"].get("graph_layers", 0) >= 500 * 6, compute["count"]  # (decode steps, every layer)


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """Llama-3.1-8B's matrices (4096 x 14336, 128k vocabulary) in 4 layers: budgets of real scale."""
    from layerstream.loader.synth import write_shaped_model

    return write_shaped_model(str(tmp_path_factory.mktemp("gpu") / "8b-4.gguf"), "llama-3.1-8b", 4, "Q4_K_M")


@pytest.mark.timeout(900)
def test_peak_device_memory_stays_within_the_budget(shaped):
    """The plan counts every byte: torch's peak reserved memory in the compute process never
    exceeds --vram-gb, over budgets (all resident, some, none), batch sizes and prompt lengths."""
    from layerstream.coordinator.plan import GiB

    rng = np.random.default_rng(0)
    seen = set()
    # the 4-layer 8B shape at ctx 1280 (plan arithmetic, tests/coordinator/test_plan_memory.py): 0.87 GiB
    # at batch 4 streams every layer, its KV in host memory, in 32-token steps; 1.1 GiB at batch 8 streams
    # every layer with the KV of one on the device; 1.25 GiB at batch 4 keeps 2; 1.45 GiB at batch 16
    # keeps 1; 2.5 GiB keeps all four in 512-token steps; 1.1 GiB at batch 1 in one-token steps
    for vram_gb, batch, prompt in [(0.87, 4, 700), (1.1, 8, 40), (1.25, 4, 1100), (1.45, 16, 300), (2.5, 1, 600),
                                   (1.1, 1, 200)]:
        index = open_model(shaped)
        cfg = EngineConfig(device="cuda", dtype="float16", ctx=1280, max_seqs=batch)
        with Engine.open(cfg, PipelineConfig(budget=Budget(vram_gb=vram_gb)), index=index) as e:
            plan = e.backend.plan
            seen.add((len(plan.resident), plan.kv_device_layers))
            prompts = [rng.integers(0, 1000, prompt if b == 0 else 20).tolist() for b in range(batch)]
            e.generate_batch(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            peak = next(s for s in e.backend.collect_stats() if s.get("role") == "compute")["device_peak_bytes"]
            assert 0 < peak <= vram_gb * GiB, (vram_gb, batch, prompt, peak / GiB, plan.describe(), plan.breakdown())
    assert len(seen) >= 3, f"the grid should cover different plans: {seen}"


@pytest.mark.timeout(600)
def test_a_mixture_of_experts_whose_expert_cache_takes_the_budgets_rest_stays_within_it(tmp_path):
    """Qwen3-30B-A3B's layers (4 of them) streamed at 2 GiB: the plan gives the expert cache what
    the budget leaves in whole expert slots, so it counts up to the budget's last slot; torch's peak
    reserved memory in the compute process stays within it through a prompt and decode steps."""
    from layerstream.coordinator.plan import GiB
    from layerstream.loader.synth import write_shaped_model

    path = write_shaped_model(str(tmp_path / "moe-4.gguf"), "qwen3-30b-a3b", 4, "Q4_K_M")
    rng = np.random.default_rng(0)
    for batch in (1, 4):
        cfg = EngineConfig(device="cuda", dtype="float16", ctx=1280, max_seqs=batch)
        with Engine.open(cfg, PipelineConfig(budget=Budget(vram_gb=2.0)), index=open_model(path)) as e:
            plan = e.backend.plan
            assert plan.streamed and dict(plan.parts)["expert cache"] > plan.slot_bytes, plan.describe()
            prompts = [rng.integers(0, 1000, 300 if b == 0 else 20).tolist() for b in range(batch)]
            e.generate_batch(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            peak = next(s for s in e.backend.collect_stats() if s.get("role") == "compute")["device_peak_bytes"]
            assert 0 < peak <= 2 * GiB, (batch, peak / GiB, plan.describe(), plan.breakdown())


@pytest.mark.parametrize("split", ["layers", "rows"])
@pytest.mark.parametrize("share", ["0.5", "auto"])
def test_cpu_share_on_cuda_agrees_with_the_single_process_engine(model, share, split):
    """The CPU computes part of each streamed Q4_K matrix, or the Q4_K FFN matrices of part of the
    streamed layers (bf16 scales), while the GPU computes the rest from blocks (fp16):
    teacher-forced top-1 against the resident CUDA engine. `auto` proposes its first share from the
    CPU's measured rate, which may be none on a machine busy with other tests (the GPU suite runs
    8 at once): its run agrees and says what it timed, and a fixed share must reach the CPU."""
    ids = TOKENS * 2
    with _engine(model, dtype="float16") as e:
        want = e.logits(ids)
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, step_tokens=4), cpu=CpuOptions(share=share, split=split))
    with _engine(model, pcfg, dtype="float16") as e:
        got = e.logits(ids)
        snaps = e.backend.collect_stats()
        table = e.backend.stats_table(snaps)
        if share == "auto":
            assert "CPU share: timed per batch" in table, table
        else:
            assert sum(s.get("bytes", {}).get("cpu_share", 0) for s in snaps) > 0
            assert "CPU share" in table and "cpu_share" in table
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_cpu_ffn_layers_give_their_vram_slot_back_early_and_agree(tmp_path):
    """NOTE [ early slot ] in streamed.py: with every FFN matrix 4-bit and the whole share the
    CPU's, each streamed layer's VRAM slot takes the next copy while the CPU computes its FFN;
    answers agree with the resident engine (a slot overwritten too soon would change them)."""
    path = str(tmp_path / "q4.gguf")
    ggufgen.write_model(path, arch="llama", n_layer=6, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, qtype="Q4_K",
                        seed=6)
    ids = TOKENS * 2
    with _engine(path, dtype="float16") as e:
        want = e.logits(ids)
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, step_tokens=4, vram_slots=2), cpu=CpuOptions(share="1", split="layers"))
    with _engine(path, pcfg, dtype="float16") as e:
        got = e.logits(ids)
        snap = next(s for s in e.backend.collect_stats() if s.get("role") == "compute")
    assert snap["count"].get("early_slot", 0) >= 6, snap["count"]
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


@pytest.mark.parametrize("moe_dense", ["resident", "stream"])
@pytest.mark.parametrize("arch,kw", [("qwen3moe", {}), ("mixtral", dict(arch="llama"))])
def test_expert_streaming_on_cuda_matches_resident(tmp_path, arch, kw, moe_dense):
    """Decode steps copy only the chosen experts from pinned staging into the device cache; the
    layers' other tensors are kept on the device after their first copy, or streamed each step."""
    path = ggufgen.write_model(str(tmp_path / f"{arch}.gguf"), **(dict(arch=arch) | kw), n_layer=3, n_embd=256,
                               n_ff=512, n_expert=16, n_expert_used=2, qtype=["Q4_K", "Q8_0"], seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with _engine(path, dtype="float16") as e:
        want = e.generate_batch([TOKENS[:7], TOKENS[:3]], params)
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(0.002, moe_dense)),
                 dtype="float16") as e:
        assert e.backend.plan.dense_resident == (moe_dense == "resident")
        assert e.generate_batch([TOKENS[:7], TOKENS[:3]], params) == want
        snaps = e.backend.collect_stats()
        ex = next(s["experts"] for s in snaps if s.get("experts"))
        graphed = next(s for s in snaps if s.get("role") == "compute")["count"].get("graph_layers", 0)
    assert ex["steps"] >= 8 and ex["misses"] > 0
    # kept attention and routers: each decode step's 3 layers ran as graphs around the expert fetch
    assert graphed >= (3 * 8 if moe_dense == "resident" else 0), graphed
    if moe_dense == "stream":
        assert graphed == 0
    # with their routers kept, layers 1 and 2 got experts predicted and copied ahead on the copy
    # stream (NOTE [ expert prefetch ]); the tokens above show they were the right bytes
    assert (ex["prefetch_hits"] > 0) == (moe_dense == "resident"), ex


def test_the_layer_slots_lent_to_the_expert_cache_on_cuda_keep_the_resident_engines_tokens(tmp_path):
    """NOTE [ the layer slots lent to the expert cache ]: on CUDA the ring's layer slots are the
    expert pool's room, so the second prompt's whole layers are copied over experts the decode
    before kept there. Both rounds give the resident engine's tokens (a reclaim that left entries
    in the room would read layer bytes as experts; a copy racing the last reads of the room shows
    only where the timing meets it: this model's steps are short), the room lent twice and taken
    back once with experts in it. The room holds the prompts' dequantization scratch too, which the
    second round's prompt step (13 tokens: past Q8_0's fused rows) writes over the experts kept there."""
    path = ggufgen.write_model(str(tmp_path / "moe.gguf"), arch="qwen3moe", n_layer=3, n_embd=256, n_ff=512,
                               n_expert=16, n_expert_used=2, qtype=["Q4_K", "Q8_0"], seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    rounds = [[TOKENS[:7], TOKENS[:3]], [TOKENS[5:12], TOKENS[2:8]]]
    with _engine(path, dtype="float16") as e:
        want = [e.generate_batch(p, params) for p in rounds]
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(0.002)),
                 dtype="float16") as e:
        assert [e.generate_batch(p, params) for p in rounds] == want
        ex = next(s["experts"] for s in e.backend.collect_stats() if s.get("experts"))
    assert ex["lends"] == 2 and ex["reclaimed"] > 0 and ex["room_scratch"] > 0, ex


def test_expert_streaming_at_batch_8_replays_its_graphs_and_matches_resident(tmp_path):
    """A mixture of experts' plan captures decode batches up to its own fused bound (memory.Sizes.graph_rows;
    before, every type's 4): eight sequences' decode steps run the streamed layers as their graphs, with
    the resident engine's tokens (32 experts, so that 8 tokens still stream their chosen ones)."""
    path = ggufgen.write_model(str(tmp_path / "moe8.gguf"), arch="qwen3moe", n_layer=3, n_embd=256, n_ff=512,
                               n_expert=32, n_expert_used=2, qtype=["Q4_K", "Q6_K"], seed=6)
    index = open_model(path)
    prompts = [TOKENS[i : i + 3 + i % 4] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def engine(pcfg):
        return Engine.open(EngineConfig(device="cuda", dtype="float16", ctx=128, max_seqs=8), pcfg, index=index)

    with engine(None) as e:
        want = e.generate_batch(prompts, params)
    # (no CPU share: the default's, at batch 8, computes in bf16 on the CPU; the next test has it)
    with engine(PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(0.002, "resident"),
                               cpu=CpuOptions(share="0"))) as e:
        assert e.backend.plan.graph_rows == 8
        got = e.generate_batch(prompts, params)
        snaps = e.backend.collect_stats()
    graphed = next(s for s in snaps if s.get("role") == "compute")["count"].get("graph_layers", 0)
    assert got == want
    assert graphed >= 3 * 5, graphed  # the five decode steps of all eight, each layer a graph pair


def test_the_default_cpu_share_computes_half_of_batch_8s_missing_experts_and_none_at_batch_2(tmp_path):
    """--cpu-share default (compute/cpu/config.py) on CUDA: a streamed MoE whose experts the native
    kernel reads in place gives steps of 5 to 8 tokens' missing experts half to the CPU, smaller
    steps none (a step's tokens count, prompts' too: these prompt steps, of 12 and 48 tokens, take
    none); each sequence's first decoded token (the step with the share) is the resident engine's
    for 7 of 8 sequences at least (the CPU's bf16 may tip a near tie)."""
    from layerstream.compute.cpu import native

    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    path = ggufgen.write_model(str(tmp_path / "moe8.gguf"), arch="qwen3moe", n_layer=3, n_embd=256, n_ff=512,
                               n_expert=32, n_expert_used=2, qtype=["Q4_K", "Q6_K"], seed=6)
    index = open_model(path)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    # (8 threads named: the default takes none with fewer, as a run pinned to 8 cores has: DEFAULT_MIN_THREADS)
    pcfg = PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(0.002, "resident"),
                          cpu=CpuOptions(threads=8))
    assert pcfg.cpu.share == "default"
    for n in (8, 2):
        prompts = [TOKENS[i : i + 6] for i in range(n)]
        cfg = EngineConfig(device="cuda", dtype="float16", ctx=128, max_seqs=n)
        with Engine.open(cfg, None, index=index) as e:
            want = e.generate_batch(prompts, params)
        with Engine.open(cfg, pcfg, index=index) as e:
            got = e.generate_batch(prompts, params)
            snaps = e.backend.collect_stats()
        ex = next(s["experts"] for s in snaps if s.get("experts"))
        words = next(s["cpu_experts"] for s in snaps if s.get("cpu_experts"))
        assert "batch 4 0%, batch 8 50%" in words, words
        assert (ex["cpu"] > 0) == (n == 8), (n, ex)
        assert sum(g == w for g, w in zip(got, want)) >= n - 1 if n == 8 else got == want


def test_cpu_experts_on_cuda_agree_with_the_single_process_engine(tmp_path):
    """NOTE [ CPU experts ] on CUDA: the CPU computes half of each one-token step's missing
    experts (bf16 scales) while the GPU fetches and computes the rest in the streamed layers'
    graphs, which weigh the CPU's pairs 0; teacher-forced top-1 against the resident engine."""
    path = ggufgen.write_model(str(tmp_path / "moe.gguf"), arch="qwen3moe", qtype="Q4_K", n_layer=3, n_embd=256,
                               n_ff=256, n_expert=16, n_expert_used=2, seed=8)
    ids = TOKENS * 2
    with _engine(path, dtype="float16") as e:
        want = e.logits(ids)
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, step_tokens=1), cpu=CpuOptions(share="0.5"), experts=ExpertOptions(0.002))
    with _engine(path, pcfg, dtype="float16") as e:
        got = e.logits(ids)
        snaps = e.backend.collect_stats()
    ex = next(s["experts"] for s in snaps if s.get("experts"))
    graphed = next(s for s in snaps if s.get("role") == "compute")["count"].get("graph_layers", 0)
    assert ex["cpu"] > 0 and ex["misses"] > 0, ex
    assert graphed >= 3 * (len(ids) - 1), graphed  # the one-token steps' layers ran as graphs
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95
    # the CPU's bf16 activations and scales may tip a router near a tie to another expert at a
    # position (on an H200 the largest difference was 25% of the largest logit, with top-1
    # still agreeing); most positions' logits stay close, and a missing CPU sum moves them all
    close = (got - want).abs().amax(-1) < 0.05 * want.abs().max().item()
    assert close.float().mean().item() >= 0.9, close
