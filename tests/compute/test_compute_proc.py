"""The compute process's messages to the coordinator (compute_proc.py)."""

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from layerstream.compute.compute_proc import ComputeWorker, _InFlight
from layerstream.compute.slot_returns import DONE_BATCH, SlotReturns
from layerstream.compute.stepper import Launched
from layerstream.proto.child import ShutdownRequested
from layerstream.proto.messages import (
    ArenaDesc,
    AttachArena,
    Forward,
    ForwardDone,
    ForwardSeq,
    LayerDone,
    LayerReady,
    StepFailed,
)
from layerstream.proto.timeline import Timeline


class _Links:
    def __init__(self, incoming):
        self.sent, self.incoming = [], list(incoming)

    def send(self, msg, extra=None):
        self.sent.append(msg)

    def recv(self, timeout=None):
        return self.incoming.pop(0) if self.incoming else None


def _worker(expert_step: bool, incoming=(), done_batch: int = DONE_BATCH):
    w = object.__new__(ComputeWorker)  # the message logic only: no arena, no model
    w.links, w.tl = _Links(incoming), Timeline("compute", "t")
    w.waits = []  # each give-back of the experts' staging slots: whether it waited for the device
    w.source = SimpleNamespace(expert_step=expert_step, launched=True, return_slots=w.waits.append, step_no=3)
    # (the pipeline's done_batch: DONE_BATCH when every streamed layer is cached)
    w.returns = SlotReturns(lambda msg: w.links.send(msg), done_batch)
    w.ready_slots = {}
    w.queued, w.inflight, w.host_ids = deque(), deque(), {}
    w.announced, w.last_raised, w.start_s = {}, 0, {}
    w.embed, w.glob, w.runner, w.resolved = None, SimpleNamespace(embd_dev=None), None, {}  # (no meta built ahead)
    return w


def test_expert_steps_hold_their_slots_until_compute_waits_or_flushes():
    """NOTE [ slots given back ]: in expert steps of a run whose streamed layers are all cached the
    slots go back in one message, before compute blocks on the coordinator (which may be waiting
    for them) or where it flushes (the step's end); a batch held to DONE_BATCH goes at once."""
    w = _worker(True, incoming=[LayerReady(3, [[7, 1], [8, 2]])])
    for layer in range(48):
        w._layer_done(3, layer, 10 + layer)
    assert w.links.sent == []
    w._pump(False)  # taking in what is queued sends nothing
    assert w.links.sent == [] and w.ready_slots == {(3, 7): 1, (3, 8): 2}
    w._pump(True)  # about to wait: what is held goes first
    assert w.links.sent == [LayerDone(3, [[i, 10 + i] for i in range(48)])] and w.returns.pending == []
    w = _worker(True, done_batch=2)
    for layer in range(3):
        w._layer_done(3, layer, 10 + layer)
    assert w.links.sent == [LayerDone(3, [[0, 10], [1, 11]])]


def test_an_earlier_steps_slot_goes_back_at_once():
    """Compute runs a step behind the coordinator, which announces the next step's layers in order:
    a slot of the step before the one running (its last layers, done after that step's end) goes at
    once, after what is held (a message names one step), where held it kept the next step's last
    layer waiting (a review's)."""
    w = _worker(True)
    w._layer_done(3, 0, 10)  # the step running: held
    assert w.links.sent == []
    w._layer_done(2, 47, 57)  # the step before's last layer
    assert w.links.sent == [LayerDone(3, [[0, 10]]), LayerDone(2, [[47, 57]])] and w.returns.pending == []


@pytest.mark.parametrize("expert_step, done_batch", [(False, DONE_BATCH), (True, 1)],
                         ids=["whole-layer-step", "layers-read-from-disk"])
def test_other_steps_give_each_slot_back_at_once(expert_step, done_batch):
    """A reader may be waiting for the slot: in steps that stream whole layers, and wherever the
    host cache does not hold every streamed layer."""
    w = _worker(expert_step, done_batch=done_batch)
    w._layer_done(1, 0, 4)
    w._layer_done(1, 1, 5)
    assert w.links.sent == [LayerDone(1, [[0, 4]]), LayerDone(1, [[1, 5]])]


class _Event:
    """A CUDA event's two calls, finished when the test says so."""

    def __init__(self):
        self.finished = False

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True


def _in_flight(step: int, rows: list[int], ids: list[int], bad: list[int]) -> _InFlight:
    host = torch.tensor([ids, bad, [0] * len(ids)], dtype=torch.long)  # ids, codes, drafts accepted
    return _InFlight(step, len(rows), "none", rows, Launched(len(rows), host, _Event(), None), 0)


def test_a_forward_during_a_step_is_queued_and_a_finished_step_is_answered_between_layers():
    """NOTE [ ids one step behind ]: a Forward that comes while a step runs is launched next (it was
    dropped as out of order); the step on the device is answered as soon as it is done, also
    while the next one waits for its layers (_pump), with its ids and codes."""
    nxt = Forward(8, [ForwardSeq(0, [-1], [5], [5], list(range(6)), True)], "none")
    w = _worker(False, incoming=[nxt])
    w.inflight.append(_in_flight(7, [0, -1], [42, -1], [0, 0]))
    w._pump(False)
    assert list(w.queued) == [nxt] and w.links.sent == [] and not w.tl.snapshot()["count"].get("unexpected_messages")
    w.inflight[0].launched.event.finished = True
    w._pump(False)
    assert w.links.sent == [ForwardDone(7, [], "float32", {}, [42, -1], [0, 0])] and not w.inflight
    assert w.host_ids == {0: 42}


def test_a_step_answers_the_step_before_only_after_its_first_launch():
    """NOTE [ answers after the step's first launch ]: until a step has put work on the device (its
    set-up, the first layer's pump before its launch), the pumps take the queued announcements in
    but answer no finished step: its timeline would hold the device idle. The first pump after the
    launch answers it, and a pump that is about to wait answers at once (the coordinator may be
    waiting for that answer)."""
    from layerstream.compute.compute_proc import ComputeWorker

    w = _worker(False, incoming=[LayerReady(8, [[3, 1]])])
    w.glob, w.embed, w.device = SimpleNamespace(embd_dev=torch.zeros(1)), None, torch.device("cpu")
    w.inflight.append(_in_flight(7, [0], [42], [0]))
    w.inflight[0].launched.event.finished = True  # step 7 is done on the device
    seen = []

    class _Source:
        expert_step, launched, launched_ns, released_ns = False, True, 0, 0

        def set_step(self, step, tokens):
            self.launched = False  # (as StreamedLayers.set_step)
            w._pump(False)  # (as its _issue_copies)
            seen.append(("set_step", list(w.links.sent), dict(w.ready_slots)))

        def return_slots(self, wait):
            w.waits.append(wait)

    def launch(seqs, sample, starts, want):
        w._pump(False)  # (the first streamed layer's _count_prefetch, before its launch)
        seen.append(("layer", list(w.links.sent)))
        w.source.launched = True  # (its graph ran: graph_ran)
        w._pump(False)  # (the next layer's)
        seen.append(("next", list(w.links.sent)))
        return Launched(1, torch.tensor([[43], [0], [0]]), None, None)

    w.source, w.stepper = _Source(), SimpleNamespace(launch=launch)
    w.cpu, w.expert_count = SimpleNamespace(experts=None, share=None), None
    ComputeWorker.launch(w, Forward(8, [ForwardSeq(0, [-1], [5], [5], list(range(6)), True)], "none"))
    assert w.waits == [False]  # NOTE [ the step's end does not wait ]: only what is done goes back
    done = ForwardDone(7, [], "float32", {}, [42], [0])
    assert seen == [("set_step", [], {(8, 3): 1}), ("layer", []), ("next", [done])]
    assert [st.step for st in w.inflight] == [8] and w.source.launched
    w.source.launched = False
    w.inflight[0].launched.event = _Event()
    w.inflight[0].launched.event.finished = True
    w._pump(True)  # about to wait: answered though held
    assert w.links.sent[-1] == ForwardDone(8, [], "float32", {}, [43], [0]) and not w.inflight


def test_the_layer_source_says_when_a_step_has_launched_work():
    """StreamedLayers.launched (NOTE [ answers after the step's first launch ]): false from the step's
    set-up until a graph ran or a layer after the step's first one is asked for (the one before
    it was launched eagerly); the pumps see it as it is at each pump."""
    from layerstream.compute.streamed import StreamedLayers

    src = object.__new__(StreamedLayers)
    seen = []
    src.cuda, src.share, src.experts, src.ready, src.tl = False, None, None, {}, Timeline("compute", "t")
    src.pump = lambda block: seen.append(src.launched)
    src.set_step(5, 1)
    src._count_prefetch(2)  # the step's first layer
    src._count_prefetch(2)  # (asked for again: a resident layer's load)
    src._count_prefetch(3)
    assert seen == [False, False, True] and src.launched
    t = src.launched_ns
    src.set_step(6, 1)
    assert src.launched_ns == 0  # (a step's first launch: when it came, for its host set-up's time)
    src._count_prefetch(0)
    src.graph_ran(0, 2, None, None)  # the resident layers' graph
    first = src.launched_ns
    src._count_prefetch(2)
    assert seen[3:] == [False, True] and first >= t > 0 and src.launched_ns == first


def test_a_forward_taken_in_during_a_step_has_its_meta_built_then_and_its_launch_takes_those_sequences():
    """NOTE [ a step's meta built ahead ] in runner.py: where the embedding is on the device, a
    Forward taken in (while the step before runs) is resolved and handed to the runner's prepare at
    once, and its launch steps over those very sequences; a prepare that raises leaves the step to
    its own launch (which raises there, as a step's failure)."""
    from layerstream.compute.compute_proc import ComputeWorker

    fwd = [Forward(k, [ForwardSeq(0, [-1], [k], [k], list(range(k + 1)), True)], "none") for k in (8, 9)]
    w = _worker(False, incoming=fwd)
    prepared, stepped = [], []

    def prepare(seqs):
        if len(prepared) == 1:
            raise ValueError("a bad step")
        prepared.append(seqs)
    w.glob, w.embed, w.device = SimpleNamespace(embd_dev=None), object(), torch.device("cpu")
    w.runner = SimpleNamespace(prepare=prepare)
    w._pump(False)
    assert list(w.queued) == fwd and list(w.resolved) == [8] and w.resolved[8] is prepared[0]
    assert [s.positions for s in prepared[0]] == [[8]]

    class _Source:
        expert_step, launched, launched_ns, released_ns = False, True, 0, 0

        def set_step(self, step, tokens):
            pass

        def return_slots(self, wait):
            w.waits.append(wait)

    def launch(seqs, sample, starts, want):
        stepped.append(seqs)
        return Launched(1, torch.tensor([[43], [0], [0]]), None, None)
    w.source, w.stepper = _Source(), SimpleNamespace(launch=launch)
    w.cpu, w.expert_count = SimpleNamespace(experts=None, share=None), None
    for msg in fwd:
        ComputeWorker.launch(w, msg)
    assert stepped[0] is prepared[0] and [s.positions for s in stepped[1]] == [[9]] and not w.resolved


def test_a_launch_times_the_hosts_set_up_before_its_first_launch_and_its_tail_after_its_last_layer():
    """--stats' step_setup and step_tail (and the trace's host line): from the step's launch to the
    layer source's first launched work, and from its last layer's release to the launch's return."""
    import time

    from layerstream.compute.compute_proc import ComputeWorker

    w = _worker(False)

    class _Source:
        expert_step, launched, launched_ns, released_ns = False, True, 0, 0

        def set_step(self, step, tokens):
            self.launched, self.launched_ns = False, 0

        def return_slots(self, wait):
            w.waits.append(wait)

    def launch(seqs, sample, starts, want):
        time.sleep(0.05)  # (the set-up)
        w.source.launched, w.source.launched_ns = True, time.monotonic_ns()
        time.sleep(0.05)
        w.source.released_ns = time.monotonic_ns()
        time.sleep(0.1)  # (the head and the sampling)
        return Launched(1, torch.tensor([[43], [0], [0]]), None, None)

    w.source, w.stepper, w.device = _Source(), SimpleNamespace(launch=launch), torch.device("cpu")
    w.cpu, w.expert_count, w.embed = SimpleNamespace(experts=None, share=None), None, object()  # (ids on the device)
    ComputeWorker.launch(w, Forward(8, [ForwardSeq(0, [-1], [5], [5], list(range(6)), True)], "none"))
    busy = w.tl.snapshot()["busy_ns"]
    # (bounds that tell each span from its neighbours' sleeps)
    assert 0.05e9 <= busy["step_setup"] < 0.1e9 and 0.1e9 <= busy["step_tail"] < 0.2e9


def test_a_host_embedding_reads_the_last_id_in_process_after_answering_the_steps_in_flight():
    """Where the token embedding is a host gather, a -1 token becomes its row's last sampled id on
    the compute side: the steps in flight are answered first (their ForwardDone goes out), then
    the id is read from what they gave; no round trip to the coordinator."""
    w = _worker(False)
    w.glob, w.embed = SimpleNamespace(embd_dev=None), None  # (mapped_embedding gave None)
    w.inflight.append(_in_flight(3, [1, 2], [11, 12], [0, 1]))
    seqs = w._resolve(Forward(4, [ForwardSeq(2, [-1], [9], [9], list(range(10)), True),
                                  ForwardSeq(0, [5, 6], [0, 1], [0, 1], [0, 1], True)], "none"))
    assert [s.tokens for s in seqs] == [[12], [5, 6]]
    assert w.links.sent == [ForwardDone(3, [], "float32", {}, [11, 12], [0, 1])]
    with pytest.raises(ValueError, match="KV row 3 feeds its last sampled id, but it sampled none"):
        w._resolve(Forward(5, [ForwardSeq(3, [-1], [0], [0], [0], True)], "none"))
    w.glob = SimpleNamespace(embd_dev=torch.zeros(1))  # on the device: the runner reads it there
    assert w._resolve(Forward(6, [ForwardSeq(3, [-1], [0], [0], [0], True)], "none"))[0].tokens == [-1]
    w.glob, w.embed = SimpleNamespace(embd_dev=None), object()  # gathered on the device from host memory
    w.inflight.append(_in_flight(7, [3], [13], [0]))
    assert w._resolve(Forward(8, [ForwardSeq(3, [-1], [0], [0], [0], True)], "none"))[0].tokens == [-1]
    assert len(w.inflight) == 1  # nothing waited for


def test_the_loop_launches_the_next_forward_before_the_step_in_flight_is_done():
    """The compute loop takes a Forward that is queued while a step runs on the device and launches
    it at once (the GPU never waits for the host between them); each ForwardDone goes, in order,
    once its step is done."""
    fwd = [Forward(k, [ForwardSeq(0, [-1], [k], [k], list(range(k + 1)), True)], "none") for k in (1, 2)]

    class Stop(Exception):
        pass

    w = _worker(False, incoming=fwd)
    events, log = [], []

    def recv(timeout=None):
        if w.links.incoming:
            return w.links.incoming.pop(0)
        if any(not e.finished for e in events):  # the device finishes once nothing else is queued
            for e in events:
                e.finished = True
            return None
        raise Stop

    def launch(msg):
        log.append(f"launch {msg.step}")
        st = _in_flight(msg.step, [0], [40 + msg.step], [0])
        events.append(st.launched.event)
        w.inflight.append(st)

    w.links.recv, w.links.ready, w.launch = recv, lambda info: None, launch
    w.registered, w.device = False, torch.device("cpu")
    w.links.send = lambda msg, extra=None: log.append(f"done {msg.step} {msg.ids}")
    with pytest.raises(Stop):
        w.run()
    assert log == ["launch 1", "launch 2", "done 1 [41]", "done 2 [42]"]
    # NOTE [ the step's end does not wait ]: the loop gives back the experts' slots that are done
    # while it polls the steps in flight, and waits for them all only before it blocks
    assert w.waits == [True, False, False, True]


def test_the_balancer_sees_the_step_own_time_not_the_time_until_it_was_answered():
    """With two steps in flight a step is answered after the next one's launch: the CPU share's
    balancer is given the step's own seconds (on the CPU: its launch, which ran it), not the time
    from its launch to its answer, and the share the step ran at (the balancer may be timing
    another by then)."""
    seen = []
    w = _worker(False)
    w.cpu = SimpleNamespace(share=SimpleNamespace(balancer=SimpleNamespace(observe=lambda *a: seen.append(a))),
                            experts=None)
    st = _in_flight(4, [0], [42], [0])
    st.t0, st.own_s, st.observed = 0, 0.025, ("share", 0.01, 1000, 0.005, 0.25)  # launched long ago, ran 25 ms
    w._answer(st)
    assert seen == [(1, 0.025 - 0.005, 0.01, 1000, 0.0, 0, 0.25)]


def test_a_step_that_raises_gives_back_every_slot_of_its_step_and_the_step_behind_it_fails_unrun():
    """NOTE [ a failed step ]: the step in flight before it is answered first; the failed step's
    slots go back, those it held (taken, not given back), those announced and not taken, and
    those announced after the failure, while a resident layer it had not loaded is loaded; the
    step sent before the coordinator knew fails too, without running; the next one runs."""
    w = _worker(False, incoming=[LayerReady(5, [[3, 12]]),
                                 Forward(6, [ForwardSeq(0, [-1], [5], [5], list(range(6)), True)], "none"),
                                 LayerReady(6, [[2, 13], [3, 14]])])
    w.device, events = torch.device("cpu"), []
    sent = w.links.sent

    def load_resident(j):  # as StreamedLayers.layer() does: the slot goes back once copied out
        w.source.resident[j] = {}
        w._layer_done(w.source.step, j, w.ready_slots.pop((w.source.step, j)))

    def abandon(n, reset_experts):
        w.source.step = n
        events.append(("abandon", n, reset_experts))

    w.source = SimpleNamespace(expert_step=False, launched=True, layouts=[None] * 4, resident={0: {}}, resident_ids={0, 1},
                               abandon=abandon, load_resident=load_resident, step=0)
    w._take(LayerReady(5, [[1, 10], [2, 11]]))
    del w.ready_slots[(5, 2)]  # layer 2 taken by the step when it raised

    def launch(msg):
        events.append(("launch", msg.step))
        if msg.step == 5:
            raise RuntimeError("boom\nsecond line")

    w.launch = launch
    w.inflight.append(_in_flight(4, [0], [42], [0]))
    w._launch(Forward(5, [ForwardSeq(0, [9, 9], [0, 1], [0, 1], [0, 1], True)], "none"))
    assert sent == [ForwardDone(4, [], "float32", {}, [42], [0]), LayerDone(5, [[1, 10]]), LayerDone(5, [[2, 11]]),
                    LayerDone(5, [[3, 12]]), StepFailed(5, "RuntimeError: boom")]
    w._pump(False)
    w._launch(w.queued.popleft())  # sent before the coordinator knew: fails without running
    assert sent[5:] == [LayerDone(6, [[2, 13]]), LayerDone(6, [[3, 14]]), StepFailed(6, "step 5 before it failed")]
    w._launch(Forward(7, [ForwardSeq(0, [4], [6], [6], list(range(7)), True)], "none", failed=5))
    assert events == [("launch", 5), ("abandon", 5, True), ("abandon", 6, False), ("launch", 7)]
    assert w.returns.lent == {} and w.ready_slots == {} and w.announced == {}
    assert w.tl.snapshot()["count"]["steps_failed"] == 2


def test_the_worker_is_ready_before_the_arena_keeps_what_comes_first_and_maps_the_arena_when_it_comes():
    """NOTE [ the arena after Ready ]: Ready goes first; a LayerReady or Forward that came before the
    arena is kept, not run; AttachArena builds what reads the slots; stats answer meanwhile."""
    fwd = Forward(1, [ForwardSeq(0, [5], [0], [0], [0], 1)])
    w = _worker(False, incoming=[LayerReady(1, [[0, 2]]), fwd, AttachArena("layerstream-1-ab", 2, 4096)])
    w.links.ready = lambda info: w.links.sent.append(("Ready", info))
    w.links.bad = SimpleNamespace(stats=lambda: {})
    w.source, w.registered, w.device = None, False, torch.device("cpu")
    w.cpu = SimpleNamespace(experts=None, share=None)
    attached = []

    def attach(desc):
        attached.append(desc)
        raise ShutdownRequested("test")  # (the step loop would follow)

    w.attach = attach
    assert "experts" not in w.stats() and w.stats()["pinned"] is False
    with pytest.raises(ShutdownRequested):
        w.run()
    assert w.links.sent == [("Ready", {"device": "cpu", "start_s": {}})]  # (what its start took: none here)
    assert attached == [ArenaDesc("layerstream-1-ab", 2, 4096)]
    assert list(w.queued) == [fwd] and w.ready_slots == {(1, 0): 2}



def test_triton_warm_up_leaves_its_cache_key_made_and_never_raises(monkeypatch):
    """compute_proc.warm_triton: what a first launch does (the gluon import, the cache key's
    hashes) done ahead; a Triton that fails there leaves it to the first launch, silently."""
    cache = pytest.importorskip("triton.runtime.cache")
    from layerstream.compute import compute_proc

    cache.triton_key.cache_clear()
    compute_proc.warm_triton()
    assert cache.triton_key.cache_info().currsize == 1
    import importlib.util
    import sys
    if importlib.util.find_spec("triton.experimental") and importlib.util.find_spec("triton.experimental.gluon"):
        assert "triton.experimental.gluon" in sys.modules

    def broken():
        raise OSError("libtriton unreadable")
    monkeypatch.setattr(cache, "triton_key", broken)
    compute_proc.warm_triton()  # (logged at debug, not raised)
