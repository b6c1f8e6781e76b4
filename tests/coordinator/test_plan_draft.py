"""The plan counts a draft model (plan.py, NOTE [ the plan counts every byte ]): its weights, KV
and scratch come off --vram-gb before the target's plan, are printed, and a draft that does not
fit is one line naming the sizes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from layerstream.coordinator.draft_plan import draft_memory
from layerstream.coordinator.plan import GiB, MiB
from layerstream.errors import ConfigError
from plans import plan, shaped

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


@pytest.fixture(scope="module")
def d1():
    return shaped("llama-3.2-1b")


def memory(d1, **kw):
    kw = dict(dtype_bytes=2, ctx=4096, max_seqs=1, step_tokens=512, quantized=True) | kw
    return draft_memory(d1[0], **kw)


def test_the_1b_drafts_memory_is_its_blocks_its_kv_and_a_step(d1):
    index, layouts = d1
    m = dict(memory(d1).parts)
    blocks = sum(lay.nbytes for lay in layouts) + sum(t.nbytes for t in index.globals.values()
                                                      if t.name != "rope_freqs.weight")
    # every layer's blocks and the tied head, each in the allocator's segments (at most 2 MiB of rounding each)
    assert blocks <= m["weights"] <= blocks + 2 * MiB * (len(layouts) * 2 + 2)
    assert m["KV"] == 16 * 2 * 4096 * 8 * 64 * 2  # layers x (K, V) x ctx x kv heads x head size x fp16
    assert 0 < m["step scratch"] < m["weights"]
    # two rows and twice the context: the KV doubles twice, the weights stay
    m4 = dict(memory(d1, ctx=8192, max_seqs=2).parts)
    assert m4["KV"] == 4 * m["KV"] and m4["weights"] == m["weights"]


def test_the_targets_plan_gets_the_budget_less_the_draft_and_prints_both(l70, d1):
    dm = memory(d1)
    alone, beside = plan(l70, 8), plan(l70, 8, draft=dm)
    assert beside.budget_bytes == 8 * GiB - dm.total and beside.device_bytes <= beside.budget_bytes
    assert len(beside.resident) < len(alone.resident)  # a GiB less: fewer layers stay
    line = beside.describe()
    assert "llama-3.2-1b-Q4_K_M.gguf takes 1.0" in line and "KV 0.12 GiB" in line
    assert "draft model's weights" in beside.breakdown()
    assert "draft" not in alone.describe() + alone.breakdown()


def test_a_draft_that_fills_the_budget_is_refused_naming_the_sizes(l8, d1):
    with pytest.raises(ConfigError) as e:
        plan(l8, 0.9, draft=memory(d1))
    msg = str(e.value)
    assert "\n" not in msg and "--vram-gb 0.90" in msg and "takes 1.0" in msg and "llama-3.2-1b" in msg
    assert "llama-3.1-8b" in msg and "--draft-model" in msg
    # the draft fits, the target's smallest step does not beside it
    with pytest.raises(ConfigError, match=r"beside the draft model's 1\.0\d GiB"):
        plan(l8, 1.2, draft=memory(d1))


def test_the_pipeline_refuses_a_draft_beyond_the_budget_in_one_line_before_starting():
    from layerstream.loader.default_model import default_model_path

    model = default_model_path()
    r = subprocess.run([str(LAUNCHER), "--device", "cpu", "--vram-gb", "0.05", "--draft-model", model,
                        "-n", "4", "hi"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "the draft model" in err[0] and "--vram-gb 0.05" in err[0], r.stderr


def _moved(model, p) -> int:
    """Bytes a decode pass of plan p moves over the link: its streamed layers' blocks (the KV of
    these plans stays on the device)."""
    assert p.kv_device_layers == len(model[1])
    return sum(model[1][i].nbytes for i in p.streamed)


def test_the_plan_weighs_the_layers_a_draft_evicts_against_the_acceptance_that_pays(l8, d1):
    """8B at 4 GiB beside the 1B: the layers and bytes of the plan without the draft, and the rate a
    at which 4 drafts give as many tokens as the pass's bytes grow (1 + a + .. + a^4 = ratio)."""
    dm = memory(d1, ctx=512)
    alone, beside = plan(l8, 4, ctx=512), plan(l8, 4, ctx=512, draft=dm, draft_tokens=4)
    c = beside.draft.cost
    assert (c.layers_alone, c.layers, c.drafts) == (len(alone.resident), len(beside.resident), 4)
    assert c.layers < c.layers_alone and (c.moved_alone, c.moved) == (_moved(l8, alone), _moved(l8, beside))
    a, ratio = c.break_even(), c.moved / c.moved_alone
    assert ratio > 1.5 and sum(a ** i for i in range(5)) == pytest.approx(ratio, rel=1e-6)
    assert 0.5 < a < 0.75 and c.warns()
    line = beside.describe()
    assert f"keeps {c.layers} layers resident instead of {c.layers_alone}" in line
    assert f"pay only above about {a:.0%} acceptance" in line
    # 16 drafts a step pay from a lower rate: the same bytes, more tokens a pass at each rate
    assert plan(l8, 4, ctx=512, draft=dm, draft_tokens=16).draft.cost.break_even() < a


def test_a_draft_that_evicts_little_pays_from_a_low_rate_and_one_that_evicts_nothing_says_nothing(l8, l70, d1):
    dm = memory(d1, ctx=512)
    c = plan(l70, 8, ctx=512, draft=dm, draft_tokens=4).draft.cost  # 70B streams most of its layers either way
    assert c.evicts and c.break_even() < 0.1 and not c.warns()
    roomy = plan(l8, 8, ctx=512, draft=dm, draft_tokens=4)
    assert not roomy.draft.cost.evicts and roomy.draft.cost.break_even() == 0.0 and not roomy.draft.cost.warns()
    assert "instead of" not in roomy.describe()


def test_a_draft_that_makes_a_resident_target_stream_warns(l8, d1):
    """8B at 5 GiB: all 32 layers resident alone, some streamed beside the draft: no rate is given."""
    dm = memory(d1, ctx=512)
    assert not plan(l8, 5, ctx=512).streamed
    c = plan(l8, 5, ctx=512, draft=dm, draft_tokens=4).draft.cost
    assert c.evicts and c.moved_alone == 0 and c.break_even() is None and c.warns()
    assert "without it nothing streams" in plan(l8, 5, ctx=512, draft=dm, draft_tokens=4).describe()


def test_the_pipeline_warns_when_its_draft_makes_the_target_stream():
    """SmolLM2 as its own draft on the CPU device in float32 at 0.6 GiB: alone every layer fits,
    beside the draft (0.48 GiB) few do; the run goes on and says so on stderr, once."""
    from layerstream.loader.default_model import default_model_path

    model = default_model_path()
    r = subprocess.run([str(LAUNCHER), "--device", "cpu", "--dtype", "float32", "--vram-gb", "0.6", "--draft-model", model,
                        "-n", "2", "--temperature", "0", "hi"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    warned = [ln for ln in r.stderr.splitlines() if "instead of" in ln]
    assert r.returncode == 0 and len(warned) == 1, r.stderr
    assert re.search(r"keeps [0-9] layers? resident instead of 30", warned[0]), warned[0]
    assert "without it nothing streams" in warned[0]
