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
