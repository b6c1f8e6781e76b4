"""bin/run-pipeline as a user runs it: one clear error line on bad input, text on good input."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.cpus import usable_cpus
from procs import ends_with_the_test

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


def run_pipeline(*args: str, timeout: float = 120, cwd=None, env=None) -> subprocess.CompletedProcess:
    """bin/run-pipeline in the reference (single-process) mode, its output captured (no terminal)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8", **(env or {}))
    return subprocess.run([str(LAUNCHER), "--single-process", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)  # (a run given no prompt reads one piped in)


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
        return p, f"{p}: tensor blk.0.attn_q.weight is stored as IQ2_XXS"  # (the file named: a probe's)
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
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["run-pipeline: error: --max-tokens 0: must be from 1 to 4194304, or -1 (until "
                                     "the end of sequence or a full context)"]


def test_n_minus_one_generates_until_the_context_is_full_and_ends_as_a_reply(tmp_path):
    """llama.cpp's -n -1: no cap but the context's room, the reply ending there with exit 0 (not the
    context-full error); with --serve (whose requests say how many) one line and exit 2."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = run_pipeline("-m", path, "--ctx", "40", "-n", "-1", "--temperature", "0", "--ignore-eos", "--stats", "hello")
    assert r.returncode == 0 and r.stdout, r.stderr
    decoded = int(r.stderr.split("decode: ")[1].split()[0])
    prompt = int(r.stderr.split("prompt: ")[1].split()[0])
    assert prompt + decoded == 40, r.stderr
    r = run_pipeline("-m", path, "--serve", "-n", "-1")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "run-pipeline: error: -n -1: the server's requests say how many tokens they want; give a number"]


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
    (["--cpu-share", "2"], "--cpu-share '2': give default, auto, 0, a fraction from 0 to 1, or fractions by batch size such as "
                           "8:0.5 or 1:0,8:0.5"),
    (["--cpu-share", "3:0.5"], "--cpu-share '3:0.5': '3:0.5' is not BATCH:FRACTION with a batch size of 1, 2, 4, 8"),
    (["--cpu-share", "8:0.5,1:0"], "--cpu-share '8:0.5,1:0': give each batch size once, smallest first"),
    (["--cpu-threads", "0"], "--cpu-threads 0: must be from 1"),
    (["--trace", "/nonexistent-dir/t.json"], "--trace /nonexistent-dir/t.json: cannot write there"),
    ([], "no prompt given"),
    # issue 25: each printed a traceback, the usage block, or a figure such as 1.04858e+06
    (["--vram-gb", "-1"], "--vram-gb -1: give the device memory budget in GiB, above 0"),
    (["--vram-gb", "1e-300"], "--vram-gb 1e-300: give the device memory budget in GiB, above 0"),  # (was named 0)
    (["--vram-gb", "1e9"], "--vram-gb 1e9: must be a finite number above 0 and at most 1048576"),  # (as typed)
    (["--chat", "--perplexity", "README.md"], "--chat and --perplexity do not go together"),
    (["--serve", "--perplexity", "README.md"], "--serve and --perplexity do not go together"),
    (["--serve", "--chat"], "--chat and --serve do not go together"),
    (["--system", "be brief"], "--system needs --chat"),
    (["-p", "hi"], "the prompt is given twice"),
    (["--api-key-file", "/nonexistent-dir/key"], "--api-key-file /nonexistent-dir/key: no such file"),
    # issue 23: an over-long seed and a trace path that is a directory, refused before generating
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: must be from {-2 ** 63} to {2 ** 64 - 1}"),
    (["--trace", "/tmp"], "--trace /tmp: is a directory"),
    # probe of issue 23's fixes: /proc/x passed the up-front check as root and failed after generating;
    # each of the others was accepted, then ignored or a traceback
    (["--trace", "/proc/x"], "--trace /proc/x: cannot write there"),
    (["--transport", "tcp"], "--transport tcp links the pipeline's processes, and --single-process starts none"),
    (["-t", "1000"], f"-t 1000: this machine has {usable_cpus()} cores"),  # (the option as typed)
    (["--repeat-penalty", "1e-39"], "--repeat-penalty 1e-39: must be a finite number from 0.01 to 100"),
    (["--stop", ""], "--stop '': an empty stop string would stop nothing"),
    (["--draft-model", ""], "--draft-model : an empty path; give a file"),  # (was "--model"'s message, exit 1)
    # options of drafting where nothing drafts were taken and ignored
    (["--draft-tokens", "3"], "--draft-tokens sets how many tokens --draft-model drafts; give --draft-model FILE"),
    (["--lookup", "2", "--draft-tokens", "3"], "--draft-tokens sets how many tokens --draft-model drafts"),
    (["--draft-policy", "fixed"], "--draft-policy needs drafting: give --draft-model FILE or --lookup N"),
    # options a mode took and dropped (issue 25's probe): each ran as if it had not been given
    (["--perplexity", "README.md", "--lookup", "2"], "--perplexity and --lookup do not go together"),
    (["--perplexity", "README.md", "--draft-model", "README.md"], "--perplexity and --draft-model do not go together"),
    (["--perplexity", "README.md", "--temperature", "0", "--seed", "3"],
     "--temperature, --seed: do nothing with --perplexity"),
    # (the chat probe's: a window of the context never fills, so nothing slides)
    (["--perplexity", "README.md", "--on-context-full", "slide"],
     "--on-context-full: does nothing with --perplexity, which scores text and samples no token; drop it"),
    (["--vram-gb", "1"], "--vram-gb: does nothing with --single-process"),  # (run_pipeline gives --single-process)
    (["--readers", "2", "--cpu-share", "0.5", "--kv-on-host"],
     "--kv-on-host, --readers, --cpu-share: do nothing with --single-process"),
    (["--cpu-share", "0.5", "--device", "cpu"], "--cpu-share '0.5': the compute device is the CPU (--device cpu)"),
    (["--cpu-split", "rows"], "--cpu-split: does nothing without a --cpu-share that splits layers (0 and the default "
                              "split none)"),
    (["--cpu-split", "rows", "--cpu-share", "Default"], "--cpu-split: does nothing without a --cpu-share that splits"),
    (["--sink-tokens", "8"], "--sink-tokens: does nothing unless the window slides (--on-context-full slide)"),
    (["--port", "9000", "--max-queue", "3"], "--port, --max-queue: do nothing without --serve; drop them"),
])
def test_former_tracebacks_are_one_line_before_anything_starts(tmp_path, args, words):
    """Each was a traceback, or an error only after the processes had started (probe, issue 10)."""
    import time

    path = ggufgen.write_model(tmp_path / "m.gguf")
    t0 = time.monotonic()
    r = run_pipeline("-m", path, *args, *([] if args == [] or {"--perplexity", "--serve"} & set(args) else ["hello"]),
                     cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run-pipeline: error: ") and words in lines[0], r.stderr
    assert time.monotonic() - t0 < 30


def test_a_share_turned_off_or_the_default_in_any_spelling_goes_with_single_process():
    """--cpu-share 0 --single-process ran until 0 stopped being the default (a probe's), then was
    refused as a pipeline option given; a share that is one still is."""
    from layerstream.coordinator.args import build_parser, check_args
    from layerstream.coordinator.cli import UsageError

    for v in ("0", "off", "8:0", "default", " DEFAULT "):
        check_args(build_parser().parse_args(["--single-process", "--cpu-share", v, "hi"]))
    with pytest.raises(UsageError, match="^--cpu-share: does nothing with --single-process"):
        check_args(build_parser().parse_args(["--single-process", "--cpu-share", "8:0.5", "hi"]))


def test_a_cpu_share_where_auto_takes_the_cpu_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    """--device auto on a machine without CUDA is the CPU, where --cpu-share computed beside nothing
    (taken and ignored before); with CUDA visible the same options pass."""
    import torch

    from layerstream.coordinator.args import build_parser, check_args
    from layerstream.coordinator.cli import UsageError, check_device

    args = build_parser().parse_args(["--cpu-share", "0.5", "hi"])
    check_args(args)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # (what device.cuda_visible asks)
    with pytest.raises(UsageError, match=r"--cpu-share '0.5': the compute device is the CPU \(no CUDA device"):
        check_device(args)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device(args)
    for off in ("0", "off"):
        args = build_parser().parse_args(["--cpu-share", off, "hi"])
        check_args(args)
        check_device(args)
    if not torch.cuda.is_available():  # the command itself, before any child: exit 2, one line
        path = ggufgen.write_model(tmp_path / "m.gguf")
        r = subprocess.run([str(LAUNCHER), "-m", path, "--cpu-share", "auto", "hi"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.splitlines() == [
            "run-pipeline: error: --cpu-share 'auto': the compute device is the CPU (no CUDA device is visible), so no "
            "share of the layers crosses a link beside it; drop --cpu-share"], r.stderr
        for device in ("cuda", "cuda:1"):  # (a probe's: exit 1, where other command lines that cannot run exit 2)
            r = subprocess.run([str(LAUNCHER), "-m", path, "--device", device, "hi"], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 2 and r.stderr.splitlines() == [
                f"run-pipeline: error: --device {device}: no CUDA device is visible; use --device cpu"], r.stderr


def test_empty_perplexity_file_and_long_prompt_are_refused_early(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf", context_length=64)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run_pipeline("-m", path, "--perplexity", str(empty))
    assert r.returncode != 0 and r.stderr.splitlines() == [f"run-pipeline: error: --perplexity {empty}: the file is empty"]
    if sys.platform == "linux":  # a size of 0 that is not empty: it cannot be read at its start
        r = run_pipeline("-m", path, "--perplexity", "/proc/self/mem")
        assert r.returncode == 2 and r.stderr.splitlines() == [
            "run-pipeline: error: --perplexity /proc/self/mem: cannot be read (Input/output error)"], r.stderr
    one = tmp_path / "one.txt"
    one.write_text("a")  # (one token, found once the model is loaded)
    r = run_pipeline("-m", path, "--single-process", "--perplexity", str(one))
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"run-pipeline: error: --perplexity {one}: the text is 1 token; a perplexity needs at least 2 (give a longer text)"]
    r = run_pipeline("-m", path, "--ctx", "16", "-n", "4", "word " * 40)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "leaves no room to generate" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_a_file_of_size_0_is_empty_only_when_it_reads_nothing(tmp_path):
    """--perplexity's up-front check (arg_files.no_text): /proc's files report a size of 0, so the
    size alone called /proc/self/stat "empty" (it holds text) and /proc/self/mem "empty" (it cannot
    be read at its start: EIO)."""
    from layerstream.coordinator.arg_files import no_text

    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert no_text(str(empty)) == "the file is empty"
    assert no_text("/proc/self/stat") is None
    assert no_text("/proc/self/mem") == "cannot be read (Input/output error)"


def test_a_perplexity_of_few_tokens_or_of_bytes_not_text_comes_with_a_warning(tmp_path):
    """A figure over fewer than PPL_FEW_TOKENS tokens, and one over bytes that are not UTF-8, is
    printed with a one-line warning each (llama-perplexity refuses short texts); a long text none."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    short, binary, text = tmp_path / "short.txt", tmp_path / "b.bin", tmp_path / "long.txt"
    short.write_text("hello world")
    binary.write_bytes(bytes(range(128, 256)) * 2 + b" word" * 80)
    text.write_text("the cat sat on the mat and " * 30)
    warnings = {}
    for f in (short, binary, text):
        r = run_pipeline("--single-process", "-m", path, "--perplexity", str(f))
        assert r.returncode == 0 and r.stdout.startswith("perplexity: "), r.stderr
        warnings[f.name] = [ln for ln in r.stderr.splitlines() if ln.startswith("run-pipeline: warning:")]
    assert len(warnings["short.txt"]) == 1 and "says little about a model" in warnings["short.txt"][0]
    assert any("not UTF-8 text (256 characters replaced)" in ln for ln in warnings["b.bin"]), warnings["b.bin"]
    assert warnings["long.txt"] == []


def test_non_utf8_prompt_bytes_are_replaced_not_a_traceback(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = subprocess.run([str(LAUNCHER), "--single-process", "-m", path, "-n", "2", "--device", "cpu",
                        b"caf\xe9 \xff"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    # said in one line, as --perplexity says it (a probe's: the model read the replacements unwarned)
    assert r.stderr.decode().splitlines() == ["run-pipeline: warning: the prompt: not UTF-8 text (2 characters "
                                              "replaced); the model reads the replacements"], r.stderr
    prompt = tmp_path / "p.txt"
    prompt.write_bytes(b"Hello \xff\xfe world")
    r = run_pipeline("--single-process", "-m", path, "-n", "2", "--device", "cpu", "-f", str(prompt))
    assert r.returncode == 0 and r.stderr.splitlines() == [
        "run-pipeline: warning: the prompt: not UTF-8 text (2 characters replaced); the model reads the replacements"]
    r = run_pipeline("--single-process", "-m", path, "-n", "2", "--device", "cpu", "café")  # (UTF-8: no warning)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    chat = _chat_model(tmp_path)  # --system's bytes too (a probe's: replaced unwarned)
    r = subprocess.run([str(LAUNCHER), "--single-process", "-m", chat, "-n", "2", "--device", "cpu", "--chat",
                        "-sys", b"be \xff brief"], input=b"/bye\n", capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stderr.decode().splitlines() == [
        "run-pipeline: warning: --system: not UTF-8 text (1 character replaced); the model reads the replacements"], r.stderr


def test_good_run_prints_the_engines_text(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf", arch="qwen3")
    r = run_pipeline("-m", path, "-n", "8", "--temperature", "0", "--device", "cpu", "hello", "world")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with Engine.load(path, device="cpu", ctx=256) as e:
        want = "".join(e.generate("hello world", SamplingParams(temperature=0, max_tokens=8)))
    assert want, "greedy text of the tiny model is not empty"
    assert r.stdout == want + "\n"


def test_a_pipeline_run_takes_its_children_from_the_warm_starts(tmp_path, monkeypatch, capsys):
    """NOTE [ warm starts ]: with warm starts on (this machine may have too few cores for them by
    default), every child of the run is a process spawned ahead, and the text is the reference
    engine's."""
    from layerstream.coordinator import cli, supervisor

    path = ggufgen.write_model(tmp_path / "m.gguf", arch="qwen3")
    monkeypatch.setattr(supervisor, "WARM_MIN_CPUS", 1)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))  # (run() reconfigures it)
    spawned, taken = [], []
    real_init, real_take = supervisor.WarmStarts.__init__, supervisor.WarmStarts.take

    def init(self, roles, device="auto"):
        spawned.append((dict(roles), device))
        real_init(self, roles, device)

    def take(self, role, args):
        proc = real_take(self, role, args)
        taken.append((role, proc is not None))
        return proc

    monkeypatch.setattr(supervisor.WarmStarts, "__init__", init)
    monkeypatch.setattr(supervisor.WarmStarts, "take", take)
    assert cli.main(["-m", path, "-n", "8", "--temperature", "0", "--device", "cpu", "--readers", "2",
                     "hello", "world"]) == 0
    with Engine.load(path, device="cpu", ctx=256) as e:
        want = "".join(e.generate("hello world", SamplingParams(temperature=0, max_tokens=8)))
    assert want and capsys.readouterr().out == want + "\n"
    assert spawned == [({"staging": 1, "reader": 2, "compute": 1}, "cpu")]  # (the warm compute is told --device)
    assert sorted(taken) == [("compute", True), ("reader", True), ("reader", True), ("staging", True)]


def test_only_perplexity_plans_for_every_position_s_logits(tmp_path, monkeypatch):
    """NOTE [ rows of logits ] in coordinator/memory.py: a run that generates plans the rows it samples;
    one that answers a prompt given on the command line plans for it (NOTE [ step tokens ] in plan.py)."""
    from layerstream.coordinator import cli
    from layerstream.errors import ConfigError

    path = ggufgen.write_model(tmp_path / "m.gguf")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox. " * 3)
    seen = []

    def engine_open(cfg, pcfg=None, **kw):
        seen.append((pcfg.budget.evaluates, pcfg.budget.job))
        raise ConfigError("stop here")

    monkeypatch.setattr(Engine, "open", staticmethod(engine_open))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))  # (run() reconfigures it)
    for argv in (["-m", path, "-n", "4", "--device", "cpu", "hello"], ["-m", path, "--perplexity", str(text), "--device", "cpu"],
                 ["-m", path, "--serve", "--port", "0", "--device", "cpu"],  # (a request may ask for more drafts)
                 ["-m", path, "-n", "-1", "--device", "cpu", "-p", "x" * 400], ["-m", path, "--lookup", "3", "--device", "cpu", "hi"]):
        with pytest.raises(SystemExit, match="1"):
            cli.main(argv)
    # (and the job of a run that answers one prompt without drafts: its tokens at four bytes each and -n's)
    assert seen == [(False, (17, 4)), (True, None), (True, None), (False, (116, 4096)), (False, None)]
    # --chat's system message goes in with the prompt, and the template takes room
    from layerstream.coordinator.args import build_parser
    from layerstream.coordinator.pipeline_config import budget_use

    args = build_parser().parse_args(["--chat", "-sys", "y" * 800, "-n", "4", "hi"])
    assert budget_use(args)["job"] == ((800 + 2) // 4 + 48, 4)
    # an interactive chat plans for a typical turn (its earlier turns stay in the KV); not with drafts
    from layerstream.coordinator.pipeline_config import CHAT_TURN_TOKENS

    assert budget_use(build_parser().parse_args(["--chat", "-n", "300"]))["job"] == (CHAT_TURN_TOKENS + 48, 300)
    assert budget_use(build_parser().parse_args(["--chat", "--lookup", "3"]))["job"] is None


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


def test_perplexity_of_standard_input_or_a_pipe_is_the_files(tmp_path):
    """`--perplexity -` scores standard input's text (a probe's: it was refused as "no such file"), as
    a file of the same text scores; a blank or too long one is one line and exit 2, an empty path too."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    text = "the quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "t.txt").write_text(text)

    def ppl(source: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([str(LAUNCHER), "--single-process", "-m", path, "--device", "cpu", "--perplexity", source],
                              input=stdin, capture_output=True, text=True, timeout=120)

    from_file, from_stdin = ppl(str(tmp_path / "t.txt")), ppl("-", text)
    assert from_file.returncode == from_stdin.returncode == 0, from_stdin.stderr
    assert re.fullmatch(r"perplexity: \d+\.\d+ over \d+ tokens\n", from_stdin.stdout) and from_stdin.stdout == from_file.stdout
    r = ppl("-", " \n")
    assert (r.returncode, r.stderr) == (2, "run-pipeline: error: --perplexity -: standard input holds no text\n")
    r = ppl("-", "x" * ((16 << 20) + 1))
    assert r.returncode == 2 and r.stderr.startswith("run-pipeline: error: --perplexity -: over the 16 MiB a run scores")
    r = ppl("")
    assert (r.returncode, r.stderr) == (2, "run-pipeline: error: --perplexity : an empty path; give a file, or - for "
                                           "standard input\n"), r.stderr


def test_perplexity_of_missing_file(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = run_pipeline("-m", path, "--perplexity", str(tmp_path / "absent.txt"))
    assert r.returncode != 0
    assert r.stderr.splitlines() == [f"run-pipeline: error: --perplexity {tmp_path / 'absent.txt'}: no such file"]


def _chat_model(tmp_path: Path, **kw) -> str:
    """A tiny model with a ChatML chat template (ggufgen writes none)."""
    plain = ggufgen.write_model(tmp_path / "plain.gguf", **kw)
    return ggufgen.rewrite_metadata(plain, tmp_path / "chat.gguf", {"tokenizer.chat_template": CHATML})


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("args,words", [
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["-n", "x"], "-n x: must be a whole number, in decimal digits"),
    (["-ctk", "q8_0"], "unknown option -ctk (one dash takes one letter"),  # llama.cpp's, read as -c tk
    (["-fa", "on"], "unknown option -fa"),
])
def test_command_line_errors_are_one_line_with_a_hint(args, words):
    """Issue 25: argparse printed its 26-line usage block."""
    r = subprocess.run([str(LAUNCHER), *args, "hello"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"run-pipeline: error: {words}") and lines[0].endswith("(see run-pipeline --help)")


def test_version_and_llama_cpp_short_options():
    from layerstream.coordinator.args import build_parser

    r = subprocess.run([str(LAUNCHER), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.fullmatch(r"run-pipeline \(layerstream\) \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout
    a = build_parser().parse_args(["-ngl", "10", "-c", "64", "-t", "3", "-s", "7", "-p", "hi", "-sys", "be brief"])
    assert (a.resident_layers, a.max_tokens, a.ctx, a.cpu_threads, a.seed) == (10, 256, 64, 3, 7)
    assert (a.prompt_opt, a.system) == ("hi", "be brief")
    a = build_parser().parse_args(["-n64", "-vv", "--n-gpu-layers", "99", "--", "-ngl", "words"])
    assert (a.max_tokens, a.resident_layers, a.prompt) == (64, 99, ["-ngl", "words"])


def test_option_checks_come_before_torch_is_imported():
    """A bad option is refused in a fraction of a second, not after torch's import (issue 25)."""
    code = ("import sys\nfrom layerstream.coordinator.cli import main\n"
            "try:\n    main(['--vram-gb', '-1', 'hi'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    for args in (["--vram-gb", "-1", "hi"], ["--seed", str(2 ** 70), "hi"], ["--cpu-share", "0", "-m", "/", "hi"],
                 ["--cpu-share", "3", "hi"], ["--cpu-split", "cols", "hi"]):
        r = subprocess.run([sys.executable, "-c", code.replace("['--vram-gb', '-1', 'hi']", repr(args))],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout == "2 False\n", (args, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "run-pipeline: error: " in r.stderr


def test_chat_on_a_model_without_a_template_fails_before_anything_starts(tmp_path):
    """Issue 25: Gemma 3 270M base (no chat template) failed only after the whole load."""
    path = ggufgen.write_model(tmp_path / "base.gguf")
    for mode in ([], ["--single-process"]):
        r = subprocess.run([str(LAUNCHER), *mode, "-m", path, "-v", "--chat", "--device", "cpu", "hello"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.splitlines()[-1] == ("run-pipeline: error: --chat: base.gguf has no chat template "
                                             "(tokenizer.chat_template; a base model, not an instruct one?); "
                                             "run without --chat"), r.stderr
        assert "plan:" not in r.stderr  # the pipeline logs its plan before it starts a process
        assert "loading layers" not in r.stderr


def test_chat_without_a_template_is_refused_from_the_one_key_with_a_cold_header_cache(tmp_path, monkeypatch, capsys):
    """Issue 25: with no parsed header cached, --chat on a template-less model waited for gguf-py's
    whole parse (17 to 24 s for Gemma 3); the key alone is read now, and the header never parsed."""
    import gguf

    from layerstream.coordinator import cli
    from layerstream.coordinator.args import build_parser

    base = ggufgen.write_model(tmp_path / "base.gguf")
    chat = _chat_model(tmp_path)
    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    parsed = []
    real_init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda *a, **k: parsed.append(a[1]) or real_init(*a, **k))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))  # (run() reconfigures it)
    with pytest.raises(SystemExit) as e:
        cli.main(["-m", base, "--chat", "--device", "cpu", "hello"])
    assert e.value.code == 1 and parsed == []
    assert capsys.readouterr().err == ("run-pipeline: error: --chat: base.gguf has no chat template "
                                       "(tokenizer.chat_template; a base model, not an instruct one?); "
                                       "run without --chat\n")
    index = cli.check_model(build_parser().parse_args(["-m", chat, "--chat", "hello"]))  # a template: opens
    assert parsed == [chat] and index.metadata["tokenizer.chat_template"] == CHATML


def test_an_empty_chat_template_and_one_that_fails_are_said_as_the_models(tmp_path, monkeypatch, capsys):
    """A probe's: an empty template was said to be "not text"; a template's own error at render
    ("'foo' is undefined") named no file, and the server answered it as the client's."""
    from layerstream.coordinator import cli
    from layerstream.coordinator.engine import Engine
    from layerstream.errors import ModelError

    base = ggufgen.write_model(tmp_path / "base.gguf")
    empty = ggufgen.rewrite_metadata(base, tmp_path / "empty.gguf", {"tokenizer.chat_template": ""})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))  # (run() reconfigures it)
    with pytest.raises(SystemExit) as e:
        cli.main(["-m", empty, "--chat", "--device", "cpu", "hello"])
    assert e.value.code == 1 and capsys.readouterr().err == (
        "run-pipeline: error: --chat: empty.gguf has an empty chat template (tokenizer.chat_template; a base model, "
        "not an instruct one?); run without --chat\n")
    bad = ggufgen.rewrite_metadata(base, tmp_path / "bad.gguf", {"tokenizer.chat_template": "{{ foo.bar }}"})
    with Engine.load(bad, device="cpu", ctx=64) as engine:
        with pytest.raises(ModelError, match=r"^bad\.gguf: chat template failed: UndefinedError: 'foo' is undefined$"):
            engine.encode_chat([{"role": "user", "content": "hi"}])


def test_context_full_error_starts_on_a_line_of_its_own(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf")
    r = run_pipeline("-m", path, "--device", "cpu", "--ctx", "12", "-n", "50", "--ignore-eos", "--temperature", "0",
                     "hello")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stdout and r.stdout.endswith("\n")  # the partial text, its line ended
    # (after the warning that -n 50 passes the context's room, said before the reply)
    assert r.stderr.splitlines()[0].startswith("run-pipeline: warning: -n 50: the context (12 tokens) holds ")
    assert r.stderr.splitlines()[1:] == ["run-pipeline: error: the sequence reached the context size (12 tokens); "
                                         "raise --ctx or pass --on-context-full slide"]


def test_stats_prints_prompt_and_decode_rates(tmp_path):
    """Issue 24 item 5; the counts against the tokenizer and the options, the rates from their times."""
    path = ggufgen.write_model(tmp_path / "m.gguf", arch="qwen3")
    r = run_pipeline("-m", path, "--device", "cpu", "--stats", "-n", "6", "--ignore-eos", "--temperature", "0",
                     "hello", "world")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"load (\d+\.\d) s; prompt: (\d+) tokens? in (\d+\.\d\d) s, (\d+\.\d) tokens/s; "
                     r"decode: (\d+) tokens? in (\d+\.\d\d) s, (\d+\.\d) tokens/s", r.stderr.splitlines()[-1])
    assert m, r.stderr
    with Engine.load(path, device="cpu", ctx=256) as e:
        n_prompt = len(e.tokenizer.encode("hello world"))
        want = "".join(e.generate("hello world", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    assert int(m[2]) == n_prompt and int(m[5]) == 6
    # rate x time gives the count, within the printed time's rounding (0.005 s; a tiny model's
    # decode can print 0.00 s)
    assert abs(float(m[4]) * float(m[3]) - n_prompt) <= float(m[4]) * 0.006 + 0.5
    assert abs(float(m[7]) * float(m[6]) - 5) <= float(m[7]) * 0.006 + 0.5  # the 5 after the first token
    assert r.stdout == want + "\n"  # stdout holds the text alone
    r = run_pipeline("-m", path, "--device", "cpu", "-n", "2", "hello")
    assert r.returncode == 0 and r.stderr == ""  # no terminal, no --stats: no figures


def test_load_progress_draws_the_pipelines_stages_on_a_terminal():
    """The pipeline's on_progress(done, total, what) hook as bars (issue 25: 7 to 30 s of silence)."""
    import io

    from layerstream.coordinator.stdio import LoadProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    t = Terminal()
    show = LoadProgress(t, mininterval=0)
    for done in range(4):
        show(done, 3, "processes")
    show(0, 30, "layers")
    assert "reading layers" not in t.getvalue()  # not before the first pass reads (a chat's prompt may be up)
    show(12, 30, "layers")
    shown = t.getvalue()
    assert "starting processes: 0/3" in shown and "starting processes: 2/3" in shown
    assert "reading layers: 12/30" in shown
    assert show.bars["processes"].disable and not show.bars["layers"].disable  # the finished one is closed
    serving = LoadProgress(Terminal(), mininterval=0, stages=("processes",))
    serving(1, 30, "layers")
    assert not serving.bars and serving.stream.getvalue() == ""


class _Lines:
    """A LineReader's stand-in: `KeyboardInterrupt` in the list is a Ctrl-C at the prompt."""

    person = False

    def __init__(self, lines):
        self.lines = iter(lines)
        self.typed = ""

    def read(self, prompt):
        line = next(self.lines, None)
        if isinstance(line, BaseException) or line is KeyboardInterrupt:
            raise line
        return line


class _Typed(_Lines):
    """Lines typed by a person at a terminal: a Ctrl-C at the prompt asks before it quits."""

    person = True


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    path = _chat_model(tmp_path_factory.mktemp("chat"))
    with Engine.load(path, device="cpu", ctx=512) as e:
        yield e


def test_a_system_message_too_long_for_the_context_is_refused_as_it_is_set(chat_engine):
    """The chat probe's: `/system` took it ('system message set'), and each message after it was
    refused for it, until the next /system. Now a person keeps the old one; a pipe's chat ends."""
    import io

    from layerstream.coordinator.repl import chat

    params = SamplingParams(temperature=0, max_tokens=2)
    long = "You are a pirate. " * 200
    out, err = io.StringIO(), io.StringIO()
    assert chat(chat_engine, params, reader=_Typed(["/system Be brief.", "/system " + long, "Hi", "/bye"]), out=out,
                err=err) == 0
    lines = err.getvalue().splitlines()
    refused = [ln for ln in lines if "error" in ln]
    assert len(refused) == 1 and re.match(r"run-pipeline: error: the system message \(--system or /system\) is \d+ "
                                          r"tokens with the chat template, and the context holds 512; .*; the "
                                          r"system message is unchanged$", refused[0]), lines
    assert "system message set" in lines and out.getvalue().strip()  # ("Hi" answered, under "Be brief.")
    err = io.StringIO()
    assert chat(chat_engine, params, reader=_Lines(["/system " + long, "Hi"]), out=io.StringIO(), err=err) == 1
    assert err.getvalue().endswith("; the chat ends here\n") and "system message set" not in err.getvalue()


def test_a_chat_line_that_was_not_utf8_is_warned_of_as_a_prompt_is(chat_engine):
    """The chat probe's: `printf 'Hi \\xff\\xfe there' | run-pipeline --chat` replaced the bytes silently,
    where a one-shot prompt warns; the line still goes to the model."""
    import io

    from layerstream.coordinator.repl import chat

    out, err = io.StringIO(), io.StringIO()
    params = SamplingParams(temperature=0, max_tokens=2)
    assert chat(chat_engine, params, reader=_Lines(["Hi \ufffd\ufffd there", "plain"]), out=out, err=err) == 0
    assert err.getvalue() == "run-pipeline: warning: the line: not UTF-8 text (2 characters replaced)\n"
    assert len(out.getvalue().splitlines()) == 2  # (both lines answered)


def test_chat_keeps_the_conversation_and_its_commands(chat_engine, monkeypatch):
    import io

    from layerstream.coordinator.repl import chat

    seen, real = [], chat_engine.encode_chat
    monkeypatch.setattr(chat_engine, "encode_chat", lambda msgs: seen.append(msgs) or real(msgs))
    out, err = io.StringIO(), io.StringIO()
    params = SamplingParams(temperature=0, max_tokens=4)
    lines = ["My name is Ada.", "", "What is my name?", "/system Be brief.", "/clear", "Hi", "/nope", " //usr/bin?",
             "/bye", "never"]
    assert chat(chat_engine, params, None, reader=_Lines(lines), out=out, err=err) == 0
    # empty lines and commands go to no model (a /system is only counted through the template, alone:
    # its length is checked as it is set); /bye ends before "never"
    assert [{"role": "system", "content": "Be brief."}] in seen
    seen = [m for m in seen if m[-1]["role"] != "system"]
    assert len(seen) == 4
    assert seen[3][-1] == {"role": "user", "content": "/usr/bin?"}  # (//: a message that begins with /)
    replies = out.getvalue().split("\n")
    assert seen[1] == [{"role": "user", "content": "My name is Ada."},
                       {"role": "assistant", "content": replies[0]},
                       {"role": "user", "content": "What is my name?"}]
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "conversation cleared (2 turns forgotten)" in err.getvalue()
    assert "unknown command /nope; /help lists the commands, and //nope sends it as a message" in err.getvalue()
    assert "> " not in out.getvalue()
    # Ctrl-D ends with 0; at a person's prompt two Ctrl-C in a row end with 130, one does not
    assert chat(chat_engine, params, reader=_Typed([KeyboardInterrupt, "/bye"]), out=out, err=err) == 0
    assert chat(chat_engine, params, reader=_Typed([KeyboardInterrupt, KeyboardInterrupt]), out=out, err=err) == 130
    assert chat(chat_engine, params, reader=_Lines([]), out=out, err=err) == 0
    assert not chat_engine.core.has_unfinished() and len(chat_engine.core.free_rows) == chat_engine.core.max_seqs


class _CtrlCOnFirstText(io.StringIO):
    """stdout that presses Ctrl-C (a real SIGINT to this process) once the reply's first text is written."""

    def write(self, text):
        if text and not self.getvalue():
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def test_ctrl_c_in_a_chat_fed_by_a_pipe_ends_it_with_130(chat_engine):
    """Probe of issue 25: `printf 'hi\\n' | run-pipeline --chat`, then Ctrl-C while it answered: the
    reply stopped, the hint said 'Ctrl-C again to quit', the input ended and the chat exited 0. With
    no person at a prompt, one Ctrl-C ends it as it ends a run without --chat: the KeyboardInterrupt
    goes on to the command (its one line and 130: test_cli_signals), the reply's text so far shown."""
    from layerstream.coordinator.repl import chat

    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    out, err = _CtrlCOnFirstText(), io.StringIO()
    lines = _Lines(["hello", "never read"])
    with pytest.raises(KeyboardInterrupt):
        chat(chat_engine, params, reader=lines, out=out, err=err)
    assert err.getvalue() == "" and list(lines.lines) == ["never read"]
    reply = out.getvalue()
    assert reply.endswith("\n") and 0 < len(reply) and "\n" not in reply[:-1]  # its text so far, its line ended
    # and a Ctrl-C while the next line is awaited from the pipe
    err = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        chat(chat_engine, params, reader=_Lines([KeyboardInterrupt, "hello"]), out=out, err=err)
    assert err.getvalue() == ""


def test_a_chat_message_of_megabytes_is_refused_with_its_size_untokenized(chat_engine, monkeypatch):
    """A probe's: a 50 MB line said 'chat template stopped: a sum of ... elements (at most ...)', the
    template's own limit, after minutes of tokenizing. Past what tokenizes in a moment, a message longer
    than the context's tokens can spell is refused by its size, untokenized; where the context slides
    (it takes any length), one past what the chat template may render is refused by its characters."""
    import dataclasses

    from layerstream.coordinator.chat_sizes import MAX_OUTPUT
    from layerstream.coordinator.repl import chat

    huge = "word " * (1 << 20)  # (5 MiB)
    encode, tokenized = chat_engine.tokenizer.encode, []
    monkeypatch.setattr(chat_engine.tokenizer, "encode", lambda text, *a, **k: tokenized.append(len(text))
                        or encode(text, *a, **k))
    params = SamplingParams(temperature=0, max_tokens=2)
    for reader, code in ((_Lines([huge, "hello"]), 1), (_Typed([huge, "/bye"]), 0)):
        out, err = io.StringIO(), io.StringIO()
        assert chat(chat_engine, params, reader=reader, out=out, err=err) == code
        line = (f"run-pipeline: error: the message is {len(huge):,} bytes, more than a context of "
                f"{chat_engine.cfg.ctx} tokens holds; give a shorter one, or a larger --ctx (--ctx-size)")
        # (a person is greeted first)
        assert err.getvalue().splitlines(keepends=True)[-1] == line + ("; the chat ends here\n" if code else "\n")
        assert out.getvalue() == ""
    err = io.StringIO()  # (a /system of megabytes: refused as it is set, not tokenized)
    assert chat(chat_engine, params, reader=_Lines(["/system " + huge, "hello"]), out=io.StringIO(), err=err) == 1
    assert err.getvalue().splitlines()[-1] == (f"run-pipeline: error: the system message (--system or /system) is "
                                               f"{len(huge.strip()):,} bytes, more than a context of {chat_engine.cfg.ctx} "
                                               "tokens holds; give a shorter one, or a larger --ctx (--ctx-size); the "
                                               "chat ends here")
    monkeypatch.setattr(chat_engine, "cfg", dataclasses.replace(chat_engine.cfg, on_context_full="slide"))
    err = io.StringIO()
    assert chat(chat_engine, params, reader=_Lines([huge]), out=io.StringIO(), err=err) == 1
    assert err.getvalue() == (f"run-pipeline: error: the message is {len(huge):,} characters, more than a chat "
                              f"prompt may be ({MAX_OUTPUT:,}); give a shorter one; the chat ends here\n")
    assert max(tokenized, default=0) < len(huge)


def test_a_chat_message_longer_than_the_context_says_how_long_and_what_to_do(chat_engine):
    """Probe of issue 25: a first message longer than the context said 'the conversation reached the
    context size (64 tokens)', after a blank line on stdout. It says the message's tokens (through the
    chat template: counted here by the engine's own encode_chat), the context's, and --ctx; a later turn
    that overflows offers /clear to a person where the message alone would fit."""
    from layerstream.coordinator.repl import chat

    params = SamplingParams(temperature=0, max_tokens=2)
    ctx = chat_engine.cfg.ctx

    def tokens(*texts: str) -> int:
        return len(chat_engine.encode_chat([{"role": "user", "content": t} for t in texts]))

    long = "word " * 400
    n = tokens(long)
    assert n >= ctx
    for reader, code in ((_Lines([long, "hello"]), 1), (_Typed([long, "/bye"]), 0)):
        out, err = io.StringIO(), io.StringIO()
        assert chat(chat_engine, params, reader=reader, out=out, err=err) == code
        line = (f"run-pipeline: error: the message is {n} tokens with the chat template, and the context holds {ctx}; "
                f"run with a larger --ctx (--ctx-size), of more than {n} tokens to leave room for the reply")
        assert line + ("; the chat ends here\n" if code else "\n") in err.getvalue(), err.getvalue()
        assert out.getvalue() == ""  # no reply, no blank line
    half = "word " * 1
    while tokens(half + "word ") < ctx * 2 // 3:
        half += "word "
    out, err = io.StringIO(), io.StringIO()
    assert chat(chat_engine, params, reader=_Typed([half, half, "/bye"]), out=out, err=err) == 0
    assert "run-pipeline: error: the conversation with this message is " in err.getvalue()
    assert f"and the context holds {ctx}; /clear starts over, or run with a larger --ctx (--ctx-size)" in err.getvalue()


def test_a_chat_stopped_by_sigterm_in_a_reply_ends_the_reply_s_line(chat_engine):
    """SIGTERM or SIGHUP during a reply (proto.signals' Stopped, raised wherever the handler runs; here
    as the third piece is written) left stdout without its newline, where Ctrl-C ended it: the
    reply's line is ended, then the stop goes on to the command."""
    import io
    import signal

    from layerstream.coordinator.repl import chat
    from layerstream.proto.signals import Stopped as Terminated

    class Stopped(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                raise Terminated(signal.SIGTERM)
            return super().write(text)

    out = Stopped()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with pytest.raises(Terminated):
        chat(chat_engine, params, None, reader=_Lines(["Hi"]), out=out, err=io.StringIO())
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1 and len(out.getvalue()) > 1


def test_a_sigterm_at_the_chats_prompt_stops_the_command_where_a_ctrl_c_asks(chat_engine):
    """A review's: SIGTERM or SIGHUP at a person's prompt was taken for a Ctrl-C ('Ctrl-C again...'),
    and the chat went on; it goes on to the command, which stops with 143 or 129."""
    import io
    import signal

    from layerstream.coordinator.repl import chat
    from layerstream.proto.signals import Stopped

    params = SamplingParams(temperature=0, max_tokens=2)
    err = io.StringIO()
    assert chat(chat_engine, params, None, reader=_Typed([KeyboardInterrupt, "/bye"]), out=io.StringIO(), err=err) == 0
    assert "Ctrl-C again" in err.getvalue()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        err = io.StringIO()
        with pytest.raises(Stopped):
            chat(chat_engine, params, None, reader=_Typed([Stopped(sig), "/bye"]), out=io.StringIO(), err=err)
        assert "Ctrl-C again" not in err.getvalue()


def test_chat_prompt_goes_to_a_terminal_never_into_piped_output():
    import io

    from layerstream.coordinator.repl import LineReader

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Tty()
    r = LineReader(stdin=Tty("hello\n"), stdout=out, stderr=err)  # typed at a terminal, stdout piped
    assert r.read("> ") == "hello" and r.read("> ") is None
    assert out.getvalue() == "" and err.getvalue() == "> > "
    err = io.StringIO()
    r = LineReader(stdin=io.StringIO("hello\n"), stdout=out, stderr=err)  # all piped: no prompt at all
    assert r.read("> ") == "hello" and out.getvalue() == err.getvalue() == ""


class _Pty:
    """A command on a pseudo-terminal of its own (its controlling terminal: \\x03 is Ctrl-C)."""

    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            # SIGINT as a terminal gives it: a background job (`.ci/run &`) runs with SIGINT
            # ignored, which would stay ignored across exec and leave Ctrl-C without effect (a
            # mask blocking it likewise)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            os.execv(argv[0], argv)
        self.buf = b""

    def expect(self, pattern: bytes, timeout: float = 60) -> re.Match:
        import select
        import time

        deadline, rx = time.monotonic() + timeout, re.compile(pattern)
        while not (m := rx.search(self.buf)):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} not seen in {timeout} s; the terminal shows {self.buf[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the child is gone
                    data = b""
                assert data, f"{pattern!r} not seen before the end; the terminal shows {self.buf[-2000:]!r}"
                self.buf += data
        self.buf = self.buf[m.end():]
        return m

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30) -> int:
        import select
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.05)[0]:  # what it writes as it ends (a full terminal blocks it)
                try:
                    self.buf += os.read(self.fd, 65536)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise AssertionError(f"still running {timeout} s later; the terminal shows {self.buf[-2000:]!r}")


@pytest.mark.default_threads
@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--single-process"], []], ids=["single-process", "pipeline"])
def test_ctrl_c_stops_a_reply_and_keeps_the_conversation(tmp_path, mode):
    """Issue 25: Ctrl-C during a reply ended the chat and lost the conversation. On a terminal:
    Ctrl-C stops the reply, the prompt comes back, the next turn sees the first (the prompt's
    token count, from the per-reply --stats line), /clear forgets it; two Ctrl-C in a row quit.
    In the pipeline too, where the Ctrl-C arrives while its event loop waits on a step."""
    path = _chat_model(tmp_path, context_length=4096)
    p = _Pty([str(LAUNCHER), *mode, "-m", path, "--device", "cpu", "--chat", "--stats",
              "-n", "4000", "--ignore-eos", "--ctx", "4096"])
    stats = rb"prompt: (\d+) tokens?(?: \(and (\d+) reused\))? in"
    try:
        p.expect(rb"> ", timeout=120)

        def turn(text: bytes) -> int:
            p.send(text + b"\r")
            p.expect(re.escape(text) + rb"\r\n")
            p.expect(rb"[\s\S]{24}")  # the reply is under way (4000 tokens: far from its end)
            p.send(b"\x03")
            p.expect(rb"\[reply stopped; Ctrl-C again to quit\]")
            m = p.expect(stats)
            p.expect(rb"> ")
            return int(m[1]) + int(m[2] or 0)

        with Engine.load(path, device="cpu", ctx=256) as e:
            alone = len(e.encode_chat([{"role": "user", "content": "hello"}]))
            after_empty_reply = len(e.encode_chat([{"role": "user", "content": "hello"},
                                                   {"role": "assistant", "content": ""},
                                                   {"role": "user", "content": "hello"}]))
        assert turn(b"hello") == alone
        assert turn(b"hello") > after_empty_reply  # the first turn and its partial reply are kept
        p.send(b"/clear\r")
        p.expect(rb"conversation cleared \(2 turns forgotten\)")
        p.expect(rb"> ")
        assert turn(b"hello") == alone  # and /clear forgot them
        # Python's readline prints the prompt, then waits in select(): a SIGINT that lands between
        # the two only sets Python's flag, and select() sleeps on until the next key (a race no
        # person hits, at a prompt seen microseconds ago). So the test lets readline get there.
        time.sleep(0.5)
        p.send(b"\x03")  # the Ctrl-C that stopped the reply, then this one: the chat ends
        assert p.wait() == 130
    finally:
        if p.pid:
            try:
                os.kill(p.pid, 9)
                os.waitpid(p.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def test_api_key_from_a_file_or_the_environment(tmp_path):
    from layerstream.coordinator.args import UsageError, build_parser, check_args, read_api_key

    key = tmp_path / "key"
    key.write_text("s3cret\n")

    def parse(*a):
        args = build_parser().parse_args(["--serve", *a])
        check_args(args)
        return args

    assert read_api_key(parse("--api-key-file", str(key)), {"LAYERSTREAM_API_KEY": "env"}) == "s3cret"
    assert read_api_key(parse("--api-key", "cli"), {"LAYERSTREAM_API_KEY": "env"}) == "cli"
    assert read_api_key(parse(), {"LAYERSTREAM_API_KEY": "env"}) == "env"
    assert read_api_key(parse(), {}) is None
    key.write_text("\n")
    with pytest.raises(UsageError, match=f"--api-key-file {key}: the key is empty"):
        read_api_key(parse("--api-key-file", str(key)), {})
    for bad in ("a b", "k\x07", "clé"):  # (a probe's: "é" was taken, then no client's UTF-8 header matched it)
        with pytest.raises(UsageError, match=r"^--api-key: the key holds spaces, control characters or characters "
                                             r"outside ASCII"):
            read_api_key(parse("--api-key", bad), {})
    with pytest.raises(UsageError, match="--api-key and --api-key-file both given"):
        parse("--api-key", "a", "--api-key-file", str(key))
    with open(key, "wb") as fh:  # a huge line (sparse): read up to the bound only, then refused
        fh.write(b"k" * 100)
        fh.truncate(64 << 20)
    with pytest.raises(UsageError, match=f"^--api-key-file {key}: larger than 4096 bytes; the file should hold"):
        read_api_key(parse("--api-key-file", str(key)), {})


def test_the_trace_file_is_opened_up_front_and_left_as_it_was(tmp_path):
    """--trace's check opens the file for writing: a file it made is removed again, one that was
    there keeps its bytes."""
    from layerstream.coordinator.args import UsageError, build_parser, check_args

    fresh, kept = tmp_path / "new.json", tmp_path / "old.json"
    kept.write_text("before")
    for trace in (fresh, kept):
        check_args(build_parser().parse_args(["--trace", str(trace), "hi"]))
    assert not fresh.exists() and kept.read_text() == "before"
    # the single-process engine writes no trace (it was accepted and ignored)
    with pytest.raises(UsageError, match="^--trace records the pipeline's processes, and --single-process starts"):
        check_args(build_parser().parse_args(["--single-process", "--trace", str(fresh), "hi"]))
    assert not fresh.exists()
    # a file the run reads (a probe's: --trace over -m's model or -f's prompt replaced it, status 0),
    # through another name too; and a folder where the part file it writes first cannot be made
    model, prompt = tmp_path / "m.gguf", tmp_path / "p.txt"
    model.write_bytes(b"GGUF model")
    prompt.write_text("hi")
    (tmp_path / "link.gguf").symlink_to(model)
    for argv, flag in ((["-m", str(model), "--trace", str(tmp_path / "link.gguf"), "hi"], "-m"),
                       (["-f", str(prompt), "--trace", str(prompt)], "-f")):
        with pytest.raises(UsageError, match=f"^--trace .*: is {flag}'s file, which the trace would replace; give"):
            check_args(build_parser().parse_args(argv))
    assert model.read_bytes() == b"GGUF model" and prompt.read_text() == "hi"
    if os.path.exists("/proc/version"):  # (opened for writing it is refused even to root, and so is a part file there)
        with pytest.raises(UsageError, match="^--trace /proc/version: cannot write there"):
            check_args(build_parser().parse_args(["--trace", "/proc/version", "hi"]))


@pytest.mark.slow
def test_serve_defaults_to_a_batch_that_fills_passes_and_reads_the_key_from_the_environment(tmp_path):
    """Issue 25: --serve held one row by default; issue 23: the key only on the command line."""
    import json
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    path = ggufgen.write_model(tmp_path / "m.gguf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([str(LAUNCHER), "--single-process", "--serve", "-m", path, "--device", "cpu",
                          "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, LAYERSTREAM_API_KEY="from-env"), start_new_session=True,
                         preexec_fn=ends_with_the_test)
    try:
        import select

        assert select.select([p.stderr], [], [], 60)[0], "nothing on stderr in 60 s"
        line = p.stderr.readline()
        assert line == "layerstream: --batch 8 (the --serve default; give --batch to choose)\n", line
        url = f"http://127.0.0.1:{port}/v1/models"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                raise AssertionError("served without the key")
            except urllib.error.HTTPError as e:
                assert e.code == 401
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
                time.sleep(0.2)
        req = urllib.request.Request(url, headers={"Authorization": "Bearer from-env"})
        assert json.load(urllib.request.urlopen(req, timeout=5))["data"]
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def test_ctx_and_batch_beyond_host_memory_are_one_line(tmp_path):
    """Issue 23: --ctx 4194304 or --batch 4096 on the CPU allocated past 10 GB with no refusal;
    the plan's host-memory check reaches the user as one line, in both modes, before any process."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    for mode in (["--single-process"], []):
        r = subprocess.run([str(LAUNCHER), *mode, "-m", path, "--device", "cpu", "--ctx", "4194304", "--batch", "4096",
                            "hello"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("run-pipeline: error: m.gguf with these options needs "), r.stderr
        assert "of host memory" in lines[0] and "lower --ctx or --batch" in lines[0]


def test_serve_batch_holds_what_the_budget_holds(tmp_path):
    """--serve's default rows: 8 on the CPU without a budget (or in one process); under a budget that
    holds every layer's KV for 64 rows of a tiny model (a few MiB), 64; the chosen plan fits."""
    from layerstream.coordinator.args import build_parser
    from layerstream.coordinator.cli import serve_batch
    from layerstream.loader.gguf_index import open_model

    index = open_model(ggufgen.write_model(tmp_path / "m.gguf"))

    def rows(*opts):
        return serve_batch(build_parser().parse_args(["--serve", "--device", "cpu", *opts]), index, 256)[0]

    assert rows() == 8 and rows("--single-process") == 8
    assert rows("--vram-gb", "1") == 64


# a greedy run of the default model through the pipeline, with --stats, for the drafting tests (its list
# repeats, so that lookup finds drafts in it)
DRAFTING = ["--device", "cpu", "--dtype", "float32", "-n", "24", "--temperature", "0", "--stats",
            "Copy this list exactly: apples, pears, plums, cherries, apples, pears, plums, cherries. Copy: apples, pears,"]


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))


@pytest.fixture(scope="module")
def no_drafts() -> subprocess.CompletedProcess:
    """bin/run-pipeline's DRAFTING run without drafts: the text both drafting tests must give (the same
    run for both)."""
    return _launch(*DRAFTING)


def test_lookup_prints_the_same_text_and_its_rates_with_stats(no_drafts):
    """bin/run-pipeline --lookup 4 (the streaming pipeline): the greedy text without lookup, and
    --stats names the drafts accepted and the tokens a pass; a negative count is one line, exit 2."""
    off, on = no_drafts, _launch("--lookup", "4", *DRAFTING)
    assert off.returncode == on.returncode == 0, on.stderr
    assert on.stdout == off.stdout and on.stdout.strip()
    line = next(ln for ln in on.stderr.splitlines() if "drafts:" in ln)
    assert "drafted tokens accepted" in line and "tokens a pass" in line
    assert "drafts:" not in off.stderr
    r = run_pipeline("--lookup", "-1", "hi")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--lookup -1: must be from 0 to 4194304")


def test_draft_model_gives_the_same_text_and_a_draft_of_another_vocabulary_is_one_line(tmp_path, no_drafts):
    """--draft-model with the model itself (the pipeline): every draft accepted, the text without
    drafts; a draft whose vocabulary differs: one line naming both files, exit 1."""
    from layerstream.loader.default_model import default_model_path

    model = default_model_path()
    off, on = no_drafts, _launch("--draft-model", model, *DRAFTING)
    assert off.returncode == on.returncode == 0, on.stderr
    assert on.stdout == off.stdout and on.stdout.strip()
    line = next(ln for ln in on.stderr.splitlines() if "drafts:" in ln)
    assert "(100%)" in line
    other = ggufgen.write_model(tmp_path / "other.gguf", n_vocab=300)
    r = run_pipeline("--device", "cpu", "--draft-model", str(other), "hi")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "other.gguf" in err[0] and model in err[0], r.stderr
    assert "Traceback" not in r.stderr
    r = run_pipeline("--draft-model", str(other), "--lookup", "2", "hi")
    assert r.returncode == 2 and "give one" in r.stderr


def test_a_draft_on_the_cpu_beside_the_pipeline_takes_one_thread_in_this_process():
    """The draft model runs in the coordinator's process; on the CPU it shares the cores with the
    compute process, so the coordinator keeps one torch thread; elsewhere -t's or torch's default."""
    from types import SimpleNamespace

    from layerstream.coordinator.cli import coordinator_threads

    def args(**kw):
        return SimpleNamespace(**({"single_process": False, "cpu_threads": None, "draft_model": None,
                                   "device": "cpu"} | kw))

    assert coordinator_threads(args(draft_model="d.gguf")) == 1
    assert coordinator_threads(args()) is None
    assert coordinator_threads(args(single_process=True, cpu_threads=3, draft_model="d.gguf")) == 3
    assert coordinator_threads(args(single_process=True)) is None


def test_a_run_freezes_its_start_up_objects_until_it_ends(tmp_path, monkeypatch, capsys):
    """NOTE [ start-up objects frozen ]: the collector is off while the run starts; while it generates,
    what its start made is frozen out of the collector's walks and the collector is on; when cli.main
    returns, or a start fails, an in-process caller has its collector back as it was."""
    import gc

    from layerstream.coordinator import cli

    path = ggufgen.write_model(tmp_path / "m.gguf")
    run_engine, open_engine, seen = cli._run_engine, cli.open_engine, []

    def spy_run(*a, **kw):
        seen.append(("run", gc.get_freeze_count(), gc.isenabled()))
        return run_engine(*a, **kw)

    def spy_open(*a, **kw):
        seen.append(("open", gc.get_freeze_count(), gc.isenabled()))
        return open_engine(*a, **kw)

    monkeypatch.setattr(cli, "_run_engine", spy_run)
    monkeypatch.setattr(cli, "open_engine", spy_open)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    assert cli.main(["-m", path, "-n", "2", "--device", "cpu", "--single-process", "--temperature", "0", "hi"]) == 0
    assert seen[0] == ("open", 0, False) and seen[1][0] == "run" and seen[1][1] > 1000 and seen[1][2], seen
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.freeze()  # a caller's own frozen objects stay frozen
    try:
        mine = gc.get_freeze_count()
        assert cli.main(["-m", path, "-n", "2", "--device", "cpu", "--single-process", "--temperature", "0", "hi"]) == 0
        assert mine - 1000 < gc.get_freeze_count() <= mine and gc.isenabled()  # (less what died meanwhile)
    finally:
        gc.unfreeze()
    ggufgen.corrupt_magic(path)
    with pytest.raises(SystemExit, match="1"):  # (the one line: not a GGUF file)
        cli.main(["-m", path, "-n", "2", "--device", "cpu", "--single-process", "hi"])
    assert gc.get_freeze_count() == 0 and gc.isenabled()


@pytest.mark.parametrize("first,second,line,code", [
    (KeyboardInterrupt, KeyboardInterrupt, "interrupted", 130),
    ("SIGTERM", KeyboardInterrupt, "terminated", 143),
    ("SIGHUP", "SIGTERM", "hung up", 129),
    (KeyboardInterrupt, "SIGTERM", "interrupted", 130),
])
def test_a_second_signal_while_the_first_one_stops_the_run_is_absorbed(monkeypatch, capsys, first, second, line,
                                                                        code):
    """A second signal that lands while the first one's stop is under way, before the stop signals are
    ignored (two Ctrl-Cs as torch imports; `timeout` passing a group's signal on), printed a
    traceback (During handling of the above exception...), and a second SIGTERM made the status 1:
    the run's one line, and the first signal's status."""
    import signal

    from layerstream.coordinator import cli
    from layerstream.proto.signals import Stopped

    def exc(kind):
        return kind() if kind is KeyboardInterrupt else Stopped(getattr(signal, kind))

    def run(args):
        raise exc(first)

    def run_whose_cleanup_is_stopped(args):  # (the second lands in run's cleanup of the first)
        try:
            raise exc(first)
        finally:
            raise exc(second)

    second_sent = []

    def fake_signal(s, handler):  # (installs nothing: this is the test's process, whose signals stay as they are)
        if handler is signal.SIG_IGN and not second_sent:
            second_sent.append(s)
            raise exc(second)

    monkeypatch.setattr(cli.signal, "signal", fake_signal)
    monkeypatch.setattr(cli, "run", run_whose_cleanup_is_stopped)
    second_sent.append("none in _stopped")
    assert cli.main(["--device", "cpu", "-n", "1", "hi"]) == code
    assert capsys.readouterr().err.strip().splitlines() == [f"run-pipeline: {line}"]
    second_sent.clear()
    monkeypatch.setattr(cli, "run", run)
    assert cli.main(["--device", "cpu", "-n", "1", "hi"]) == code
    assert second_sent and capsys.readouterr().err.strip().splitlines() == [f"run-pipeline: {line}"]
