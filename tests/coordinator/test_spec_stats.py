"""Speculation's figures (issue 26): acceptance, tokens a pass and the drafting's share of the time,
in the --stats line and in the server's /metrics."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.coordinator.engine_worker import Metrics
from layerstream.coordinator.lookup import LookupStats


def test_the_stats_line_gives_the_drafting_time_and_its_share_of_the_decode():
    s = LookupStats(passes=10, tokens=25, drafted=40, accepted=15, draft_s=0.5)
    line = s.line(decode_s=2.0)
    assert "15 of 40 drafted tokens accepted (38%)" in line and "2.50 tokens a pass over 10 passes" in line
    assert "drafting 0.50 s (25% of the decode)" in line
    assert s.since(LookupStats(draft_s=0.25)).draft_s == 0.25 and s.plus(s).draft_s == 1.0


def test_metrics_count_the_speculation_between_steps():
    m, core = Metrics(), SimpleNamespace(waiting=[], running=[], reused_tokens=0, spec=LookupStats())
    core.spec = LookupStats(passes=3, tokens=7, drafted=8, accepted=4, draft_s=0.25)
    m.step(0.1, [], core)
    core.spec = LookupStats(passes=5, tokens=12, drafted=12, accepted=7, draft_s=0.5)
    m.step(0.1, [], core)
    text = generate_latest(m.registry).decode()
    for name, want in (("passes", 5), ("tokens", 12), ("drafted", 12), ("accepted", 7), ("draft_s", 0.5)):
        assert f"layerstream_spec_{name}_total {float(want)}" in text, text


def test_a_draft_models_proposals_are_timed(tmp_path):
    target = ggufgen.write_model(tmp_path / "t.gguf", qtype="Q8_0", seed=1)
    draft = ggufgen.write_model(tmp_path / "d.gguf", qtype="Q8_0", seed=2, n_layer=1)
    with Engine.load(str(target), device="cpu", dtype="float32", ctx=64, draft_model=str(draft)) as e:
        e.generate_batch([[5, 77, 200, 13]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        s = e.core.spec
        assert s.drafted > 0 and s.draft_s >= e.draft.seconds > 0  # (the core times around the draft's own timing)
