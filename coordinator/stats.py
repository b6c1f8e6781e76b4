"""The run's statistics: each process's snapshot read once into typed records, and the table
`--stats` prints.

Snapshots travel as plain data (proto/timeline.py's `Timeline.snapshot()` plus what the compute
process adds, in a StatsReply); `ProcessStats.parse` is the one place that reads them by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerstream.coordinator.plan import GiB, Plan
from layerstream.proto.timeline import stats_table

Snapshot = dict[str, Any]


@dataclass(frozen=True)
class ExpertStats:
    """The compute process's expert cache over the run (compute/experts.py, ExpertCache)."""

    policy: str
    hits: int  # chosen experts found in the device cache
    misses: int  # chosen experts copied after their router
    bytes: int  # bytes of experts copied
    steps: int  # steps that streamed experts
    tokens: int  # tokens of those steps
    prefetch_hits: int = 0  # chosen experts copied ahead on the previous layer's prediction
    prefetched: int = 0  # experts copied ahead
    cpu: int = 0  # experts the CPU computed
    prefetch_late: int = 0  # layers whose copies ahead had not landed when their misses were copied
    prefetch_limit: float = 0.0  # the mean limit of one-token steps' copies ahead (0: none such)
    lends: int = 0  # times the layer slots were lent to the cache (NOTE [ the layer slots lent to the expert cache ])
    reclaimed: int = 0  # experts dropped from them when a prompt took them back
    room: int = 0  # bytes lent: the layer slots, and `room_scratch` of them the prompts' dequantization scratch
    room_scratch: int = 0

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ExpertStats:
        return cls(str(d.get("policy", "lfu")), int(d["hits"]), int(d["misses"]), int(d["bytes"]), int(d["steps"]),
                   int(d["tokens"]), int(d.get("prefetch_hits", 0)), int(d.get("prefetched", 0)), int(d.get("cpu", 0)),
                   int(d.get("prefetch_late", 0)), float(d.get("prefetch_limit", 0.0)), int(d.get("lends", 0)),
                   int(d.get("reclaimed", 0)), int(d.get("room", 0)), int(d.get("room_scratch", 0)))

    def describe(self) -> str | None:
        n = self.hits + self.misses + self.prefetch_hits
        if not n:
            return None
        ahead, copied = self.prefetch_hits, self.prefetched
        # (NOTE [ copies ahead that land in time ] in compute/expert_pool.py: one-token steps only)
        limit = (f"; at most {self.prefetch_limit:.1f} a layer on average in one-token steps, late in "
                 f"{self.prefetch_late} layers") if self.prefetch_limit else ""
        pre = (f"; {ahead} ({ahead / n:.0%}) copied ahead on the previous layer's prediction, of {copied} "
               f"copied ahead ({ahead / max(copied, 1):.0%} used{limit})") if copied else ""
        what = "the layer slots and the dequantization scratch" if self.room_scratch else "the layer slots"
        size = f" ({self.room / 2**30:.2f} GiB)" if self.room else ""
        room = (f", {what}{size} lent to it {self.lends} times ({self.reclaimed} experts dropped where a prompt "
                f"took them back)") if self.lends else ""
        return (f"{self.hits} of {n} fetched experts were in the device cache ({self.hits / n:.0%}, {self.policy}{room})"
                f"{pre}; "
                f"{self.bytes / 1e6:.1f} MB moved over {self.steps} steps with expert streaming "
                f"({self.bytes / max(self.tokens, 1) / 1e6:.2f} MB a token)")


@dataclass(frozen=True)
class ProcessStats:
    """One process's counters: stage counts, the device's peak, and the compute process's parts."""

    role: str
    ident: str
    count: dict[str, int]
    device_peak_bytes: int = 0
    experts: ExpertStats | None = None
    cpu_share: str | None = None  # the CPU share's balancer, said in words
    cpu_experts: str | None = None

    @classmethod
    def parse(cls, snap: Snapshot) -> ProcessStats:
        ex = snap.get("experts")
        return cls(str(snap.get("role", "?")), str(snap.get("ident", "")), dict(snap.get("count", {})),
                   int(snap.get("device_peak_bytes", 0)), ExpertStats.parse(ex) if ex else None,
                   snap.get("cpu_share") or None, snap.get("cpu_experts") or None)


def format_stats(snaps: list[Snapshot], wall_s: float, plan: Plan) -> str:
    """The per-stage table, then a line for each of the run's parts (plan, experts, CPU share, caches)."""
    procs = [ProcessStats.parse(s) for s in snaps]
    c = {k: v for p in procs for k, v in p.count.items() if k.startswith(("prefetch", "host_cache"))}
    extra = {}
    peak = max((p.device_peak_bytes for p in procs), default=0)
    if peak:
        extra["device memory peak"] = f"{peak / GiB:.2f} GiB (torch's reserved memory)"
    ex = next((p.experts for p in procs if p.experts), None)
    if ex and ex.describe():
        extra["experts"] = ex.describe()
    share = next((p.cpu_share for p in procs if p.cpu_share), None)
    if share:
        extra["CPU share"] = share
    cpu_ex = next((p.cpu_experts for p in procs if p.cpu_experts), None)
    if cpu_ex:
        extra["CPU experts"] = cpu_ex
    return stats_table(snaps, wall_s, extra | {
        "plan": plan.describe(),
        "plan, device memory": plan.breakdown(),
        "host cache": f"{c.get('host_cache_hits', 0)} hits, {c.get('prefetch_reads', 0)} reads from disk",
        "prefetch": f"{c.get('prefetch_hit', 0)} layers ready before compute asked, {c.get('prefetch_miss', 0)} waited",
    })
