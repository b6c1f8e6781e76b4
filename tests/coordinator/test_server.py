"""The OpenAI-compatible server, live on 127.0.0.1, through the official `openai` client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from procs import leaked, segments

openai = pytest.importorskip("openai")
from layerstream.compute.sampling import SamplingParams  # noqa: E402

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"
KEY = "test-key"
pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    p = subprocess.Popen([str(LAUNCHER), "--serve", "--port", str(port), "--device", "cpu", "--dtype", "float32",
                          "--ctx", "512", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"the server exited: {p.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return p, url
        except OSError:
            time.sleep(0.3)
    p.kill()
    raise AssertionError("the server did not start in 120 s")


def _stop(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server():
    p, url = _start("--single-process", "--batch", "8", "--api-key", KEY)
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    yield client, client.models.list().data[0].id
    assert _stop(p) == 143  # graceful: in-flight requests finish, then 128 + SIGTERM as the CLI


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


def test_the_next_chat_turn_reuses_the_conversations_kv(server, smollm_engine):
    """Turn two's prompt starts with turn one's, whose KV the freed row still holds: only the rest
    is prefilled (the metrics count the reused tokens), and the answer is the engine's."""
    import urllib.request

    client, model = server

    def reused() -> float:
        req = urllib.request.Request(str(client.base_url).replace("/v1/", "/metrics"))
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
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as m:
        metrics = m.read().decode()
    assert "layerstream_generated_tokens_total" in metrics and "layerstream_pass_seconds_bucket" in metrics


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

        # long enough that the first is still running when the third comes (0.6 s later): 100
        # tokens take about 5 s on a 2-core CPU
        long = dict(model=model, prompt="Count: 1, 2,", max_tokens=100, temperature=0, extra_body={"ignore_eos": True})
        results = []
        threads = [threading.Thread(target=lambda: results.append(_try(client, long))) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join(120)
        assert "429" in results, results  # one running, one waiting, the third refused
    finally:
        _stop(p)


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
    assert _stop(p) == 143

    def alive() -> list[str]:  # not counting zombies the init process has yet to reap
        ps = subprocess.run(["ps", "-s", str(p.pid), "-o", "pid=,stat="], capture_output=True, text=True).stdout
        return [line.split()[0] for line in ps.splitlines() if line.split() and "Z" not in line.split()[1]]

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), f"processes left: {alive()}"
    assert not leaked(before)
    assert "Traceback" not in p.stderr.read()


def test_failed_pipeline_answers_503_and_health_says_why():
    p, url = _start("--resident-layers", "0")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        spawned = subprocess.run(["pgrep", "-s", str(p.pid), "-f", "spawn_main"], capture_output=True,
                                 text=True).stdout.split()
        assert spawned
        for pid in spawned:  # staging, reader and compute: the pipeline cannot go on
            os.kill(int(pid), signal.SIGKILL)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=model, prompt="Hi", max_tokens=3)
        assert e.value.status_code == 503 and "died" in e.value.body["message"]
        import json
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as h:
            urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30)
        assert h.value.code == 503 and "died" in json.loads(h.value.read())["error"]
    finally:
        _stop(p)


class _TimedCore:
    """A stand-in engine core: each step takes `pass_s` and finishes every request it holds,
    noting which requests shared it."""

    def __init__(self, pass_s: float):
        self.pass_s, self.held, self.passes = pass_s, [], []
        self.waiting, self.running, self.reused_tokens = [], [], 0

    def add_request(self, rid, prompt, params):
        self.held.append(rid)

    def abort(self, rid):
        pass

    def has_unfinished(self):
        return bool(self.held)

    def step(self):
        from layerstream.coordinator.core import RequestOutput

        self.passes.append(self.held)
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
