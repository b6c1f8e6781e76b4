"""A model whose weights are NaN: one line naming the fault, from the engine and from the command line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import Budget, PipelineConfig
from layerstream.errors import LayerstreamError, ModelError

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> str:
    return ggufgen.poison(ggufgen.write_model(tmp_path_factory.mktemp("nan") / "nan.gguf"))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_refuses_nan_logits(nan_model, temperature):
    with Engine.load(nan_model, device="cpu", ctx=256) as e:
        with pytest.raises(LayerstreamError, match=r"NaN logits at token \d+: its weights may be corrupt") as err:
            "".join(e.generate("hello", SamplingParams(temperature=temperature, max_tokens=4, seed=0)))
        assert "\n" not in str(err.value)
        with pytest.raises(LayerstreamError, match="NaN logits"):  # the engine serves the next request the same way
            "".join(e.generate("again", SamplingParams(temperature=0, max_tokens=2)))
        # logits() too (the Python API probe's: it returned them without a word)
        with pytest.raises(ModelError, match=r"^the model produced NaN logits at token 0: its weights may be corrupt"):
            e.logits([1, 2, 3])


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_command_line_prints_one_line_and_fails(nan_model, temperature):
    """It printed NUL characters at temperature 0 and nothing (exit 0) when sampling."""
    r = subprocess.run([str(LAUNCHER), "--single-process", "-m", nan_model, "-n", "4", "--temperature", temperature,
                        "--device", "cpu", "hello"], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode != 0 and "\0" not in r.stdout and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "NaN logits at token" in errors[0] and "weights may be corrupt" in errors[0], r.stderr


def test_perplexity_of_nan_weights_is_one_line_and_fails(nan_model, tmp_path):
    """It printed 'perplexity: nan over N tokens' and exited 0."""
    with Engine.load(nan_model, device="cpu", ctx=256) as e:
        with pytest.raises(LayerstreamError, match=r"^the model produced NaN logits at token 0: its weights may be"):
            e.perplexity("one two three four five six seven")
    text = tmp_path / "text.txt"
    text.write_text("one two three four five six seven eight nine ten " * 4)
    r = subprocess.run([str(LAUNCHER), "--single-process", "-m", nan_model, "--perplexity", str(text),
                        "--device", "cpu"], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and re.match(r"run-pipeline: error: the model produced NaN logits at token \d+: ", lines[0])


@pytest.mark.parametrize("pipeline", [False, True], ids=["single-process", "pipeline, KV on the host"])
def test_a_request_with_nan_logits_leaves_its_kv_row_clean_for_the_next(tmp_path, pipeline):
    """One token's embedding NaN: a request that holds it fails, and a clean request on the same row
    (one row in all) afterwards gives what it gives on a healthy engine. Before, the failed request's
    NaN stayed in the row's slots past the next one's tokens, which attention masks but still weighs
    (zero times NaN), and every later request on the row failed (stepper.py, NOTE [ a row left
    non-finite ])."""
    path = ggufgen.write_model(tmp_path / "m.gguf", qtype="F32")
    P = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    clean = [[3, 45, 46], [45, 46, 47], [45, 46, 47, 48, 49, 50]]  # (the first shares its first token with a NaN one)
    with Engine.load(path, device="cpu", ctx=64, max_seqs=1) as e:
        want = [e.generate_batch([p], P) for p in clean]
    poison_row(path, "token_embd.weight", 7)
    pcfg = PipelineConfig(budget=Budget(resident_layers=1, kv_on_host=True)) if pipeline else None
    with Engine.open(EngineConfig(path, device="cpu", ctx=64, max_seqs=1), pcfg) as e:
        for bad in ([5, 6, 7, 8], [5, 6, 7, *range(10, 40)]):
            with pytest.raises(LayerstreamError, match="NaN logits"):
                e.generate_batch([bad], P)
            assert [e.generate_batch([p], P) for p in clean] == want
        with pytest.raises(ModelError, match=r"NaN logits at token \d+"):  # evaluation's steps too
            e.logits([3, 7, *range(10, 40)])
        assert [e.generate_batch([p], P) for p in clean] == want


def poison_row(path, tensor: str, row: int) -> None:
    """Overwrite row `row` of a float32 matrix in the file with NaN."""
    import gguf
    import numpy as np

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == tensor)
    width = int(t.shape[0])  # (gguf's shape: the row's length first)
    with open(path, "r+b") as fh:
        fh.seek(int(t.data_offset) + row * width * 4)
        fh.write(np.full(width, np.nan, dtype=np.float32).tobytes())
