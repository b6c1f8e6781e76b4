"""The compute process's messages to the coordinator (compute_proc.py)."""

from types import SimpleNamespace

import pytest

from layerstream.compute.compute_proc import DONE_BATCH, ComputeWorker
from layerstream.proto.messages import LayerDone, LayerReady
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
    w.links, w.source, w.tl = _Links(incoming), SimpleNamespace(expert_step=expert_step), Timeline("compute", "t")
    w.cfg = SimpleNamespace(done_batch=done_batch)  # (the pipeline's: DONE_BATCH when every streamed layer is cached)
    w.done, w.done_step, w.ready_slots = [], 0, {}
    return w


def test_expert_steps_give_slots_back_a_few_at_a_time_and_before_waiting():
    """NOTE [ slots given back ]: in expert steps the slots go back DONE_BATCH a message, and what
    is left goes before compute blocks on the coordinator, which may be waiting for it."""
    w = _worker(True, incoming=[LayerReady(3, [[7, 1], [8, 2]])])
    for layer in range(DONE_BATCH + 1):
        w._layer_done(3, layer, 10 + layer)
    assert w.links.sent == [LayerDone(3, [[i, 10 + i] for i in range(DONE_BATCH)])]
    w._pump(False)  # taking in what is queued sends nothing
    assert len(w.links.sent) == 1 and w.ready_slots == {(3, 7): 1, (3, 8): 2}
    w._pump(True)  # about to wait: the last one goes first
    assert w.links.sent[-1] == LayerDone(3, [[DONE_BATCH, 10 + DONE_BATCH]]) and w.done == []


@pytest.mark.parametrize("expert_step, done_batch", [(False, DONE_BATCH), (True, 1)],
                         ids=["whole-layer-step", "layers-read-from-disk"])
def test_other_steps_give_each_slot_back_at_once(expert_step, done_batch):
    """A reader may be waiting for the slot: in steps that stream whole layers, and wherever the
    host cache does not hold every streamed layer."""
    w = _worker(expert_step, done_batch=done_batch)
    w._layer_done(1, 0, 4)
    w._layer_done(1, 1, 5)
    assert w.links.sent == [LayerDone(1, [[0, 4]]), LayerDone(1, [[1, 5]])]
