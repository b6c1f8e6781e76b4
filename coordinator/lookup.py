"""Prompt lookup: drafts for speculative decoding from n-gram matches in the text so far.

The behaviour of prompt lookup decoding (llama.cpp's `lookup` example): the sequence's last
n tokens (n from `ngram_max` down to `ngram_min`, the longest first) are looked for earlier in
the prompt and the output; the tokens that followed the most recent earlier occurrence are the
draft. It costs no model, and pays where the reply copies its prompt (editing, code, summaries
and answers that quote a retrieved text).
"""

from __future__ import annotations

from dataclasses import dataclass

NGRAM_MAX = 3  # the longest suffix looked for
NGRAM_MIN = 1  # the shortest


class PromptLookup:
    """One sequence's n-gram index: for every n-gram seen, where the token after its latest
    occurrence is; `propose` drafts from the longest suffix found."""

    cheap = True  # asking costs nothing: a paused sequence still asks (NOTE [ draft policy ])

    def __init__(self, tokens: list[int], ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"n-gram sizes {ngram_min}..{ngram_max}: need 1 <= min <= max")
        self.nmax, self.nmin = ngram_max, ngram_min
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append accepted tokens; each n-gram ending before a new token learns that it is followed."""
        for t in tokens:
            i = len(self.tokens)  # the new token's index: the n-grams ending at i - 1 are followed by it
            for n in range(self.nmin, min(self.nmax, i) + 1):
                self.follow[tuple(self.tokens[i - n : i])] = i
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
        (nmax..nmin tokens) of the sequence; [] where none occurred before."""
        L = len(self.tokens)
        if k < 1:
            return []
        for n in range(min(self.nmax, L), self.nmin - 1, -1):
            at = self.follow.get(tuple(self.tokens[L - n :]))
            if at is not None:  # (the suffix itself has no follower yet, so `at` is an earlier one)
                return self.tokens[at : at + k]
        return []


@dataclass
class LookupStats:
    """Speculation over a run: decode passes of sequences that may draft, the tokens they gave,
    the drafted tokens sent and those accepted."""

    passes: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0  # seconds spent proposing (a draft model's steps and their read-back)

    def plus(self, other: "LookupStats") -> "LookupStats":
        return LookupStats(self.passes + other.passes, self.tokens + other.tokens, self.drafted + other.drafted,
                           self.accepted + other.accepted, self.draft_s + other.draft_s)

    def since(self, before: "LookupStats") -> "LookupStats":
        return LookupStats(self.passes - before.passes, self.tokens - before.tokens, self.drafted - before.drafted,
                           self.accepted - before.accepted, self.draft_s - before.draft_s)

    def line(self, decode_s: float | None = None) -> str:
        """The --stats line; with `decode_s`, the drafting's share of that time."""
        rate = f"{self.accepted / self.drafted:.0%}" if self.drafted else "n/a"
        per = f"{self.tokens / self.passes:.2f}" if self.passes else "n/a"
        share = f" ({self.draft_s / decode_s:.0%} of the decode)" if decode_s else ""
        return (f"drafts: {self.accepted} of {self.drafted} drafted tokens accepted ({rate}); "
                f"{per} tokens a pass over {self.passes} passes; drafting {self.draft_s:.2f} s{share}")
