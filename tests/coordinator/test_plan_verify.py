"""With a draft model or --lookup, the plan counts the decode graphs a verifying step's rows replay
(memory.Sizes.graph_rows; runner.py, NOTE [ drafts verified as decode rows ]), prints them, and the
compute process captures the batches the plan counted; --serve's default rows count the draft."""

from __future__ import annotations

import torch

import ggufgen
from layerstream.compute.device import keeps_quantized, resolve_dtype
from layerstream.compute.runner import GRAPH_KV_MIN
from layerstream.coordinator.draft_plan import draft_memory, draft_tokens_for
from layerstream.coordinator.engine import EngineConfig
from layerstream.coordinator.launch import make_launch
from layerstream.coordinator.memory import kv_buckets
from layerstream.coordinator.pipeline_config import Budget, PipelineConfig
from layerstream.coordinator.plan import GiB, MiB, make_plan
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import layer_layouts
from layerstream.loader.synth import shaped_index
from layerstream.proto.child import ChildEndpoints
from plans import plan


def graphs(p) -> int:
    return dict(p.parts)["decode graphs"]


def test_a_drafting_plan_counts_graphs_up_to_its_verify_rows_and_prints_them(l8):
    """8B at 4 GiB, batch 1: without drafts one batch is captured (under 10 MiB of graphs); drafting 4
    tokens, batches 1 to 5, whose pool holds a 5-row step with qsmall's split partials (4 splits of
    K, float32, over the FFN's 14336 rows) and each batch's hidden states at every KV bucket."""
    alone = plan(l8, 4, ctx=4096)
    assert alone.graph_rows == 1 and graphs(alone) < 10 * MiB
    assert "decode graphs of up to" not in alone.describe()
    drafting = plan(l8, 4, ctx=4096, draft_tokens=4)
    assert drafting.graph_rows == 5
    assert "decode graphs of up to 5 rows" in drafting.describe()
    assert sum(v for _, v in drafting.parts) == drafting.device_bytes <= 4 * GiB
    partials = 4 * 5 * 14336 * 4
    buckets = kv_buckets(4096, GRAPH_KV_MIN)
    assert buckets == 3  # KV lengths 1024, 2048, 4096 (the decode kernel reads only the used slots)
    outs = sum(range(1, 6)) * 4096 * 2 * buckets
    assert graphs(drafting) >= graphs(alone) + 2 * partials + outs
    assert f"decode graphs {graphs(drafting) / GiB:.2f} GiB" in drafting.breakdown()
    # four rows: about 52 MB (two 20 MiB segments of the transient's pool)
    assert 40e6 < graphs(plan(l8, 4, ctx=4096, draft_tokens=3)) < 60e6


def test_graph_rows_stop_where_rows_leave_the_fused_kernels_or_the_step(l8):
    # Q4_K and Q6_K stay fused up to 16 rows, VERIFY_ROWS 16: no more graphs for longer drafts
    assert plan(l8, 4, ctx=512, draft_tokens=15).graph_rows == 16
    assert plan(l8, 4, ctx=512, draft_tokens=40).graph_rows == 16
    # two sequences drafting 4 each: a verifying step of 10 rows
    assert plan(l8, 4, ctx=512, max_seqs=2, draft_tokens=4).graph_rows == 10
    # a decode-only step has no room for a chunk: nothing beyond the plain decode graph
    one = plan(l8, 4, ctx=512, step_tokens=1, draft_tokens=4)
    assert one.graph_rows == 1 and graphs(one) == graphs(plan(l8, 4, ctx=512, step_tokens=1))
    # Q5_K's fused kernel stops at 4 rows: a Q5_K_M model's verifying rows beyond it run eagerly
    q5 = shaped_index("llama-3.1-8b", mix="Q5_K_M")
    assert plan((q5, layer_layouts(q5)), 5, ctx=512, draft_tokens=8).graph_rows == 4
    # the CPU captures nothing
    assert plan(l8, None, ctx=512, draft_tokens=4, device_type="cpu", quantized=False).graph_rows == 0


def test_drafting_plans_stay_within_the_budget(l8, l70):
    for model, gibs in ((l8, (2, 4, 8)), (l70, (8, 16))):
        for gib in gibs:
            for B, ctx in ((1, 4096), (4, 2048)):
                for n in (4, 15):
                    p = plan(model, gib, ctx=ctx, max_seqs=B, draft_tokens=n)
                    assert sum(v for _, v in p.parts) == p.device_bytes <= gib * GiB, (gib, B, ctx, n, p.breakdown())
                    assert p.graph_rows == min(B * (1 + n), 16)


def test_the_compute_process_captures_the_batches_the_plan_counted(tmp_path):
    """launch.py hands the plan's graph rows to the compute process, which captures those (old: the
    decode batches only, min(4, --batch), whatever the plan counted)."""
    index = open_model(ggufgen.write_model(tmp_path / "m.gguf", n_vocab=256))
    cfg = PipelineConfig(budget=Budget(vram_gb=1))
    ends = ChildEndpoints("ipc:///x", "ipc:///y"), 1
    for ecfg, rows in ((EngineConfig(lookup=4), 5), (EngineConfig(draft_model="d.gguf", draft_tokens=6), 7),
                       (EngineConfig(), 1)):
        n = draft_tokens_for(ecfg)
        la = make_launch(index, torch.device("cuda"), torch.float16, 256, 1, cfg, draft_tokens=n)
        assert la.plan.graph_rows == rows
        assert la.compute_config(*ends).plan.graph_max_tokens(quantized=True) == rows
        assert la.compute_config(*ends).plan.graph_max_tokens(quantized=False) == 0


def test_serve_batch_counts_the_drafts_memory_at_each_row_count(tmp_path):
    """--serve's default rows with --draft-model: the draft's KV and scratch grow with the rows and come
    off the same budget, so fewer rows fit; the rows chosen fit beside the draft, one more does not."""
    from layerstream.coordinator.args import build_parser, check_args
    from layerstream.coordinator.cli import serve_batch

    path = ggufgen.write_model(tmp_path / "m.gguf")
    index = open_model(path)

    def rows(*opts):
        args = build_parser().parse_args(["--serve", "--device", "cpu", "--vram-gb", "0.05", *opts])
        check_args(args)  # (as the CLI does: it fills the drafting options' defaults)
        return serve_batch(args, index, 256)[0]

    alone, beside = rows(), rows("--draft-model", path)
    assert alone == 64 and 1 <= beside < alone

    cpu = torch.device("cpu")
    e, quantized = torch.finfo(resolve_dtype(None, cpu, index.hparams.arch)).bits // 8, keeps_quantized(cpu)

    def plan_at(b):
        d = draft_memory(index, dtype_bytes=e, ctx=256, max_seqs=b, step_tokens=512, quantized=quantized, cuda=False)
        return make_plan(index, layer_layouts(index), vram_bytes=int(0.05 * GiB), host_cache_bytes=None, dtype_bytes=e,
                         ctx=256, max_seqs=b, quantized=quantized, device_type="cpu", draft=d, draft_tokens=4)

    fits = plan_at(beside)
    assert fits.device_bytes + fits.draft.total <= 0.05 * GiB
    try:  # one more row: no plan, or (above 8 rows) one that moves KV every pass
        over = plan_at(beside + 1)
    except ConfigError:
        over = None
    assert over is None or (beside >= 8 and over.kv_device_layers < index.hparams.n_layer)


def test_a_mixture_of_experts_captures_its_batches_up_to_its_own_fused_rows(l8):
    """A streamed MoE layer's batches above Q5_K's bound ran eagerly (BENCHMARKS.md W8: no graph
    launch in a batch-8 pass's trace): the Qwen3-30B-A3B shape's matrices (Q4_K and Q6_K) stay fused
    to 8 rows and its grouped experts take 8 tokens, so a plan of 8 sequences captures batches up to
    8 and counts their graphs; a dense model keeps the bound of every type."""
    from layerstream.compute.moe import GROUPED_MAX_TOKENS
    from layerstream.compute.qlinear import FUSED_MIN_OF_TYPES
    from plans import shaped

    moe = shaped("qwen3-30b-a3b")
    assert {int(t.qtype) for layer in moe[0].layers for t in layer.values() if len(t.shape) > 1} - {0} == {12, 14}
    four, eight, more = (plan(moe, 8, ctx=512, max_seqs=n) for n in (4, 8, 16))
    assert four.graph_rows == 4 and eight.graph_rows == GROUPED_MAX_TOKENS == 8 and more.graph_rows == 8
    assert graphs(eight) > graphs(four)
    assert sum(v for _, v in eight.parts) == eight.device_bytes <= 8 * GiB
    assert plan(l8, 8, ctx=512, max_seqs=8).graph_rows == FUSED_MIN_OF_TYPES == 4
    # a mixture of experts with Q5_K matrices (Q5_K_M) keeps to their bound
    q5 = shaped_index("qwen3-30b-a3b", "Q5_K_M")
    assert plan((q5, layer_layouts(q5)), 8, ctx=512, max_seqs=8).graph_rows == 4
