"""Per-sequence KV ring bookkeeping: which physical slot each new token writes, and positions.

NOTE [KV ring and positions]: without sliding, a token's position is its index in the sequence
and the compute side stores K already rotated. With `slide`, the first `sink` tokens stay in
slots 0..sink-1 and the rest form a ring; positions are the tokens' order within the cache
(StreamingLLM), so they stay below the capacity however long the generation runs. As they
change while the ring slides, K is then stored before RoPE and rotated at read time with the
positions given here.

NOTE [ rollback ]
Speculative decoding appends drafted tokens and takes the rejected ones back (`rollback`): the
count and total go back, so their slots are written again by the next tokens and never attended
before that (a step attends slots 0..count-1 only). A chunk that evicts overwrites older tokens'
slots, which a rollback could not restore: drafts go only where `room(n)` says n tokens fit
without evicting, and a rollback of tokens appended while the ring evicted is refused. So a
sliding ring drafts nothing once it is full: restoring the evicted tokens is impossible, and
marking the rejected drafts' slots empty instead would leave a smaller window at other positions
than decoding one token at a time gives (every position moves with each token once it slides),
so the text would differ from the text without drafts.
"""

from __future__ import annotations

from layerstream.errors import ConfigError, ContextFullError


def context_full(ctx: int) -> ContextFullError:
    """The one error for a sequence that outgrew its KV ring (every caller raises this one)."""
    return ContextFullError(f"the sequence reached the context size ({ctx} tokens); "
                            "raise --ctx or pass --on-context-full slide")


class KVRing:
    """Slot bookkeeping of one sequence's KV ring of fixed capacity."""

    def __init__(self, capacity: int, sink: int = 4, mode: str = "error"):
        if mode not in ("error", "slide"):
            raise ConfigError(f"--on-context-full {mode!r}: use 'error' or 'slide'")
        if mode == "slide" and not 0 <= sink < capacity - 1:
            raise ConfigError(f"--sink-tokens {sink} must be below --ctx {capacity} minus one")
        self.cap, self.sink, self.mode = capacity, sink if mode == "slide" else 0, mode
        self.count = 0  # tokens held now
        self.start = 0  # ring index (within the window part) of the oldest window token
        self.total = 0  # tokens ever appended

    @property
    def window(self) -> int:
        return self.cap - self.sink

    def max_chunk(self) -> int:
        """Most tokens one step may append (a chunk never evicts its own tokens)."""
        return self.window if self.mode == "slide" else self.cap - self.count

    def append(self, n: int) -> tuple[list[int], list[int]]:
        """Reserve slots for n new tokens; returns (slots, positions) of the new tokens."""
        if self.count + n > self.cap:
            if self.mode == "error":
                raise context_full(self.cap)
            if n > self.window:
                raise ValueError(f"chunk of {n} tokens is larger than the ring window {self.window}")
        free = self.cap - self.count
        m = min(n, free)
        slots = list(range(self.count, self.count + m))
        self.count += m
        for _ in range(n - m):  # evict the oldest window token, reuse its slot
            slots.append(self.sink + self.start)
            self.start = (self.start + 1) % self.window
        self.total += n
        first = self.count - n
        return slots, list(range(first, self.count))

    def room(self, n: int) -> bool:
        """Whether n more tokens fit without evicting (nor a full ring's error): so they can be
        rolled back (NOTE [ rollback ])."""
        return self.count + n <= self.cap

    def rollback(self, n: int) -> None:
        """Forget the last n tokens appended (rejected drafts); only where no eviction happened."""
        if n == 0:
            return
        if not 0 < n <= self.count or self.total != self.count:
            raise ValueError(f"cannot roll back {n} of {self.count} tokens of a ring that evicted "
                             f"{self.total - self.count} (NOTE [ rollback ])")
        self.count -= n
        self.total -= n

    def slot_positions(self) -> list[int] | range:
        """Position held by each physical slot 0..count-1: a range where slot i holds position i (a
        ring that has not slid; a step's meta and message then do not grow with the context)."""
        if self.count < self.cap or self.start == 0:
            return range(self.count)
        W, s0 = self.window, self.start
        # window slot p (ring index r = p - sink) holds logical index (r - start) mod W
        return list(range(self.sink)) + [self.sink + (r - s0) % W for r in range(W)]
