"""The engine core keeps the device's queue full: step n + 1 is launched before step n's ids are
read (NOTE [ one step behind ] in core.py), on a virtual device on the CPU, and on CUDA no launch
waits for the device."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.core import EngineCore
from layerstream.coordinator.engine import Engine, EngineConfig, LocalBackend
from layerstream.coordinator.tokenizer import Tokenizer
from layerstream.loader.gguf_index import open_model
from virtual_device import VirtualClock, VirtualDevice

V = 256


class FakeModel:
    """Logits that depend on a sequence's last token and position, the end of sequence far ahead
    at position 10; a -1 is its row's last sampled id."""

    device = torch.device("cpu")
    max_seqs = 4

    def __init__(self, eos: int):
        self.eos = eos

    def step(self, seqs, want, last_ids=None):
        if want == "none":
            return None
        rows = []
        for s in seqs:
            tok = int(last_ids[s.row]) if s.tokens[-1] < 0 else s.tokens[-1]
            rows.append(torch.randn(V, generator=torch.Generator().manual_seed(tok * 7919 + s.positions[-1])) * 3)
            rows[-1][self.eos] += 1e4 * (s.positions[-1] == 10)
        return torch.stack(rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = ggufgen.write_model(tmp_path_factory.mktemp("overlap") / "m.gguf", n_vocab=V)
    return Tokenizer.from_metadata(open_model(path).metadata)


REQUESTS = {  # greedy, seeded with every filter and the penalty, a stop string, the end of sequence
    "greedy": ([1, 2, 3], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
    "filters": ([7, 8, 9], SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=3,
                                          repeat_penalty=1.3, max_tokens=12, ignore_eos=True)),
    "eos": ([13, 14], SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, max_tokens=30)),
}


def run_logged(tokenizer, lookahead: bool, host_s: float = 1.0, device_s: float = 3.0):
    """The requests through a core on a virtual device: the device's log, with ("text", n) where
    the core took step n's ids (detokenizing, stop checks), and the virtual time it took."""
    clock = VirtualClock()
    dev = VirtualDevice(LocalBackend(FakeModel(next(iter(tokenizer.eos_ids))), V), clock, host_s, device_s)
    c = EngineCore(dev, tokenizer, V, max_seqs=4, ctx=64, step_tokens=8, lookahead=lookahead)
    accept = c._accept

    def logged(r, tok):
        dev.log.append(("text", dev.log[-1][1]))  # (the read just before: the step whose ids these are)
        return accept(r, tok)

    c._accept = logged
    for name, (prompt, params) in REQUESTS.items():
        c.add_request(name, prompt, params)
    outs = []
    while c.has_unfinished():
        outs += c.step()
    return dev.log, clock.now, outs


def test_each_step_is_launched_before_the_last_steps_ids_are_read(tokenizer):
    """Every step's ids are read (and detokenized) only once the next step is on the device's
    queue, but for the last step, after which no request goes on: the device never waits for the
    host's reading of ids. So the run takes the device's time (3 s a step) and the host's 1 s a
    step hides behind it; stepping in turn takes both."""
    log, took, outs = run_logged(tokenizer, lookahead=True)
    at = {e: i for i, e in enumerate(log)}
    reads = [n for kind, n in log if kind == "read"]
    late = [n for n in reads if ("launch", n + 1) in at and at["launch", n + 1] > at["read", n]]
    assert late == [] and [n for n in reads if ("launch", n + 1) not in at] == [reads[-1]]
    assert all(at["launch", n + 1] < i for i, (kind, n) in enumerate(log) if kind == "text" and n != reads[-1])
    assert took == 1 + 3 * len(reads)  # the first launch's host second, then the device's steps back to back
    log_t, took_t, outs_t = run_logged(tokenizer, lookahead=False)
    assert took_t == 4 * len([e for e in log_t if e[0] == "read"])
    key = lambda o: (o.request_id, o.text, o.token_ids, o.finish_reason)  # noqa: E731
    assert sorted(map(key, outs)) == sorted(map(key, outs_t))  # the same tokens and ends either way
    assert {o.request_id: o.finish_reason for o in outs if o.finished} == {"greedy": "length", "filters": "length",
                                                                          "eos": "eos"}


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("names", [["greedy"], list(REQUESTS)])  # one argmax for all; each row's own sampler
def test_on_cuda_a_core_step_returns_while_the_device_still_runs_the_work_queued_before(tmp_path, names):
    """On CUDA the device is kept busy (a sleep kernel of about a second) before each decode step
    is launched; the core's whole step (launch n + 1, read n's ids, detokenize) returns before
    that sleep ends: nothing in it waits for the device (an .item(), a .cpu(), a sync, a copy to
    pageable memory) but n's ids, queued before the sleep. Stepping in turn waits, as a check that
    the probe sees a wait."""
    path = ggufgen.write_model(str(tmp_path / "m.gguf"), arch="llama", n_layer=4, n_embd=256, n_ff=512,
                               n_head=4, n_head_kv=2, qtype=["Q4_K", "Q6_K"], seed=5)
    cfg = EngineConfig(device="cuda", dtype="float16", ctx=128, max_seqs=4)
    waited = {}
    with Engine.open(cfg, index=open_model(path)) as e:
        c, submit = e.core, e.core.backend.submit
        ends = []

        def busy_then_submit(seqs, sample, starts, want="none"):
            torch.cuda._sleep(2_000_000_000)  # cycles: about a second at the H200's clock
            ends.append(torch.cuda.Event())
            ends[-1].record()
            submit(seqs, sample, starts, want)

        for lookahead in (True, False):
            c.lookahead = lookahead
            for rep in range(2):  # the first run captures the graphs of each batch (that waits)
                for name in names:  # (no end of sequence: a batch of another size would capture its graphs)
                    prompt, params = REQUESTS[name]
                    c.add_request(f"{name}{rep}", prompt, replace(params, ignore_eos=True))
                for _ in range(3):
                    c.step()  # prompts in, every request decoding
                c.backend.submit = busy_then_submit if rep else submit
                done = []
                for _ in range(4):
                    ends.clear()
                    c.step()
                    if rep:
                        done.append(ends[-1].query())  # (an IndexError: the step launched nothing)
                c.backend.submit = submit
                while c.has_unfinished():
                    c.step()
            waited[lookahead] = done
    assert waited[True] == [False] * 4 and waited[False] == [True] * 4
