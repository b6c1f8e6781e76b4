"""The pipeline's scheduling core in one process: messages in, messages out, no sockets."""

from __future__ import annotations

import pytest

import ggufgen
from layerstream.coordinator.plan import make_plan
from layerstream.coordinator.stream_core import StreamCore
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import layer_layouts
from layerstream.proto.messages import LayerReady, LayerStaged, LoadLayer

READERS = ("reader-0", "reader-1")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    index = open_model(ggufgen.write_model(tmp_path_factory.mktemp("sc") / "m.gguf", n_layer=3))
    return make_plan(index, layer_layouts(index), vram_bytes=None, host_cache_bytes=0, dtype_bytes=4, ctx=64,
                     max_seqs=1, resident_layers=0, prefetch=2)


def core_with_reads(plan) -> tuple[StreamCore, list]:
    core = StreamCore(plan, 3)
    for r in READERS:
        assert core.reader_ready(r, restarted=False) == []
    # every layer is read in two parts, one by each reader
    sends = core.set_reads([{r: [[0, 100 * i + k, 10, k * 10]] for k, r in enumerate(READERS)} for i in range(3)])
    return core, sends


def staged(m: LoadLayer, reader: str) -> LayerStaged:
    return LayerStaged(m.req, m.layer, m.slot, 10, 0.001, reader)


def loads(sends) -> list[tuple[str, LoadLayer]]:
    return [(ident, m) for link, ident, m in sends if link == "readers" and isinstance(m, LoadLayer)]


def test_loads_go_to_both_readers_and_a_layer_is_announced_once_both_parts_are_staged(plan):
    core, sends = core_with_reads(plan)
    first = loads(sends)
    assert {i for i, _ in first} == set(READERS) and len(first) == 2 * plan.prefetch
    m = next(m for i, m in first if m.layer == 0 and i == "reader-0")
    assert core.on_staged("reader-0", staged(m, "reader-0")) == []  # half of layer 0
    core.begin_step()
    out = core.on_staged("reader-1", staged(m, "reader-1"))
    assert ("compute", "compute", LayerReady(1, [[0, m.slot]])) in out
    assert core.on_staged("reader-1", staged(m, "reader-1")) == []  # a retried read answering twice


def test_a_failed_read_is_retried_once_then_ends_the_run(plan):
    core, sends = core_with_reads(plan)
    ident, m = loads(sends)[0]
    again = core.on_read_failed(ident, m.req, "EIO")
    assert again == [("readers", ident, m)] and core.failure is None
    assert core.on_read_failed(ident, m.req, "EIO") == [] and "failed twice: EIO" in core.failure


def test_a_restarted_reader_gets_the_parts_its_predecessor_left(plan):
    core, sends = core_with_reads(plan)
    mine = [m for i, m in loads(sends) if i == "reader-1"]
    core.reader_down("reader-1")
    assert all(i == "reader-0" for i, _ in loads(core.advance()))  # nothing goes to a reader that is down
    resent = core.reader_ready("reader-1", restarted=True)
    assert sorted(m.req for _, _, m in resent) == sorted(m.req for m in mine)
    assert all(link == "readers" and ident == "reader-1" for link, ident, _ in resent)


def test_host_cache_hits_are_announced_at_once_all_in_one_message(tmp_path):
    """Layers held in the host cache are staged at once, outside the `prefetch` window (NOTE
    [ cached layers outside the window ]), and announced together at the step's start: a pass
    needs no message a layer (a streamed MoE layer copies the next layer's experts ahead only
    once that layer is announced: slot_returns.py, NOTE [ slots given back ]). A layer compute
    still holds is announced once given back."""
    index = open_model(ggufgen.write_model(tmp_path / "m.gguf", n_layer=6))
    plan = make_plan(index, layer_layouts(index), vram_bytes=None, host_cache_bytes=None, dtype_bytes=4, ctx=64,
                     max_seqs=1, resident_layers=0, prefetch=2)
    assert plan.cache_layers == 6 and not plan.resident
    core = StreamCore(plan, 6)
    core.reader_ready("r", restarted=False)
    pending = [m for _, _, m in core.set_reads([{"r": [[0, 100 * i, 10, 0]]} for i in range(6)])]
    core.begin_step()
    slots = {}
    while pending:  # the first pass reads every layer into the cache; compute gives each back
        m = pending.pop(0)
        for _, _, x in core.on_staged("r", staged(m, "r")):
            if isinstance(x, LayerReady):
                for layer, slot in x.ready:
                    slots[layer] = slot
                    pending += [y for _, _, y in core.on_layer_done([[layer, slot]]) if isinstance(y, LoadLayer)]
            elif isinstance(x, LoadLayer):
                pending.append(x)
    assert sorted(slots) == list(range(6))
    out = core.begin_step()  # the next pass: every layer, in one message
    assert out == [("compute", "compute", LayerReady(2, [[i, slots[i]] for i in range(6)]))]
    assert core.on_layer_done([[i, slots[i]] for i in range(4)]) == []  # staged for the next pass
    out = core.begin_step()  # 4 and 5 still held: the first four, then the rest once given back
    assert out == [("compute", "compute", LayerReady(3, [[i, slots[i]] for i in range(4)]))]
    out = core.on_layer_done([[4, slots[4]], [5, slots[5]]])
    assert out == [("compute", "compute", LayerReady(3, [[4, slots[4]], [5, slots[5]]]))]


def test_the_read_compute_waits_for_is_that_of_its_next_layer_and_knows_when_it_was_sent(plan):
    """The stall watchdog blames the readers that owe the read of the layer compute needs next
    (StreamCore.stall_blame); a retried read counts from its retry."""
    now = [100.0]
    core = StreamCore(plan, 3, clock=lambda: now[0])
    for r in READERS:
        core.reader_ready(r, restarted=False)
    sends = core.set_reads([{r: [[0, 100 * i + k, 10, k * 10]] for k, r in enumerate(READERS)} for i in range(3)])
    assert core.blocking_read() is None  # no step: compute waits for nothing
    core.begin_step()
    p = core.blocking_read()
    assert p.load.layer == 0 and p.left == set(READERS) and p.issued == 100.0
    m = next(m for i, m in loads(sends) if m.layer == 0 and i == "reader-0")
    core.on_staged("reader-0", staged(m, "reader-0"))
    assert core.blocking_read().left == {"reader-1"}  # the reader that has not staged its part
    now[0] = 130.0
    core.on_read_failed("reader-1", m.req, "EIO")
    assert core.blocking_read().issued == 130.0
    out = core.on_staged("reader-1", staged(m, "reader-1"))
    assert any(isinstance(x, LayerReady) for _, _, x in out)
    assert core.blocking_read().load.layer == 1 and core.loaded == {0}
