"""bin/run-pipeline as a user runs it: one clear error line on bad input, text on good input."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


def run_pipeline(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """bin/run-pipeline in the reference (single-process) mode; the pipeline will become the default."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([str(LAUNCHER), "--single-process", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=env)


def _bad_model(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken model file and a word its error line must name."""
    p = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        ggufgen.truncate(ggufgen.write_model(p), -100)
        return p, p.name
    if kind == "truncated_header":
        ggufgen.truncate(ggufgen.write_model(p), 200)
        return p, p.name
    if kind == "wrong_magic":
        ggufgen.corrupt_magic(ggufgen.write_model(p))
        return p, p.name
    if kind == "unknown_arch":
        ggufgen.write_unknown_arch(p, arch="mamba")
        return p, "mamba"
    if kind == "unsupported_quant":
        ggufgen.write_unsupported_quant(p, qtype="IQ2_XXS", tensor="blk.0.attn_q.weight")
        return p, "blk.0.attn_q.weight is stored as IQ2_XXS"
    if kind == "missing_tensor":
        ggufgen.write_missing_tensor(p, tensor="blk.1.ffn_up.weight")
        return p, "blk.1.ffn_up.weight"
    if kind == "no_such_file":
        return p, p.name
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "truncated_header", "wrong_magic", "unknown_arch",
                                  "unsupported_quant", "missing_tensor", "no_such_file"])
def test_bad_model_gives_one_error_line(tmp_path, kind):
    path, names = _bad_model(tmp_path, kind)
    r = run_pipeline("-m", str(path), "-n", "4", "hello")
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("run-pipeline: error: "), r.stderr
    assert names in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_bad_option_gives_one_error_line(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = run_pipeline("-m", path, "--max-tokens", "0", "hello")
    assert r.returncode != 0
    assert r.stderr.splitlines() == ["run-pipeline: error: --max-tokens 0: must be from 1 to 4194304"]


@pytest.mark.parametrize("args,words", [
    (["--vram-gb", "nan"], "--vram-gb nan: must be a finite number"),
    (["--vram-gb", "inf"], "--vram-gb inf: must be a finite number"),
    (["--host-cache-gb", "nan"], "--host-cache-gb nan"),
    (["--device", "bogus"], "--device bogus: use auto, cpu, cuda or cuda:N"),
    (["--temperature", "1e-46"], "--temperature 1e-46: too small"),
    (["--prefill-chunk", "0"], "--prefill-chunk 0"),
    (["--batch", "0"], "--batch 0: must be from 1"),
    (["--prefetch", "1000000000"], "--prefetch 1000000000: must be from 1 to 65536"),
    (["--readers", "100000"], "--readers 100000"),
    (["--ctx", "1"], "--ctx 1"),
    (["--cpu-share", "2"], "--cpu-share '2': give auto, 0 or a fraction"),
    (["--cpu-threads", "0"], "--cpu-threads 0: must be from 1"),
    (["--trace", "/nonexistent-dir/t.json"], "--trace /nonexistent-dir/t.json: cannot write there"),
    ([], "no prompt given"),
])
def test_former_tracebacks_are_one_line_before_anything_starts(tmp_path, args, words):
    """Each was a traceback, or an error only after the processes had started (probe, issue 10)."""
    import time

    path = ggufgen.write_model(tmp_path / "m.gguf")
    t0 = time.monotonic()
    r = run_pipeline("-m", path, *args, *([] if args == [] else ["hello"]))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run-pipeline: error: ") and words in lines[0], r.stderr
    assert time.monotonic() - t0 < 30


def test_empty_perplexity_file_and_long_prompt_are_refused_early(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf", context_length=64)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run_pipeline("-m", path, "--perplexity", str(empty))
    assert r.returncode != 0 and r.stderr.splitlines() == [f"run-pipeline: error: --perplexity {empty}: the file is empty"]
    r = run_pipeline("-m", path, "--ctx", "16", "-n", "4", "word " * 40)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "leaves no room to generate" in r.stderr and len(r.stderr.splitlines()) == 1


def test_non_utf8_prompt_bytes_are_replaced_not_a_traceback(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = subprocess.run([str(LAUNCHER), "--single-process", "-m", path, "-n", "2", "--device", "cpu",
                        b"caf\xe9 \xff"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr


def test_good_run_prints_the_engines_text(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf", arch="qwen3")
    r = run_pipeline("-m", path, "-n", "8", "--temperature", "0", "--device", "cpu", "hello", "world")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with Engine.load(path, device="cpu", ctx=256) as e:
        want = "".join(e.generate("hello world", SamplingParams(temperature=0, max_tokens=8)))
    assert want, "greedy text of the tiny model is not empty"
    assert r.stdout == want + "\n"


def test_perplexity_option(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    r = run_pipeline("-m", path, "--perplexity", str(text), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"perplexity: (\d+\.\d+) over (\d+) tokens\n", r.stdout)
    assert m, r.stdout
    with Engine.load(path, device="cpu", ctx=256) as e:
        ppl, n = e.perplexity(text.read_text())
    assert float(m[1]) == pytest.approx(ppl, rel=1e-3) and int(m[2]) == n


def test_perplexity_of_missing_file(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = run_pipeline("-m", path, "--perplexity", str(tmp_path / "absent.txt"))
    assert r.returncode != 0
    assert r.stderr.splitlines() == [f"run-pipeline: error: --perplexity {tmp_path / 'absent.txt'}: no such file"]


def test_interactive_chat_keeps_the_conversation(smollm_engine, monkeypatch, capsys):
    from layerstream.compute.sampling import SamplingParams
    from layerstream.coordinator import cli

    lines = iter(["My name is Ada.", "What is my name?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    prompts, real = [], smollm_engine.generate

    def generate(ids, params):
        prompts.append(smollm_engine.tokenizer.decode(ids))
        yield from real(ids, params)

    monkeypatch.setattr(smollm_engine, "generate", generate)
    cli._interactive_chat(smollm_engine, SamplingParams(temperature=0, max_tokens=12), None)
    first_reply = capsys.readouterr().out.split("\n")[0]
    assert len(prompts) == 2
    assert "My name is Ada." in prompts[1] and first_reply.strip() in prompts[1]
    assert prompts[1].rstrip().endswith("assistant")  # the generation prompt of the template
