"""Speculative decoding in the engine core: where a request's drafts come from, how many it may
send a step, and how a verified chunk's result is taken (core.py calls these; lookup.py and
draft.py propose).

NOTE [ speculative decoding ]
A request with prompt lookup (SamplingParams.lookup, else the engine's default) decodes a
chunk [its last id, d1..dn]: drafts from lookup.py (or a draft model's, draft.py), verified in
the same step as everything else (the backend samples every position of the chunk, sampling.py
NOTE [ speculative sampling ]; the runner runs the chunk's tokens as decode rows, runner.py
NOTE [ drafts verified as decode rows ]). The backend gives the drafts accepted, k, and the id after
them: the request takes d1..dk and that id, and its ring rolls the n - k rejected positions
back (kv_ring.py NOTE [ rollback ]). Its next chunk starts at a position known only once the
step is collected, so such a request never rides one step ahead: while it may draft, the core
submits the next step only after collecting the last (no lookahead), and drafts go only where
its ring has room without evicting and its max_tokens leaves room. The drafts of a step's
sequences share the step's padded size (core.py NOTE [ step size ]) before prompt chunks do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.draft_policy import DraftPolicy
from layerstream.coordinator.lookup import LookupStats, PromptLookup
from layerstream.coordinator.outputs import RequestOutput
from layerstream.errors import ConfigError, LayerstreamError


@dataclass(eq=False)
class RequestDrafts:
    """One request's drafting: its source (a PromptLookup or a draft.DraftProposer), the tokens it
    drafts a step at most, how many it drafts next (its DraftPolicy, NOTE [ draft policy ]), and
    whether a step in flight verifies its drafts (where its next token goes is not known until that
    step is collected)."""

    source: object
    most: int
    verifying: bool = False
    adaptive: bool = True  # the policy shortens and pauses drafts (else always `most`)
    policy: DraftPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = DraftPolicy(self.most, self.adaptive)

    def extend(self, tokens: list[int]) -> None:
        """Accepted tokens; while paused, a free source that would have drafted one resumes drafting."""
        for t in tokens:
            if self.policy.wait and getattr(self.source, "cheap", False) and self.source.propose(1) == [t]:
                self.policy.matched()
            else:
                self.policy.tick()
            self.source.extend([t])

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()  # (a draft model's row)


class Speculation:
    """The engine's drafting: `start` a request's, `room`/`propose` while scheduling, `verified` when
    a verifying step is collected; `stats` over the run. The core's requests are read for their
    `drafts`, `prompt`, `fed`, `done`, `params`, `generated`, `sampled` and `ring`."""

    def __init__(self, lookup: int = 0, draft=None, adaptive: bool = True):
        if lookup < 0:
            raise ConfigError(f"--lookup {lookup}: must be >= 0 (0 turns prompt lookup off)")
        self.lookup = lookup  # tokens drafted a step where a request does not say
        self.draft = draft  # a draft model's DraftModel (draft.py), else drafts come from prompt lookup
        self.stats = LookupStats()
        # requests started from now on follow NOTE [ draft policy ] (off: always their count; the Python
        # API's switch, engine.core.speculation.adaptive)
        self.adaptive = adaptive

    def start(self, prompt: list[int], params: SamplingParams) -> RequestDrafts | None:
        """A new request's drafting, or None where it drafts nothing."""
        n = self.lookup if params.lookup is None else params.lookup
        if not n:
            return None
        return RequestDrafts(PromptLookup(prompt) if self.draft is None else self.draft.proposer(prompt), n,
                             adaptive=self.adaptive)

    def room(self, r) -> int:
        """How many tokens a decoding request may draft after its next one: its policy's length (NOTE
        [ draft policy ]), as far as its max_tokens and its ring without evicting go (NOTE [ rollback ]
        in kv_ring.py)."""
        if r.drafts is None or r.fed < len(r.prompt) or r.done:
            return 0
        return max(min(r.drafts.policy.length(), r.params.max_tokens - len(r.generated) - 1, r.ring.cap - r.ring.count - 1), 0)

    def holds_back(self, r) -> bool:
        """Whether the request keeps the next step from riding ahead (NOTE above)."""
        return r.drafts is not None and (r.drafts.verifying or self.room(r) > 0)

    def propose(self, r, tok: int, most: int) -> list[int]:
        """The drafts that follow `tok` (up to `most`), where the request drafts."""
        n = min(self.room(r), most)
        if n < 1 or tok < 0:
            return []
        t0 = time.perf_counter()
        out = r.drafts.source.propose(n)
        self.stats.draft_s += time.perf_counter() - t0
        if not out:
            r.drafts.policy.missed()  # (NOTE [ draft policy ])
        return out

    def verified(self, r, drafts: list[int], last: int, k: int,
                 accept: Callable[[int], RequestOutput]) -> RequestOutput:
        """A decode chunk's result: its first k drafts and the id after them taken in turn through
        `accept`, up to one that ends the request; the rejected drafts' positions rolled back. One
        output for all of them (the first id was counted in `r.ids.sampled` by the caller)."""
        if not 0 <= k <= len(drafts):
            raise LayerstreamError(f"internal: {k} of {len(drafts)} drafts accepted")
        r.ring.rollback(len(drafts) - k)
        r.drafts.policy.record(len(drafts), k)
        st = self.stats
        st.passes, st.drafted, st.accepted = st.passes + 1, st.drafted + len(drafts), st.accepted + k
        text, ids = "", []
        for j, tok in enumerate(drafts[:k] + [last]):
            if j:
                r.ids.sampled += 1
            out = accept(tok)
            text, ids = text + out.text, ids + out.token_ids
            st.tokens += 1
            if out.finished:
                break
        out.text, out.token_ids = text, ids
        return out
