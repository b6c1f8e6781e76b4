"""What the engine core gives back for a request (RequestOutput), and the stop strings' matcher."""

from __future__ import annotations

from dataclasses import dataclass

from layerstream.coordinator.kv_ring import context_full
from layerstream.errors import LayerstreamError


@dataclass
class RequestOutput:
    """What one step produced for one request: new text, and whether it finished and why."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "eos", "stop", "length", "abort", "context_full", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why, with finish_reason "error"

    def raise_for_failure(self, on_context_full: str, ctx: int) -> None:
        """Raise what a caller that runs one reply at a time reports: the request's own failure
        (e.g. NaN logits), or a full context when the run asked for an error there."""
        if self.finish_reason == "error":
            raise LayerstreamError(self.error or "the request failed")
        if self.finish_reason == "context_full" and on_context_full == "error":
            raise context_full(ctx)


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports when one is hit."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        for s in self.stops:
            k = self.buf.find(s)
            if k >= 0:
                out, self.buf = self.buf[:k], ""
                return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self, text: str = "") -> str:
        out, self.buf = self.buf + text, ""
        for s in self.stops:
            k = out.find(s)
            if k >= 0:
                return out[:k]
        return out
