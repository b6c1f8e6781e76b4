"""A step that fails in the compute process fails its own requests; the run goes on (NOTE [ a failed
step ] in compute_proc.py). Faults are injected by tests/faults.py into the spawned children."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import faults
import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline import StepError
from layerstream.coordinator.pipeline_config import Budget, ExpertOptions, PipelineConfig, ProcessOptions
from layerstream.loader.gguf_index import open_model
from procs import ends_with_the_test, serving, stop

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_leftovers")]

GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPTS = [[5, 17, 33, 80, 81, 90, 100], [200, 3, 9]]
POISON = 7
BAD = [POISON, POISON, 40, 41, 42]
# layers 0 and 1 resident, 2 and 3 streamed, read from disk at every pass into one slot ahead: the
# staging path at a small budget; a stall ends the test in seconds, not at its timeout
PCFG = PipelineConfig(budget=Budget(resident_layers=2, host_cache_gb=0, prefetch=1), procs=ProcessOptions(stall_timeout_s=20))
LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def _engine(path, pcfg=None):
    return Engine.open(EngineConfig(device="cpu", ctx=64, max_seqs=2), pcfg, index=open_model(path))


@pytest.fixture(scope="module")
def reference(model):
    """Each prompt's greedy text alone, then both in one batch, in one process."""
    with _engine(model) as e:
        return ["".join(e.generate(list(p), GREEDY)) for p in PROMPTS] + [e.generate_batch(PROMPTS, GREEDY)]


def _texts(e) -> list:
    return ["".join(e.generate(list(p), GREEDY)) for p in PROMPTS] + [e.generate_batch(PROMPTS, GREEDY)]


def _compute_count(e, name: str) -> int:
    snap = next(s for s in e.backend.collect_stats() if s.get("role") == "compute")
    return snap["count"].get(name, 0)


@pytest.mark.parametrize("layer, when", [(3, "before"), (2, "after"), (1, "before")],
                         ids=["streamed-layer-not-yet-taken", "streamed-layer-in-use", "resident-layer"])
def test_a_failed_step_and_the_one_behind_it_fail_their_requests_and_the_next_get_the_reference_text(
        model, reference, tmp_path, monkeypatch, layer, when):
    """A decoding request with a step in flight, then a prompt whose chunk raises at `layer`: both
    requests end with the error (the step behind the failed one fails too, without running), the
    pipeline stays open, every staging slot is back, and the next requests give the one-process
    text."""
    faults.install(tmp_path, monkeypatch, POISON, layer, when)
    with _engine(model, PCFG) as e:
        core = e.core
        core.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        outs = core.step() + core.step()
        assert len(core.inflight) == 1 and core.running  # "a" decodes, a step in flight
        core.add_request("b", BAD, GREEDY)
        with pytest.raises(StepError, match=r"^step \d+ failed in the compute process: OutOfMemoryError: CUDA out "
                                            rf"of memory \(injected at layer {layer} of step \d+\)$"):
            for _ in range(10):
                outs += core.step()
        ended = {o.request_id: o for o in core.step() if o.finished}
        assert set(ended) == {"a", "b"} and {o.finish_reason for o in ended.values()} == {"error"}
        assert "injected" in ended["b"].error and not core.running and sorted(core.free_rows) == [0, 1]
        assert not e.backend.closed
        assert _texts(e) == reference
        assert _compute_count(e, "steps_failed") == 2  # the failed step and the one sent behind it
        assert not e.backend.core.sched.lent  # every announced slot came back


def test_a_first_step_that_fails_before_any_layer_still_loads_the_resident_ones(model, reference, tmp_path,
                                                                               monkeypatch):
    """The coordinator announces a resident layer once, in the first step: a first step that fails
    at layer 0 loads them anyway while it gives its slots back (else the next step waits for them
    until the watchdog ends the run). Through the Python API: the exception, then the text."""
    faults.install(tmp_path, monkeypatch, POISON, 0)
    with _engine(model, PCFG) as e:
        with pytest.raises(StepError, match=r"injected at layer 0 of step 1\)$"):
            e.generate_batch([BAD], GREEDY)
        assert _texts(e) == reference
        assert _compute_count(e, "steps_failed") == 2  # (its first decode step was sent behind it)


def test_an_expert_step_that_fails_with_a_layer_in_use_gives_its_slot_back_and_starts_a_fresh_cache(
        tmp_path, monkeypatch):
    """A MoE decode-sized step (its chosen experts only, the dense parts kept) that raises with a
    layer's staging slot held for its experts: the slot goes back, the expert cache starts empty
    (an entry may name a copy never issued), and the next requests give the one-process text."""
    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe", n_layer=3, n_expert=16, n_expert_used=2,
                               seed=4)
    prompts = [[5, 17, 33, 80], [9, 3]]
    with Engine.open(EngineConfig(device="cpu", dtype="float32", ctx=64, max_seqs=2), index=open_model(path)) as e:
        want = e.generate_batch(prompts, GREEDY)
    faults.install(tmp_path, monkeypatch, POISON, 1, "after")
    pcfg = PipelineConfig(budget=Budget(resident_layers=0), procs=ProcessOptions(stall_timeout_s=20), experts=ExpertOptions(1.0, "resident"))
    with Engine.open(EngineConfig(device="cpu", dtype="float32", ctx=64, max_seqs=2), pcfg,
                     index=open_model(path)) as e:
        assert e.generate_batch(prompts, GREEDY) == want  # (the cache filled)
        with pytest.raises(StepError, match=r"injected at layer 1 of step \d+\)$"):
            e.generate_batch([[9, 3], [POISON, POISON]], GREEDY)  # 4 tokens: an expert step
        assert e.generate_batch(prompts, GREEDY) == want
        assert not e.backend.core.sched.lent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_pipeline_server_answers_a_failed_step_500_and_serves_the_next_request(model, tmp_path, monkeypatch):
    """The server in its default (pipeline) mode: the request whose step raises in the compute
    process is answered 500 with the reason, the next request gets the one-process text, and
    the server stops as usual (SIGTERM: 143, no traceback)."""
    with _engine(model) as e:
        want = "".join(e.generate(PROMPTS[0], GREEDY))
    faults.install(tmp_path, monkeypatch, POISON, 3)
    port = _free_port()
    p = subprocess.Popen([str(LAUNCHER), "--serve", "--port", str(port), "--model", model, "--device", "cpu",
                          "--ctx", "64", "--batch", "2", "--resident-layers", "2", "--host-cache-gb", "0",
                          "--prefetch", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=ends_with_the_test)
    with serving(p, port):
        status, got = _post(port, {"prompt": BAD, "max_tokens": 4, "temperature": 0})
        assert status == 500 and got["error"]["type"] == "server_error", got
        assert "failed in the compute process: OutOfMemoryError" in got["error"]["message"], got
        status, got = _post(port, {"prompt": PROMPTS[0], "max_tokens": GREEDY.max_tokens, "temperature": 0})
        assert status == 200 and got["choices"][0]["text"] == want, got
        assert stop(p, timeout=60) == 143
        assert "Traceback" not in p.stderr.read()


def test_close_on_another_thread_fails_the_call_in_flight_with_one_line(model):
    """An API user's close() while another thread generates (a hostile-user probe): the sockets were
    closed under the waiting call, which raised a raw ZMQError ("Socket operation on non-socket").
    Now the call ends with one line saying the engine was closed, and nothing is left."""
    import threading
    import time

    from layerstream.errors import LayerstreamError

    e = Engine.open(EngineConfig(device="cpu", ctx=64, max_seqs=2, on_context_full="slide"), PCFG,
                    index=open_model(model))
    got, pieces = [], []

    def generate():
        try:
            for piece in e.generate("hello", SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)):
                pieces.append(piece)
        except BaseException as err:  # noqa: BLE001 - the test asserts what it was
            got.append(err)
    t = threading.Thread(target=generate)
    t.start()
    deadline = time.monotonic() + 60
    while len(pieces) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pieces) >= 5, "no tokens before the close"
    e.close()
    t.join(30)
    assert not t.is_alive()
    # (a close seen between two steps is the engine's LayerstreamError, one that lands in a step's wait
    # the pipeline's PipelineError: each says the engine was closed)
    assert len(got) == 1 and isinstance(got[0], LayerstreamError), got
    assert "closed" in str(got[0]) and "\n" not in str(got[0])
    assert e.backend.links is None and e.backend.loop.is_closed()
