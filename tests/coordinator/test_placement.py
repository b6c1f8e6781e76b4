"""Which layers a plan keeps resident (coordinator/placement.py, NOTE [ resident layers between
streamed ones ]): spread between the streamed ones where a mixture of experts streams its experts
and predicts them, the first ones otherwise."""

from __future__ import annotations

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import Budget, ExpertOptions, PipelineConfig
from layerstream.coordinator.placement import spread
from layerstream.loader.gguf_index import open_model
from plans import plan, shaped


@pytest.mark.parametrize("n,r", [(48, 14), (48, 5), (48, 24), (48, 30), (48, 47), (4, 2), (3, 1), (7, 0), (5, 5)])
def test_spread_takes_layer_0_and_even_intervals_after_it(n, r):
    got = spread(n, r)
    assert len(set(got)) == len(got) == r and list(got) == sorted(got) and all(0 <= i < n for i in got)
    if 0 < r < n:
        assert got[0] == 0 and n - 1 not in got  # the step starts in the graph that embeds; ends streamed
        gaps = [b - a for a, b in zip((*got, n), (*got[1:], n))]
        assert max(gaps) - min(gaps) <= 1 + (n % r > 0)  # even intervals, to the rounding
    if 2 * r <= n:
        assert all(b - a >= 2 for a, b in zip(got, got[1:]))  # a streamed layer between any two


def test_a_moe_whose_experts_stream_keeps_its_resident_layers_between_streamed_ones():
    moe = shaped("qwen3-30b-a3b")
    p = plan(moe, 8)
    r = len(p.resident)
    assert 0 < r < 48 and p.dense_resident and p.expert_prefetch
    assert p.resident == spread(48, r) and p.streamed == tuple(i for i in range(48) if i not in p.resident)
    assert "layers resident (layers 0, " in p.describe() and "between the streamed ones" in p.describe()
    # the same bytes as the first r: every layer is one size
    first = plan(moe, 8, expert_prefetch=0)  # nothing predicted: nothing to gain, the first ones
    assert first.resident == tuple(range(len(first.resident))) and "between" not in first.describe()
    assert len(plan(moe, 8, resident_layers=6).resident) == 6 and plan(moe, 8, resident_layers=6).resident[1] == 8
    host_kv = plan(moe, 8, kv_on_host=True)  # a resident layer runs in a graph only with its KV on the device
    assert host_kv.resident == tuple(range(len(host_kv.resident)))


def test_a_dense_model_keeps_its_first_layers(l8):
    p = plan(l8, 4)
    assert 0 < len(p.resident) < 32 and p.resident == tuple(range(len(p.resident)))
    assert "between the streamed ones" not in p.describe()


def test_a_pipeline_with_resident_layers_between_streamed_ones_decodes_the_resident_engines_tokens(tmp_path):
    """Layers 0 and 2 of four resident, 1 and 3 streamed: layer 1's step predicts layer 3's experts
    (past layer 2) and copies them ahead; the tokens are the single-process engine's on
    dequantized weights. Without a prediction the plan keeps the first layers (nothing to gain)."""
    pytest.importorskip("triton")
    path = ggufgen.write_model(tmp_path / "moe4.gguf", arch="qwen3moe", qtype="Q8_0", n_layer=4, n_expert=8,
                               n_expert_used=2, seed=5)
    prompts = [[5, 17, 33], [9, 3]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cache_gb = 2 * (3 * 128 * 68) / 2**30  # two of a layer's 8 experts: most of a step's are not cached

    def engine(pcfg=None, **kw):
        return Engine.open(EngineConfig(device="cpu", ctx=64, max_seqs=2, dtype="float32", **kw), pcfg,
                           index=open_model(path))

    with engine(weights="dense") as e:
        want = e.generate_batch(prompts, params)
    got = {}
    for ahead in (0, 3):
        pcfg = PipelineConfig(budget=Budget(resident_layers=2), experts=ExpertOptions(cache_gb, prefetch=ahead))
        with engine(pcfg, weights="quantized") as e:
            assert e.backend.plan.resident == ((0, 2) if ahead else (0, 1)), e.backend.plan.describe()
            assert e.generate_batch(prompts, params) == want
            got[ahead] = next(s["experts"] for s in e.backend.collect_stats() if s.get("experts"))
    off, on = got[0], got[3]
    assert off["prefetched"] == 0 and off["hits"] + off["misses"] > 0
    assert 0 < on["prefetch_hits"] <= on["prefetched"], on  # layer 3's, predicted by layer 1
