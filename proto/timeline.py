"""Stage profiling shared by every process: busy/wait time, byte counters, trace events.

Timestamps are `time.monotonic_ns()`: CLOCK_MONOTONIC is one clock for every process of a
Linux host, so events of readers, compute and coordinator line up on one timeline. A snapshot
is plain data (msgpack-friendly) and travels in a StatsReply.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, suppress
from typing import Any

from layerstream.errors import ConfigError


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
                "step", "step_setup", "step_tail", "wait_layer", "wait_copy", "wait_route", "graph_warm",
                "graph_capture"):
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
    # into a file beside it, then renamed over it: a full disk leaves no half-written trace, and an
    # earlier trace at `path` stays whole (through a symbolic link: the file it names)
    path, part = os.path.realpath(path), trace_part(path)
    try:
        with open(part, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        os.replace(part, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(part)
        raise
    return len(events)


def trace_part(path: str) -> str:
    """The file a trace for `path` is written into before it is renamed over it (through a symbolic
    link: beside the file it names)."""
    return f"{os.path.realpath(path)}.part{os.getpid()}"


def trace_report(path: str, snaps: list[dict[str, Any]]) -> str:
    """Write every process's trace to `path` (write_chrome_trace); the lines that say so, with
    device_gaps' where the trace has steps of layers."""
    try:
        n = write_chrome_trace(path, snaps)
    except OSError as e:  # (arg_files.check_trace opened it up front; a disk can still fill meanwhile)
        raise ConfigError(f"--trace {path}: cannot write it ({e.strerror or e})") from None
    gaps = device_gaps(snaps)
    return f"trace: {n} events written to {path}" + (f"\n{gaps}" if gaps else "")


def device_gaps(snaps: list[dict[str, Any]]) -> str | None:
    """A trace's one-line answer to where the compute stream waits for the host: the compute
    process's layer intervals (`compute` and `dequant` events; on CUDA each from the layer's start
    event to its end, copies waited for included) cut into steps where the layer index goes back,
    and the medians over those steps of: their layers' span, the stream's time with nothing queued
    between their layers and before their first (after the step before's last: its head, sampling
    and the next step's set-up), and the layer that waits longest; where the compute process timed
    them, the host's set-up of a step (from its launch to its first launched work) and its tail
    (from its last layer's release to its launch's return: the head, the sampling). None without
    two such steps."""
    iv = sorted((e[2], e[2] + e[3], e[4].get("layer", -1)) for s in snaps if s.get("role") == "compute"
                for e in s.get("events", []) if e[1] in ("compute", "dequant"))
    steps: list[list[tuple[int, int, int]]] = []
    for t in iv:
        if not steps or t[2] < steps[-1][-1][2]:  # (a layer's dequant, then its compute: one step)
            steps.append([])
        steps[-1].append(t)
    if len(steps) < 2:
        return None
    span, between, before, first, rest, waits, prev_end = [], [], [], [], [], {}, None
    for st in steps:
        idle, end = 0, st[0][1]
        spans = {st[0][2]: [st[0][0], st[0][1]]}  # each layer's: its dequant's start to its compute's end
        for a, b, layer in st[1:]:
            gap = max(0, a - end)
            idle += gap
            waits.setdefault(layer, []).append(gap)
            end = max(end, b)
            ab = spans.setdefault(layer, [a, b])
            ab[1] = max(ab[1], b)
        span.append(end - st[0][0])
        between.append(idle)
        if prev_end is not None:
            before.append(max(0, st[0][0] - prev_end))
        prev_end = end
        durs = [b - a for a, b in spans.values()]
        first.append(durs[0])
        rest.extend(durs[1:])
    worst = max(waits, key=lambda j: statistics.median(waits[j]), default=None)

    def ms(ns: float) -> str:
        return f"{ns / 1e6:.2f} ms"

    line = (f"device stream, medians over {len(steps)} steps (layer intervals as the trace times them): a step's layers "
            f"{ms(statistics.median(span))} from the first's start to the last's end, with nothing queued "
            f"{ms(statistics.median(between))} between them and {ms(statistics.median(before))} before the first; "
            f"the first's interval {ms(statistics.median(first))} (the resident layers' graph, where one runs)")
    if rest:
        line += f", another's {ms(statistics.median(rest))}"
    if worst is not None:
        line += f"; the longest wait before L{worst} ({ms(statistics.median(waits[worst]))})"
    host: dict[str, list[int]] = {"step_setup": [], "step_tail": []}
    for e in (e for s in snaps if s.get("role") == "compute" for e in s.get("events", []) if e[1] in host):
        host[e[1]].append(e[3])
    if host["step_setup"] and host["step_tail"]:  # (the compute process's own clock, not the device's)
        line += (f"; on the host, a step's set-up {ms(statistics.median(host['step_setup']))} before its first "
                 f"launch, its tail {ms(statistics.median(host['step_tail']))} after its last layer's release")
    return line
