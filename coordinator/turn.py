"""One request through the engine core, timed: the generation loop of the CLI and of its chat."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from layerstream.coordinator.args import MAX_CTX
from layerstream.coordinator.lookup import LookupStats

log = logging.getLogger("layerstream.request")


def counted(n: int, noun: str) -> str:
    """'1 token', '2 tokens': n and the noun, plural but for one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class Rates:
    """Prompt and decode figures of one or more requests, as llama.cpp and Ollama print them."""

    prompt_tokens: int = 0  # prompt tokens computed
    reused_tokens: int = 0  # prompt tokens whose KV an earlier request left in the row (not computed)
    prompt_s: float = 0.0  # from the request's submission to its first sampled token
    sampled: int = 0  # tokens sampled (an end-of-sequence token included)
    decode_s: float = 0.0  # from the first sampled token to the last: the prompt excluded
    lookup: LookupStats | None = None  # speculation by prompt lookup, where on

    def add(self, other: "Rates") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.reused_tokens += other.reused_tokens
        self.prompt_s += other.prompt_s
        self.sampled += other.sampled
        self.decode_s += other.decode_s
        if other.lookup is not None:
            self.lookup = other.lookup if self.lookup is None else self.lookup.plus(other.lookup)

    def line(self, load_s: float | None = None) -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.1f} tokens/s" if n > 0 and s > 0 else "n/a"

        # the first sampled token ends the prompt's time; the decode rate counts the ones after it
        decode_n = max(self.sampled - 1, 0)
        load = "" if load_s is None else f"load {load_s:.1f} s; "
        reused = f" (and {self.reused_tokens} reused)" if self.reused_tokens else ""
        return (f"{load}prompt: {counted(self.prompt_tokens, 'token')}{reused} in {self.prompt_s:.2f} s, "
                f"{rate(self.prompt_tokens, self.prompt_s)}; decode: {counted(self.sampled, 'token')} in "
                f"{self.decode_s:.2f} s, {rate(decode_n, self.decode_s)}"
                + (f"; {self.lookup.line(self.decode_s)}" if self.lookup is not None and self.lookup.passes else ""))


class Turn:
    """Generates one reply through `engine.core`; `stop()` ends it between steps, and the
    request is aborted in the core (its row freed) however the reply ends."""

    _count = 0

    def __init__(self, engine, ids: list[int], params):
        Turn._count += 1
        if params.max_tokens >= MAX_CTX and engine.cfg.on_context_full == "error":
            # -n -1: until the end of sequence, or the context's room, where the reply ends as at -n
            params = replace(params, max_tokens=max(1, engine.cfg.ctx - len(ids)))
        self.engine, self.ids, self.params = engine, ids, params
        self.request_id = f"cli-{Turn._count}"
        self.rates = Rates()
        self.finish_reason: str | None = None
        self.stopped = False
        self.stamps: list[float] = []  # perf_counter at each output that sampled tokens (the bench's intervals)

    def pieces(self, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """The reply's text, piece by piece; ends early (stopped = True) once stop() says so."""
        core = self.engine.core
        reused = getattr(core, "reused_tokens", 0)
        spec = getattr(core, "spec", None)
        spec0 = None if spec is None else LookupStats(**vars(spec))
        t0 = time.perf_counter()
        t_first = t_last = None
        core.add_request(self.request_id, self.ids, self.params)
        log.info("%s: started, %d prompt tokens", self.request_id, len(self.ids))
        try:
            # until the reply ends: a step still in flight (its token discarded, core.py NOTE [ one step
            # behind ]) is collected by the next step the core runs, so the prompt comes back at once
            while self.finish_reason is None and core.has_unfinished():
                if stop():
                    self.stopped = True
                    return
                for out in core.step():
                    if out.request_id != self.request_id:
                        continue
                    if out.token_ids or out.finish_reason == "eos":
                        t_last = time.perf_counter()
                        t_first = t_first or t_last
                        self.stamps.append(t_last)
                        self.rates.sampled += len(out.token_ids) + (out.finish_reason == "eos")  # (drafts: several)
                    if t_first is not None and not self.rates.prompt_tokens:
                        self.rates.reused_tokens = getattr(core, "reused_tokens", 0) - reused
                        self.rates.prompt_tokens = len(self.ids) - self.rates.reused_tokens
                        self.rates.prompt_s = t_first - t0
                    if out.text:
                        yield out.text
                    if out.finished:
                        self.finish_reason = out.finish_reason
                        out.raise_for_failure(self.engine.cfg.on_context_full, self.engine.cfg.ctx)
        finally:
            if t_first is not None:
                self.rates.decode_s = t_last - t_first
            if spec0 is not None and spec.passes > spec0.passes:
                self.rates.lookup = spec.since(spec0)
            core.abort(self.request_id)  # a reply stopped or failed gives its row back
            core.aborted.clear()  # (its report is for nobody: one request at a time here)
            log.info("%s: ended (%s); %s", self.request_id, "stopped" if self.stopped else self.finish_reason,
                     self.rates.line())
