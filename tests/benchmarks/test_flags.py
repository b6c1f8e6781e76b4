"""The stages that start the pipeline (pipeline, serve, spec) hand it the options their flags say:
each flag of run-pipeline's budgets, readers, CPU share and experts reaches the config."""

import pytest

from benchmarks import bench
from layerstream.coordinator import pipeline as pipeline_mod, pipeline_config as pc
from layerstream.coordinator.engine import Engine
from layerstream.loader.synth import ModelShape, write_shaped_model

TINY = ModelShape("tiny", n_embd=128, n_ff=256, n_layer=2, n_head=2, n_head_kv=1, n_vocab=300, context_length=512)
FLAGS = ["--vram-gb", "3.5", "--host-cache-gb", "2", "--resident-layers", "1", "--prefetch", "3",
         "--step-tokens", "64", "--vram-slots", "3", "--readers", "2", "--cpu-share", "0.25", "--cpu-split", "rows",
         "--cpu-threads", "3", "--expert-cache-gb", "1.5", "--moe-dense", "stream", "--expert-policy", "lru",
         "--expert-prefetch", "4"]


def said(direct: bool = False, trace: bool = False) -> pc.PipelineConfig:
    """The config FLAGS ask for, written out field by field."""
    return pc.PipelineConfig(
        budget=pc.Budget(vram_gb=3.5, host_cache_gb=2.0, resident_layers=1, kv_on_host=None, prefetch=3, step_tokens=64,
                      vram_slots=3, evaluates=False),
        readers=pc.ReaderOptions(count=2, dirs=(), threads=None, direct=direct),
        cpu=pc.CpuOptions(share="0.25", split="rows", threads=3),
        experts=pc.ExpertOptions(cache_gb=1.5, moe_dense="stream", policy="lru", prefetch=4),
        procs=pc.ProcessOptions(trace=trace))


class Opened(Exception):
    """Raised in place of starting the pipeline, with the config it was given."""


@pytest.fixture
def tiny(tmp_path):
    return write_shaped_model(tmp_path / "tiny.gguf", TINY)


def _started_with(monkeypatch, argv) -> pc.PipelineConfig:
    def engine_open(cfg, pcfg=None, **kw):
        raise Opened(pcfg)

    def backend(index, cfg, pcfg):
        raise Opened(pcfg)

    monkeypatch.setattr(Engine, "open", staticmethod(engine_open))
    monkeypatch.setattr(pipeline_mod, "pipeline_backend", backend)
    args = bench.build_parser().parse_args(argv)
    with pytest.raises(Opened) as e:
        args.func(args)
    return e.value.args[0]


def test_the_pipeline_stage_starts_the_pipeline_its_flags_say(tiny, monkeypatch, tmp_path):
    got = _started_with(monkeypatch, ["pipeline", "-m", tiny, "--device", "cpu", "--direct", "--trace",
                                      str(tmp_path / "t.json"), *FLAGS])
    assert got == said(direct=True, trace=True)


def test_the_serve_stage_starts_the_pipeline_its_flags_say(tiny, monkeypatch):
    assert _started_with(monkeypatch, ["serve", "-m", tiny, "--device", "cpu", *FLAGS]) == said()


def test_the_spec_stage_starts_the_pipeline_its_flags_say(tiny, monkeypatch):
    assert _started_with(monkeypatch, ["spec", "-m", tiny, "--device", "cpu", *FLAGS]) == said()


def test_without_flags_the_stages_take_the_pipelines_defaults(tiny, monkeypatch):
    """(but for the rows of logits: the stages only generate, as run-pipeline without --perplexity)"""
    for stage in ("pipeline", "serve", "spec"):
        got = _started_with(monkeypatch, [stage, "-m", tiny, "--device", "cpu"])
        assert got == pc.PipelineConfig(budget=pc.Budget(evaluates=False)), stage
