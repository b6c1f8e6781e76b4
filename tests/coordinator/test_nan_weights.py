"""A model whose weights are NaN: one line naming the fault, from the engine and from the command line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.errors import LayerstreamError

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
