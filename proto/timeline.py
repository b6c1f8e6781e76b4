"""Stage profiling shared by every process: busy/wait time, byte counters, trace events.

Timestamps are `time.monotonic_ns()`: CLOCK_MONOTONIC is one clock for every process of a
Linux host, so events of readers, compute and coordinator line up on one timeline. A snapshot
is plain data (msgpack-friendly) and travels in a StatsReply.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any


class Timeline:
    """Per-process recorder: `span()` times work of a category; events are kept when tracing."""

    def __init__(self, role: str, ident: str, trace: bool = False, max_events: int = 200_000):
        self.role, self.ident, self.trace = role, ident, trace
        self.max_events = max_events
        self.busy_ns: dict[str, int] = defaultdict(int)
        self.count: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.events: list[list[Any]] = []  # [name, cat, t0_ns, dur_ns, args]

    @contextmanager
    def span(self, cat: str, name: str = "", nbytes: int = 0, **args):
        t0 = time.monotonic_ns()
        try:
            yield
        finally:
            self.add(cat, name or cat, t0, time.monotonic_ns() - t0, nbytes, **args)

    def add(self, cat: str, name: str, t0_ns: int, dur_ns: int, nbytes: int = 0, **args) -> None:
        """Record one interval (also for intervals measured elsewhere, e.g. CUDA events)."""
        self.busy_ns[cat] += dur_ns
        self.count[cat] += 1
        self.bytes[cat] += nbytes
        if self.trace and len(self.events) < self.max_events:
            if nbytes:
                args["bytes"] = nbytes
            self.events.append([name, cat, t0_ns, dur_ns, args])

    def incr(self, key: str, n: int = 1) -> None:
        self.count[key] += n

    def snapshot(self, clear_events: bool = True) -> dict[str, Any]:
        snap = {
            "role": self.role, "ident": self.ident,
            "busy_ns": dict(self.busy_ns), "count": dict(self.count), "bytes": dict(self.bytes),
            "events": self.events,
        }
        if clear_events:
            self.events = []
        return snap


def merge_snapshots(snaps: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Sum busy seconds, counts and bytes per category over processes."""
    tot: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in snaps:
        for cat, ns in s.get("busy_ns", {}).items():
            tot[cat]["busy_s"] += ns / 1e9
        for cat, n in s.get("count", {}).items():
            tot[cat]["count"] += n
        for cat, b in s.get("bytes", {}).items():
            tot[cat]["bytes"] += b
    return tot


def stats_table(snaps: list[dict[str, Any]], wall_s: float, extra: dict[str, Any] | None = None) -> str:
    """The per-stage table `--stats` prints at exit."""
    tot = merge_snapshots(snaps)
    rows = [f"{'stage':<16}{'count':>8}{'busy s':>10}{'GB':>10}{'GB/s':>9}{'ms each':>10}"]
    for cat in ("read", "copy", "expert_copy", "expert_prefetch", "dequant", "compute", "cpu_share", "cpu_pack",
                "step", "wait_layer", "wait_copy", "wait_route"):
        if cat not in tot:
            continue
        t = tot[cat]
        gbs = f"{t['bytes'] / t['busy_s'] / 1e9:.2f}" if t["bytes"] and t["busy_s"] else "-"
        each = t["busy_s"] / t["count"] * 1e3 if t["count"] else 0.0
        rows.append(f"{cat:<16}{int(t['count']):>8}{t['busy_s']:>10.3f}{t['bytes'] / 1e9:>10.3f}{gbs:>9}{each:>10.3f}")
    busy = tot.get("compute", {}).get("busy_s", 0.0) + tot.get("dequant", {}).get("busy_s", 0.0)
    steps = tot.get("step", {}).get("busy_s", 0.0)
    line = f"wall time {wall_s:.3f} s"
    if steps > 0:  # the share of the forward steps' time the device computed nothing
        line += f"; {steps:.3f} s in {int(tot['step']['count'])} steps, compute idle {max(0.0, 1 - busy / steps):.1%}"
    rows.append(line)
    for k, v in (extra or {}).items():
        rows.append(f"{k}: {v}")
    return "\n".join(rows)


def write_chrome_trace(path: str, snaps: list[dict[str, Any]]) -> int:
    """Write a Chrome trace / Perfetto JSON of every process's events; returns the event count."""
    events: list[dict[str, Any]] = []
    t_min = min((e[2] for s in snaps for e in s.get("events", [])), default=0)
    for pid, s in enumerate(snaps, start=1):
        name = f"{s.get('role', '?')} {s.get('ident', '')}".strip()
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
        for ename, cat, t0, dur, args in s.get("events", []):
            tid = {"copy": 1, "expert_copy": 1, "expert_prefetch": 1, "dequant": 2, "compute": 2, "cpu_share": 3, "cpu_pack": 3}.get(cat, 0)
            events.append({
                "name": ename, "cat": cat, "ph": "X", "pid": pid, "tid": tid,
                "ts": (t0 - t_min) / 1e3, "dur": max(dur, 1) / 1e3, "args": args,
            })
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return len(events)
