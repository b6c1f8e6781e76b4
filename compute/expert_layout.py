"""Where a MoE layer's experts sit in its staging bytes and in the device's pool, and which steps
fetch only their chosen experts (NOTE [ expert streaming ] in streamed.py)."""

from __future__ import annotations

from layerstream.loader.layout import LayerLayout

EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")  # [E, N, K] each
ALIGN = 256  # an expert's gate, up and down each start at a multiple of this in its pool slot


def expected_experts(n_expert: int, n_used: int, tokens: int) -> float:
    """The distinct experts a step of `tokens` tokens is expected to touch with uniform routing,
    k of E a token: E * (1 - (1 - k/E)^T)."""
    return n_expert * (1 - (1 - n_used / n_expert) ** tokens)


def streams_experts(n_expert: int, n_used: int, tokens: int) -> bool:
    """Whether a step of `tokens` tokens fetches only its chosen experts rather than whole layers:
    while the experts it is expected to touch (expected_experts) are at most half of them (a prompt
    touches nearly all: whole layers stream faster)."""
    if not n_expert:
        return False
    return expected_experts(n_expert, n_used, tokens) <= n_expert / 2


def max_in_flight(n_expert: int, n_used: int) -> int:
    """Pool slots a step may hold on the device beyond the cache: the experts one layer of the
    largest expert step can choose (its misses land there, NOTE [ misses first, bookkeeping after ]),
    and the slot of zeros that the CPU's pairs read (NOTE [ the expert pool ])."""
    t_max = max(t for t in range(1, n_expert + 1) if streams_experts(n_expert, n_used, t))
    return min(n_expert, n_used * t_max) + 1


def expert_parts(lay: LayerLayout) -> list[tuple[object, int, int, int, int]]:
    """(tensor, bytes an expert, offset in a pool slot, rows, cols) of each expert tensor of a layer."""
    out, off = [], 0
    for name in EXPERT_TENSORS:
        t = lay.tensor(name)
        n_exp, rows, cols = t.shape
        per = t.nbytes // n_exp
        out.append((t, per, off, rows, cols))
        off += -(-per // ALIGN) * ALIGN
    return out


def expert_bytes(host, t, per: int, e: int):
    """Expert e's bytes of expert tensor t (`per` bytes an expert) in a layer's staging bytes."""
    return host[t.slot_offset + e * per : t.slot_offset + (e + 1) * per]


def slot_bytes(layouts: list[LayerLayout]) -> int:
    """Bytes of one expert's pool slot: the largest expert (gate, up and down) of any layer."""
    return max((sum(-(-p[1] // ALIGN) * ALIGN for p in expert_parts(lay)) for lay in layouts
                if any(t.name == EXPERT_TENSORS[0] for t in lay.tensors)), default=0)


class LayerParts:
    """expert_parts of each layer, and what the grouped kernel reads of them, worked out once a layer."""

    def __init__(self):
        self.parts: dict[int, list] = {}  # layer -> expert_parts of its layout
        self.kernel: dict[int, tuple] = {}  # layer -> (qtype, rows, cols) of gate, up and down
        self.offsets: dict[int, tuple] = {}  # layer -> where gate, up and down start in a pool slot
        self.sizes: dict[int, int] = {}  # layer -> an expert's bytes (gate, up and down)

    def of(self, lay: LayerLayout) -> list:
        got = self.parts.get(lay.layer)
        if got is None:
            got = self.parts[lay.layer] = expert_parts(lay)
        return got

    def expert_nbytes(self, lay: LayerLayout) -> int:
        """An expert's bytes, its gate's, up's and down's (once a layer: each fetch and copy ahead reads it)."""
        got = self.sizes.get(lay.layer)
        if got is None:
            got = self.sizes[lay.layer] = sum(p[1] for p in self.of(lay))
        return got

    def kernel_parts(self, i: int, lay: LayerLayout) -> tuple:
        """(qtype, rows, cols) of an expert's gate, up and down."""
        got = self.kernel.get(i)
        if got is None:
            got = self.kernel[i] = tuple((p[0].qtype, p[3], p[4]) for p in expert_parts(lay))
        return got

    def slot_offsets(self, i: int, lay: LayerLayout) -> tuple[int, int, int]:
        """Where an expert's gate, up and down start in its pool slot."""
        got = self.offsets.get(i)
        if got is None:
            got = self.offsets[i] = tuple(p[2] for p in expert_parts(lay))
        return got
