"""What a pipeline run starts with: the children's configs (coordinator/launch.py) and the engine's
text side built beside the processes' start (coordinator/engine.py)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import ggufgen
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.launch import compute_threads, make_launch
from layerstream.coordinator.pipeline import PipelineConfig
from layerstream.errors import ModelError
from layerstream.loader.gguf_index import open_model
from layerstream.proto.child import ChildEndpoints
from procs import leaked, segments


def test_the_compute_process_gets_the_index_without_the_tokenizers_metadata(tmp_path):
    index = open_model(ggufgen.write_model(tmp_path / "m.gguf", n_vocab=256))
    assert any(k.startswith("tokenizer.") for k in index.metadata)
    la = make_launch(index, torch.device("cpu"), torch.float32, 64, 1, PipelineConfig())
    cfg = la.compute_config(ChildEndpoints("ipc:///x", "ipc:///y"), 1)
    sent = pickle.loads(pickle.dumps(cfg)).index
    assert not any(k.startswith("tokenizer.") for k in sent.metadata)
    assert sent.metadata == {k: v for k, v in index.metadata.items() if not k.startswith("tokenizer.")}
    assert sent.hparams == index.hparams and sent.layers == index.layers and sent.globals == index.globals
    assert any(k.startswith("tokenizer.") for k in index.metadata)  # (the launcher's own index is untouched)


def test_a_bad_tokenizer_over_the_pipeline_is_one_error_naming_the_file_and_leaves_nothing(tmp_path):
    """The tokenizer is built while the processes start: its error still comes as the file's,
    after the pipeline is stopped."""

    path = ggufgen.write_model(tmp_path / "m.gguf", n_vocab=256)
    index = open_model(path)
    index.metadata["tokenizer.ggml.model"] = "no-such-tokenizer"
    before = segments()
    with pytest.raises(ModelError) as e:
        Engine.open(EngineConfig(model=path, device="cpu", dtype="float32", ctx=64), PipelineConfig(), index=index)
    assert str(e.value).startswith(f"{path}: ") and "no-such-tokenizer" in str(e.value)
    assert not leaked(before, run=os.getpid())


def test_the_compute_process_takes_one_cpu_thread_where_a_gpu_holds_the_whole_model_and_the_cpu_computes_nothing(
        monkeypatch):
    monkeypatch.setattr("layerstream.coordinator.launch.threads_default", lambda: 12)
    # (asked, cuda, share off, streams)
    assert compute_threads(None, True, True, False) == 1
    assert compute_threads(3, True, True, False) == 3  # --cpu-threads wins
    assert compute_threads(None, True, False, True) == 12  # a CPU share of streamed layers beside the GPU
    assert compute_threads(None, True, True, True) is None  # streamed, no share: the process's default
    monkeypatch.setattr("layerstream.coordinator.launch.usable_cpus", lambda: 6)
    assert compute_threads(None, False, True, False, one_job=True) == 6  # on the CPU, one prompt, nothing streamed
    assert compute_threads(None, False, True, True, one_job=True) is None  # streamed: its default (one for the readers)
    assert compute_threads(None, False, True, False) is None  # a server, a draft model: the coordinator works too
    assert compute_threads(2, False, True, False, one_job=True) == 2


def test_two_steps_ahead_and_the_warm_up_only_where_a_gpu_holds_the_whole_model(tmp_path):
    index = open_model(ggufgen.write_model(tmp_path / "m.gguf", n_vocab=256))
    la = make_launch(index, torch.device("cpu"), torch.float32, 64, 1, PipelineConfig())
    assert not la.plan.streamed and (la.steps_ahead, la.warm_up_pays) == (1, False)  # (the CPU)


def test_a_run_without_compiled_kernels_says_its_first_steps_compile_them(tmp_path, monkeypatch):
    """On a fresh machine Triton's cache is empty and the first steps compile for tens of seconds in
    silence: the launcher says so once (device.first_compile_note), by Triton's own rule for the folder."""
    from layerstream.compute.device import first_compile_note, triton_cache_dir

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    assert triton_cache_dir() == str(tmp_path / ".triton" / "cache")
    assert str(tmp_path / ".triton" / "cache") in first_compile_note("triton")  # (missing)
    cache = tmp_path / "c"
    cache.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    assert str(cache) in first_compile_note("triton")  # (empty)
    (cache / "KERNELHASH").mkdir()
    assert first_compile_note("triton") is None
    for form in ("native", "dense"):
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "none"))
        assert first_compile_note(form) is None
