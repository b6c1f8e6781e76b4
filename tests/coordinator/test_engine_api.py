"""The Python API as a vLLM or llama-cpp-python user calls it, wrongly: each bad value refused at
once with one line naming it (not a hang, a torch error at the first step, or another prompt's
text), one generation at a time, an engine usable after Ctrl-C inside a step. From a hostile
probe of the API; each case failed or hung on the code before."""

from __future__ import annotations

import os
import threading

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.errors import ConfigError, LayerstreamError

G = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = [5, 77, 200, 13]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(ggufgen.write_model(tmp_path_factory.mktemp("api") / "m.gguf", qtype="Q8_0"))


@pytest.mark.parametrize("kw,words", [
    (dict(max_seqs=0), "max_seqs=0: must be a whole number, at least 1"),  # loaded, then its first batch hung
    (dict(max_seqs=1.5), "max_seqs=1.5: must be a whole number"),
    (dict(ctx=0), "ctx=0: must be a whole number, at least 2"),
    (dict(ctx="512"), "ctx='512': must be a whole number"),
    (dict(device="meta"), "device='meta': use auto, cpu, cuda or cuda:N"),
    (dict(device=None), "device=None: use auto, cpu, cuda or cuda:N"),
    (dict(on_context_full="x"), "on_context_full='x': give error or slide"),
    (dict(on_context_full="slide", ctx=64, sink_tokens=1000), "sink_tokens=1000: must be below ctx (64) minus one"),
    (dict(sink_tokens=-1), "sink_tokens=-1: must be a whole number, at least 0"),
    (dict(model=""), "model='': give a GGUF file's path"),  # (it loaded the default model)
    (dict(draft_policy="x"), "draft_policy='x': give adaptive or fixed"),
    (dict(weights="x"), "weights='x': use auto, quantized, native or dense"),  # (a ValueError, a probe's)
    # (the Python API probe's: a raw TypeError at load, an empty name, and "no" taken for true)
    (dict(draft_model=123), "draft_model=123: give a GGUF file's path, or None for no draft"),
    (dict(draft_model=""), "draft_model='': give a GGUF file's path"),
    (dict(warm_up="no"), "warm_up='no': must be True or False"),
    (dict(lookahead="no"), "lookahead='no': must be True or False"),
    # (a second Python API probe's: refused at load, where 5 and '5' read alike)
    (dict(dtype=5), "dtype=5: use float32, float16 or bfloat16, or None for the device's default"),
    (dict(dtype="fp16"), "dtype='fp16': use float32, float16 or bfloat16"),
])
def test_a_bad_engine_setting_is_refused_before_loading(model, kw, words):
    kw = {"model": model, "device": "cpu", **kw}
    with pytest.raises(ConfigError) as e:
        Engine.load(**kw)
    assert str(e.value).startswith(words), e.value
    with pytest.raises(ConfigError):
        EngineConfig(**kw)


@pytest.mark.parametrize("kw,words", [
    (dict(max_tokens=0), "max_tokens=0: must be from 1 to 4194304"),  # (it sampled one token all the same)
    (dict(top_k=1.5), "top_k=1.5: must be a whole number"),
    (dict(top_k=float("nan")), "top_k=nan: must be a whole number"),  # (ran as if top-k were off)
    (dict(seed=1.5), "seed=1.5: must be a whole number"),
    (dict(max_tokens=None), "max_tokens=None: must be a whole number"),
    (dict(temperature="0.5"), "temperature='0.5': must be a number"),
    (dict(stop=None), "stop=None: give stop strings"),
    (dict(stop=[1, 2]), "stop=[1, 2]: give stop strings"),
    (dict(stop=["x", ""]), "stop=['x', '']: give stop strings, each of at least one character"),
    (dict(stop={"a": 1}), "stop={'a': 1}: give stop strings"),  # (its keys were taken; a probe's)
    (dict(stop="\ud800"), "stop='\\ud800': not text a model can generate"),  # (it could never match)
])
def test_a_bad_sampling_value_is_refused(kw, words):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**kw)
    assert str(e.value).startswith(words), e.value


def test_numpy_scalars_are_taken_as_pythons():
    """The Python API probe's: an np.int64 seed overflowed at the first generation (a raw
    OverflowError); numpy's numbers are stored as Python's when the params are made."""
    import numpy as np

    from layerstream.compute.sampling import fresh_seed

    p = SamplingParams(seed=np.int64(5), temperature=np.float32(0.5), max_tokens=np.uint8(3), top_k=np.int32(4))
    assert (p.seed, p.max_tokens, p.top_k) == (5, 3, 4) and type(p.seed) is int and type(p.temperature) is float
    assert fresh_seed(p) == 5 and fresh_seed(SamplingParams(seed=np.uint64(2**64 - 1))) == 2**64 - 1


def test_one_stop_string_is_one_stop_not_its_letters():
    assert SamplingParams(stop="Paris").stop == ("Paris",)  # (it stopped at any of P, a, r, i, s)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_bad_prompts_and_ids_are_refused_naming_what_was_given(model):
    with Engine.load(model, device="cpu", ctx=64) as e:
        with pytest.raises(TypeError, match="takes a list of prompts, not str"):
            e.generate_batch("abc", G)  # (three prompts: 'a', 'b', 'c')
        with pytest.raises(TypeError, match="params must be a SamplingParams, not dict"):
            e.generate_batch([PROMPT], {"temperature": 0})
        with pytest.raises(TypeError, match=r"a prompt: give text \(a str\) or a list of token ids"):
            e.generate_batch([[1, 2.5]], G)  # (a float id was taken)
        with pytest.raises(ConfigError, match=r"token id -1 is outside the vocabulary \(0..255\)"):
            e.logits([1, -1])  # (the logits of the vocabulary's last entry)
        with pytest.raises(TypeError, match=r"logits\(\): give a list of token ids"):
            e.logits("hello")
        with pytest.raises(TypeError, match="text must be a str, not int"):
            e.encode(123)
        with pytest.raises(ConfigError, match="window=1: must be a whole number of tokens, at least 2"):
            e.perplexity("one two three four five six", window=1)  # (ZeroDivisionError)
        assert e.generate_batch([tuple(PROMPT)], G) == e.generate_batch([PROMPT], G)  # ids as a tuple too


def test_one_generation_at_a_time_and_none_after_close(model):
    e = Engine.load(model, device="cpu", ctx=64, max_seqs=2)
    want = e.generate_batch([PROMPT], G)
    g = e.generate(PROMPT, G)
    next(g)
    with pytest.raises(LayerstreamError, match="already running a generation"):
        e.generate_batch([PROMPT], G)  # (KeyError, and the open generator then yielded nothing)
    with pytest.raises(LayerstreamError, match="already running a generation"):
        e.logits(PROMPT)
    g.close()
    assert e.generate_batch([PROMPT], G) == want
    got, refused, other = [], [], []

    def worker():
        for _ in range(4):
            try:
                got.append(e.generate_batch([PROMPT], G))
            except LayerstreamError as x:
                refused.append(str(x))
            except Exception as x:  # (KeyError, RuntimeError, before)
                other.append(repr(x))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not other and got and all(x == want for x in got), (other, got)  # (another prompt's text, before)
    assert len(got) + len(refused) == 12
    # close() from another thread ends a generation under way at its next step (it generated to its end)
    pieces, ended = [], []
    g = e.generate(PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    pieces.append(next(g))
    closer = threading.Thread(target=e.close)
    closer.start()
    closer.join(30)
    try:
        pieces.extend(g)
    except LayerstreamError as x:
        ended.append(str(x))
    assert ended == ["this engine was closed during the generation"] and len(pieces) < 60, (ended, len(pieces))
    with pytest.raises(LayerstreamError, match="this engine is closed"):
        e.generate_batch([PROMPT], G)  # (it generated on)
    with pytest.raises(LayerstreamError, match="this engine is closed"):
        e.encode(PROMPT)  # (a probe's: it tokenized on, where the README says a closed engine refuses every call)
    for call in (lambda: e.encode_chat([{"role": "user", "content": "hi"}]), lambda: e.perplexity("")):
        with pytest.raises(LayerstreamError, match="this engine is closed"):
            call()  # (the Python API probe's: it rendered, and perplexity said the text was too short)
    for call in (lambda: e.core.add_request("r", [1, 2], G), lambda: e.core.score([1, 2], lambda at, lg: None),
                 e.core.step):  # (step: an IndexError on a local backend, [] on the pipeline; a probe's)
        with pytest.raises(LayerstreamError, match="this engine is closed"):
            call()  # (the engine core queued and generated on a local backend; a probe's)
    e.close()  # (twice is fine)


def test_requests_of_the_cores_own_and_generate(model):
    """Requests added through engine.core (README's lower level) and generate(): a probe's. One the
    caller aborted left its end for the next generate, which raised a bare KeyError; one still in
    flight had its outputs taken by generate's steps, and each call raised KeyError. Now the first
    is passed over and the second refused, naming it; an evaluation says what it needs."""
    with Engine.load(model, device="cpu", ctx=64, max_seqs=2) as e:
        want = e.generate_batch([PROMPT], G)
        e.core.add_request("x", [1, 2], G)
        e.core.abort("x")
        assert e.generate_batch([PROMPT], G) == want
        e.core.add_request("a", [1, 2], G)
        e.core.step()
        with pytest.raises(ConfigError, match="^the engine's core has 1 request of its own in flight "
                                              r"\(added through engine.core\): step them to their end or abort"):
            e.generate_batch([PROMPT], G)
        with pytest.raises(ConfigError, match="^evaluation needs the engine idle: let the requests in flight finish, or abort them$"):
            e.logits(PROMPT)
        assert [o.finish_reason for o in e.core.run_to_completion() if o.finished] == ["length"]
        assert e.generate_batch([PROMPT], G) == want
        with pytest.raises(ConfigError, match="^a request's params must be a SamplingParams, not NoneType$"):
            e.core.add_request("t", [1, 2], None)  # (an AttributeError from the sampler before)


@pytest.mark.parametrize("when", ["before", "after"])
def test_ctrl_c_inside_a_step_leaves_the_engine_usable(model, when):
    """A KeyboardInterrupt landing inside the backend's submit (before or after the step is launched):
    the next call raised 'collect() with no step in flight' (the core's record of the step kept, the
    backend's not)."""
    with Engine.load(model, device="cpu", ctx=64) as e:
        want = e.generate_batch([PROMPT], G)
        submit, calls = e.backend.submit, []

        def interrupted(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                if when == "after":
                    submit(*a, **kw)
                raise KeyboardInterrupt
            submit(*a, **kw)

        e.backend.submit = interrupted
        with pytest.raises(KeyboardInterrupt):
            e.generate_batch([PROMPT], G)
        assert e.generate_batch([PROMPT], G) == want


@pytest.mark.parametrize("kw", [dict(vram_gb=float("nan")), dict(vram_gb="1"), dict(host_cache_gb=-1)])
def test_a_bad_pipeline_budget_is_refused_when_made(kw):
    """(NaN and "1" failed converting to bytes deep in the launch; -1 was reported in bytes)"""
    from layerstream.coordinator.pipeline_config import Budget

    with pytest.raises(ConfigError, match=rf"^{next(iter(kw))}=.*: give GiB as a finite number from 0 to 1048576"):
        Budget(**kw)
    assert Budget(vram_gb=1 << 20).vram_gb == 1 << 20  # (the CLI's --vram-gb takes up to this: the review's)


def test_pipeline_options_of_the_wrong_kind_are_refused_when_made(model):
    """A probe's: a dict for a budget, or for the whole pipeline, failed deep in the launch
    (AttributeError); a string count compared with an int (TypeError); a folder given as one string
    was read as its letters; Budget(prefetch=-1) was refused only when the pipeline opened, named as
    run-pipeline's flag."""
    from layerstream.coordinator.pipeline_config import Budget, PipelineConfig, ReaderOptions

    cases = [(lambda: PipelineConfig(budget={"vram_gb": 1}), r"^PipelineConfig budget=\{'vram_gb': 1\}: give a Budget\(\.\.\.\)"),
             (lambda: ReaderOptions(count="2"), r"^ReaderOptions\.count='2': give 1 to "),
             (lambda: ReaderOptions(dirs="/tmp"), r"^ReaderOptions\.dirs='/tmp': give a list of folders, one per reader"),
             (lambda: Budget(prefetch=-1), r"^prefetch=-1: give a whole number from 1 to 65536"),
             (lambda: Budget(resident_layers=1.5), r"^resident_layers=1.5: give a whole number from 0 to"),
             (lambda: Budget(vram_slots=True), r"^vram_slots=True: give a whole number from 2 to 16"),
             (lambda: Engine.open(EngineConfig(model=model, device="cpu"), {"budget": 1}),
              r"^Engine.open's pipeline=\{'budget': 1\}: give a PipelineConfig\(\.\.\.\), or None"),
             # (a second probe's: AttributeError from deep in the load)
             (lambda: Engine.open({"device": "cpu"}), r"^Engine.open's cfg=\{'device': 'cpu'\}: give an EngineConfig"),
             (lambda: Engine.open(None), r"^Engine.open's cfg=None: give an EngineConfig"),
             (lambda: PipelineConfig(warm=5), r"^PipelineConfig warm=5: leave it None"),  # (AttributeError at the start)
             (lambda: Engine.open(EngineConfig(model=model, device="cpu"), index="x"),
              r"^Engine.open's index='x': give an open_model\(path\)'s index")]
    for make, words in cases:
        with pytest.raises(ConfigError, match=words):
            make()
    assert Budget(prefetch=1, resident_layers=0, vram_slots=16, step_tokens=512).prefetch == 1
    assert ReaderOptions(count=2, dirs=("/a", "/b")).dirs == ("/a", "/b")


def test_a_model_path_that_is_no_regular_file_says_so():
    from layerstream.errors import ModelError

    with pytest.raises(ModelError, match=r"^/dev/null: is not a regular file; give the path of a \.gguf file$"):
        Engine.load("/dev/null", device="cpu")  # (it said 'no such model file')


def test_a_fifo_as_the_model_is_refused_at_once(tmp_path):
    """`-m <(zcat m.gguf.gz)`: the header cache read the pipe before the file's kind was checked, and
    waited for a writer forever (a probe's). In a child, so that a hang fails the test."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    code = ("from layerstream.coordinator.engine import Engine\n"
            "from layerstream.errors import ModelError\n"
            f"try:\n    Engine.load({str(fifo)!r}, device='cpu')\nexcept ModelError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"{fifo}: is not a regular file; give the path of a .gguf file", r.stderr


def test_chat_messages_of_the_wrong_shape_are_the_callers_error_not_the_models(smollm_engine):
    """(a message without content, or with None or a list, was 'ModelError: chat template failed')"""
    for bad in ([{"role": "user", "content": None}], [{"role": "user"}], [{"role": "user", "content": ["x"]}],
                "hello", [("user", "hi")]):
        with pytest.raises(TypeError, match="messages: give a list of dicts, each with a str 'role' and 'content'"):
            smollm_engine.encode_chat(bad)
    assert smollm_engine.encode_chat([{"role": "user", "content": "hi"}])  # (the template's own text and the message)


def test_the_python_api_probes_wrong_kinds_of_value_are_refused_in_one_line(smollm_engine, model):
    """decode() of a str compared its letters with ints deep in; chat="yes" was taken for True; a
    device given second was taken for `progress`; logits() of more tokens than the context ran the
    whole pass before it said so, in words about a sequence."""
    e = smollm_engine
    with pytest.raises(TypeError, match=r"^decode\(\) takes token ids \(ints\), not a str"):
        e.tokenizer.decode("abc")
    with pytest.raises(TypeError, match="^token id 'a': token ids are ints"):
        e.tokenizer.decode(["a"])
    # (a second probe's: None and an int were 'not iterable', True decoded as token 1, an id past the
    # vocabulary a bare ValueError where generate() says the same as a ConfigError)
    for ids, words in [(None, r"^decode\(\) takes token ids \(ints\), not a NoneType"),
                       (5, r"^decode\(\) takes token ids \(ints\), not a int"), ([True], "^token id True: token ids are ints")]:
        with pytest.raises(TypeError, match=words):
            e.tokenizer.decode(ids)
    with pytest.raises(ConfigError, match=rf"^token id {2 ** 70} is outside the vocabulary \(0\.\.\d+\)$"):
        e.tokenizer.decode([2 ** 70])
    with pytest.raises(ConfigError, match="^chat='yes': must be True or False"):
        e.generate_batch(["hi"], SamplingParams(max_tokens=1), chat="yes")
    # (a second probe's: "no" added the generation prompt, continued the last message, and streamed)
    msgs = [{"role": "user", "content": "hi"}]
    for call, words in [(lambda: e.encode_chat(msgs, add_generation_prompt="no"), "^add_generation_prompt='no'"),
                        (lambda: e.encode_chat(msgs, continue_final="no"), "^continue_final='no'"),
                        (lambda: e.generate_batch(["hi"], SamplingParams(max_tokens=1), stream="no"), "^stream='no'")]:
        with pytest.raises(ConfigError, match=words + ": must be True or False$"):
            call()
    steps = e.core.steps
    with pytest.raises(LayerstreamError, match=r"^logits\(\): 513 tokens do not fit the context size \(512 tokens\); "
                                               "raise ctx, pass fewer tokens, or use on_context_full='slide'$"):
        e.logits([1] * 513)
    assert e.core.steps == steps  # (refused before any step)
    with Engine.load(model, "cpu") as one:
        assert one.cfg.device == "cpu"


def test_a_system_message_without_chat_and_token_ids_with_chat_are_refused(smollm_engine):
    """A probe's: system= without chat=True was dropped, and token ids with chat=True ran without the
    template, each silently; the CLI refuses --system without --chat."""
    P = SamplingParams(temperature=0, max_tokens=2)
    for prompt in ("hi", [1, 2, 3]):
        with pytest.raises(ConfigError, match=r"^system= is a chat's system message: give chat=True too"):
            smollm_engine.generate_batch([prompt], P, system="Be brief.")
    with pytest.raises(ConfigError, match=r"^chat=True renders text through the chat template: give text prompts"):
        smollm_engine.generate_batch([[1, 2, 3]], P, chat=True)
    assert smollm_engine.encode("hi", chat=True, system="Be brief.") != smollm_engine.encode("hi", chat=True)
    for bad in (None, b"hi", ["hi"]):
        with pytest.raises(TypeError, match=r"^encode\(\) takes the text as a str, not "):
            smollm_engine.tokenizer.encode(bad)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
@pytest.mark.timeout(60)
def test_a_forked_child_cannot_use_its_parents_engine_and_its_close_leaves_the_parents(model):
    """A probe's: a forked child's generation over the parent's pipeline hung past the stall timeout
    with no message (the sockets are the parent's), and in one process it hung too (torch's threads
    are the parent's); now its calls refuse at once, and its close() (a context manager's exit)
    leaves the parent's engine running."""
    e = Engine.load(model, device="cpu", ctx=64, max_seqs=2)
    want = e.generate_batch([PROMPT], G)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what its call raised, then leave without the parent's teardown
        try:
            e.generate_batch([PROMPT], G)
            said = "no error"
        except LayerstreamError as x:
            said = str(x)
        except BaseException as x:  # noqa: BLE001 - the test reports what it was
            said = repr(x)
        e.close()
        os.write(w, said.encode())
        os._exit(0)
    os.close(w)
    said = os.read(r, 4096).decode()
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    assert said == (f"this engine was opened by process {os.getpid()}; a forked process cannot use it: open an "
                    "engine in the child, or fork before opening one"), said
    assert e.generate_batch([PROMPT], G) == want
    e.close()


def test_a_script_that_opens_a_pipeline_without_a_main_guard_says_so_in_one_line_a_child(model, tmp_path):
    """A probe's: multiprocessing ran the script again in each child, whose Engine.open printed a
    page of RuntimeError from each (about 250 lines); now each child says what to do in one line."""
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text("from layerstream.coordinator.engine import Engine, EngineConfig\n"
                      "from layerstream.coordinator.pipeline_config import Budget, PipelineConfig\n"
                      f"e = Engine.open(EngineConfig(model={model!r}, device='cpu', ctx=64), "
                      "PipelineConfig(budget=Budget(host_cache_gb=0)))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    said = [line for line in r.stderr.splitlines() if line.startswith("layerstream: ")]
    assert r.returncode == 1 and said and set(said) == {
        "layerstream: an engine was opened while a child process started (the script runs again in each child): "
        "put the code that opens it under if __name__ == \"__main__\":"}, r.stderr[-2000:]
    assert "RuntimeError" not in r.stderr and "bootstrapping phase" not in r.stderr


def test_a_pipeline_opened_from_a_script_on_standard_input_runs(model):
    """A probe's: `python -` (the script read from standard input) opened a pipeline that failed with
    "the staging process died (exit code 1)": multiprocessing handed each child the main script's
    path, "<stdin>", which each tried to run and could not find. Such a script is no longer run
    again in the children (nothing to run), so it needs no main guard either."""
    import subprocess
    import sys

    script = ("from layerstream.coordinator.engine import Engine, EngineConfig\n"
              "from layerstream.coordinator.pipeline_config import Budget, PipelineConfig\n"
              "from layerstream.compute.sampling import SamplingParams\n"
              f"with Engine.open(EngineConfig(model={model!r}, device='cpu', ctx=64), "
              "PipelineConfig(budget=Budget(host_cache_gb=0))) as e:\n"
              "    print(repr(''.join(e.generate('Hi', SamplingParams(temperature=0, max_tokens=4)))))\n")
    r = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "FileNotFoundError" not in r.stderr, r.stderr[-2000:]
    with Engine.open(EngineConfig(model=model, device="cpu", ctx=64)) as e:  # the same text in this process
        assert r.stdout.strip() == repr("".join(e.generate("Hi", SamplingParams(temperature=0, max_tokens=4))))


def test_the_main_guard_line_goes_in_one_write(monkeypatch):
    """The children print that line at once: as SystemExit's text it went as two writes (the text,
    then its newline) where stderr is unbuffered (PYTHONUNBUFFERED=1), and two children's lines ran
    together on one line. One write each keeps each line whole (a pipe's writes of at most
    PIPE_BUF bytes are not interleaved)."""
    import multiprocessing

    writes = []
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, data)) or len(data))
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(SystemExit) as stop:
        Engine.open(EngineConfig(model="never-read.gguf"))
    assert stop.value.code == 1
    assert len(writes) == 1 and writes[0][0] == 2 and writes[0][1].count(b"\n") == 1
    line = writes[0][1].decode()
    assert line.startswith("layerstream: an engine was opened while a child process started") and line.endswith(
        'if __name__ == "__main__":\n') and len(writes[0][1]) <= 512


def test_errors_raised_deep_name_the_python_apis_settings_not_the_command_lines(model, tmp_path):
    """A probe's: a Python caller who passed ctx= or draft_model= was told to lower --ctx or --batch, or
    to pass --model for a draft's missing file (NOTE [ the caller's names ] in api_names.py); the
    command line keeps its flags (test_cli's refusals)."""
    import torch

    from layerstream.errors import ModelError

    with pytest.raises(ConfigError, match=r"GiB of host memory .* is available: lower ctx or max_seqs$"):
        Engine.load(model, device="cpu", ctx=1 << 30)
    with pytest.raises(ModelError, match=rf"^{tmp_path}/draft\.gguf: no such model file; give the path of a \.gguf file$"):
        Engine.load(model, device="cpu", draft_model=str(tmp_path / "draft.gguf"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda: no CUDA device is visible; use device='cpu'$"):
            Engine.load(model, device="cuda")
    with Engine.load(model, device="cpu", ctx=16) as e:
        with pytest.raises(ConfigError, match=r"^chat=True: this model's GGUF has no tokenizer\.chat_template; call "
                                              r"it without chat=True$"):
            list(e.generate("hi", G, chat=True))
        with pytest.raises(LayerstreamError, match=r"; raise ctx, shorten the prompt, or use on_context_full='slide'$"):
            list(e.generate(PROMPT * 8, G))
        # the engine core, as README gives it (`e.core`; a probe's: these still named the flags)
        with pytest.raises(LayerstreamError, match=r"; raise ctx, shorten the prompt, or use on_context_full='slide'$"):
            e.core.add_request("long", PROMPT * 8, G)
