"""A draft model for speculative decoding: a small model with the target's vocabulary, resident on
the target's device, drafting greedily for each request (speculation.py, NOTE [ speculative
decoding ]).

NOTE [ draft model ]
Each request that drafts takes one of the draft's KV rows on its first proposal and gives it back
when it ends; with none free it drafts nothing. The row holds the KV of the tokens it was fed
(`fed`): before each proposal, the tokens fed that the target did not accept are rolled back
(the common prefix with the accepted text stays), the accepted ones not yet fed are fed as one
chunk, then the draft decodes greedily one token at a time. A greedy draft is deterministic, so
the target's verification keeps its own distribution exactly (sampling.py, NOTE [ speculative
sampling ]). The draft's ring never slides: it drafts as far as its capacity goes (the target's
own ring stops drafts once it would evict anyway, kv_ring.py NOTE [ rollback ]).

NOTE [ the draft on the device ]
The draft runs through the target's own device path (compute/stepper.py, NOTE [ ids one step
behind ]): each of a proposal's decode steps feeds the token -1, which the runner takes from the
row's last sampled id on the device, and samples greedily there. So a proposal of n tokens
launches its n steps without waiting, and the host reads the n ids once, after the last step
(one wait a proposal, not one a token). It lives in the coordinator's process, on the device
`--device` names: the target's GPU, so with the streaming pipeline this process holds a CUDA
context of its own beside the compute process's. The plan counts the draft's weights, KV and
scratch within --vram-gb and gives the target what is left (plan.py, `draft_parts`). The
alternative, the draft inside the compute process, would send every proposal's ids over the
pipeline's link and back, while the core, which schedules the drafts, lives here.
"""

from __future__ import annotations

import time

from layerstream.compute.step_meta import SeqStep
from layerstream.compute.stepper import Stepper
from layerstream.coordinator.kv_ring import KVRing
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import ModelIndex
from layerstream.proto.messages import SamplerStart

VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.eot_token_id")


def check_vocab(target: ModelIndex, draft: ModelIndex) -> None:
    """Refuse a draft whose vocabulary or special tokens differ from the target's (one line)."""
    why = None
    if draft.hparams.n_vocab != target.hparams.n_vocab:
        why = f"{draft.hparams.n_vocab} tokens against {target.hparams.n_vocab}"
    else:
        for key in VOCAB_KEYS:
            if draft.metadata.get(key) != target.metadata.get(key):
                why = f"its {key} differs"
                break
    if why:
        raise ConfigError(f"--draft-model {draft.path}: its vocabulary differs from {target.path}'s ({why}); "
                          "a draft needs the target's tokenizer (the same model family)")


class DraftModel:
    """The draft's runner (a ModelRunner: `step`, `hp`, `device`), its free KV rows, the Stepper
    that samples its steps on its device, and how long its proposals took."""

    def __init__(self, runner, ctx: int, max_seqs: int, step_tokens: int):
        self.runner, self.ctx, self.step_tokens = runner, ctx, step_tokens
        self.free_rows = list(range(max_seqs))
        kv = getattr(runner, "kv", None)  # (its rows zeroed after non-finite logits, as the target's: stepper.py)
        self.stepper = Stepper(runner.step, runner.hp.n_vocab, max_seqs, runner.device,  # (greedy: no sampling graphs)
                               clear_row=kv.clear_row if kv is not None else None)
        self.seconds = 0.0  # wall time of the proposals (their one wait for the device included)
        self.proposals = 0
        self.proposed = 0  # tokens proposed

    def proposer(self, prompt: list[int]) -> DraftProposer:
        return DraftProposer(self, prompt)


class DraftProposer:
    """One request's drafts from the draft model, with the interface of lookup.PromptLookup."""

    def __init__(self, model: DraftModel, tokens: list[int]):
        self.model = model
        self.tokens = list(tokens)  # the accepted text so far
        self.row: int | None = None
        self.ring = KVRing(model.ctx)
        self.fed: list[int] = []  # tokens whose KV the row holds, at positions 0..

    def extend(self, tokens: list[int]) -> None:
        self.tokens += tokens

    def close(self) -> None:
        """The request ended: its row goes back."""
        if self.row is not None:
            self.model.free_rows.append(self.row)
            self.row = None

    def _launch(self, toks: list[int], sample: bool, starts: list[SamplerStart]):
        """One step of the draft over `toks` (-1: the row's last drafted id, on the device)."""
        slots, pos = self.ring.append(len(toks))
        seq = SeqStep(self.row, toks, slots, pos, self.ring.slot_positions())
        return self.model.stepper.launch([seq], [int(sample)], starts, "none")

    def propose(self, k: int) -> list[int]:
        """Up to k tokens the draft decodes greedily after the accepted text (NOTE [ draft model ]),
        launched without a wait, read back once (NOTE [ the draft on the device ])."""
        if k < 1 or not self.tokens:
            return []
        m = self.model
        t0 = time.perf_counter()
        keep = 0
        for a, b in zip(self.fed, self.tokens[:-1]):  # (the last accepted token is fed anew: its logits)
            if a != b:
                break
            keep += 1
        todo = self.tokens[keep:]
        # the chunk, then n - 1 drafted tokens are fed (the last one drafted is not): all without eviction
        n = min(k, self.ring.cap - keep - len(todo) + 1)
        if n < 1:
            return []
        starts = []
        if self.row is None:
            if not m.free_rows:
                return []
            self.row = m.free_rows.pop(0)
            starts = [SamplerStart(self.row, 0.0, 1, 1.0, 0.0, 1.0, 0, 0, [])]  # greedy, no penalty
        self.ring.rollback(len(self.fed) - keep)
        self.fed = self.fed[:keep]
        for i in range(0, len(todo) - m.step_tokens, m.step_tokens):  # a long chunk's leading parts
            self._launch(todo[i : i + m.step_tokens], False, starts)
            starts = []
        last = todo[(len(todo) - 1) // m.step_tokens * m.step_tokens :]
        steps = [self._launch(last, True, starts)]
        self.fed += todo
        for _ in range(n - 1):
            steps.append(self._launch([-1], True, []))
        out = [Stepper.result(s).ids[0] for s in steps]  # (read once every step is launched)
        self.fed += out[:-1]
        m.seconds += time.perf_counter() - t0
        m.proposals += 1
        m.proposed += len(out)
        return out
