"""What the coordinator accepts from its children: which role may send each message, and each
message's fields in range (a message that fails is counted and dropped, never acted on)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerstream.compute.sampling import NO_FINITE
from layerstream.proto.messages import ForwardDone, LayerDone, LayerStaged, ReadFailed, Ready, StepFailed

# which child roles may send each message type to the coordinator (others are dropped)
SENDERS = {
    Ready: {"staging", "reader", "compute"},
    LayerStaged: {"reader"},
    ReadFailed: {"reader"},
    LayerDone: {"compute"},
    ForwardDone: {"compute"},
    StepFailed: {"compute"},
}


@dataclass(frozen=True)
class Acceptance:
    """One run's bounds, fixed at its start, for `refusal` on every message (several a layer)."""

    expected: dict[int, int]  # each step in flight's sequences (the run's own dict, kept current)
    n_vocab: int
    n_layer: int
    n_slots: int
    step_tokens: int

    def refusal(self, role: str | None, ident: str, msg, extra) -> str | None:
        """Why `msg` (with its `extra` frames) from child `ident` of `role` (None: no child of the run)
        is dropped, or None where it is acceptable."""
        if role is None:
            return f"{type(msg).__name__} from {ident!r}, which is no child of this run"
        allowed = SENDERS.get(type(msg))
        if allowed is not None and role not in allowed:
            return f"{type(msg).__name__} from the {role} {ident}, which never sends it"
        if isinstance(msg, ForwardDone):
            nbytes = len(memoryview(extra[0])) if extra else 0
            if msg.dtype != "float32" or len(extra) > 1 or (
                    msg.shape != [] if not extra else len(msg.shape) != 2 or math.prod(msg.shape) * 4 != nbytes):
                return f"ForwardDone with dtype {msg.dtype!r} shape {msg.shape} and {nbytes} bytes of logits"
            n = self.expected.get(msg.step, len(msg.ids))
            if not (len(msg.ids) == len(msg.bad) == n and all(-1 <= t < self.n_vocab for t in msg.ids)
                    and all(0 <= c <= NO_FINITE for c in msg.bad) and len(msg.accepted) in (0, n)
                    and all(0 <= a <= self.step_tokens for a in msg.accepted)):
                return (f"ForwardDone of step {msg.step} with {len(msg.ids)} ids, {len(msg.bad)} codes and "
                        f"{len(msg.accepted)} draft counts for {n} sequences, or out of range")
        elif isinstance(msg, LayerDone):
            for layer, slot in msg.done:
                if not (layer < self.n_layer and slot < self.n_slots):
                    return f"LayerDone for layer {layer} slot {slot}, out of range"
        return None
