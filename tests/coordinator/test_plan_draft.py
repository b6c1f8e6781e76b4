"""The plan counts a draft model (plan.py, NOTE [ the plan counts every byte ]): its weights, KV
and scratch come off --vram-gb before the target's plan, are printed, and a draft that does not
fit is one line naming the sizes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layerstream.coordinator.plan import GiB, MiB, draft_memory
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
