"""Codec: round trips of every message type and a typed error for every kind of bad input."""

import logging

import msgpack
import pytest

from layerstream.proto import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ArenaDesc,
    AttachArena,
    BadMessageCounter,
    EncodeError,
    Failed,
    Forward,
    ForwardDone,
    ForwardSeq,
    LayerDone,
    LayerReady,
    LayerStaged,
    LoadLayer,
    MalformedMessage,
    ProtocolError,
    ReadFailed,
    Ready,
    SamplerStart,
    Shutdown,
    StatsReply,
    StatsRequest,
    StepFailed,
    UnknownTag,
    VersionMismatch,
    decode,
    decode_extra,
    encode,
    from_wire,
    peek_tag,
    to_wire,
)

SAMPLES = [
    Ready("reader", "reader-0", 4242, {"drive": "/dev/nvme0", "slots": [0, 1], "ok": True, 3: None}),
    Shutdown("user asked"),
    Failed("reader", "reader-1", "LayerReader.read", "OSError: [Errno 5] I/O error", "Traceback ...\n"),
    StatsRequest(),
    AttachArena("layerstream-1-ab", 3, 8192),
    StatsReply("compute", "compute-0", {"h2d_s": 0.25, "layers": 30, "per_layer": [0.1, 0.2]}),
    LoadLayer(7, 12, 3, [[0, 4096, 1 << 33, 0], [1, 0, 512, 1 << 33]]),
    LayerStaged(7, 12, 3, 544_000_000, 0.0123, "reader-0"),
    ReadFailed(7, 12, 3, "OSError: short read"),
    Forward(5, [ForwardSeq(0, [1, 2, 3], [0, 1, 2], [0, 1, 2], [0, 1, 2]),
                ForwardSeq(1, [4], [9], [9], list(range(10)))], "all"),
    Forward(6, [ForwardSeq(0, [-1], [3], [3], [0, 1, 2, 3], 1), ForwardSeq(1, [7, 8], [0, 1], [0, 1], [0, 1], 2)],
            "none", [SamplerStart(1, 0.8, 40, 0.95, 0.05, 1.1, 64, (1 << 64) - 1, [7, 8])], 4),
    LayerDone(5, [[12, 3]]),
    LayerDone(5, [[12, 3], [13, 0]]),
    LayerReady(5, [[12, 3], [14, 1]]),
    ForwardDone(5, [2, 49152], "float32", {"forward_s": 0.8}),
    ForwardDone(6, [], "float32", {}),
    ForwardDone(7, [], "float32", {}, [12, -1, 3], [0, 0, 1]),
    ForwardDone(8, [], "float32", {}, [12, -1, 3], [0, 0, 1], [0, 0, 4]),
    StepFailed(9, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
]


def frames_of(version, tag, body_obj):
    return [bytes((version, tag)), msgpack.packb(body_obj, use_bin_type=True)]


def test_samples_cover_every_type():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = encode(msg)
    assert len(frames) == 2
    assert frames[0] == bytes((PROTOCOL_VERSION, msg.TAG))
    assert peek_tag(frames) == msg.TAG
    back = decode(frames)
    assert type(back) is type(msg)
    assert back == msg


def test_round_trip_from_memoryviews():
    msg = SAMPLES[6]
    assert decode([memoryview(f) for f in encode(msg)]) == msg


def test_extra_frames_pass_through_uncopied():
    logits = bytearray(b"\x01\x02" * 100)
    view = memoryview(logits)
    frames = encode(ForwardDone(1, [1, 100], "float32", {}), extra=[view])
    assert frames[2] is view
    decoded = decode_extra(frames)
    assert decoded.msg.step == 1
    assert decoded.extra == [view]
    assert decode_extra(encode(Shutdown("done"))).extra == []


def test_tags_unique_and_one_byte():
    assert all(0 < tag < 256 and cls.TAG == tag for tag, cls in MESSAGE_TYPES.items())


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        SAMPLES[0].role = "x"


def test_failed_from_exception():
    try:
        raise KeyError("blk.3.attn_q.weight")
    except KeyError as exc:
        msg = Failed.from_exception("reader", "reader-0", "load", exc)
    assert msg.error == "KeyError: 'blk.3.attn_q.weight'"
    assert "Traceback" in msg.traceback and "raise KeyError" in msg.traceback
    assert decode(encode(msg)) == msg


def test_unknown_tag():
    with pytest.raises(UnknownTag, match="unknown message tag 200"):
        decode(frames_of(PROTOCOL_VERSION, 200, []))


def test_wrong_version():
    with pytest.raises(VersionMismatch, match=f"version 9 received, this process speaks {PROTOCOL_VERSION}"):
        decode(frames_of(9, LayerDone.TAG, [1, [[2, 3]]]))


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([7, 12, 3, [[0, 1, 2, 3]]])[:-3],  # truncated
        b"\xc1\xc1\xc1",  # never-used msgpack byte
        msgpack.packb([7, 12, 3, []]) + b"\x01",  # trailing bytes
        b"",
    ],
    ids=["truncated", "garbage", "extra-data", "empty"],
)
def test_bad_msgpack(body):
    with pytest.raises(MalformedMessage, match="LoadLayer: body is not valid msgpack"):
        decode([bytes((PROTOCOL_VERSION, LoadLayer.TAG)), body])


def test_wrong_arity():
    with pytest.raises(MalformedMessage, match=r"LoadLayer: body has 3 fields, expected 4 \(req, layer, slot, ranges\)"):
        decode(frames_of(PROTOCOL_VERSION, LoadLayer.TAG, [7, 12, 3]))
    with pytest.raises(MalformedMessage, match="body has 1 fields, expected 0"):
        decode(frames_of(PROTOCOL_VERSION, StatsRequest.TAG, [1]))


def test_non_list_body():
    with pytest.raises(MalformedMessage, match="body must be a list of fields, got dict"):
        decode(frames_of(PROTOCOL_VERSION, Shutdown.TAG, {"reason": "x"}))
    with pytest.raises(MalformedMessage, match="got int"):
        decode(frames_of(PROTOCOL_VERSION, Shutdown.TAG, 3))


@pytest.mark.parametrize(
    "tag, body, text",
    [
        (LayerReady.TAG, [1, 2], "LayerReady.ready must be list, got int"),
        (LayerReady.TAG, [1, [[2, "3"]]], r"LayerReady.ready must hold \[layer, slot\] pairs of ints >= 0, got \[2, '3'\]"),
        (LayerReady.TAG, [1, [[2, True]]], "LayerReady.ready must hold"),
        (LayerDone.TAG, [1, [[2, 3, 4]]], "LayerDone.done must hold"),
        (LayerDone.TAG, [1, [[-1, 3]]], "LayerDone.done must hold"),
        (LayerDone.TAG, [1, [7]], "LayerDone.done must hold"),
        (LoadLayer.TAG, [1, 2, 3, {}], "LoadLayer.ranges must be list, got dict"),
        (ForwardDone.TAG, [1, [], 5, {}, [], [], []], "ForwardDone.dtype must be str, got int"),
        (ForwardDone.TAG, [1, [], "float32", {}, [3, 1.5], [0, 0], []], "ForwardDone.ids must hold ints, got 1.5"),
        (Forward.TAG, [1, [], "some", [], 0], "Forward.want_logits must be one of"),
        (Forward.TAG, [1, [], "last", [[0, 0.8, 40]], 0], r"Forward.starts\[0\] must be a SamplerStart list of 9 fields"),
        (Forward.TAG, [1, [], "last", [[0, 0.8, 40, 0.9, 0.05, 1.1, 64, "7", []]], 0],
         r"Forward.starts\[0\]: SamplerStart.seed must be int, got str"),
        (Shutdown.TAG, [b"bytes"], "Shutdown.reason must be str, got bytes"),
        (Forward.TAG, [1, [], "last", [], "3"], "Forward.failed must be int, got str"),
        (StepFailed.TAG, [1, None], "StepFailed.error must be str, got NoneType"),
        (AttachArena.TAG, ["x", "3", 8192], "AttachArena.n_slots must be int, got str"),
        (AttachArena.TAG, [None, 3, 8192], "AttachArena.name must be str, got NoneType"),
    ],
)
def test_wrong_field_types(tag, body, text):
    with pytest.raises(MalformedMessage, match=text):
        decode(frames_of(PROTOCOL_VERSION, tag, body))


SEQ = [0, [1, 2], [0, 1], [0, 1], [0, 1], 0, -1]  # a Forward's sequence as it travels


@pytest.mark.parametrize(
    "seqs, text",
    [
        ([SEQ[:6]], r"Forward.seqs\[0\] must be a ForwardSeq list of 7 fields \(row, tokens, slots, positions, kv_pos, "
                    r"sample, kv_count\)"),
        ([SEQ + [7]], r"Forward.seqs\[0\] must be a ForwardSeq list of 7 fields"),
        ([SEQ, 3], r"Forward.seqs\[1\] must be a ForwardSeq list of 7 fields .* got 3"),
        ([{"row": 0}], r"Forward.seqs\[0\] must be a ForwardSeq list"),
        ([["0", *SEQ[1:]]], r"Forward.seqs\[0\]: ForwardSeq.row must be int, got str"),
        ([[True, *SEQ[1:]]], r"Forward.seqs\[0\]: ForwardSeq.row must be int, got bool"),
        ([[0, 5, *SEQ[2:]]], r"Forward.seqs\[0\]: ForwardSeq.tokens must be list, got int"),
        ([[0, [1, 2.5], *SEQ[2:]]], r"Forward.seqs\[0\]: ForwardSeq.tokens must hold ints, got 2.5"),
        ([SEQ[:4] + [[0, None], 0, -1]], r"Forward.seqs\[0\]: ForwardSeq.kv_pos must hold ints, got None"),
        ([SEQ[:5] + [True, -1]], r"Forward.seqs\[0\]: ForwardSeq.sample must be int, got bool"),
        ([SEQ[:6] + [2.0]], r"Forward.seqs\[0\]: ForwardSeq.kv_count must be int, got float"),
    ],
    ids=["too-few", "too-many", "not-a-list", "a-map", "str-row", "bool-row", "int-tokens", "float-token",
         "none-kv-pos", "bool-sample", "float-kv-count"],
)
def test_forward_seq_of_wrong_arity_or_type_is_refused(seqs, text):
    """Forward.seqs holds ForwardSeq records: the codec refuses one of the wrong arity or types,
    naming the sequence and the field."""
    with pytest.raises(MalformedMessage, match=text):
        decode(frames_of(PROTOCOL_VERSION, Forward.TAG, [1, seqs, "last", [], 0]))
    ok = decode(frames_of(PROTOCOL_VERSION, Forward.TAG, [1, [SEQ], "last", [], 0]))
    assert ok.seqs == [ForwardSeq(*SEQ)] and ok.seqs[0].tokens == [1, 2]


def test_encode_refuses_a_forward_whose_seqs_are_not_records():
    with pytest.raises(EncodeError, match=r"Forward.seqs\[0\] must be a ForwardSeq, got list"):
        encode(Forward(1, [SEQ], "last"))
    with pytest.raises(EncodeError, match="ForwardSeq.row must be int, got str"):
        encode(Forward(1, [ForwardSeq("0", [1], [0], [0], [0])], "last"))


def test_int_lists_are_checked_item_by_item():
    with pytest.raises(MalformedMessage, match=r"ForwardDone.shape must hold ints, got '2'"):
        decode(frames_of(PROTOCOL_VERSION, ForwardDone.TAG, [1, [1, "2"], "float32", {}, [], [], []]))


def test_arena_description_travels_as_a_checked_record():
    desc = ArenaDesc("layerstream-1-ab", 3, 8192)
    assert to_wire(desc) == ["layerstream-1-ab", 3, 8192]
    assert from_wire(ArenaDesc, msgpack.unpackb(msgpack.packb(to_wire(desc)))) == desc
    for bad, text in ((["x", 3], "ArenaDesc must be a list of 3 fields"), ({"name": "x"}, "got {'name': 'x'}"),
                      (["x", "3", 8192], "ArenaDesc.n_slots must be int, got str"), (None, "got None")):
        with pytest.raises(MalformedMessage, match=text):
            from_wire(ArenaDesc, bad)
    got = decode(encode(AttachArena.of(desc)))  # (readers and compute get it in a message)
    assert type(got) is AttachArena and got.desc == desc


def test_float_field_takes_int():
    msg = decode(frames_of(PROTOCOL_VERSION, LayerStaged.TAG, [1, 2, 3, 4, 0, "r"]))
    assert msg.read_s == 0


def test_missing_frames_and_bad_header():
    with pytest.raises(MalformedMessage, match="at least 2 frames"):
        decode([b"garbage"])
    with pytest.raises(MalformedMessage, match="header frame must be 2 bytes"):
        decode([b"\x01\x02\x03", b"\x90"])


def test_ext_types_refused():
    body = msgpack.packb([msgpack.ExtType(5, b"x")])
    with pytest.raises(MalformedMessage, match="extension type 5"):
        decode([bytes((PROTOCOL_VERSION, LayerDone.TAG)), body])


def test_encode_refuses_bad_messages():
    with pytest.raises(EncodeError, match="not a registered message type: dict"):
        encode({"slot": 1})
    with pytest.raises(EncodeError, match="LayerDone.done must hold"):
        encode(LayerDone(1, [[2, 3.0]]))
    with pytest.raises(EncodeError, match="cannot pack"):
        encode(Ready("r", "i", 1, {"x": object()}))
    with pytest.raises(EncodeError, match="want_logits"):
        encode(Forward(1, [], "first"))


def test_errors_share_a_base():
    for cls in (UnknownTag, VersionMismatch, MalformedMessage, EncodeError):
        assert issubclass(cls, ProtocolError)


def test_counter_counts_and_rate_limits_logs(caplog):
    counter = BadMessageCounter("test-recv", log_every_s=60.0)
    with caplog.at_level(logging.WARNING, logger="layerstream.proto.codec"):
        assert counter.decode([b"junk"], peer=b"reader-0") is None
        assert counter.decode(frames_of(PROTOCOL_VERSION, 250, [])) is None
        assert counter.decode(frames_of(PROTOCOL_VERSION - 1, 1, [])) is None
        assert counter.decode(encode(LayerDone(4, [[0, 1]]))).msg == LayerDone(4, [[0, 1]])
    assert counter.total == 3
    assert counter.by_kind == {"MalformedMessage": 1, "UnknownTag": 1, "VersionMismatch": 1}
    assert isinstance(counter.last_error, VersionMismatch)
    assert counter.stats()["bad_messages"] == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1  # rate-limited: the first one only, within the interval
    assert "test-recv: dropped bad message from b'reader-0': MalformedMessage" in lines[0]


def test_counter_reports_suppressed_count(caplog):
    counter = BadMessageCounter("r", log_every_s=0.0)
    with caplog.at_level(logging.WARNING, logger="layerstream.proto.codec"):
        counter.decode([b"a"])
        counter.decode([b"b"])
    assert len(caplog.records) == 2
    assert "2 bad in total" in caplog.records[1].getMessage()


def test_a_sequence_whose_slots_hold_positions_in_order_travels_as_a_count():
    """ForwardSeq.of: a ring that has not slid (slot i holds position i: a range) sends its count,
    not the list, so a step's message does not grow with the context; a slid ring's list travels
    whole; either comes back as the positions it stood for."""
    whole = ForwardSeq.of(0, [-1], [4095], [4095], range(4096), 1)
    assert whole.kv_pos == [] and whole.kv_count == 4096
    back = decode(encode(Forward(1, [whole], "none")))
    assert back.seqs[0].kv_positions() == range(4096)
    slid = ForwardSeq.of(0, [-1], [2], [9], [0, 1, 9, 3, 4, 5, 6, 7], 1)
    assert slid.kv_count == -1 and decode(encode(Forward(2, [slid], "none"))).seqs[0].kv_positions() == slid.kv_pos
    for kv_pos, count in (([9, 9, 9], 5), ([], -7)):  # both at once, or a count below -1: refused, not guessed
        with pytest.raises(ValueError, match=rf"ForwardSeq of row 0: kv_count {count} with {len(kv_pos)} kv_pos"):
            ForwardSeq(0, [-1], [0], [0], kv_pos, 1, count).kv_positions()
