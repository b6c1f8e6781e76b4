"""run-pipeline's warnings about flags it takes that then change nothing (coordinator/flag_notes.py):
one line on stderr, and the run goes on (a probe's: each was taken in silence)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import ggufgen

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"
GREEDY = ("--device", "cpu", "-n", "2", "--temperature", "0", "--ignore-eos")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), *args, "The sky is"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def _warnings(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.startswith("run-pipeline: warning: ")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ggufgen.write_model(tmp_path_factory.mktemp("m") / "m.gguf")  # 2 layers, 256 tokens of context


def test_flags_of_streamed_layers_where_nothing_streams_are_warned(model):
    """Every layer kept on the device: the streamed layers' flags act on nothing, said once before
    the reply, naming them as typed and why."""
    r = _run("-m", model, *GREEDY, "--vram-gb", "8", "--vram-slots", "16", "--host-cache-gb=2")
    assert _warnings(r) == [
        "run-pipeline: warning: --host-cache-gb 2, --vram-slots 16 have no effect: every layer of the model fits in "
        "--vram-gb 8 (nothing streams); drop them, or give a smaller --vram-gb to stream"]


def test_the_reason_names_what_keeps_every_layer(tmp_path):
    """-ngl past the model's layers keeps them all, whatever the budget; on CUDA without --vram-gb the
    budget is the GPU's free memory; on the CPU without it there is no limit. The expert flags too."""
    from layerstream.coordinator.args import build_parser, check_args
    from layerstream.coordinator.flag_notes import plan_notes
    from layerstream.coordinator.plan import make_plan
    from layerstream.loader.gguf_index import open_model
    from layerstream.loader.layout import layer_layouts
    from plans import plan, shaped

    one_b = shaped("llama-3.2-1b")
    a = build_parser().parse_args(["-ngl", "99", "--vram-gb", "8", "--expert-cache-gb", "1", "hi"])
    check_args(a)
    assert plan_notes(a, plan(one_b, 8, resident_layers=99), "cuda") == [
        "--expert-cache-gb 1 has no effect: -ngl 99 keeps every layer on the device (nothing streams); drop it, "
        "or give a smaller -ngl to stream"]
    a = build_parser().parse_args(["--vram-slots", "3", "hi"])
    assert plan_notes(a, plan(one_b, 8), "cuda") == [
        "--vram-slots 3 has no effect: every layer of the model fits in the GPU's free memory (nothing streams); "
        "drop it, or give a --vram-gb below the model's size to stream"]
    moe = open_model(ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe"))
    alone = make_plan(moe, layer_layouts(moe), vram_bytes=None, host_cache_bytes=None, dtype_bytes=4, ctx=256,
                      max_seqs=1, device_type="cpu")
    a = build_parser().parse_args(["--expert-policy", "lru", "hi"])
    assert plan_notes(a, alone, "cpu") == [
        "--expert-policy lru has no effect: on the CPU without --vram-gb every layer is kept in memory (nothing "
        "streams); drop it, or give --vram-gb to stream"]
    # where layers stream the flags act: nothing is said
    a = build_parser().parse_args(["--vram-slots", "3", "--host-cache-gb", "1", "--vram-gb", "0.8", "hi"])
    assert plan_notes(a, plan(one_b, 0.8, vram_slots=3), "cuda") == []
    a = build_parser().parse_args(["-ngl", "1", "--expert-policy", "lru", "hi"])
    assert plan_notes(a, make_plan(moe, layer_layouts(moe), vram_bytes=None, host_cache_bytes=None, dtype_bytes=4,
                                   ctx=256, max_seqs=1, device_type="cpu", resident_layers=1), "cpu") == []


def test_vram_slots_without_a_budget_or_past_what_the_streamed_layers_fill_are_warned(model):
    """--vram-slots sets the slots under a budget: on the CPU without --vram-gb (no limit) the plan
    takes its own count. On CUDA a streamed layer fills two slots at most past the first pass (its
    copy, and the next step's copied ahead): the rest hold memory for nothing, but where the
    streamed layers' experts alone cross, which lend the slots to the expert cache."""
    from layerstream.coordinator.args import build_parser
    from layerstream.coordinator.flag_notes import plan_notes
    from plans import plan, shaped

    r = _run("-m", model, *GREEDY, "-ngl", "1", "--vram-slots", "3")
    assert _warnings(r) == [
        "run-pipeline: warning: --vram-slots 3 has no effect without --vram-gb: with no memory budget the plan sets "
        "the streamed layers' slots itself (4); drop it, or give --vram-gb to plan under a budget"]
    one_b = shaped("llama-3.2-1b")  # 16 layers
    a = build_parser().parse_args(["--vram-slots", "16", "-ngl", "15", "hi"])
    assert plan_notes(a, plan(one_b, 8, resident_layers=15, vram_slots=16), "cuda") == [
        "--vram-slots 16: 1 layer streams, and past the first pass at most 2 slots hold a layer at once (each streamed "
        "layer's copy, and the next step's copied ahead); the other 14 hold device memory that could keep layers "
        "resident; give --vram-slots 2"]
    a = build_parser().parse_args(["--vram-slots", "5", "-ngl", "14", "hi"])
    assert plan_notes(a, plan(one_b, 8, resident_layers=14, vram_slots=5), "cuda")[0].startswith(
        "--vram-slots 5: 2 layers stream, and past the first pass at most 4 slots hold a layer")
    # quiet: as many slots as the streamed layers fill, a budget on the CPU, the expert cache's room
    a = build_parser().parse_args(["--vram-slots", "4", "-ngl", "14", "hi"])
    assert plan_notes(a, plan(one_b, 8, resident_layers=14, vram_slots=4), "cuda") == []
    assert plan_notes(a, plan(one_b, 8, resident_layers=14, vram_slots=4, device_type="cpu"), "cpu") == []
    a = build_parser().parse_args(["--vram-slots", "16", "-ngl", "46", "hi"])
    moe = plan(shaped("qwen3-30b-a3b"), 60, resident_layers=46, vram_slots=16)
    assert moe.streamed and moe.dense_resident and plan_notes(a, moe, "cuda") == []


def test_a_context_past_the_models_trained_one_is_warned(model, tmp_path):
    """llama.cpp warns "n_ctx_train < n_ctx"; run-pipeline took -c 1024 on a model of 256 tokens in
    silence. At the model's own context nothing is said, nor where the header does not say its context
    (the 4096 it is then read as is no model's)."""
    from layerstream.coordinator.args import build_parser
    from layerstream.coordinator.flag_notes import header_notes
    from layerstream.loader.gguf_index import open_model

    r = _run("--single-process", "-m", model, *GREEDY, "-c", "1024")
    assert _warnings(r) == ["run-pipeline: warning: -c 1024 is beyond the model's trained context (256 tokens); "
                            "replies past it may lose coherence"]
    assert header_notes(build_parser().parse_args(["--ctx", "256", "hi"]), open_model(model)) == []
    untold = ggufgen.rewrite_metadata(model, tmp_path / "untold.gguf", {}, drop=("llama.context_length",))
    assert header_notes(build_parser().parse_args(["--ctx", "8192", "hi"]), open_model(untold)) == []


def test_kv_on_host_on_the_cpu_is_warned(model):
    """On the CPU the KV is in host memory whatever the flag says: --kv-on-host was taken in silence,
    and only copied each layer's KV out each step. On CUDA it moves the KV off the device, and under
    a --vram-gb budget it leaves the KV out of the budget's count (more layers kept): nothing said
    there, nor without the flag."""
    from layerstream.coordinator.args import build_parser
    from layerstream.coordinator.flag_notes import device_notes

    r = _run("-m", model, *GREEDY, "--kv-on-host")
    assert _warnings(r) == [
        "run-pipeline: warning: --kv-on-host saves nothing on the CPU: the KV is in host memory already (the "
        "device's memory is the host's), and the flag only adds a copy of each layer's KV every step; drop it"]
    assert device_notes(build_parser().parse_args(["--kv-on-host", "hi"]), "cuda", False) == []
    assert device_notes(build_parser().parse_args(["hi"]), "cpu", False) == []
    assert device_notes(build_parser().parse_args(["--kv-on-host", "--vram-gb", "4", "hi"]), "cpu", True) == []
    r = _run("-m", model, *GREEDY, "--kv-on-host", "--vram-gb", "4")
    assert r.returncode == 0 and not [w for w in _warnings(r) if "--kv-on-host" in w]
