"""run-pipeline's command line as a llama.cpp or vLLM user types it: other tools' spellings, errors
that name what was typed, refusals (exit 2) before any process starts; piped chat; what -v logs."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest

import ggufgen
from layerstream.coordinator.arg_files import read_prompt_text
from layerstream.coordinator.args import UsageError, build_parser, check_args

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


def _run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def _main(*args: str) -> subprocess.CompletedProcess:
    """run-pipeline's main() run in this process (what the launcher runs), standard input empty, with no
    pipeline process allowed to start (a start fails the test): its exit status, and as its standard
    error what it prints there, logs at the command's level and warns, as a run's. For command lines
    refused once the model's header is read, where a process of the command spent its time importing
    torch. (Not for a command line that reads standard input: this process's is not the command's.)"""
    import contextlib
    import io
    import logging
    import signal
    import sys
    import warnings

    from layerstream.coordinator import cli, supervisor
    from layerstream.proto.signals import STOP_SIGNALS

    mp, handlers = pytest.MonkeyPatch(), {s: signal.getsignal(s) for s in STOP_SIGNALS}
    err = io.StringIO()
    logged = logging.StreamHandler(err)
    logged.setLevel(logging.WARNING)  # (main()'s level without -v)
    try:
        mp.setattr(supervisor.Supervisor, "start", lambda *a, **k: pytest.fail("a process started"))
        mp.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO()))  # (run() reconfigures it)
        mp.setattr(sys, "unraisablehook", sys.unraisablehook)  # (main() wraps it: put back after)
        logging.getLogger().addHandler(logged)
        with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        logging.getLogger().removeHandler(logged)
        mp.undo()
        for sig, handler in handlers.items():  # (main() installs the command's own handlers)
            signal.signal(sig, handler)
    quiet = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # (Python's default)
    said = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught
                   if not issubclass(w.category, quiet))
    return subprocess.CompletedProcess(["run-pipeline", *args], code, "", err.getvalue() + said)


def _one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one error line of a refused command line, without its prefix."""
    lines = r.stderr.splitlines()
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("run-pipeline: error: "), r.stderr
    return lines[0].removeprefix("run-pipeline: error: ")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ggufgen.write_model(tmp_path_factory.mktemp("m") / "m.gguf")


# the arguments of a short greedy run on `model`, and that run with its prompt typed (the reply a prompt read
# from standard input must give: two tests compare with it, and the run is the same for both)
GREEDY = ("--device", "cpu", "-n", "6", "--temperature", "0", "--ignore-eos")


@pytest.fixture(scope="module")
def typed(model):
    return _run("-m", str(model), *GREEDY, "The sky is")


@pytest.mark.parametrize("args,line", [
    # named as typed: these named --resident-layers, --temperature inf, --max-tokens
    (["-ngl", "-1"], "-ngl -1: must be from 0 to 2147483648"),
    (["--n-gpu-layers=-5"], "--n-gpu-layers -5: must be from 0 to 2147483648"),
    (["--temperature", "1e309"], "--temperature 1e309: must be a finite number from 0 to 100"),
    (["-n0"], "-n 0: must be from 1 to 4194304, or -1 (until the end of sequence or a full context)"),
    (["--n-predict", "0"], "--n-predict 0: must be from 1 to 4194304, or -1"),
    (["--threads", "100000"], "--threads 100000: must be from 1 to 4096"),
    (["--seed", str(-2 ** 63 - 1)], f"--seed {-2 ** 63 - 1}: must be from {-2 ** 63} to {2 ** 64 - 1} (-1: a fresh one)"),
    # a value argparse could not read: its own words, "argument -c/--ctx/--ctx-size: invalid int value: '0x10'"
    (["--ctx", "0x10"], "--ctx 0x10: must be a whole number, in decimal digits"),
    # what int() reads beside decimal digits: an underscore, spaces, another script's digits (run before)
    (["--seed", "1_000"], "--seed 1_000: must be a whole number, in decimal digits"),
    (["-n=1_0"], "-n 1_0: must be a whole number, in decimal digits"),
    (["--ctx", " 64"], "--ctx ' 64': must be a whole number, in decimal digits"),  # (quoted: a probe's)
    (["-n", ""], "-n '': must be a whole number, in decimal digits"),
    (["-ngl", "\u0661"], "-ngl \u0661: must be a whole number, in decimal digits"),
    (["--temp", "x"], "--temp x: must be a number"),
    # what float() reads beside a decimal number: 1_0 ran at temperature 10 (a probe's), spaces, other digits
    (["--temperature", "1_0"], "--temperature 1_0: must be a number"),
    (["--top-p", " 0.5"], "--top-p ' 0.5': must be a number"),
    (["--min-p", "\uff10.\uff15"], "--min-p \uff10.\uff15: must be a number"),
    (["--dtype", "f8"], "--dtype f8: use float32, float16 or bfloat16"),
    # a dashed value that is no plain number: argparse took -inf for an option (refused as glued letters)
    (["--temperature", "-inf"], "--temperature -inf: must be a finite number from 0 to 100"),
    (["-ngl", "-nan"], "-ngl -nan: must be a whole number, in decimal digits"),
    # accepted and doing nothing, or failing late with exit 1
    (["--trace", ""], "--trace : an empty path; give a file"),
    (["--reader-dir", "/nonexistent-dir"], "--reader-dir /nonexistent-dir: no such directory"),
    (["--reader-dir", str(LAUNCHER)], f"--reader-dir {LAUNCHER}: is not a directory"),
    # a count of folders other than --readers: said once the model was open, exit 1, "given 1 times" (a probe's)
    (["--readers", "2", "--reader-dir", str(LAUNCHER.parent)], "--reader-dir given once for --readers 2; give one "
                                                                "per reader"),
    (["--readers", "2", *["--reader-dir", str(LAUNCHER.parent)] * 3], "--reader-dir given 3 times for --readers 2; "
                                                                       "give one per reader"),
    (["-f", "/nonexistent-dir/p.txt"], "-f /nonexistent-dir/p.txt: no such file"),
    # the prompt option twice: argparse kept the last and dropped the first unsaid
    (["-p", "Hi", "--prompt", "Bye"], "--prompt Bye: the prompt is given twice (-p/--prompt more than once); "
                                      "give it once"),
    (["-f", "a.txt", "-f", "b.txt"], "-f b.txt: the prompt is given twice (-f/--file more than once); give it once"),
    # other tools' options: argparse said "unrecognized arguments"
    (["--max-model-len", "128"], "unknown option --max-model-len (vLLM's context size); did you mean --ctx N?"),
    (["-b", "512"], "unknown option -b (llama.cpp's prompt tokens per step); did you mean --prefill-chunk N?"),
    (["--batch-size=512"], "unknown option --batch-size (llama.cpp's prompt tokens per step); did you mean "
                           "--prefill-chunk N?"),
    (["-np", "4"], "unknown option -np (llama.cpp's sequences at once); did you mean --batch N?"),
    # llama.cpp's conversation flag was refused as glued letters, with no way forward
    (["-cnv"], "unknown option -cnv (llama.cpp's conversation mode); did you mean --chat?"),
    (["--conversation"], "unknown option --conversation (llama.cpp's conversation mode); did you mean --chat?"),
    (["-i"], "unknown option -i (llama.cpp's interactive mode); did you mean --chat?"),
])
def test_refusals_name_what_was_typed(model, args, line):
    assert _one_line(_run("-m", model, *args, *([] if "-f" in args else ["hello"]))).startswith(line)


def test_a_negative_seed_is_taken_as_the_server_and_sampling_params_take_it():
    """A probe's: --seed -2 was refused where the server's seed and SamplingParams take it (negative
    seeds wrap, as torch's generators take them); -1 still asks for a fresh one."""
    from layerstream.compute.sampling import SamplingParams, fresh_seed
    from layerstream.coordinator.args import check_args

    for given, kept in (("-2", -2), (str(-2 ** 63), -2 ** 63), ("-1", None)):
        a = build_parser().parse_args(["--seed", given, "hi"])
        check_args(a)
        assert a.seed == kept
    assert fresh_seed(SamplingParams(seed=-2)) == 2 ** 64 - 2


def test_top_k_minus_one_keeps_all_tokens_as_the_servers_does():
    """A probe's: --top-k -1 was refused where the server's top_k -1 (vLLM's clients') keeps all."""
    from layerstream.coordinator.args import check_args

    for given, kept in (("-1", 0), ("0", 0), ("7", 7)):
        a = build_parser().parse_args(["--top-k", given, "hi"])
        check_args(a)
        assert a.top_k == kept


def test_a_one_prompt_runs_context_is_what_its_prompt_and_n_can_fill(tmp_path):
    """NOTE [ a job's context ]: a run that answers one prompt given as text sizes its KV ring to its
    prompt's bytes twice, 16 more and -n's tokens (the model's context and 4096 at most), where the ring of
    4096 held a layer's room at small budgets; --ctx, a chat, drafts, -n -1 and a sliding window keep
    the default. Its greedy reply is the one a ring of the model's whole context gives."""
    from types import SimpleNamespace

    from layerstream.coordinator.cli import default_ctx

    text = tmp_path / "p.txt"
    text.write_text("déjà vu " * 10)
    hp = SimpleNamespace(context_length=1024)
    for argv, want in ((["-n", "8", "hello there"], 22 + 16 + 8), (["-f", str(text)], 200 + 16 + 256),
                       (["-n", "5000", "hi"], 1024), (["--ctx", "100", "hi"], 100), (["-n", "-1", "hi"], 1024),
                       (["--chat", "hi"], 1024), (["--lookup", "3", "hi"], 1024),
                       (["--on-context-full", "slide", "hi"], 1024)):
        a = build_parser().parse_args(argv)
        check_args(a)
        read_prompt_text(a)  # (as run-pipeline does before the engine opens)
        assert default_ctx(a, hp) == want, argv
    path = ggufgen.write_model(tmp_path / "m.gguf", context_length=1024, seed=3)
    runs = [_run("-m", path, "--device", "cpu", "--temperature", "0", "--ignore-eos", "-n", "40", *ctx, "hello there")
            for ctx in ((), ("--ctx", "1024"))]
    assert all(r.returncode == 0 for r in runs) and runs[0].stdout == runs[1].stdout and runs[0].stdout, runs


def test_a_one_prompt_runs_context_holds_a_sentencepiece_prompt_of_more_tokens_than_bytes(tmp_path, monkeypatch):
    """A probe's: a SentencePiece vocabulary with a space prefix and an added token of one byte ("\n")
    puts a space before each stretch of text after it, so "\nB" * 100 (200 bytes) is 301 tokens; with
    its context at the prompt's bytes, 16 and -n's the prompt was refused. Twice the bytes hold it."""
    vocab = ([("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [(f"<0x{b:02X}>", 6) for b in range(256)] + [("\n", 4), ("▁", 1)]
             + [(c, 1) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁" + c, 1) for c in "abcdefghijklmnopqrstuvwxyz"])

    def add_tokenizer(w, n_vocab):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([k for _, k in vocab])
        w.add_token_scores([-1.0 if t.startswith("▁") else -2.0 for t, _ in vocab])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)

    monkeypatch.setattr(ggufgen, "add_tokenizer", add_tokenizer)
    path = ggufgen.write_model(tmp_path / "spm.gguf", n_vocab=len(vocab), context_length=4096)
    runs = [_run("-m", path, "--device", "cpu", "--temperature", "0", "--ignore-eos", "-n", "30", *ctx, "\nB" * 100)
            for ctx in ((), ("--ctx", "4096"))]
    assert all(r.returncode == 0 for r in runs) and runs[0].stdout == runs[1].stdout, runs


def test_llama_cpp_spellings_are_aliases():
    """--ctx-size 128 -n 2 hi was 'unrecognized arguments: --ctx-size hi' (128 taken as the prompt)."""
    a = build_parser().parse_args(["--ctx-size", "128", "--n-predict", "2", "--threads", "1", "hi"])
    assert (a.ctx, a.max_tokens, a.cpu_threads, a.prompt) == (128, 2, 1, ["hi"])
    a = build_parser().parse_args(["-ngl", "99999", "hi"])  # (refused past 65536, where README says more keeps all)
    check_args(a)
    assert a.resident_layers == 99999
    a = build_parser().parse_args(["--", "-b", "--max-model-len"])  # words after -- are the prompt's
    assert a.prompt == ["-b", "--max-model-len"]
    # an option's value, not an option: argparse takes it for one, and the hint says how to give it
    with pytest.raises(UsageError, match=r"^argument --stop: expected one argument \(a value that starts with a "
                                         r"dash is given with '=', as --stop=-x\)$"):
        build_parser().parse_args(["--stop", "-b", "hi"])
    assert build_parser().parse_args(["--stop=-b", "hi"]).stop == ["-b"]
    # a value that reads as a number is the option's, whatever its spelling: argparse knew -1 and -0.5 only
    a = build_parser().parse_args(["--temp", "-inf", "-n", "-1", "--stop", "-1e3", "--min-p", "-nan", "--", "-inf"])
    assert (a.temperature, a.max_tokens, a.stop, a.prompt) == (-math.inf, -1, ["-1e3"], ["-inf"])
    assert math.isnan(a.min_p) and a.typed["temperature"] == ("--temp", "-inf")
    # a decimal number in any of its usual spellings
    a = build_parser().parse_args(["--temp", ".5", "--top-p", "+9E-1", "--min-p", "1.", "--vram-gb", "Infinity", "hi"])
    assert (a.temperature, a.top_p, a.min_p, a.vram_gb) == (0.5, 0.9, 1.0, math.inf)


def test_stop_strings_read_llama_cpps_escapes():
    """`--stop '\\n'` stopped only at a backslash followed by n, where llama.cpp's -r reads a newline."""
    a = build_parser().parse_args(["--stop", r"\n", "--stop", r"\\n", "--stop", r"\xc3\xa9!", "--stop", r"a\q\t",
                                   "--stop", r"\xff", "hi"])
    check_args(a)
    assert a.stop == ["\n", "\\n", "é!", "a\\q\t", "\ufffd"]
    with pytest.raises(UsageError, match="an empty stop string"):
        check_args(build_parser().parse_args(["--stop", "", "hi"]))


def _read(a) -> None:
    """run-pipeline's checks of the flags, then its read of the prompt (after the model's header)."""
    check_args(a)
    read_prompt_text(a)


def test_the_prompt_from_a_file(tmp_path):
    text = "Once upon a time\nthere was a file.\n"
    (tmp_path / "p.txt").write_text(text)
    a = build_parser().parse_args(["-f", str(tmp_path / "p.txt")])
    _read(a)
    assert a.prompt == [text[:-1]]  # less the file's last newline, as llama.cpp's -f reads it
    (tmp_path / "two.txt").write_text("Q: why?\n\n")
    a = build_parser().parse_args(["-f", str(tmp_path / "two.txt")])
    _read(a)
    assert a.prompt == ["Q: why?\n"]  # (one newline only)
    for twice in (["-f", str(tmp_path / "p.txt"), "words"], ["--file", str(tmp_path / "p.txt"), "-p", "x"]):
        with pytest.raises(UsageError, match="the prompt is given twice"):
            check_args(build_parser().parse_args(twice))
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(UsageError, match="the file holds no prompt text"):
        _read(build_parser().parse_args(["-f", str(tmp_path / "blank.txt")]))


def test_a_prompt_piped_in_is_read_when_none_is_given(model, typed):
    """A probe's: `echo text | run-pipeline -m M` was refused as 'no prompt given' (Ollama reads the
    piped text as the prompt); the text piped in gives the same reply as the same words typed, and
    standard input that is /dev/null is still 'no prompt given', and one that holds only blanks says
    so (a probe's: it said no prompt was given, where one was piped in)."""
    args = ("-m", str(model), *GREEDY)
    piped = _run(*args, stdin="The sky is\n")  # (echo's newline dropped, as from -f)
    assert typed.returncode == 0 and typed.stdout.strip(), typed.stderr
    assert piped.returncode == 0 and piped.stdout == typed.stdout, piped.stderr
    assert _one_line(_run(*args, stdin=None)).startswith("no prompt given; pass the prompt text (or pipe it in)")
    for stdin in (" \n", "\0\0\n", ""):  # blanks, NULs, nothing (/dev/null above is the helper's default)
        assert _one_line(_run(*args, stdin=stdin)) == ("standard input holds no prompt text (it is empty or blank); "
                                                       "pipe in the prompt, or pass it as an argument")
    # a probe's: a Windows line end kept its \r (another reply); a lone `-` was the prompt "-"
    assert _run(*args, stdin="The sky is\r\n").stdout == typed.stdout
    assert _run(*args, "-", stdin="The sky is").stdout == typed.stdout
    # with words given, standard input is not read (a pipe left open must not hold the run)
    read_end, write_end = os.pipe()
    try:
        r = subprocess.run([str(LAUNCHER), *args, "The sky is"], stdin=read_end, capture_output=True, text=True,
                           timeout=120)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert r.returncode == 0 and r.stdout == typed.stdout, r.stderr


def test_a_piped_prompt_waits_for_a_slow_writer_and_never_holds_a_refusal(model, typed):
    """A probe's: a pipe its parent left non-blocking (as Node.js passes one) gave a traceback while
    empty and cut the prompt where the writer paused; with a pipe left open, a command line that
    cannot run waited for it instead of saying so."""
    import fcntl
    import threading
    import time

    args = ("-m", str(model), *GREEDY)
    assert typed.returncode == 0 and typed.stdout.strip(), typed.stderr
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_NONBLOCK)

    def write():
        time.sleep(2)  # (the run has started and found the pipe empty)
        os.write(write_end, b"The sky")
        time.sleep(1)
        os.write(write_end, b" is\n")
        os.close(write_end)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        r = subprocess.run([str(LAUNCHER), *args], stdin=read_end, capture_output=True, text=True, timeout=120)
    finally:
        writer.join(10)
        os.close(read_end)
    assert r.returncode == 0 and r.stdout == typed.stdout, r.stderr
    truncated = Path(model).parent / "truncated.gguf"
    truncated.write_bytes(b"GGUF\3\0\0\0")
    read_end, write_end = os.pipe()  # open for the run's whole length: nothing is ever written
    try:
        for bad, words, code in ((["--top-p", "5"], "--top-p 5: must be", 2),
                                 (["--system", "x"], "--system needs --chat", 2),
                                 (["-m", "/nonexistent.gguf"], "-m /nonexistent.gguf: no such file", 2),
                                 # (what needs the model's header: it was said only once the pipe closed)
                                 (["--expert-cache-gb", "1"], "--expert-cache-gb: does nothing with a dense model", 2),
                                 (["-m", str(truncated)], f"{truncated}: truncated GGUF file", 1)):
            r = subprocess.run([str(LAUNCHER), *args, *bad], stdin=read_end, capture_output=True, text=True,
                               timeout=60)
            assert _one_line(r, code).startswith(words), r.stderr
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_blank_prompt_is_refused_with_chat_as_without():
    """Probe of issue 25: `--chat "   "` sent the blank as the chat's message, where without --chat it
    was refused; --chat with no prompt at all stays the interactive chat."""
    assert _one_line(_run("--chat", "   ")) == ("the prompt is blank; pass the prompt text, or leave it out for an "
                                             "interactive chat")
    for argv in (["--chat", ""], ["--chat", "-p", " \n"], ["--chat", " ", "\t"]):
        with pytest.raises(UsageError, match="^the prompt is blank"):
            check_args(build_parser().parse_args(argv))
    a = build_parser().parse_args(["--chat"])
    check_args(a)
    assert a.prompt == []
    # the chat probe's: without --chat a blank prompt given was 'no prompt given'
    for argv in (["-p", ""], ["-p", " "], [" ", "\t"]):
        with pytest.raises(UsageError, match=r"^the prompt is blank; pass the prompt text \(or leave it out and pipe"):
            check_args(build_parser().parse_args(argv))


def test_an_error_naming_a_file_with_control_characters_stays_one_line(tmp_path):
    """-m 'new<newline>line.gguf' split the error over two lines, and a name holding an escape
    sequence sent it to the terminal (a probe's): both are escaped as repr escapes them."""
    for name, shown in [("new\nline.gguf", "new\\nline.gguf"), ("esc\x1b[31mred.gguf", "esc\\x1b[31mred.gguf")]:
        r = _run("-m", str(tmp_path / name), "hi")
        assert r.returncode == 2 and shown in _one_line(r) and "\x1b" not in r.stderr
    # what shows as it is: letters, emoji and their joiners, other scripts' spaces; bidirectional overrides do not
    from layerstream.coordinator.spelling import one_line

    assert one_line("lat\u00e9 \U0001f468\u200d\U0001f469 a\u200cb \u3000c") == "lat\u00e9 \U0001f468\u200d\U0001f469 a\u200cb \u3000c"
    assert one_line("a\u202eb\u2028c\udce9") == "a\\u202eb\\u2028c\\udce9"


def test_a_model_file_given_as_the_prompt_is_refused(model, tmp_path):
    """`run-pipeline model.gguf -n 3` generated from the default model with the path as its prompt."""
    assert _one_line(_run(model, "-n", "3")) == (f"{model} is a model file given as the prompt; give the model "
                                                 "with -m FILE")
    a = build_parser().parse_args(["-m", model, str(tmp_path / "absent.gguf"), "says"])  # with -m: a word
    check_args(a)
    with pytest.raises(UsageError, match=r"absent\.gguf names a model file \(there is no such file\) given as the "
                                         r"prompt; give the model with -m FILE$"):  # a mistyped path: not a prompt
        check_args(build_parser().parse_args([str(tmp_path / "absent.gguf"), "-n", "3"]))


def test_a_models_context_of_one_token_is_refused_naming_its_key_unless_ctx_is_given(tmp_path, monkeypatch):
    """A model whose metadata gives a context of 1 token exited 1 with 'ctx=1: must be a whole number,
    at least 2', a value nobody had typed (a probe's)."""
    from layerstream.coordinator import cli, supervisor

    m = ggufgen.write_model(tmp_path / "c1.gguf", context_length=1)
    assert _one_line(_main("-m", m, "--device", "cpu", "hello")) == (
        "the model's context is 1 token (metadata llama.context_length), too few to run; give --ctx N (2 or more)")
    monkeypatch.setattr(supervisor.Supervisor, "start", lambda *a, **k: pytest.fail("a process started"))
    cli.check_header(build_parser().parse_args(["-m", m, "--ctx", "16", "hello"]))  # (accepted: no raise)


@pytest.mark.parametrize("args,line", [
    (["--on-context-full", "slide", "--sink-tokens", "5000", "-c", "64"],
     "--sink-tokens 5000: must be at most 62, two below the context size 64, so that the window can slide"),
    (["--on-context-full", "slide", "-c", "4"],  # the default 4 sink tokens, not typed
     "a context of 4 tokens leaves a sliding window no room beside its 4 sink tokens (--sink-tokens' default); "
     "give --ctx 6 or more, or fewer --sink-tokens"),
    (["--on-context-full", "slide", "--sink-tokens", "255"],  # the model's 256 tokens
     "--sink-tokens 255: must be at most 254, two below the context size 256 (the model's 256 tokens, at most 4096)"),
    (["--prefetch", "65536"], "--prefetch 65536: at most 2 (the model's layer count)"),  # (exit 1 from the plan)
    (["--expert-policy", "lru"], "--expert-policy: does nothing with a dense model (llama, no experts); drop it"),
    (["--expert-cache-gb", "1", "--moe-dense", "stream"],
     "--expert-cache-gb, --moe-dense: do nothing with a dense model (llama, no experts); drop them"),
])
def test_options_the_header_refuses_exit_2_before_any_process_starts(model, args, line, monkeypatch):
    """The sink tokens against the context exited 1 from the engine; the expert options on a dense
    model were accepted and did nothing. Both are refused once the header is read."""
    from layerstream.coordinator import cli, supervisor

    assert _one_line(_main("-m", model, "--device", "cpu", *args, "hello")).startswith(line)
    a = build_parser().parse_args(["-m", model, *args, "hello"])
    check_args(a)
    monkeypatch.setattr(supervisor.Supervisor, "start", lambda *a, **k: pytest.fail("a process started"))
    with pytest.raises(UsageError, match=line.replace("(", r"\(").replace(")", r"\)")):
        cli.check_header(a)


def test_expert_options_pass_on_a_mixture_of_experts_model(tmp_path):
    from layerstream.coordinator import cli

    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe")
    a = build_parser().parse_args(["-m", path, "--expert-policy", "lru", "--moe-dense", "stream", "hello"])
    check_args(a)
    cli.check_header(a)


def test_more_experts_copied_ahead_than_the_model_has_exits_2_before_any_process_starts(tmp_path, monkeypatch):
    """A probe's: `--expert-prefetch 17` on a model of 16 experts exited 1 from the plan; a usage error
    of the command line exits 2, as `--expert-prefetch 100000000` and expert options on a dense model do."""
    from layerstream.coordinator import cli, supervisor

    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe")  # 4 experts
    line = "--expert-prefetch 5: use 0 (off) to 4 (the model's experts)"
    assert _one_line(_main("-m", path, "--device", "cpu", "--expert-prefetch", "5", "hello")) == line
    monkeypatch.setattr(supervisor.Supervisor, "start", lambda *a, **k: pytest.fail("a process started"))
    with pytest.raises(UsageError, match=r"--expert-prefetch 5: use 0 \(off\) to 4"):
        cli.check_header(build_parser().parse_args(["-m", path, "--expert-prefetch", "5", "hello"]))
    cli.check_header(build_parser().parse_args(["-m", path, "--expert-prefetch", "4", "hello"]))


def test_piped_chat_ends_at_the_first_failed_turn_with_status_1(tmp_path):
    """Probe of issue 25: piped turns that reached the context size each printed the same partial
    text and its error, and the chat exited 0. (The first turn's 68 tokens through the template fit
    the 96 of the context; its 40-token reply does not.)"""
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = ggufgen.rewrite_metadata(ggufgen.write_model(tmp_path / "plain.gguf"), tmp_path / "chat.gguf",
                                    {"tokenizer.chat_template": chatml})
    r = _run("--single-process", "-m", path, "--device", "cpu", "--chat", "-c", "96", "-n", "40", "--ignore-eos",
             "--temperature", "0", stdin="Tell me about Rome\nAnd Greece?\nAnd Egypt?\n")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        "run-pipeline: error: the conversation reached the context size (96 tokens); the chat ends here (give a larger "
        "--ctx)"]
    assert r.stdout.count("\n") == 1  # one partial reply, its line ended


def test_verbose_logs_each_stage(model, typed):
    """-v promised 'log what each stage does' and logged the two plan lines; the same run without -v
    (`typed`) writes nothing there."""
    r = _run("-v", "-m", str(model), *GREEDY, "The sky is")
    assert r.returncode == 0, r.stderr
    for words in (f"{model}: llama, 2 layers, width 64, 256 tokens of context", "plan: ", "staging: started (pid",
                  "reader-0: started (pid", "compute: started (pid", "cli-1: started, ",
                  "staging: ready ", "reader-0: ready ", "every layer read once ",
                  "cli-1: ended (length); prompt: ", "compute: stopped (exit status 0)",
                  "staging: stopped (exit status 0)"):
        assert words in r.stderr, (words, r.stderr)
    assert r.stderr.count("staging: stopped") == 1
    # what the compute process's start took, by part (its Ready), and the first read's rate
    assert re.search(r"compute: ready \d+\.\d\d s after the pipeline's start \(device set-up \d+\.\d\d s, "
                     r"global weights \d+\.\d\d s\)", r.stderr), r.stderr
    assert re.search(r"every layer read once \d+\.\d\d s after the pipeline's start \(0\.\d\d GB; "
                     r"\d+\.\d\d GB/s since the start\)", r.stderr), r.stderr
    assert typed.returncode == 0 and typed.stderr == "", typed.stderr


def test_the_prompt_file_may_be_standard_input_or_a_pipe(tmp_path, monkeypatch):
    """`-f -`, `-f /dev/stdin` and `-f <(...)` (a pipe) are read to their end, as llama.cpp's -f
    reads them; they were refused as 'no such file' or 'not a regular file'."""
    import io
    import threading

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("Two plus two is".encode())))
    a = build_parser().parse_args(["-f", "-"])
    _read(a)
    assert a.prompt == ["Two plus two is"]
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("The sky is"))
    writer.start()
    a = build_parser().parse_args(["--file", str(fifo)])
    _read(a)
    writer.join(10)
    assert a.prompt == ["The sky is"]


def test_a_prompt_pipe_without_its_writer_says_it_waits(tmp_path, monkeypatch, capsys):
    """`-f PIPE` whose writer comes late says once on stderr what it waits for, then reads the
    text (a probe's: it waited with nothing shown); one read at once says nothing."""
    import threading
    import time

    monkeypatch.setattr("layerstream.coordinator.arg_files.WAIT_NOTE_S", 0.1)
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: (time.sleep(0.6), fifo.write_text("The sky is")))
    writer.start()
    a = build_parser().parse_args(["-f", str(fifo)])
    _read(a)
    writer.join(10)
    assert a.prompt == ["The sky is"]
    assert capsys.readouterr().err == f"-f {fifo}: waiting for text on the pipe (Ctrl-C stops)\n"
    (tmp_path / "t.txt").write_text("Hello")
    a = build_parser().parse_args(["-f", str(tmp_path / "t.txt")])
    _read(a)
    time.sleep(0.2)
    assert a.prompt == ["Hello"] and capsys.readouterr().err == ""


def test_n_beyond_the_contexts_room_is_said_before_the_reply(model, typed):
    """A probe's: `-n` past what the context holds after the prompt was said only once the reply had
    filled the context (the error is still the run's end, where the reply does not end first)."""
    r = _run("-m", str(model), "-c", "32", *GREEDY[:2], "-n", "40", *GREEDY[4:], "The sky is")
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and lines[0].startswith("run-pipeline: warning: -n 40: the context (32 tokens) holds "), r.stderr
    assert lines[0].endswith("; the reply stops there with an error unless it ends first (raise --ctx, or pass "
                             "--on-context-full slide)") and lines[-1].startswith("run-pipeline: error: the sequence "
                                                                                  "reached the context size (32 tokens)")
    assert typed.stderr == ""  # (-n 6 fits: no warning)
    slide = _run("-m", str(model), "-c", "32", *GREEDY[:2], "-n", "40", *GREEDY[4:], "--on-context-full", "slide",
                 "The sky is")
    assert slide.returncode == 0 and slide.stderr == "", slide.stderr


def test_a_link_that_leads_nowhere_is_said_so(tmp_path):
    """(a loop of links and a dangling link were each 'no such file')"""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "d").symlink_to(tmp_path / "gone.gguf")
    for flag, name, why in (("-m", "a", "Too many levels of symbolic links"), ("-f", "a", "Too many levels of "
                            "symbolic links"), ("-m", "d", "No such file or directory")):
        r = _run(flag, str(tmp_path / name), *(["hi"] if flag == "-m" else []))
        assert _one_line(r) == f"{flag} {tmp_path / name}: a symbolic link whose target cannot be reached ({why})", r.stderr


def test_a_prompt_file_beyond_what_the_context_can_hold_is_refused_untokenized(tmp_path):
    """A probe's: a 60 MB -f file was tokenized whole (57 s, 10.3 GB) to be refused by its token
    count; as the chat's and the server's, its bytes are weighed first (Tokenizer.longest_piece)."""
    big = tmp_path / "big.txt"
    big.write_text("abc " * (1 << 18))  # (1 MiB: past TOKENIZE_FREELY, and far past 64 tokens' worth)
    r = _main("--device", "cpu", "--single-process", "--ctx", "64", "-n", "2", "-f", str(big))
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "run-pipeline: error: the prompt is 1,048,576 bytes, more than a context of 64 tokens holds; give a shorter "
        "one, or a larger --ctx (--ctx-size)"], r.stderr


def test_a_perplexity_file_too_large_to_tokenize_is_refused_before_loading(tmp_path):
    """A probe's: 300 MB of text grew the run to 24 GB tokenizing it, until the kernel killed it."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate((16 << 20) + (100 << 10))  # (sparse: no disk)
    with pytest.raises(UsageError, match=r"^--perplexity .*big.txt: 16.1 MiB, over the 16 MiB a run scores"):
        check_args(build_parser().parse_args(["--perplexity", str(big)]))
    with open(big, "r+b") as f:
        f.truncate(16 << 20)
    check_args(build_parser().parse_args(["--perplexity", str(big)]))  # (16 MiB of NULs: scored, not refused)


def test_a_system_message_too_long_for_the_context_is_named_before_the_chat_starts():
    """A probe's: it was reported as the first message's length, and only once a line was typed."""
    r = _run("--device", "cpu", "--single-process", "--chat", "--ctx", "64", "-n", "4", "--system", "word " * 200,
             stdin="hi\n")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert re.search(r"the system message \(--system or /system\) is \d+ tokens with the chat template, and the "
                     r"context holds 64; give a shorter one, or a larger --ctx", lines[0]), r.stderr
    # sliding, the context takes it (the review's: this was refused too); greedy, since four sampled
    # tokens can all be blank (a fresh clone's CI drew such a reply)
    r = _run("--device", "cpu", "--single-process", "--chat", "--ctx", "64", "-n", "4", "--on-context-full", "slide",
             "--temperature", "0", "--system", "word " * 200, stdin="hi\n")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
