"""A draft model beside the target's plan: its device memory (`DraftMemory`, taken off the budget
before the target's plan, plan.py NOTE [ the plan counts every byte ]) and what it takes from the
target (`DraftCost`); the tokens a sequence drafts a step."""

from __future__ import annotations

import os
from dataclasses import dataclass

from layerstream.coordinator.draft_policy import expected_tokens
from layerstream.coordinator.memory import SLACK_FRACTION, SLACK_MIN, Sizes, reserved_bytes
from layerstream.loader.gguf_index import ModelIndex

GiB = 1 << 30


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# NOTE [ what a draft costs the target ]
# A draft model's memory comes off the budget before the target's plan (NOTE above), so the
# target may keep fewer layers resident and stream more bytes every pass; a pass verifying k
# drafts then has to give more tokens to pay. A streamed pass is bound by the bytes it moves
# over the link (prompt and decode passes alike cost about their streamed bytes), so the cost of
# a pass beside the draft against one without it is taken as the ratio of the bytes they move,
# which bounds the time ratio from above (the resident layers' compute is the same in both). A
# pass of k drafts gives 1 + a + .. + a^k tokens at acceptance a (draft_policy.expected_tokens),
# so drafting pays above the a where that equals the ratio, before the draft's own time; where
# the target streams nothing without the draft, a streamed pass costs many resident ones and
# no acceptance pays. Where that rate is above WARN_ACCEPTANCE, the run warns: a same-family
# small draft's acceptance often lies below it.
WARN_ACCEPTANCE = 0.5


@dataclass(frozen=True)
class DraftCost:
    """What a draft model takes from the target's plan (NOTE [ what a draft costs the target ])."""

    layers_alone: int  # the target's resident layers without the draft
    moved_alone: int  # bytes a decode pass moves over the link without it
    layers: int  # ... and beside it
    moved: int
    drafts: int  # tokens a step drafts at most

    @property
    def evicts(self) -> bool:
        return self.layers < self.layers_alone

    def break_even(self) -> float | None:
        """The acceptance rate above which `drafts` drafts a pass pay for the bytes moved beside the
        draft (0.0: from any rate; None: at no rate)."""
        if self.moved <= self.moved_alone:
            return 0.0
        if not self.moved_alone or not self.drafts:
            return None
        ratio = self.moved / self.moved_alone
        if expected_tokens(1.0, self.drafts) < ratio:
            return None
        lo, hi = 0.0, 1.0  # expected_tokens rises with a
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected_tokens(mid, self.drafts) < ratio else (lo, mid)
        return hi

    def warns(self) -> bool:
        a = self.break_even()
        return self.evicts and (a is None or a > WARN_ACCEPTANCE)

    def line(self) -> str:
        a = self.break_even()
        pays = (f"{self.drafts} drafts a step pay only above about {a:.0%} acceptance, before the draft's own time"
                if a is not None else "without it nothing streams, and a streamed pass costs many resident ones"
                if not self.moved_alone else f"{self.drafts} drafts a step cannot pay for that at any acceptance")
        return (f"the target keeps {self.layers} layer{'' if self.layers == 1 else 's'} resident instead of {self.layers_alone} and a decode pass "
                f"moves {_gib(self.moved)} instead of {_gib(self.moved_alone)}: {pays}")


@dataclass(frozen=True)
class DraftMemory:
    """A draft model's device memory by item (`draft_memory`), taken off the budget before the plan."""

    path: str
    parts: tuple[tuple[str, int], ...]
    cost: DraftCost | None = None  # what it takes from the target's plan (make_plan fills it in)

    @property
    def total(self) -> int:
        return sum(v for _, v in self.parts)

    def line(self) -> str:
        what = ", ".join(f"{k} {_gib(v)}" for k, v in self.parts if v)
        cost = f"; {self.cost.line()}" if self.cost and self.cost.evicts else ""
        return f"the draft model {os.path.basename(self.path)} takes {_gib(self.total)} ({what}){cost}"

    def refusal(self, vram_bytes: int, target: str) -> str:
        return (f"--vram-gb {vram_bytes / GiB:.2f}: {self.line()}, which leaves nothing for {os.path.basename(target)}; "
                "raise --vram-gb, lower --ctx or --batch, or take a smaller --draft-model")


def draft_memory(draft: ModelIndex, *, dtype_bytes: int, ctx: int, max_seqs: int, step_tokens: int,
                 quantized: bool, cuda: bool = True) -> DraftMemory:
    """A draft model's device memory as engine.local_backend makes it: every layer resident, its
    head and norm, its token embedding (on the device, where a token -1 is gathered), the KV of
    max_seqs rows at ctx, one step of step_tokens tokens (scratch, dequantization buffer, cuBLAS),
    its decode graphs, and the allocator's slack (NOTE [ the caching allocator's rounding ])."""
    from layerstream.loader.layout import layer_layouts

    sz = Sizes(draft, layer_layouts(draft), dtype_bytes, ctx, max_seqs, quantized, cuda, False)
    g, T = draft.globals, max(step_tokens, max_seqs)
    emb = g["token_embd.weight"]
    untied = "output.weight" in g  # (tied: the head is the embedding, counted once in sz.head)
    embed = reserved_bytes([emb.nbytes if sz.kept_as_blocks(emb) else sz.dense_bytes(emb)], cuda) if untied else 0
    parts = [("weights", sz.resident_prefix[draft.hparams.n_layer] + sz.head + embed),
             ("KV", sz.kv(draft.hparams.n_layer)),
             ("step scratch", sz.step(T) + sz.dequant_scratch(T) + sz.cublas(T) + sz.graphs(True))]
    used = sum(v for _, v in parts)
    return DraftMemory(draft.path, (*parts, ("slack", SLACK_MIN + int(used * SLACK_FRACTION))))


def draft_memory_for(ecfg, device, dtype) -> DraftMemory | None:
    """The memory of the engine config's --draft-model on `device` in `dtype` (None without one)."""
    if not getattr(ecfg, "draft_model", None):
        return None
    import torch

    from layerstream.compute.device import keeps_quantized
    from layerstream.loader.gguf_index import open_model

    return draft_memory(open_model(ecfg.draft_model), dtype_bytes=dtype.itemsize, ctx=ecfg.ctx,
                        max_seqs=ecfg.max_seqs, step_tokens=ecfg.prefill_chunk,
                        quantized=keeps_quantized(device, ecfg.weights), cuda=torch.device(device).type == "cuda")


def draft_tokens_for(cfg) -> int:
    """Tokens a sequence drafts a step, as the engine drafts: --draft-tokens with a --draft-model, else
    --lookup (an EngineConfig, or run-pipeline's parsed arguments, which carry the same names)."""
    return cfg.draft_tokens if cfg.draft_model else (cfg.lookup or 0)
