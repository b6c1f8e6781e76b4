"""Layouts and LayerReader on a tiny GGUF written with gguf.GGUFWriter."""

import errno
import os
import threading
import time

import msgpack
import numpy as np
import pytest

from layerstream.errors import ConfigError, ModelError
from layerstream.loader import reader as reader_mod
from layerstream.loader.arena import Arena
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import GLOBALS, LayerLayout, ReadRange, globals_layout, layer_layouts
from layerstream.loader.reader import LayerReader, readers_for

pytestmark = pytest.mark.timeout(60)

N_LAYER, N_EMBD, N_FF, N_HEAD, N_VOCAB = 3, 64, 128, 4, 96


def write_tiny_llama(path, seed=0):
    """A minimal llama GGUF: F32 norms, F16 attention, Q8_0 FFN, random bytes."""
    import gguf

    rng = np.random.default_rng(seed)
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)

    def f32(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    def f16(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float16))

    def q8(name, rows, cols):  # Q8_0: 34 bytes per 32 values
        w.add_tensor(name, rng.integers(0, 256, (rows, cols // 32 * 34), dtype=np.uint8), raw_dtype=Q.Q8_0)

    f16("token_embd.weight", N_VOCAB, N_EMBD)
    for i in range(N_LAYER):
        b = f"blk.{i}."
        f32(b + "attn_norm.weight", N_EMBD)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            f16(b + n + ".weight", N_EMBD, N_EMBD)
        f32(b + "ffn_norm.weight", N_EMBD)
        q8(b + "ffn_gate.weight", N_FF, N_EMBD)
        q8(b + "ffn_up.weight", N_FF, N_EMBD)
        q8(b + "ffn_down.weight", N_EMBD, N_FF)
    f32("output_norm.weight", N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model(tmp_path):
    return open_model(write_tiny_llama(tmp_path / "tiny.gguf"))


def all_layouts(index):
    return layer_layouts(index) + [globals_layout(index)]


def test_layout_invariants(model):
    layouts = all_layouts(model)
    assert [lay.layer for lay in layouts] == list(range(N_LAYER)) + [GLOBALS]
    assert {t.name for t in layouts[0].tensors} == set(model.layers[0])
    assert {t.name for t in layouts[-1].tensors} == {"token_embd.weight", "output_norm.weight"}
    for lay in layouts:
        assert lay.nbytes % 4096 == 0
        ends = 0
        for t in lay.tensors:  # slot order, no overlap, same offset modulo a page as in the file
            assert t.slot_offset >= ends and t.slot_offset % 4096 == t.file_offset % 4096
            assert t.slot_offset % 32 == 0
            ends = t.slot_offset + t.nbytes
        assert ends <= lay.nbytes
        rs = lay.ranges()
        assert sum(r.nbytes for r in rs) >= lay.data_nbytes
    # a block's tensors are contiguous in the file: one read fills the slot
    assert all(len(lay.ranges()) == 1 for lay in layouts[:N_LAYER])
    # the globals are far apart in the file (token_embd first, output_norm last): two runs
    assert len(layouts[-1].ranges()) == 2


def test_layout_wire_roundtrip(model):
    for lay in all_layouts(model):
        wire = msgpack.unpackb(msgpack.packb(lay.to_wire()))
        back = LayerLayout.from_wire(wire)
        assert back == lay and back.ranges() == lay.ranges()
        name = lay.tensors[0].name
        assert back.tensor(name) == lay.tensor(name) and name in back


@pytest.fixture
def small_chunks(monkeypatch):
    """Pieces of two pages, so that a tiny model's layer is read in several pieces at once."""
    monkeypatch.setattr(reader_mod, "CHUNK", 2 * 4096)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("direct", [False, True])
def test_read_every_layer_into_slots(model, direct, threads, small_chunks):
    layouts = all_layouts(model)
    with Arena.create(len(layouts), max(lay.nbytes for lay in layouts)) as arena, \
            LayerReader(model.files, direct=direct, threads=threads) as rd:
        for slot, lay in enumerate(layouts):
            arena.slot_array(slot)[:] = 0xEE
            n = rd.read_into(lay.ranges(), arena.slot_view(slot))
            assert n >= lay.data_nbytes
        for slot, lay in enumerate(layouts):
            arr = arena.slot_array(slot)
            tensors = model.layers[lay.layer] if lay.layer != GLOBALS else model.globals
            for t in lay.tensors:
                want = model.tensor_bytes(tensors[t.name])
                assert np.array_equal(arr[t.slot_offset : t.slot_offset + t.nbytes], want), (lay.layer, t.name)
            del arr
        st = rd.stats()
        assert st["bytes"] > 0 and st["busy_s"] > 0 and st["reads"] >= sum(len(lay.ranges()) for lay in layouts)
        # tmp_path is on ext4 here; where a filesystem refuses O_DIRECT the reader falls back (tested below)
        assert (st["direct_bytes"] > 0) == direct


def test_direct_reads_land_in_unaligned_slot_positions(model):
    """A hand-made range whose slot offset breaks the page rule is read buffered, still correct."""
    t = model.layers[1]["ffn_up.weight"]
    with Arena.create(1, 2**20) as arena, LayerReader(model.files, direct=True) as rd:
        rd.read_into([ReadRange(t.file, t.offset, t.nbytes, 4096 + 7)], arena.slot_view(0))
        assert np.array_equal(arena.slot_array(0)[4096 + 7 : 4096 + 7 + t.nbytes], model.tensor_bytes(t))
        assert rd.stats()["direct_bytes"] == 0


def test_direct_falls_back_when_open_refuses(model, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(reader_mod.os, "open", no_direct)
    with pytest.warns(RuntimeWarning, match="O_DIRECT"):
        rd = LayerReader(model.files, direct=True)
    lay = layer_layouts(model)[0]
    with Arena.create(1, lay.nbytes) as arena:
        rd.read_into(lay.ranges(), arena.slot_view(0))
        t = lay.tensors[-1]
        assert np.array_equal(arena.slot_array(0)[t.slot_offset : t.slot_offset + t.nbytes],
                              model.tensor_bytes(model.layers[0][t.name]))
    assert rd.stats()["direct_bytes"] == 0
    rd.close()


def test_direct_falls_back_when_read_refuses(model, monkeypatch, recwarn):
    rd = LayerReader(model.files, direct=True)
    direct_fds = set(rd._dfds.values())
    real_preadv = os.preadv

    def refuse(fd, bufs, off):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, off)

    monkeypatch.setattr(reader_mod.os, "preadv", refuse)
    layouts = layer_layouts(model)
    with Arena.create(len(layouts), max(lay.nbytes for lay in layouts)) as arena:
        for slot, lay in enumerate(layouts):
            rd.read_into(lay.ranges(), arena.slot_view(slot))
        t = layouts[2].tensor("attn_k.weight")
        assert np.array_equal(arena.slot_array(2)[t.slot_offset : t.slot_offset + t.nbytes],
                              model.tensor_bytes(model.layers[2]["attn_k.weight"]))
    assert len([w for w in recwarn if "O_DIRECT" in str(w.message)]) == 1
    assert rd.stats()["direct_bytes"] == 0
    rd.close()


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("inside", [True, False])
def test_truncated_file_is_a_model_error(model, direct, threads, small_chunks, inside):
    """The message names the file's end as it is now: a cut before the data's start (a probe's) named
    where the read began, and O_DIRECT's reads the end rounded to a page."""
    lay = layer_layouts(model)[N_LAYER - 1]
    r = lay.ranges()[0]
    cut = r.file_offset + r.nbytes // 2 if inside else r.file_offset - 10_001
    with LayerReader(model.files, direct=direct, threads=threads) as rd, Arena.create(1, lay.nbytes) as arena:
        os.truncate(r.file, cut)  # truncated under the reader
        with pytest.raises(ModelError) as e:
            rd.read_into(lay.ranges(), arena.slot_view(0))
    msg = str(e.value)
    assert r.file in msg and "truncated" in msg and f"offset {r.file_offset}" in msg
    assert f"ends at byte {cut}," in msg


def test_a_layer_is_read_by_several_threads_at_once(model, small_chunks, monkeypatch):
    """Pieces of one layer are in flight on different threads at the same time (NOTE [ parallel reads ])."""
    real_preadv = os.preadv
    lock = threading.Lock()
    now, most, threads = [0], [0], set()

    def slow(fd, bufs, off):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            threads.add(threading.get_ident())
        time.sleep(0.01)
        try:
            return real_preadv(fd, bufs, off)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(reader_mod.os, "preadv", slow)
    lay = layer_layouts(model)[1]
    with LayerReader(model.files, threads=3) as rd, Arena.create(1, lay.nbytes) as arena:
        rd.read_into(lay.ranges(), arena.slot_view(0))
        t = lay.tensor("ffn_down.weight")
        assert np.array_equal(arena.slot_array(0)[t.slot_offset : t.slot_offset + t.nbytes],
                              model.tensor_bytes(model.layers[1]["ffn_down.weight"]))
    assert most[0] == 3 and len(threads) == 3


def test_a_failed_piece_waits_for_the_others(model, small_chunks, monkeypatch):
    """read_into raises only after every other piece of the call is done: none writes into the
    slot once it is handed back."""
    lay = layer_layouts(model)[0]
    first = lay.ranges()[0].file_offset
    real_preadv = os.preadv
    finished = []

    def fail_first(fd, bufs, off):
        if off == first:
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(0.02)
        n = real_preadv(fd, bufs, off)
        finished.append(off)
        return n

    monkeypatch.setattr(reader_mod.os, "preadv", fail_first)
    with LayerReader(model.files, threads=4) as rd, Arena.create(1, lay.nbytes) as arena:
        pieces = sum(-(-r.nbytes // reader_mod.CHUNK) for r in lay.ranges())
        with pytest.raises(ModelError, match=f"read error at byte {first}: Input/output error"):
            rd.read_into(lay.ranges(), arena.slot_view(0))
        done = len(finished)
        time.sleep(0.1)
        assert done == len(finished) == pieces - 1


def test_default_threads_follow_the_cores():
    assert [reader_mod.default_threads(c) for c in (1, 2, 4, 16, 64)] == [2, 2, 2, 8, 8]
    with pytest.raises(ConfigError, match="--read-threads 0"):
        LayerReader([], threads=0)


def test_range_outside_slot_and_unknown_file(model):
    lay = layer_layouts(model)[0]
    with LayerReader(model.files) as rd:
        with pytest.raises(ConfigError, match="make the slots larger"):
            rd.read_into(lay.ranges(), memoryview(bytearray(4096)))
        with pytest.raises(ConfigError, match="not opened"):
            rd.read_into([ReadRange("/nope.gguf", 0, 1, 0)], memoryview(bytearray(4096)))
    with pytest.raises(ModelError, match="cannot open"):
        LayerReader(["/nonexistent/model.gguf"])


def test_readers_for_round_robin_and_dirs(tmp_path):
    files = ["/m/a-00001-of-00002.gguf", "/m/a-00002-of-00002.gguf"]
    plan = readers_for(files, 2)
    ranges = [ReadRange(files[0], 0, 10, 0), ReadRange(files[1], 0, 10, 4096)]
    assert plan.split(0, ranges) == {0: ranges}
    assert plan.split(1, ranges) == {1: ranges}

    d0, d1 = tmp_path / "nvme0", tmp_path / "nvme1"
    files = [str(d0 / "m-00001-of-00002.gguf"), str(d1 / "m-00002-of-00002.gguf")]
    ranges = [ReadRange(files[0], 0, 10, 0), ReadRange(files[1], 0, 10, 4096)]
    plan = readers_for(files, 2, [str(d0), str(d1)])
    assert plan.files == ((files[0],), (files[1],))
    assert plan.split(5, ranges) == {0: [ranges[0]], 1: [ranges[1]]}
    # two readers on one drive take turns on its files
    plan = readers_for(files, 3, [str(d0), str(d0), str(d1)])
    assert plan.split(0, ranges) == {0: [ranges[0]], 2: [ranges[1]]}
    assert plan.split(1, ranges) == {1: [ranges[0]], 2: [ranges[1]]}
    with pytest.raises(ConfigError, match="^1 reader directory given for 3 readers; give one per reader$"):
        readers_for(files, 3, [str(d0)])
    with pytest.raises(ConfigError, match="^2 reader directories given for 1 reader; give one per reader$"):
        readers_for(files, 1, [str(d0), str(d1)])
    with pytest.raises(ConfigError, match="not under any reader directory"):
        readers_for(files, 1, [str(d0)])
