"""bin/bench links: what the coordinator's sockets cost the host a decode step (coordinator/links.py):
one round of a step's send, the wait for the compute process's answer and its drain, as two backend
calls (the step's submit and its collect) run as `Pipeline._call` runs them (`run_task`, NOTE [ backend
calls without the loop ]) or each entering the loop (`run_until_complete`), with the answer already
queued (the CLI's case when it is slower than the device) and with the answer coming while it waits;
and the loop's entry alone."""

from __future__ import annotations

import statistics
import threading
import time

import uvloop
import zmq

from layerstream.coordinator.event_loop import run_task
from layerstream.coordinator.links import CoordinatorLinks
from layerstream.proto.codec import encode
from layerstream.proto.messages import Shutdown
from layerstream.proto.sockets import make_dealer


def _rounds(loop, links: CoordinatorLinks, child: zmq.Socket, n: int, queued: bool, run) -> list[float]:
    """Seconds of each of n rounds, each call run by `run(loop, coro)`; the child's answer queued
    before the round, or sent by a thread once the round has sent its step."""
    step, msg = Shutdown("step"), encode(Shutdown("answer"))  # (any small message stands in for both)

    async def submit() -> None:
        await links.send("compute", "compute", step)

    async def collect() -> None:
        await links.wait(5.0)
        if not await links.drain():
            raise RuntimeError("the child's answer did not arrive")

    stop = threading.Event()

    def answer() -> None:  # the child: answers each step it is sent
        while not stop.is_set():
            if child.poll(100):
                child.recv_multipart()
                child.send_multipart(msg)

    times = []
    helper = None if queued else threading.Thread(target=answer, daemon=True)
    if helper is not None:
        helper.start()
    try:
        for _ in range(n):
            if queued:
                child.send_multipart(msg)
                while not links.socks["compute"].getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    pass
            t0 = time.perf_counter()
            run(loop, submit())
            run(loop, collect())
            times.append(time.perf_counter() - t0)
            if queued:
                child.recv_multipart()
    finally:
        stop.set()
        if helper is not None:
            helper.join()
    return times


def bench_links(args) -> None:
    loop = uvloop.new_event_loop()
    links = CoordinatorLinks("ipc", "127.0.0.1", 1 << 20, 1 << 20)
    ctx = zmq.Context()
    child = make_dealer(ctx, links.ep.compute, "compute")
    try:
        child.send_multipart(encode(Shutdown("hello")))  # (the ROUTER learns the child's identity)
        loop.run_until_complete(links.wait(5.0))
        loop.run_until_complete(links.drain())

        async def nothing() -> None:
            return None
        entered = type(loop).run_until_complete
        rows = [("loop entry alone", lambda: [_entry(loop, nothing) for _ in range(args.rounds)])]
        for how, run in (("run_task", run_task), ("loop entered", entered)):
            rows += [(f"answer queued, {how}", lambda run=run: _rounds(loop, links, child, args.rounds, True, run)),
                     (f"answer comes, {how}", lambda run=run: _rounds(loop, links, child, args.rounds, False, run))]
        print(f"{'submit and collect':<34} {'median µs':>10} {'best µs':>8}  "
              f"({args.rounds} rounds each, after as many untimed)")
        for label, fn in rows:
            fn()  # (warm)
            ts = fn()
            print(f"{label:<34} {statistics.median(ts) * 1e6:>10.1f} {min(ts) * 1e6:>8.1f}")
    finally:
        child.close(0)
        ctx.term()
        links.close()
        loop.close()


def _entry(loop, coro_fn) -> float:
    t0 = time.perf_counter()
    loop.run_until_complete(coro_fn())
    return time.perf_counter() - t0


def add_parser(sub) -> None:
    p = sub.add_parser("links", help="the coordinator's sockets a decode step: a step's send, wait and drain on the loop")
    p.add_argument("--rounds", type=int, default=2000, help="timed rounds per figure (default 2000)")
    p.set_defaults(func=bench_links)
