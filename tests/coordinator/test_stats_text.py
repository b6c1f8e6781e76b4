"""--stats' closing lines name each part once: "CPU share: ...", never "CPU share: CPU share ..."."""

from __future__ import annotations

from layerstream.compute.cpu.balancer import MAX_TOKENS, Balancer
from layerstream.coordinator.stats import format_stats
from plans import plan, shaped


def _lines(share: Balancer, experts: Balancer) -> dict[str, str]:
    """format_stats' labelled lines for a compute snapshot as compute_proc.stats makes it."""
    snap = {"role": "compute", "ident": "compute", "count": {},
            "cpu_share": f"{share.describe()}; 4 threads; packed 0.50 GiB",
            "cpu_experts": f"{experts.describe()}; 12 computed; packed 0.25 GiB"}
    text = format_stats([snap], 1.0, plan(shaped("llama-3.1-8b"), 4))
    return {k: v for k, _, v in (line.partition(": ") for line in text.splitlines()) if k.startswith("CPU")}


def test_a_fixed_cpu_share_is_named_once():
    fixed = Balancer({}, 0.0, 0.8, 1.0, pack_frac=0.5, fixed=0.5)
    experts = Balancer({}, 0.0, 1.0, 1.0, pack_frac=0.25, fixed=0.25, what="missing experts")
    assert _lines(fixed, experts) == {
        "CPU share": f"fixed at 50% of the 4-bit rows, batches up to {MAX_TOKENS}; 4 threads; packed 0.50 GiB",
        "CPU experts": f"fixed at 25% of the missing experts, batches up to {MAX_TOKENS}; 12 computed; packed 0.25 GiB",
    }


def test_a_timed_cpu_share_is_named_once():
    auto = Balancer({1: 70.0}, 55.0, 0.8, 1.0, pack_frac=0.9)
    lines = _lines(auto, Balancer({1: 70.0}, 55.0, 1.0, 1.0, pack_frac=0.9, what="missing experts"))
    assert lines["CPU share"].startswith("timed per batch, of the 4-bit rows: batch 1: "), lines
    assert lines["CPU experts"].startswith("timed per batch, of the missing experts: batch 1: "), lines
    assert all("CPU share" not in v and "CPU experts" not in v for v in lines.values()), lines


def _experts_line(snap: dict) -> str:
    text = format_stats([snap], 1.0, plan(shaped("qwen3-30b-a3b"), 4))
    return next(v for k, _, v in (ln.partition(": ") for ln in text.splitlines()) if k == "experts")


def test_the_experts_line_says_how_many_a_layer_copied_ahead_and_how_often_late():
    """The experts' line carries the copies ahead's mean limit and late layers (NOTE [ copies ahead
    that land in time ]) as compute_proc.stats sends them."""
    snap = {"role": "compute", "ident": "compute", "count": {},
            "experts": {"policy": "lfu", "hits": 10, "misses": 30, "bytes": 4_000_000, "steps": 2, "tokens": 2,
                        "prefetch_hits": 60, "prefetched": 80, "prefetch_late": 7, "prefetch_limit": 5.25}}
    line = _experts_line(snap)
    assert line == ("10 of 100 fetched experts were in the device cache (10%, lfu); 60 (60%) copied ahead on the "
                    "previous layer's prediction, of 80 copied ahead (75% used; at most 5.2 a layer on average in "
                    "one-token steps, late in 7 layers); 4.0 MB moved over 2 steps with expert streaming (2.00 MB a token)")
    # steps of several tokens alone: no limit to speak of
    snap["experts"].update(prefetch_late=0, prefetch_limit=0.0)
    assert "(75% used); 4.0 MB moved" in _experts_line(snap)
    # the layer slots lent to the cache (NOTE [ the layer slots lent to the expert cache ])
    snap["experts"].update(lends=3, reclaimed=41)
    assert _experts_line(snap).startswith("10 of 100 fetched experts were in the device cache (10%, lfu, the layer "
                                          "slots lent to it 3 times (41 experts dropped where a prompt took them back));")
    # with the dequantization scratch among them (the room's size, as ExpertCache.stats sends it)
    snap["experts"].update(room=int(1.25 * 2**30), room_scratch=384 << 20)
    assert ("(10%, lfu, the layer slots and the dequantization scratch (1.25 GiB) lent to it 3 times (41 experts "
            "dropped") in _experts_line(snap)


def test_the_table_has_rows_for_the_decode_graphs_captures():
    """The captures' host time (graphs.py: graph_warm, the warm-up run; graph_capture, the capture)
    gets its rows in --stats' table."""
    from layerstream.proto.timeline import stats_table

    snap = {"role": "compute", "ident": "compute", "count": {"graph_warm": 4, "graph_capture": 4},
            "busy_ns": {"graph_warm": 8_000_000, "graph_capture": 12_000_000}, "bytes": {}}
    rows = {line.split()[0]: line.split()[1:] for line in stats_table([snap], 1.0).splitlines()[1:3]}
    assert rows == {"graph_warm": ["4", "0.008", "0.000", "-", "2.000"],
                    "graph_capture": ["4", "0.012", "0.000", "-", "3.000"]}, rows
