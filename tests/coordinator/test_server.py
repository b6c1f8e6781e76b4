"""The OpenAI-compatible server, live on 127.0.0.1, through the official `openai` client."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from procs import ends_with_the_test, leaked, segments, serving, stop, wait_listening

openai = pytest.importorskip("openai")
from layerstream.compute.sampling import SamplingParams  # noqa: E402

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"
KEY = "test-key"
pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sigint_default() -> None:
    """In the server before exec: SIGINT as a terminal gives it. A shell runs a background job
    (`.ci/run &`) with SIGINT ignored, which stays ignored across exec, and Python then installs
    no Ctrl-C handler: the test of Ctrl-C's exit status would see the server carry on. A mask
    that blocks it would be inherited likewise."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    ends_with_the_test()


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    p = subprocess.Popen([str(LAUNCHER), "--serve", "--port", str(port), "--device", "cpu", "--dtype", "float32",
                          "--ctx", "512", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=_sigint_default)
    try:
        wait_listening(p, port)
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):  # (the group may be gone with the server)
            os.killpg(p.pid, signal.SIGKILL)
        raise
    return p, f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def server():
    p, url = _start("--single-process", "--batch", "8", "--api-key", KEY)
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    yield client, client.models.list().data[0].id
    assert stop(p) == 143  # graceful: in-flight requests finish, then 128 + SIGTERM as the CLI
    assert "Traceback" not in p.stderr.read()


def _engine_text(engine, prompt_ids, max_tokens) -> str:
    return "".join(engine.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens)))


def test_completion_and_chat_answer_as_the_engine_does(server, smollm_engine):
    client, model = server
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    want = _engine_text(smollm_engine, smollm_engine.tokenizer.encode("The capital of France is"), 12)
    assert r.choices[0].text == want and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens == 5
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == _engine_text(smollm_engine, smollm_engine.encode_chat(msgs), 16)
    assert r.choices[0].message.role == "assistant"


DRAFTS_PROMPT = ("Fix the typo: 'The quick brown fox jumpd over the lazy dog.'\n"
                 "Fixed: 'The quick brown fox jumped over the lazy dog.'\nFix the typo: 'The lazy dog slept "
                 "in the sun all day.' has no typo, so: 'The")


@pytest.fixture(scope="module")
def drafts_want(smollm_engine) -> str:
    """The engine's greedy text for DRAFTS_PROMPT without drafts (the same for both kinds of drafts)."""
    return _engine_text(smollm_engine, smollm_engine.tokenizer.encode(DRAFTS_PROMPT), 30)


@pytest.mark.parametrize("drafts", ["lookup", "draft-model"])
def test_a_server_with_drafts_answers_as_the_engine_without_and_a_request_may_turn_them_off(drafts_want,
                                                                                            smollm_path, drafts):
    """--lookup 4, or the model as its own --draft-model: greedy answers through the openai client
    equal the engine's text without drafts, with drafts on (the server's default) and off (a
    request's "lookup": 0)."""
    prompt, want = DRAFTS_PROMPT, drafts_want
    p, url = _start("--single-process", "--batch", "2",
                    *(["--lookup", "4"] if drafts == "lookup" else ["--draft-model", smollm_path]))
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for extra in ({}, {"lookup": 0}, {"lookup": 2}):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0, extra_body=extra)
            assert r.choices[0].text == want, extra
    finally:
        assert stop(p) == 143
    assert "Traceback" not in p.stderr.read()


def test_sampling_options_given_with_serve_are_the_requests_defaults(smollm_engine):
    """`--serve --temperature 0 -n 7`, as llama-server's options: a request that sets neither is
    greedy and takes 7 tokens (OpenAI's defaults would sample, 16 tokens); one that sets its own
    max_tokens takes that; the start-up line names what changed."""
    prompt = "The capital of France is"
    want = _engine_text(smollm_engine, smollm_engine.tokenizer.encode(prompt), 7)
    p, url = _start("--single-process", "--temperature", "0", "-n", "7")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt=prompt)
        assert r.choices[0].text == want and r.usage.completion_tokens == 7
        r = client.completions.create(model=model, prompt=prompt, max_tokens=3)
        assert r.usage.completion_tokens == 3 and want.startswith(r.choices[0].text)
    finally:
        assert stop(p) == 143
    out = p.stdout.read()
    assert "requests that do not set them get temperature 0.0, max_tokens 7" in out, out
    assert "Traceback" not in p.stderr.read()


def test_the_next_chat_turn_reuses_the_conversations_kv(server, smollm_engine):
    """Turn two's prompt starts with turn one's, whose KV the freed row still holds: only the rest
    is prefilled (the metrics count the reused tokens), and the answer is the engine's."""
    import urllib.request

    client, model = server

    def reused() -> float:
        req = urllib.request.Request(str(client.base_url).replace("/v1/", "/metrics"),
                                     headers={"Authorization": f"Bearer {KEY}"})
        text = urllib.request.urlopen(req, timeout=30).read().decode()
        return float(next(ln.split()[-1] for ln in text.splitlines()
                          if ln.startswith("layerstream_prefix_reused_tokens_total")))

    msgs = [{"role": "user", "content": "Name a large animal that lives in the sea."}]
    first = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    before = reused()
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And a small one?"}]
    second = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    assert reused() - before >= len(smollm_engine.encode_chat(msgs[:1]))  # at least all of turn one's prompt
    assert second.choices[0].message.content == _engine_text(smollm_engine, smollm_engine.encode_chat(msgs), 10)


def test_streaming_gives_the_same_text_in_pieces(server):
    client, model = server
    msgs = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0,
                                                 stream=True))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    parts = list(client.completions.create(model=model, prompt="One, two,", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in parts) == client.completions.create(
        model=model, prompt="One, two,", max_tokens=8, temperature=0).choices[0].text


def test_eight_concurrent_clients_get_the_sequential_answers(server):
    """float32: a batch's composition does not change greedy answers."""
    client, model = server
    prompts = [f"Write a sentence about the number {i}." for i in range(8)]

    def ask(p):
        return client.completions.create(model=model, prompt=p, max_tokens=10, temperature=0).choices[0].text

    sequential = [ask(p) for p in prompts]
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(prompts[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(8)] == sequential


def test_per_request_seeds_reproduce(server):
    client, model = server

    def sample(seed):
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    a = sample(7)
    others = [threading.Thread(target=sample, args=(s,)) for s in (1, 2, 3)]
    for t in others:
        t.start()
    b = sample(7)  # while others share the batch
    for t in others:
        t.join(120)
    assert a == b and sample(8) != a


def test_errors_are_openai_shaped(server):
    client, model = server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 600, max_tokens=2)
    assert "context is 512 tokens" in e.value.body["message"]
    wrong = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model, prompt="x", max_tokens=2)
    import json
    import urllib.error
    import urllib.request

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(f"{base}/v1/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=30)
    assert bad.value.code == 400 and json.loads(bad.value.read())["error"]["type"] == "invalid_request_error"
    with urllib.request.urlopen(f"{base}/health", timeout=30) as health:
        assert json.loads(health.read())["status"] == "ok"
    # a keyed server keeps /metrics behind its key (it was open); the scheme is case-insensitive (RFC
    # 7235: 'bearer' got 401), the key is not
    for auth in (None, f"Bearer {KEY.upper()}", f"Basic {KEY}"):
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(urllib.request.Request(f"{base}/metrics", headers={"Authorization": auth} if auth
                                                          else {}), timeout=30)
        assert denied.value.code == 401 and json.loads(denied.value.read())["error"]["code"] == "invalid_api_key"
        assert denied.value.headers["WWW-Authenticate"] == "Bearer"  # (RFC 7235: a 401 names its scheme)
    for auth in (f"bearer {KEY}", f"BEARER  {KEY}"):
        with urllib.request.urlopen(urllib.request.Request(f"{base}/metrics", headers={"Authorization": auth}),
                                    timeout=30) as m:
            metrics = m.read().decode()
        assert "layerstream_generated_tokens_total" in metrics and "layerstream_pass_seconds_bucket" in metrics


def test_two_authorization_headers_are_a_400(server):
    """A probe's: with two, the first decided (valid then wrong: 200; wrong then valid: 401)."""
    client, _ = server
    port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for first, second in ((KEY, "wrong"), ("wrong", KEY)):
        status, _, reply = _raw_exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                               b"Connection: close\r\nContent-Type: application/json\r\n"
                                               b"Authorization: Bearer %s\r\nAuthorization: Bearer %s\r\n"
                                               b"Content-Length: %d\r\n\r\n%s"
                                         % (first.encode(), second.encode(), len(body), body))
        assert status == 400 and reply["error"]["message"] == ("the request has more than one Authorization "
                                                               "header; send one"), reply


def test_a_chat_ending_with_the_assistants_words_continues_them(server, smollm_engine):
    """A prefill (a probe's: the reply opened a new turn and counted from 1 again): the reply goes on
    from the assistant's last character, as the engine's continued prompt does; asked otherwise,
    a new turn; a prefill of the user's words is a 400."""
    client, model = server
    msgs = [{"role": "user", "content": "Count to 5"}, {"role": "assistant", "content": "1, 2,"}]
    got = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == _engine_text(smollm_engine, smollm_engine.encode_chat(
        msgs, continue_final=True), 6)
    new_turn = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                              extra_body={"continue_final_message": False})
    assert new_turn.choices[0].message.content == _engine_text(smollm_engine, smollm_engine.encode_chat(msgs), 6)
    assert new_turn.choices[0].message.content != got.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="only an assistant's message with text can be continued"):
        client.chat.completions.create(model=model, messages=msgs[:1], max_tokens=2,
                                       extra_body={"continue_final_message": True})


def test_the_openai_fields_clients_send_are_served(server, smollm_engine):
    """Issue 25: max_completion_tokens, stream_options.include_usage, content as text parts, n,
    GET /v1/models/{id}, and OpenAI's error `code`, through the official client."""
    client, model = server
    msgs = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens <= 5
    assert r.choices[0].message.content == _engine_text(smollm_engine, smollm_engine.encode_chat(msgs), 5)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
    assert client.chat.completions.create(model=model, messages=parts, max_completion_tokens=5,
                                          temperature=0).choices[0].message.content == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    kw = dict(model=model, prompt="Once upon a time", max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    two = client.completions.create(n=2, **kw)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.choices[0].text != two.choices[1].text
    assert two.choices[0].text == client.completions.create(**kw).choices[0].text  # choice 0 has the seed
    assert two.choices[1].text == client.completions.create(**kw | {"seed": 8}).choices[0].text  # 1 the next
    prompt_tokens = len(smollm_engine.tokenizer.encode("Once upon a time"))
    assert (two.usage.prompt_tokens, two.usage.completion_tokens) == (prompt_tokens, 16)  # the prompt once
    streamed = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0, n=2,
                                                   stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) == \
            _engine_text(smollm_engine, smollm_engine.encode_chat(msgs), 4)
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 600, max_tokens=2)
    assert e.value.code == "context_length_exceeded" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2, logprobs=True)
    assert e.value.param == "logprobs"


@pytest.mark.default_threads
def test_a_non_loopback_host_without_a_key_warns_and_ctrl_c_exits_130():
    """One exit rule: 128 + the signal after the drain, Ctrl-C (SIGINT) as SIGTERM (143)."""
    p, url = _start("--single-process", "--host", "0.0.0.0")
    p.send_signal(signal.SIGINT)
    try:
        assert p.wait(timeout=60) == 130
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = p.stderr.read()
    assert "warning: serving on 0.0.0.0 without an API key" in err and "Traceback" not in err


def test_aborted_stream_frees_its_row_and_a_full_queue_is_429():
    p, url = _start("--single-process", "--batch", "1", "--max-queue", "1")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt="Count: 1, 2,", max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()  # the client goes away mid-stream
        t0 = time.monotonic()
        r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, timeout=30)
        assert r.choices[0].text is not None and time.monotonic() - t0 < 20  # 400 tokens would take longer

        # one running (a stream of 400 tokens, seen to have started), one waiting (seen in the queue's
        # gauge), the third refused; then the first goes and the waiting one is served
        metrics = url.removesuffix("/v1") + "/metrics"
        running = client.completions.create(model=model, prompt="Count: 1, 2,", max_tokens=400, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        next(iter(running))
        results = {}
        short = dict(model=model, prompt="Count: 1, 2,", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        waiting = threading.Thread(target=lambda: results.__setitem__("waiting", _try(client, short)))
        waiting.start()
        _wait_for(lambda: _gauge(metrics, "layerstream_queue_length") == 1, "the second request to wait")
        results["third"] = _try(client, short)
        running.close()
        waiting.join(120)
        assert results == {"waiting": "ok", "third": "429"}, results
    finally:
        stop(p)


def _gauge(metrics_url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")))


def _try(client, kw) -> str:
    try:
        client.completions.create(**kw)
        return "ok"
    except openai.RateLimitError as e:
        assert e.response.headers.get("retry-after") == "1"
        return "429"


def test_sigterm_on_the_pipeline_server_leaves_nothing_behind():
    before = segments()
    p, url = _start("--resident-layers", "0")
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="Hi", max_tokens=3, temperature=0).choices[0].text is not None
    kids = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(kids) >= 3, "the pipeline's processes"
    assert stop(p) == 143

    def alive() -> list[str]:  # not counting zombies the init process has yet to reap
        ps = subprocess.run(["ps", "-s", str(p.pid), "-o", "pid=,stat="], capture_output=True, text=True).stdout
        return [line.split()[0] for line in ps.splitlines() if line.split() and "Z" not in line.split()[1]]

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), f"processes left: {alive()}"
    assert not leaked(before, run=p.pid)
    assert "Traceback" not in p.stderr.read()


def _long_stream(url: str):
    """A streamed completion of up to 4000 tokens, opened (urllib's response, a context manager)."""
    import urllib.request

    req = urllib.request.Request(url + "/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "Tell a story", "max_tokens": 4000, "ignore_eos": True,
                                                  "stream": True}).encode())
    return urllib.request.urlopen(req, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_a_closed_terminal_stops_the_server_as_sigterm_does(sig):
    """SIGHUP (its terminal closed) or SIGQUIT (a Ctrl-\\) to the whole group with a stream in flight:
    the stream ends with [DONE], the server exits 128 + the signal, nothing is left (at their defaults
    the server ended at once, and SIGQUIT's left the run's shared memory)."""
    before = segments()
    p, url = _start("--ctx", "256")
    try:
        with _long_stream(url) as r:
            r.readline()  # the stream started
            os.killpg(p.pid, sig)
            body = r.read().decode()
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "abort"' in body.replace('":"', '": "')
        assert p.wait(timeout=30) == 128 + sig
        assert "Traceback" not in p.stderr.read()
        assert not leaked(before, run=p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.default_threads
def test_ctrl_c_stops_a_server_whose_sigint_is_ignored_with_status_130():
    """A shell starts a background job with SIGINT ignored, which Python keeps: uvicorn's handler
    takes the signal and raises it again once stopped, where it is ignored; the exit status is
    still 130 (it was 0)."""
    def ignored() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ends_with_the_test()

    port = _free_port()
    p = subprocess.Popen([str(LAUNCHER), "--serve", "--port", str(port), "--device", "cpu", "--single-process",
                          "--ctx", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=ignored)
    with serving(p, port):
        assert stop(p, signal.SIGINT) == 130
        assert "Traceback" not in p.stderr.read()


def _children(p: subprocess.Popen) -> dict[str, int]:
    """The server's pipeline processes by the name supervisor.child_main gives them: pid."""
    from procs import descendants

    out = {}
    for k in descendants(p.pid):
        with contextlib.suppress(OSError):
            out[open(f"/proc/{k}/comm").read().strip()] = k
    return {name: pid for name, pid in out.items() if name.startswith("layerstream-")}


def _exits_1_naming(p: subprocess.Popen, before: set[str], child: str) -> None:
    """The server stopped by itself: exit status 1, its last line the engine's failure naming `child`
    dead (so that a supervisor starts it again), and the only line that says so (the engine's log
    said it too, a moment before), no traceback, nothing left."""
    assert p.wait(timeout=60) == 1
    err = p.stderr.read()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("run-pipeline: error: the server stopped: the engine failed: ") \
        and f"the {child} process died" in last, err
    assert [line for line in err.splitlines() if f"the {child} process died" in line] == [last], err
    assert not leaked(before, run=p.pid)


def test_a_dead_pipeline_answers_503_and_the_server_exits_1_saying_why():
    """The compute process gone mid-stream (the engine cannot go on): the stream in hand is answered
    with a 503 error event naming the dead child, then `data: [DONE]` (a probe's: the stream ended
    without it, where vLLM sends it), then the server stops by itself with one line and exit status
    1, leaving nothing behind."""
    before = segments()
    p, url = _start("--ctx", "256", "--resident-layers", "0")
    try:
        with _long_stream(url) as r:
            r.readline()  # the stream started
            os.kill(_children(p)["layerstream-com"], signal.SIGKILL)
            body = r.read().decode()
        events = [line.removeprefix("data: ") for line in body.strip().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "the compute process died" in err["message"], err
        _exits_1_naming(p, before, "compute")
    finally:
        if p.poll() is None:
            stop(p)


def test_an_idle_server_whose_staging_dies_stops_at_once_saying_why():
    """Staging killed while no request runs (a hostile-user probe): the server answered /health 200
    and kept the dead staging's shared-memory segment until the next request, since the children's
    exits were watched only during a step. Now the idle engine looks every half second: the server
    stops by itself, exit status 1, its segment removed."""
    before = segments()
    p, url = _start("--ctx", "256")
    try:
        os.kill(_children(p)["layerstream-sta"], signal.SIGKILL)
        t0 = time.monotonic()
        _exits_1_naming(p, before, "staging")
        assert time.monotonic() - t0 < 30
    finally:
        if p.poll() is None:
            stop(p)


def _state(pid: int) -> str | None:
    """A process's state letter in /proc (T: stopped, Z: exited, not yet reaped), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _exited(pid: int) -> bool:
    """Whether a process can be waited for by its parent: gone, or a zombie with no thread left but its
    first (the first thread shows Z while the others are still being torn down)."""
    try:
        return os.listdir(f"/proc/{pid}/task") == [str(pid)] and _state(pid) == "Z"
    except OSError:
        return True


def test_health_is_503_at_once_while_a_child_is_stopped_or_dead():
    """A hostile-user probe: /health answered 200 while the compute process was stopped (SIGSTOP), and
    for most of a second after staging died (the engine's failure was recorded only once the idle
    check had seen the death, waited for the child's last words and stopped the pipeline). Now it asks
    the pipeline itself: 503 naming the stopped process, 200 again once it is continued, and 503 as
    soon as staging's death can be seen, before the server stops by itself."""
    before = segments()
    p, url = _start("--ctx", "256")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        kids = _children(p)
        compute, staging = kids["layerstream-com"], kids["layerstream-sta"]
        assert _call(port, "GET", "/health", timeout=10)[0] == 200
        os.kill(compute, signal.SIGSTOP)
        _wait_for(lambda: _state(compute) == "T", "the compute process to stop")
        status, body, _ = _call(port, "GET", "/health", timeout=10)
        assert status == 503 and body["status"] == "error" and "the compute process is stopped" in body["error"], body
        os.kill(compute, signal.SIGCONT)
        _wait_for(lambda: _state(compute) != "T", "the compute process to go on")
        status, body, _ = _call(port, "GET", "/health", timeout=10)
        assert status == 200 and body["status"] == "ok", body
        os.kill(staging, signal.SIGKILL)
        _wait_for(lambda: _exited(staging), "staging to die")
        status, body, _ = _call(port, "GET", "/health", timeout=10)
        assert status == 503 and "the staging process died (exit code -9)" in body["error"], body
        _exits_1_naming(p, before, "staging")
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
            stop(p)


class _TimedCore:
    """A stand-in engine core: each step takes `pass_s` and finishes every request it holds,
    noting which requests shared it."""

    max_seqs = 1  # rows

    def __init__(self, pass_s: float):
        self.pass_s, self.held, self.passes = pass_s, [], []
        self.waiting, self.running, self.reused_tokens, self.steps = [], [], 0, 0

    def add_request(self, rid, prompt, params):
        self.held.append(rid)

    def abort(self, rid):
        pass

    def has_unfinished(self):
        return bool(self.held)

    def step(self):
        from layerstream.coordinator.core import RequestOutput

        self.passes.append(self.held)
        self.steps += 1
        outs = [RequestOutput(r, "", [], True, "length", 1, 0) for r in self.held]
        self.held = []
        time.sleep(self.pass_s)
        return outs


def test_requests_arriving_together_share_the_first_pass_from_idle():
    """When a request wakes an idle engine, the first pass waits for those arriving with it
    (until none comes for the gap), but at most a quarter of the last pass's time."""
    import asyncio
    from types import SimpleNamespace

    from layerstream.coordinator.server import EngineWorker, Metrics

    core = _TimedCore(pass_s=0.4)
    w = EngineWorker(SimpleNamespace(core=core), asyncio.new_event_loop(), Metrics(), max_queue=16,
                     gather_gap_s=0.25, gather_first_s=2.0)
    w.start()
    try:
        for i in range(4):  # a burst: 10 ms apart, well inside the gap
            w.submit(f"a{i}", [1], None)
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while len(core.passes) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.passes == [["a0", "a1", "a2", "a3"]]
        time.sleep(0.6)  # the pass (0.4 s) is over: idle again, and the cap is now 0.1 s
        w.submit("b0", [1], None)
        time.sleep(0.2)  # inside the gap, past the cap: the next pass, not b0's
        w.submit("b1", [1], None)
        while len(core.passes) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.passes[1:] == [["b0"], ["b1"]]
    finally:
        w.stop()
        w.join(5)


# -- the server in this process, over its own SmolLM2 engine (2 rows, ctx 512) -----------------------



class _Records(logging.Handler):
    """Every log record of the server and of uvicorn, to look for tracebacks and access lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def live(smollm_path):
    from types import SimpleNamespace

    import uvicorn

    from layerstream.coordinator.engine import Engine
    from layerstream.coordinator.http_guard import Limits
    from layerstream.coordinator.server import Server, uvicorn_config

    engine = Engine.load(smollm_path, device="cpu", dtype="float32", ctx=512, max_seqs=2)
    limits = Limits(body_bytes=4 << 20, body_timeout_s=10, body_stall_s=1.0, header_timeout_s=1.0,
                    max_connections=40, bodies_bytes=6 << 20)
    server = Server(engine, "smollm", None, max_queue=6, limits=limits)
    port = _free_port()
    http_server = uvicorn.Server(uvicorn_config(server, "127.0.0.1", port, grace_s=5))
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("layerstream.server", "uvicorn", "uvicorn.error")]
    for lg in loggers:
        lg.addHandler(records)
    level = loggers[0].level
    loggers[0].setLevel(logging.INFO)  # the access log, as -v sets it
    thread = threading.Thread(target=http_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield SimpleNamespace(port=port, server=server, engine=engine, records=records.records)
    finally:
        http_server.should_exit = True
        thread.join(30)
        for lg in loggers:
            lg.removeHandler(records)
        loggers[0].setLevel(level)
        engine.close()
    assert not [r for r in records.records if r.exc_info], "a traceback in the server's log"


def _call(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120):
    """(status, parsed JSON or text, headers) of one request on a fresh connection."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        h = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, body=data, headers=h | (headers or {}))
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw), dict(r.getheaders())
        except ValueError:
            return r.status, raw.decode(errors="replace"), dict(r.getheaders())
    finally:
        c.close()


def _healthy(live) -> None:
    status, body, _ = _call(live.port, "GET", "/health", timeout=10)
    assert status == 200 and body["status"] == "ok"
    status, body, _ = _call(live.port, "POST", "/v1/completions",
                            {"prompt": "The sky is", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop"), body


def test_hostile_bodies_are_400s_and_the_server_goes_on(live):
    """Each field checked by type and range at the boundary (issue 23: a seed of 2**64 killed the
    engine thread; "stream": "false" streamed; extreme JSON gave 500 with a traceback)."""
    cases = [
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "stream": "false"}, "stream"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "x", "logprobs": 5}, "logprobs"),
        ({"prompt": "x", "repeat_penalty": 1e-39}, "repeat_penalty"),  # was a 500 "infinite logits"
    ]
    for body, param in cases:
        status, got, _ = _call(live.port, "POST", "/v1/completions", body)
        assert status == 400 and got["error"]["param"] == param and got["error"]["type"] == "invalid_request_error"
    for raw in (b"[" * 200_000, b'{"max_tokens": ' + b"9" * 6000 + b"}", b'{"prompt": "\\ud800 x"}',
                b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "temperature": 1e999}'):
        status, got, _ = _call(live.port, "POST", "/v1/completions", raw)
        assert status == 400 and got["error"]["code"] is None, got
    status, got, _ = _call(live.port, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": {"text": "x"}}]})
    assert status == 400 and got["error"]["param"] == "messages[0].content"
    _healthy(live)


def test_a_failed_step_answers_500_and_the_next_request_is_served(live):
    core = live.engine.core
    real = core.backend

    class Failing:
        def submit(self, *args):
            core.backend = real
            raise RuntimeError("injected step failure")

        collect = submit

    core.backend = Failing()
    try:
        status, got, _ = _call(live.port, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    finally:
        core.backend = real
    assert status == 500 and "injected step failure" in got["error"]["message"]
    assert got["error"]["type"] == "server_error"
    _healthy(live)
    assert sorted(core.free_rows) == [0, 1]


def _metric(live, name: str) -> float:
    _, text, _ = _call(live.port, "GET", "/metrics", timeout=10)
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


def test_a_client_gone_from_a_plain_request_frees_its_row(live):
    """Not streamed: the handler watches the connection and aborts when it closes (issue 23:
    the row generated 3,000 more tokens and the next request waited 254 s)."""
    aborted = _metric(live, 'layerstream_finished_requests_total{reason="abort"}')
    body = json.dumps({"prompt": "Count: 1, 2,", "max_tokens": 400, "temperature": 0, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 60
    while _metric(live, "layerstream_running_sequences") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(live, "layerstream_running_sequences") == 1
    s.close()
    while _metric(live, 'layerstream_finished_requests_total{reason="abort"}') == aborted \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(live, 'layerstream_finished_requests_total{reason="abort"}') == aborted + 1
    assert _metric(live, "layerstream_running_sequences") == 0
    _healthy(live)


def test_a_huge_chunked_body_is_refused_before_it_is_read(live):
    s = socket.create_connection(("127.0.0.1", live.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
    sent, reply = 0, b""
    s.settimeout(0.05)
    try:
        while sent < 256 << 20:  # 64 times the cap
            try:
                s.sendall(piece)
                sent += 1 << 16
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                reply += s.recv(4096)
            except (socket.timeout, BlockingIOError):
                continue
            if reply:
                break
        s.settimeout(10)
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 64 << 20  # the server answered long before the client was done
    status, got, _ = _call(live.port, "POST", "/v1/completions", b"x" * 100, {"Content-Length": str(5 << 20)})
    assert status == 413


def _raw_exchange(port: int, data: bytes) -> tuple[int, bytes, dict]:
    """Send `data` on a new connection and read to its close: (status, head lowercased, JSON body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    finally:
        s.close()
    head, _, rest = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), json.loads(rest)


def test_a_request_framed_both_ways_is_refused_and_its_connection_closed(live):
    """Content-Length beside Transfer-Encoding: chunked (h11 reads the chunks and ignores the length,
    where a proxy in front may read the length: request smuggling). RFC 9112 lets a server refuse it
    and asks that the connection close after: 400 naming both, then EOF; the server goes on."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    status, head, reply = _raw_exchange(live.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Content-Type: application/json\r\nContent-Length: 5\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n"
                                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert status == 400 and b"connection: close" in head, head
    err = reply["error"]
    assert err["code"] == "invalid_framing" and "Content-Length and Transfer-Encoding" in err["message"]
    _healthy(live)


def test_a_post_without_a_length_is_a_411_and_h11s_words_are_text(live):
    """A probe's: a POST with neither Content-Length nor Transfer-Encoding was read as an empty body
    (400 'not valid JSON: Expecting value'), where RFC 9110 has a 411; a request line h11 cannot parse
    was quoted as a Python bytearray's repr."""
    status, head, reply = _raw_exchange(live.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                                   b"Content-Type: application/json\r\n\r\n")
    assert status == 411 and b"connection: close" in head and reply["error"]["code"] == "length_required", reply
    assert reply["error"]["message"] == ("the request has no Content-Length (nor a chunked body); send the "
                                         "body's length")
    status, _, reply = _raw_exchange(live.port, b"POST /health HTTP/1.1\r\nHost: localhost\r\nConnection: close"
                                                b"\r\n\r\n")  # (a route that takes no body: as ever)
    assert status == 405, reply
    n = len(live.records)
    status, head, reply = _raw_exchange(live.port, b"GET /v1/models\r\n\r\n")  # (no HTTP version)
    assert status == 400 and "bytearray" not in reply["error"]["message"], reply
    assert reply["error"]["message"] == "malformed HTTP request: illegal request line: 'GET /v1/models'", reply
    _healthy(live)
    # logged as the server's other requests are, with its peer and why, not as uvicorn's bare warning
    said = [r.getMessage() for r in live.records[n:]]
    assert "127.0.0.1 unparsed request 400: illegal request line: 'GET /v1/models'" in said, said
    assert "Invalid HTTP request received." not in said, said


def test_requests_h11_cannot_parse_are_answered_in_json_and_read_to_the_end(live):
    """uvicorn answered these in plain text ("Invalid HTTP request received."), and a head past
    h11's buffer with a reset, no answer: now OpenAI's JSON with h11's status, the connection
    closed after the client has sent what it had (LINGER_S); the server goes on."""
    post = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    for data in (post + b"Content-Length: 46\r\nContent-Length: 5\r\n\r\n" + b" " * 46,  # two lengths
                 post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",  # a chunk size not hex
                 b"GET /health HTTP/1.1\r\n\r\n"):  # HTTP/1.1 without Host
        status, head, body = _raw_exchange(live.port, data)
        assert status == 400 and b"content-type: application/json" in head and b"connection: close" in head, head
        assert body["error"]["code"] == "invalid_http_request" and body["error"]["message"].startswith("malformed")
    status, head, body = _raw_exchange(live.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX: "
                                                  + b"a" * 200_000 + b"\r\n\r\n")
    assert status == 431 and body["error"]["code"] == "invalid_http_request", (status, body)
    _healthy(live)


def test_a_head_past_16_kib_is_431_however_it_arrives(live):
    """A probe's: h11 refuses a head past its buffer only while the head is incomplete, so a 70 KB head
    sent in one write was served (200). The Guard measures the whole head: 431 in JSON, closed."""
    status, head, body = _raw_exchange(live.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: "
                                                  + b"a" * 70_000 + b"\r\n\r\n")
    assert status == 431 and b"connection: close" in head and body["error"]["code"] == "invalid_http_request"
    assert "more than 16 KiB" in body["error"]["message"]
    status, got, _ = _call(live.port, "GET", "/health", headers={"X-A": "a" * 8000})  # within the limit
    assert status == 200


def test_a_413_reaches_a_client_still_sending_its_body(live):
    """A probe's: a body declared past the cap is answered 413 at once with the connection closed;
    closed with the body's bytes unread, the connection was reset and urllib read the reset
    (ConnectionResetError), not the answer. Now the close lingers as h11's refusals do."""
    import urllib.error
    import urllib.request

    big = json.dumps({"prompt": "a" * (24 << 20)}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{live.port}/v1/completions", big,
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"
    _healthy(live)


def test_an_http2_preface_gets_one_answer_and_its_connection_closed(live):
    """h11 read an HTTP/2 connection preface's first line (PRI * HTTP/2.0) as a request and answered
    404, then its SM line 400: two answers. One 505 in OpenAI's JSON (a request of any HTTP version
    but 1.x gets it), then EOF; the server goes on."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # (an empty SETTINGS frame, as a client sends next)
    for data in (preface, preface + settings, b"GET /health HTTP/2.0\r\nHost: localhost\r\n\r\n"):
        status, head, body = _raw_exchange(live.port, data)  # (its json.loads fails on a second answer)
        assert status == 505 and b"connection: close" in head, head
        assert body["error"]["message"].startswith("HTTP/2.0 is not served here: this server speaks HTTP/1.1")
    _healthy(live)


def test_an_absolute_form_target_is_served_as_the_path_it_names(live):
    """RFC 9112 3.2.2: a server takes `GET http://host:port/health` (the form a proxy is sent); it was
    answered 404 naming the whole URL. The target's authority stands for Host, so a keyless server
    refuses a name it does not answer there as in Host."""
    get = b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    status, _, body = _raw_exchange(live.port, get % b"http://127.0.0.1:%d/health" % live.port)
    assert status == 200 and body["status"] == "ok", body
    status, _, body = _raw_exchange(live.port, get % b"HTTP://localhost/v1/models?x=1")
    assert status == 200 and body["data"][0]["id"] == "smollm", body
    status, _, body = _raw_exchange(live.port, get % b"http://rebound.example/health")
    assert status == 400 and body["error"]["code"] == "invalid_host", body
    _healthy(live)


def test_an_encoded_body_is_refused_not_read_as_plain_json(live):
    """Content-Encoding: gzip was ignored (a plain body under it was served, a gzipped one read as bad
    JSON): 415 naming the coding, the connection closed; identity is plain."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\nContent-Encoding: %s\r\n\r\n" + body)
    status, head, err = _raw_exchange(live.port, req % b"gzip")
    assert status == 415 and "Content-Encoding: gzip" in err["error"]["message"], err
    status, _, _ = _call(live.port, "POST", "/v1/completions", body, {"Content-Encoding": "identity"})
    assert status == 200
    _healthy(live)


def _post_head(port: int, length: int | None) -> socket.socket:
    """A connection that has sent a completion request's head (Content-Length, or chunked) and no body."""
    s = socket.create_connection(("127.0.0.1", port))
    size = b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked"
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + size
              + b"\r\n\r\n")
    return s


def _reply(s: socket.socket, timeout: float = 5) -> bytes:
    s.settimeout(timeout)
    got = b""
    try:
        while b"\r\n\r\n" not in got and (chunk := s.recv(4096)):
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return got


def test_bodies_across_connections_are_held_within_one_budget(live):
    """NOTE [ HTTP limits ]: 6 MiB of bodies at once, counted as they arrive. A 4 MB body in flight (its
    head sent, 3.8 MB of it so far) leaves room for neither a declared 3 MB body nor a chunked one past
    2.5 MB: each is answered 503 (the declared one at once, unread; the probe's 60 connections of 15 MB
    each took 850 MB); once the first client goes, a 3 MB body is served. Sixteen connections that
    each declared 3 MB and sent nothing hold none of it (a probe's: they held the whole budget and
    every other POST was refused)."""
    idle = [_post_head(live.port, 3_000_000) for _ in range(16)]
    try:
        time.sleep(0.5)
        body = b'{"prompt": "The sky is", "max_tokens": 2, "temperature": 0}' + b" " * 500_000
        status, got, _ = _call(live.port, "POST", "/v1/completions", body)
        assert status == 200, got
    finally:
        for s in idle:
            s.close()
    first = _post_head(live.port, 4_000_000)
    first.sendall(b" " * 3_800_000)
    try:
        time.sleep(0.5)
        second = _post_head(live.port, 3_000_000)
        assert _reply(second).startswith(b"HTTP/1.1 503"), "a declared body past the budget was not refused at once"
        second.close()
        third = _post_head(live.port, None)
        piece = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(40):  # 2.6 MB
                third.sendall(piece)
        assert _reply(third).startswith(b"HTTP/1.1 503")
        third.close()
    finally:
        first.close()
    deadline = time.monotonic() + 10
    while live.server.bodies.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.server.bodies.held == 0
    body = b'{"prompt": "The sky is", "max_tokens": 2, "temperature": 0}' + b" " * 3_000_000
    status, got, _ = _call(live.port, "POST", "/v1/completions", body)
    assert status == 200 and got["usage"]["completion_tokens"] == 2, got
    assert live.server.bodies.held == 0
    _healthy(live)


def test_half_sent_request_heads_time_out_and_connections_are_capped(live):
    """NOTE [ HTTP limits ]: 60 connections that never finish their request head; past the cap
    (40) they are answered 503 at once, the rest are closed after the head deadline (1 s)."""
    socks = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", live.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localh")
        socks.append(s)
    try:
        answers = []
        for s in socks:
            s.settimeout(15)
            got = b""
            try:
                while chunk := s.recv(4096):
                    got += chunk
            except ConnectionResetError:
                pass
            answers.append(got)
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(busy) >= 20 and all(a in (b"",) or a.startswith(b"HTTP/1.1 503") for a in answers)
    finally:
        for s in socks:
            s.close()
    _healthy(live)


def test_health_answers_while_a_huge_prompt_is_refused(live):
    """A 2.6 MB prompt: more bytes than 512 tokens can hold, refused untokenized; /health, asked
    over and over meanwhile, answers at once (issue 23: a 15 MB prompt held every client for 15 s
    while the event loop tokenized it)."""
    result = {}
    words = " ".join(f"word{i}" for i in range(250_000)).encode()
    post = threading.Thread(target=lambda: result.update(r=_call(live.port, "POST", "/v1/completions",
                                                                   b'{"prompt": "' + words + b'"}')))
    post.start()
    # the longest time between two answers: the tokenizer holds the GIL, so a prompt tokenized
    # on the loop stalls this thread too, and the gap shows it
    gaps, last = [], time.monotonic()
    while post.is_alive() or not gaps:
        status, _, _ = _call(live.port, "GET", "/health", timeout=60)
        assert status == 200
        gaps.append(time.monotonic() - last)
        last = time.monotonic()
        time.sleep(0.02)
    post.join(120)
    assert max(gaps) < 3, max(gaps)  # tokenizing it on the loop held /health for 10 s here
    status, got, _ = result["r"]
    assert status == 400 and got["error"]["code"] == "context_length_exceeded" and got["error"]["param"] == "prompt"


def test_a_chat_of_more_messages_than_the_context_holds_is_refused_before_its_render(live):
    """A hostile-user probe: 50,000 empty messages (1.6 MB, no content bytes to count) were rendered
    by the chat template for 2 to 3.4 s in the two-thread parse pool before their 400, and 30 such
    requests held a plain "hi" back for 27 s. A message takes a token at least: more messages than
    the context's tokens are refused before the render."""
    for n in (50_000, 512):
        status, got, _ = _call(live.port, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": ""}] * n, "max_tokens": 1})
        assert status == 400 and got["error"]["code"] == "context_length_exceeded", got
        assert got["error"]["param"] == "messages" and got["error"]["message"].startswith(f"{n} messages"), got
    status, got, _ = _call(live.port, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}] * 3, "max_tokens": 1})
    assert status == 200, got


def test_a_keyless_server_refuses_foreign_hosts_and_non_json_posts(live):
    status, got, _ = _call(live.port, "GET", "/v1/models", headers={"Host": "attacker.example:80"})
    assert status == 400 and got["error"]["code"] == "invalid_host"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:8080", "192.168.0.7"):
        assert _call(live.port, "GET", "/v1/models", headers={"Host": host})[0] == 200
    form = b'{"prompt": "x", "max_tokens": 2}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        c = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        c.putrequest("POST", "/v1/completions")
        if ctype:
            c.putheader("Content-Type", ctype)
        c.putheader("Content-Length", str(len(form)))
        c.endheaders(form)
        r = c.getresponse()
        assert r.status == 415 and json.loads(r.read())["error"]["code"] == "unsupported_media_type"
        c.close()


def test_every_route_answers_json_and_models_by_id(live):
    status, got, _ = _call(live.port, "GET", "/no/such/route")
    assert status == 404 and got["error"]["code"] == "not_found"
    status, got, headers = _call(live.port, "GET", "/v1/completions")
    assert status == 405 and got["error"]["code"] == "method_not_allowed" and "POST" in headers.get("allow", "")
    status, got, _ = _call(live.port, "GET", "/v1/models/smollm")
    assert status == 200 and got["id"] == "smollm" and got["object"] == "model"
    status, got, _ = _call(live.port, "GET", "/v1/models/gpt-4")
    assert status == 404 and got["error"]["code"] == "model_not_found"
    # a probe's: a trailing slash was redirected (307, no body, its Location from the client's Host)
    for method, path in (("GET", "/health/"), ("POST", "/v1/chat/completions/"), ("DELETE", "/metrics/")):
        status, got, headers = _call(live.port, method, path, {} if method == "POST" else None,
                                     headers={"Host": "evil.example"} if method == "GET" else None)
        assert status in (400, 404) and "location" not in headers and got["error"]["code"] in ("not_found", "invalid_host")
    status, got, _ = _call(live.port, "GET", "/health/")
    assert status == 404 and got["error"]["code"] == "not_found"


def test_an_access_line_a_request_at_info(live):
    _call(live.port, "POST", "/v1/completions", {"prompt": "One, two,", "max_tokens": 2, "temperature": 0,
                                                  "ignore_eos": True})
    lines = [r.getMessage() for r in live.records if r.name == "layerstream.server"]
    assert any(ln.startswith("POST /v1/completions 200 prompt=4 completion=2 ") and ln.endswith("s")
               for ln in lines), lines[-5:]


def test_a_stream_cut_by_its_client_logs_the_tokens_it_produced(live):
    """The access line of a stream the client closed counts the tokens sent before (was 0: only
    finished choices were counted)."""
    body = json.dumps({"prompt": "Count: 1, 2,", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    seen = len(live.records)
    s = socket.create_connection(("127.0.0.1", live.port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 6:
        got += s.recv(4096)
    s.close()
    deadline = time.monotonic() + 60

    def cut_lines():
        return [r.getMessage() for r in live.records[seen:] if r.name == "layerstream.server"
                and r.getMessage().startswith("POST /v1/completions 200 prompt=")]

    while not cut_lines() and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = cut_lines()
    assert int(line.split("completion=")[1].split()[0]) >= 6, line
    _healthy(live)


def test_an_upgrade_request_is_served_as_http_without_a_warning_in_the_log(live):
    """A probe's: every request with an Upgrade: websocket header logged uvicorn's two warnings, one
    telling to pip install a WebSocket library, so any client could fill the log."""
    seen = len(live.records)
    status, _, _ = _raw_exchange(live.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                                            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert status == 200
    assert not [r for r in live.records[seen:] if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in live.records[seen:]]


def test_sixteen_clients_with_long_prompts_are_served_or_refused(live):
    """2 rows, a queue of 6, 16 clients at once with prompts near and past the context (512): each
    is answered, or refused with 429 (queue) or 400 (too long); the server is healthy after."""
    prompts = [" ".join(["lorem ipsum dolor"] * (60 + 40 * (i % 4))) for i in range(16)]
    got: dict[int, tuple] = {}

    def ask(i):
        got[i] = _call(live.port, "POST", "/v1/completions", {"prompt": prompts[i], "max_tokens": 4,
                                                                "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    statuses = [got[i][0] for i in range(16)]
    assert set(statuses) <= {200, 400, 429} and 200 in statuses, statuses
    for i, (status, body, _) in got.items():
        if status == 400:
            assert body["error"]["code"] == "context_length_exceeded"
        if status == 429:
            assert body["error"]["type"] == "rate_limit_error"
    _healthy(live)


def test_the_worker_goes_on_after_a_failed_step_and_gives_up_after_three_in_a_row(tmp_path):
    """A failed step answers its own requests (finish_reason "error") and the next is served; three
    failed steps in a row (a device left unusable) fail the engine: 503 from then on."""
    import asyncio
    from types import SimpleNamespace

    import torch

    import ggufgen
    from layerstream.coordinator.core import EngineCore, RequestOutput
    from layerstream.coordinator.engine import LocalBackend
    from layerstream.coordinator.openai_api import ApiError
    from layerstream.coordinator.server import EngineWorker, Metrics
    from layerstream.coordinator.tokenizer import Tokenizer
    from layerstream.loader.gguf_index import open_model

    tok = Tokenizer.from_metadata(open_model(ggufgen.write_model(tmp_path / "m.gguf", n_vocab=256)).metadata)

    class Model:
        fail = 0  # steps left to fail
        max_seqs, device = 2, torch.device("cpu")

        def step(self, seqs, want, last_ids=None):
            if self.fail:
                self.fail -= 1
                raise RuntimeError("device fault")
            return torch.zeros(len(seqs), 256)

    model = Model()
    backend = LocalBackend(model, 256)
    core = EngineCore(backend, tok, 256, max_seqs=2, ctx=32, step_tokens=8)
    loop = asyncio.new_event_loop()
    failed = []
    w = EngineWorker(SimpleNamespace(core=core, backend=backend), loop, Metrics(), max_queue=8,
                     on_failure=lambda: failed.append(w.failure))
    w.start()

    async def answer(rid):
        q = w.submit(rid, [1, 2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while True:
            item = await asyncio.wait_for(q.get(), 30)
            if not isinstance(item, RequestOutput) or item.finished:
                return item

    try:
        model.fail = 1
        got = loop.run_until_complete(answer("a"))
        assert got.finish_reason == "error" and "device fault" in got.error and w.failure is None
        assert loop.run_until_complete(answer("b")).finish_reason == "length"
        model.fail = 3
        for rid in ("c", "d"):
            assert loop.run_until_complete(answer(rid)).finish_reason == "error"
        assert not failed
        assert loop.run_until_complete(answer("e")).status == 503 and "device fault" in w.failure
        loop.run_until_complete(asyncio.sleep(0.1))
        assert failed == [w.failure]  # the server is told once, to stop and exit non-zero
        with pytest.raises(ApiError) as e:
            w.submit("f", [1], SamplingParams())
        assert e.value.status == 503
    finally:
        w.stop()
        w.join(5)
        loop.close()


def test_a_port_in_use_is_one_line_before_the_model_loads_and_port_0_announces_its_port():
    """--port held by another listener: one line naming it, exit 1, and nothing served (the port is
    bound before the model loads, not by uvicorn after it); --port 0: the URL printed carries the
    port the system gave, and it answers."""
    import re
    import urllib.request

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = subprocess.run([str(LAUNCHER), "--serve", "--port", str(port), "--device", "cpu", "--ctx", "256"],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "", (p.returncode, p.stdout)
    assert p.stderr.count("\n") == 1 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr
    p = subprocess.Popen([str(LAUNCHER), "--serve", "--port", "0", "--single-process", "--device", "cpu", "--ctx", "256"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=_sigint_default)
    try:
        line = p.stdout.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1$", line.strip())
        assert m and int(m.group(1)) > 0, line
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/v1/models", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
                time.sleep(0.3)
    finally:
        assert stop(p) == 143


def test_more_choices_than_the_queue_holds_is_400_not_a_429_to_retry():
    """n above the rows and --max-queue could never be admitted: 400 naming n (a 429 asks the client
    to retry for ever); n within them is queued."""
    import asyncio
    from types import SimpleNamespace

    from layerstream.coordinator.openai_api import ApiError
    from layerstream.coordinator.server import EngineWorker, Metrics

    w = EngineWorker(SimpleNamespace(core=_TimedCore(pass_s=0.01)), asyncio.new_event_loop(), Metrics(), max_queue=3)
    with pytest.raises(ApiError) as e:
        w.submit([f"a{i}" for i in range(5)], [1], None)  # 1 row + 3 queued at most
    assert e.value.status == 400 and e.value.param == "n" and "--max-queue" in e.value.message
    w.submit([f"b{i}" for i in range(4)], [1], None)  # (not started: it waits in the queue)
    assert w.queued() == 3


# -- stopping, the queue's count, stalled bodies, long paths, characters cut at the end ----------------


def _sse_post(port: int, body: dict) -> http.client.HTTPResponse:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    return r


def _events(r: http.client.HTTPResponse, until: int | None = None) -> list[str]:
    """The `data:` payloads of a stream, read until it ends (or `until` of them)."""
    got = []
    while until is None or len(got) < until:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            got.append(line[6:].decode().strip())
    return got


@pytest.mark.default_threads
@pytest.mark.parametrize("how, mode", [("SIGTERM", "one process"), ("double Ctrl-C", "one process"),
                                       ("double Ctrl-C", "pipeline"), ("SIGTERM to the group", "pipeline")])
def test_stopping_ends_requests_in_flight_with_abort_and_done(how, mode):
    """NOTE [ server shutdown ]: a stream of 4000 tokens and a plain request of 4000 in flight. SIGTERM:
    one line on stderr (how many, how long), then after the grace each gets its end: the stream a last
    chunk with finish_reason "abort" and `data: [DONE]`, the plain request 200 with its text so far and
    "abort"; exit 143, no traceback, no "engine failed". A second Ctrl-C ends them at once, exit 130.
    (The probe: 31 s of silence, a traceback, the stream cut without [DONE], curl exit 18; with the
    pipeline, a second Ctrl-C printed five tracebacks and "engine failed: ZMQError".) A SIGTERM to the
    whole group (systemd's stop) gives the same grace: it killed the children at once, and the streams
    ended within a second, after lines of a reader's death and restart and "engine failed"."""
    p, url = _start(*(["--single-process"] if mode == "one process" else []), "--batch", "2", "--ctx", "4096")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    long = {"prompt": "Tell a story", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    try:
        plain: dict = {}
        t = threading.Thread(target=lambda: plain.update(r=_call(port, "POST", "/v1/completions", long)))
        t.start()
        stream = _sse_post(port, long | {"stream": True})
        first = _events(stream, 3)
        assert len(first) == 3 and all(json.loads(e)["choices"][0]["finish_reason"] is None for e in first)
        sig = signal.SIGINT if how == "double Ctrl-C" else signal.SIGTERM
        t0 = time.monotonic()
        if how == "SIGTERM to the group":
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        if how == "double Ctrl-C":
            time.sleep(1)
            p.send_signal(signal.SIGINT)
        rest = _events(stream)
        took = time.monotonic() - t0
        t.join(60)
        code = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rest[-1] == "[DONE]", rest[-3:]
    last = json.loads(rest[-2])
    assert last["choices"][0]["finish_reason"] == "abort" and len(first + rest) > 5
    status, body, _ = plain["r"]
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort", body
    assert body["choices"][0]["text"] and 0 < body["usage"]["completion_tokens"] < 4000
    err = p.stderr.read()
    assert code == (130 if how == "double Ctrl-C" else 143), err
    assert (took < 4) if how == "double Ctrl-C" else (took > 4), took  # (the grace: 5 s)
    for bad in ("Traceback", "engine failed", "ERROR", "Exception"):
        assert bad not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    stopping = [ln for ln in lines if "stopping" in ln]
    assert stopping == ["layerstream: stopping: 2 requests in flight, given at most 5 s to finish; "
                        + ("Ctrl-C again" if how == "double Ctrl-C" else "a second signal") + " ends them now"], err
    assert len(lines) == 2 and lines[-1] in ("run-pipeline: terminated", "run-pipeline: interrupted"), err


def test_a_signals_copy_is_not_a_second_signal():
    """A probe's: `timeout 600 run-pipeline --serve` stopped by Ctrl-C or `kill -- -PGID` got the
    signal twice, the group's and the one `timeout` passes on, and took the copy for a second signal:
    the requests in flight were cut at once, with no grace. The same signal again within ECHO_S is the
    first one's copy; another signal, or the same one later, is a second."""
    import uvicorn

    from layerstream.coordinator.server_stop import ECHO_S, GracefulServer

    def server():
        return GracefulServer(uvicorn.Config(app=None), end_requests=lambda: None)

    http = server()
    http.handle_exit(signal.SIGTERM, None)
    http.handle_exit(signal.SIGTERM, None)  # (the copy)
    assert http.should_exit and not http.force_exit and http._captured_signals == [signal.SIGTERM]
    time.sleep(ECHO_S * 1.5)
    http.handle_exit(signal.SIGTERM, None)
    assert http.force_exit
    http = server()
    http.handle_exit(signal.SIGINT, None)
    http.handle_exit(signal.SIGTERM, None)  # (another signal: a second, however soon)
    assert http.force_exit and http._captured_signals == [signal.SIGINT]


def test_max_queue_counts_the_requests_beyond_the_running_batch():
    """2 rows and --max-queue 1: four requests at once are 2 running, 1 queued, and the fourth a
    429 (the probe: the second one was refused, though a row was free for it), said in good grammar."""
    import asyncio
    from types import SimpleNamespace

    from layerstream.coordinator.openai_api import ApiError
    from layerstream.coordinator.server import EngineWorker, Metrics

    core = _TimedCore(pass_s=0.01)
    core.max_seqs = 2  # rows
    w = EngineWorker(SimpleNamespace(core=core), asyncio.new_event_loop(), Metrics(), max_queue=1)
    for i in range(3):  # (not started: all still waiting in the command queue, as a burst's are)
        w.submit(f"a{i}", [1], None)
    assert w.queued() == 1
    with pytest.raises(ApiError) as e:
        w.submit("a3", [1], None)
    assert e.value.status == 429
    assert e.value.message.startswith("1 request is waiting beyond the 2 this server runs at once, and it "
                                      "queues at most 1 (--max-queue)"), e.value.message
    with pytest.raises(ApiError) as e:  # n choices: at most rows + queue, else never admitted
        w.submit([f"b{i}" for i in range(4)], [1], None)
    assert e.value.status == 400 and e.value.param == "n" and "at most 3" in e.value.message


def test_a_stalled_body_is_answered_408_and_its_connection_closed(live):
    """Content-Length 1000 and 5 bytes, then nothing: after the stall limit (1 s here, 30 s by default)
    408 and the connection closed (the probe: 300 such connections all held for more than 60 s)."""
    s = _post_head(live.port, 1000)
    try:
        s.sendall(b'{"pro')
        t0 = time.monotonic()
        reply = _reply(s, timeout=8)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - t0 < 8
        s.settimeout(5)
        rest = b""
        while chunk := s.recv(4096):
            rest += chunk
        assert b"request_timeout" in reply + rest  # the body's code, then the end of the connection
    finally:
        s.close()
    assert live.server.bodies.held == 0
    _healthy(live)


def test_a_404_quotes_a_bounded_part_of_a_long_path(live):
    status, got, _ = _call(live.port, "GET", "/" + "a" * 15_000)  # (a head past 16 KiB is a 431)
    assert status == 404 and got["error"]["code"] == "not_found"
    assert len(got["error"]["message"]) < 400 and "(14901 more characters)" in got["error"]["message"]
    deadline = time.monotonic() + 5
    while not (logged := [r.getMessage() for r in live.records
                          if r.name == "layerstream.server" and " 404 " in r.getMessage()]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)  # (the access line is written once the answer is sent)
    assert logged and len(logged[-1]) < 400, "the access line quotes a bounded part of the path too"


def _cut_at_a_character(raw: bytes) -> str:
    """The text of whole UTF-8 characters at the start of raw (at most 3 bytes dropped)."""
    for cut in range(len(raw), len(raw) - 4, -1):
        try:
            return raw[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("not UTF-8")


def test_a_text_cut_mid_character_drops_the_tail_in_the_server_and_the_cli(live, smollm_engine):
    """The probe's emojis, 20 greedy tokens: the last token ends mid-character. The text, streamed
    or not, and the CLI's (turn.Turn, the same core) is the whole characters of the tokens' bytes,
    with no U+FFFD at the end (llama-server's rule)."""
    from layerstream.coordinator.turn import Turn

    prompt = "Here are some emojis: 😀🎉🔥"
    params = SamplingParams(temperature=0, max_tokens=20)
    core, tok = smollm_engine.core, smollm_engine.tokenizer
    core.add_request("emoji", tok.encode(prompt), params)
    ids = [t for o in core.run_to_completion() for t in o.token_ids]
    assert len(ids) == 20 and tok.decode(ids).endswith("\ufffd"), "the case must end mid-character"
    want = _cut_at_a_character(b"".join(tok.token_bytes(i) for i in ids))
    assert want and "\ufffd" not in want
    body = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
    status, got, _ = _call(live.port, "POST", "/v1/completions", body)
    assert status == 200 and got["choices"][0]["text"] == want, got
    events = _events(_sse_post(live.port, body | {"stream": True}))
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want
    assert "".join(Turn(smollm_engine, tok.encode(prompt), params).pieces()) == want


@contextlib.contextmanager
def _stopping_server(grace: float):
    """A GracefulServer over a stand-in engine in a thread, bodies given 30 s between pieces and 60 s in
    all; yields (Server, GracefulServer, thread, port) and stops it at the end, whatever happened."""
    import io
    from types import SimpleNamespace

    from layerstream.coordinator.http_guard import Limits
    from layerstream.coordinator.server import Server, uvicorn_config
    from layerstream.coordinator.server_stop import GracefulServer

    engine = SimpleNamespace(core=_TimedCore(pass_s=0.01), cfg=SimpleNamespace(ctx=64), hparams=SimpleNamespace(n_vocab=4),
                             tokenizer=SimpleNamespace(longest_piece=1), chat_template=None)
    server = Server(engine, "m", None, limits=Limits(body_stall_s=30, body_timeout_s=60))
    port = _free_port()
    http = GracefulServer(uvicorn_config(server, "127.0.0.1", port, grace_s=grace), server.end_requests, grace,
                          err=io.StringIO())
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: http.started, "the server to start")
        yield server, http, thread, port
    finally:
        http.force_exit = http.should_exit = True
        thread.join(10)


def _wait_for(done, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.02)


def _whole_reply(s: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    s.settimeout(timeout)
    got = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while chunk := s.recv(4096):
            got += chunk
    return got


def test_a_stalled_upload_does_not_hold_the_stop_past_its_grace():
    """Probe of issue 25: a client that sent a request's head and half its body, then waited, held a
    SIGTERM's stop for 3 s past the 5 s grace (the wait given to the engine's aborts). Now the body is
    answered 503 'the server is stopping' when the grace runs out (1 s here), and the server stops then."""
    from layerstream.coordinator.server_stop import ABORT_WAIT_S

    grace = 1.0
    with _stopping_server(grace) as (server, http, thread, port):
        s = _post_head(port, 1000)
        try:
            s.sendall(b'{"prompt": "hel')
            _wait_for(lambda: server.body_reads, "its handler to read the body")
            t0 = time.monotonic()
            http.handle_exit(signal.SIGTERM, None)
            thread.join(30)
            took = time.monotonic() - t0
            reply = _whole_reply(s)
        finally:
            s.close()
    # (the stop waited for the aborts, ABORT_WAIT_S, after the grace: at least grace + ABORT_WAIT_S)
    assert not thread.is_alive() and took < grace + ABORT_WAIT_S, took
    assert reply.startswith(b"HTTP/1.1 503") and b"connection: close" in reply.lower(), reply
    assert b"send the request again once it is back" in reply, reply
    assert server.bodies.held == 0 and not server.body_reads


def test_a_body_whose_reading_starts_after_the_requests_were_ended_is_answered_503_at_once():
    """A handler that reached its body only after end_requests ran (the grace out) was not among the
    reads it ends: it waited for the body's stall limit (30 s here), then the stop dropped it."""
    with _stopping_server(grace=1.0) as (server, http, thread, port):
        server.end_requests()  # (no body being read yet: nothing to cancel on the server's loop)
        s = _post_head(port, 1000)
        try:
            s.sendall(b'{"prompt": "hel')
            reply = _whole_reply(s, timeout=10)
        finally:
            s.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"connection: close" in reply.lower(), reply
        head, _, body = reply.partition(b"\r\n\r\n")
        error = json.loads(body)["error"]
        assert error["code"] == "server_stopping", error
        assert error["message"] == ("the server is stopping; send the request again once it is back "
                                    "(or to another server)"), error
        assert server.bodies.held == 0 and not server.body_reads


def test_a_server_whose_compute_process_hangs_stops_within_seconds():
    """SIGTERM with the compute process stopped (SIGSTOP) mid-stream (a hostile-user probe): the
    stop waited for the engine's thread, stuck in its call until the watchdog's --stall-timeout
    (37 s at its default). Now it stops the pipeline's processes after server.STUCK_S, and nothing
    is left; the stream, cut before, ends as an aborted one does (its last chunk "abort", then [DONE]),
    answered by the server where the engine does not answer (server_stop.ABORT_WAIT_S)."""
    before = segments()
    p, url = _start("--ctx", "256", "--resident-layers", "0")
    try:
        with _long_stream(url) as r:
            r.readline()  # the stream started
            compute = [pid for name, pid in _children(p).items() if name == "layerstream-com"]
            assert len(compute) == 1, compute
            os.kill(compute[0], signal.SIGSTOP)
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            body = r.read().decode()
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "abort"' in body.replace('":"', '": "')
        assert p.wait(timeout=25) == 143
        assert time.monotonic() - t0 < 20
        assert not leaked(before, run=p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_hung_pipeline_found_during_the_stop_ends_the_streams_as_aborted():
    """A hostile-user probe: SIGTERM with the compute process stopped (SIGSTOP) mid-stream, and a
    --stall-timeout short enough for the watchdog's verdict to come within the stop's grace: the
    stream got an error event (the engine failed), where every other stream the stop ends gets its
    last chunk "abort" and [DONE] (Cut). It ends as they do now; the server exits 143, the first
    signal's status, and says the watchdog's verdict once, and nothing is left."""
    before = segments()
    p, url = _start("--ctx", "256", "--resident-layers", "0", "--stall-timeout", "2")
    try:
        with _long_stream(url) as r:
            r.readline()  # the stream started
            os.kill(_children(p)["layerstream-com"], signal.SIGSTOP)
            p.send_signal(signal.SIGTERM)
            body = r.read().decode()
        assert '"error"' not in body, body[-500:]
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "abort"' in body.replace('":"', '": "')
        assert p.wait(timeout=30) == 143
        err = p.stderr.read()
        assert "Traceback" not in err
        said = [line for line in err.splitlines() if "the compute process sent nothing for 2 s" in line]
        assert len(said) == 1 and "engine failed: " in said[0], err
        assert err.rstrip().endswith("run-pipeline: terminated"), err
        assert not leaked(before, run=p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.default_threads
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_a_server_whose_engine_hangs_at_once(sig):
    """A hostile-user probe: a second SIGTERM (or Ctrl-C) while the stop's grace waits on a stream whose
    compute process is stopped still waited for the engine's aborts (ABORT_WAIT_S), then for its
    thread (STUCK_S): 8 s and more. A second signal ends the requests at once now, the stream with its
    "abort" chunk and [DONE], and the server exits within seconds, 128 + the first signal."""
    before = segments()
    p, url = _start("--ctx", "256", "--resident-layers", "0")
    try:
        with _long_stream(url) as r:
            r.readline()  # the stream started
            compute = _children(p)["layerstream-com"]
            os.kill(compute, signal.SIGSTOP)
            p.send_signal(sig)
            time.sleep(1)
            t0 = time.monotonic()
            p.send_signal(sig)
            body = r.read().decode()
            code = p.wait(timeout=30)
            took = time.monotonic() - t0
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "abort"' in body.replace('":"', '": "')
        assert code == 128 + sig and took < 3, (code, took)
        assert "Traceback" not in p.stderr.read()
        assert not leaked(before, run=p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("costly", ["bytes", "brackets"])
def test_large_bodies_parse_apart_so_small_requests_never_wait_behind_them(live, monkeypatch, costly):
    """A probe's: two 16 MiB bodies of junk JSON, seconds of parsing each, held both threads of the parse
    pool, and a 2-token chat took 7.7 s. Bodies of LARGE_BODY bytes or more, or of HEAVY_CONTAINERS '['
    and '{' (a later probe's bodies of many arrays, under a megabyte), now parse one at a time in a
    thread of their own: here two such are held in their parse while a small one is served."""
    from layerstream.coordinator.openai_api import HEAVY_CONTAINERS
    from layerstream.coordinator.server import LARGE_BODY

    release, entered = threading.Event(), []
    prepare = live.server._prepare
    if costly == "bytes":
        body = b'{"prompt": "The sky is", "max_tokens": 1, "temperature": 0}' + b" " * (LARGE_BODY + 1000)
    else:
        stops = ["[" * 256] * (HEAVY_CONTAINERS // 256)  # (as many as a request may: no prompt past the context)
        body = json.dumps({"prompt": "The sky is", "max_tokens": 1, "temperature": 0, "stop": stops}).encode()

    def held(raw, kind, *rest):
        if raw == body:
            entered.append(len(raw))
            release.wait(30)
        return prepare(raw, kind, *rest)

    monkeypatch.setattr(live.server, "_prepare", held)
    answers = []
    large = [threading.Thread(target=lambda: answers.append(_call(live.port, "POST", "/v1/completions", body)[0]))
             for _ in range(2)]
    for t in large:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while not entered and time.monotonic() < deadline:
            time.sleep(0.02)
        assert entered, "no large body reached its parse"
        time.sleep(0.3)  # (the second large body's turn: in the large bodies' thread, behind the first)
        status, got, _ = _call(live.port, "POST", "/v1/completions",
                               {"prompt": "The sky is", "max_tokens": 2, "temperature": 0}, timeout=5)
        assert status == 200, got
    finally:
        release.set()
        for t in large:
            t.join(60)
    assert answers == [200, 200]


def test_a_mixture_of_experts_served_over_the_pipeline_answers_as_the_engine(tmp_path):
    """Issue 27's MoE shape through the server: a tiny qwen3moe, no layer resident and an expert
    cache of a few experts (so decode steps copy the chosen experts and evict), four clients at
    once (as test_pipeline's test_decode_fetches_only_chosen_experts plans it); each greedy answer is
    the single-process engine's, and the run's --stats counted expert steps."""
    import ggufgen
    from layerstream.coordinator.engine import Engine

    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe", qtype="Q8_0", n_layer=3, n_expert=16,
                               n_expert_used=2, seed=4)
    prompts = [[5, 17, 33, 80], [9, 3], [100, 101, 7], [42]]
    with Engine.load(str(path), device="cpu", dtype="float32", ctx=512, max_seqs=4) as e:
        want = [e.generate_batch([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0] for p in prompts]
    p, url = _start("-m", str(path), "--batch", "4", "--resident-layers", "0", "--expert-cache-gb", "0.0002", "--stats")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        got: dict[int, str] = {}

        def ask(i):
            r = client.completions.create(model=model, prompt=prompts[i], max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
            got[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(i) for i in range(4)] == want
    finally:
        assert stop(p) == 143
    err = p.stderr.read()
    assert "Traceback" not in err, err
    m = re.search(r"experts: \d+ of (\d+) fetched experts .* over (\d+) steps with expert streaming", err)
    assert m and int(m[1]) > 0 and int(m[2]) >= 4, err[-2000:]  # (the decode steps copied chosen experts)
