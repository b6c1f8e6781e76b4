"""How many tokens a sequence drafts next, from its recent acceptance.

NOTE [ draft policy ]
A step that verifies drafts costs more than a decode step even where none is accepted: its k
rows are a decode batch of k (runner.py NOTE [ drafts verified as decode rows ]; a longer chunk
runs as a prompt-like chunk), the sequence does not ride one step ahead (core.py NOTE [ one
step behind ]), and a draft model spends its own time on every proposal. So a sequence whose
drafts are rejected stops drafting for a while, and one whose drafts are taken drafts further:
- The rate a is the share of drafted tokens accepted over its last WINDOW verifications. A
  verification of k drafts then gives (1 - a^(k+1)) / (1 - a) tokens on average.
- A proposal that offered nothing though the policy asked for drafts (no n-gram matched, the
  draft had no room) counts as one draft rejected: it held the next step back all the same.
- Drafting pauses once the window holds MIN_CHECKS verifications and even `most` drafts would
  give fewer than MIN_GAIN tokens a pass. The pause lasts PAUSE accepted tokens, doubled after each probe
  that fails (up to MAX_PAUSE) and reset by one that pays; after it the history starts afresh
  and the next proposal is a probe of `most` tokens.
- While paused, a source that costs nothing to ask (prompt lookup, `cheap`) is still asked for
  one token before each accepted one: a match ends the pause at once (the text began to copy).
- Otherwise the length is the least k whose next draft would add fewer than TAIL tokens
  (a^(k+1) <= TAIL), within 1..most: a long draft where drafts are taken, a short one where not.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 4  # verifications the rate looks back on
MIN_CHECKS = 2  # verifications in the window before a pause can start
MIN_GAIN = 1.5  # tokens a verifying pass must give on average, else drafting pauses
TAIL = 0.05  # a further draft is sent while it adds at least this many tokens on average
PAUSE, MAX_PAUSE = 8, 256  # accepted tokens a pause lasts, first and at most


def expected_tokens(a: float, k: int) -> float:
    """Tokens a pass verifying k drafts gives at acceptance rate a: 1 + a + .. + a^k."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


class DraftPolicy:
    """One sequence's draft length (`length`), fed its verifications (`record`) and its accepted
    tokens (`tick`, `matched`); plain logic (NOTE [ draft policy ])."""

    def __init__(self, most: int, adaptive: bool = True):
        self.most, self.adaptive = most, adaptive  # not adaptive: always `most`
        self.recent: deque[tuple[int, int]] = deque(maxlen=WINDOW)  # (drafted, accepted) a verification
        self.wait = 0  # accepted tokens before drafting again; 0: drafting
        self.pause = PAUSE  # the next pause's length
        self.pauses = 0  # pauses so far

    def rate(self) -> float | None:
        drafted = sum(d for d, _ in self.recent)
        return sum(a for _, a in self.recent) / drafted if drafted else None

    def length(self) -> int:
        """Tokens to draft now (0 while paused)."""
        if self.wait or self.most < 1:
            return 0
        a = self.rate()
        if a is None or a >= 1:
            return self.most
        k = math.ceil(math.log(TAIL) / math.log(a)) - 1 if a > 0 else 1  # least k with a^(k+1) <= TAIL
        return max(1, min(self.most, k))

    def record(self, drafted: int, accepted: int) -> None:
        """A verification's outcome: `accepted` of `drafted` tokens taken."""
        if drafted < 1 or not self.adaptive:
            return
        self.recent.append((drafted, accepted))
        if len(self.recent) < MIN_CHECKS:
            return
        if expected_tokens(self.rate(), self.most) < MIN_GAIN:
            self.wait, self.pause = self.pause, min(2 * self.pause, MAX_PAUSE)
            self.pauses += 1
            self.recent.clear()
        else:
            self.pause = PAUSE

    def missed(self) -> None:
        """Drafts were asked for and the source offered none (NOTE above)."""
        self.record(1, 0)

    def tick(self, n: int = 1) -> None:
        """n tokens were accepted: a pause draws to its end."""
        self.wait = max(0, self.wait - n)

    def matched(self) -> None:
        """A free source would have drafted the token just accepted: drafting resumes now."""
        if self.wait:
            self.wait, self.pause = 0, PAUSE
