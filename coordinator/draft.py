"""A draft model for speculative decoding: a small model with the target's vocabulary, run in this
process beside the target, drafting greedily for each request (core.py, NOTE [ speculative decoding ]).

NOTE [ draft model ]
Each request that drafts takes one of the draft's KV rows on its first proposal and gives it back
when it ends; with none free it drafts nothing. The row holds the KV of the tokens it was fed
(`fed`): before each proposal, the tokens fed that the target did not accept are rolled back
(the common prefix with the accepted text stays), the accepted ones not yet fed are fed as one
chunk, then the draft decodes greedily one token at a time. A greedy draft is deterministic, so
the target's verification keeps its own distribution exactly (sampling.py, NOTE [ speculative
sampling ]). The draft's ring never slides: it drafts as far as its capacity goes.
"""

from __future__ import annotations

from layerstream.compute.step_meta import SeqStep
from layerstream.coordinator.kv_ring import KVRing
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import ModelIndex

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
    """The draft's runner (anything with ModelRunner's `step`) and its free KV rows."""

    def __init__(self, runner, ctx: int, max_seqs: int, step_tokens: int):
        self.runner, self.ctx, self.step_tokens = runner, ctx, step_tokens
        self.free_rows = list(range(max_seqs))

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

    def _feed(self, toks: list[int]):
        """Feed tokens (in chunks of the step's size); the last one's logits [V]."""
        logits = None
        for i in range(0, len(toks), self.model.step_tokens):
            chunk = toks[i : i + self.model.step_tokens]
            slots, pos = self.ring.append(len(chunk))
            logits = self.model.runner.step([SeqStep(self.row, chunk, slots, pos, self.ring.slot_positions())], "last")
            self.fed += chunk
        return logits[0]

    def propose(self, k: int) -> list[int]:
        """Up to k tokens the draft decodes greedily after the accepted text (NOTE above)."""
        if k < 1 or not self.tokens:
            return []
        if self.row is None:
            if not self.model.free_rows:
                return []
            self.row = self.model.free_rows.pop(0)
        keep = 0
        for a, b in zip(self.fed, self.tokens[:-1]):  # (the last accepted token is fed anew: its logits)
            if a != b:
                break
            keep += 1
        self.ring.rollback(len(self.fed) - keep)
        self.fed = self.fed[:keep]
        out: list[int] = []
        todo = self.tokens[keep:]
        while len(out) < k and self.ring.room(len(todo)):
            out.append(int(self._feed(todo).argmax()))
            todo = out[-1:]
        return out
