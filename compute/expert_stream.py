"""Expert steps of the streamed MoE layers: which steps fetch only their chosen experts, the
staging slots held for them, the layers' kept dense parts, and the ExpertSet each layer's math sees.

NOTE [ expert streaming ]
A decode token of a mixture-of-experts model uses n_expert_used of n_expert experts a layer
(Qwen3-30B-A3B: 8 of 128), so in steps whose tokens are expected to touch at most half the
experts (`streams_experts`), a streamed MoE layer copies everything but its expert tensors
ahead, as usual; once its router has run, `moe_block` asks the layer's `ExpertSet` for the
experts the step's tokens chose (each once, whatever the batch), and only those missing from
the device's `ExpertCache` (experts.py: the most often used stay) are copied, each a byte range
of the 3-D expert tensors in the staging slot. The slot is therefore held until the layer's
`release` (and given back once the layer's work after those copies is done, without the host
waiting: `return_slots`). With a CPU share, the CPU computes part of the missing experts from the
same slot instead (cpu/experts.py, NOTE [ CPU experts ]). With the layers' routers kept, each
layer's step also copies the next layer's predicted experts ahead (experts.py, NOTE [ expert
prefetch ]). Prompt steps touch nearly every expert: their layers stream whole.

With `dense_resident` (the plan's, when they fit) a streamed MoE layer keeps its own device copy
of every tensor but its experts from its first load on, so its expert steps copy nothing ahead:
no VRAM slot is taken, and the staging slot is held only for the chosen experts' bytes.

NOTE [ the step's end does not wait ]
A staging slot held for a layer's experts goes back once the device has run that layer (its
event). The host waits for that only where it must wait for the coordinator anyway (the pumps
that block, which give back everything first, so no wait can deadlock) and before the compute
loop blocks on its socket with no step in flight. A step's launch, at its end, gives back only
the slots whose layers are done, and the compute loop gives back the rest as they finish while
it polls the step in flight. Waiting at the launch's end held the host until the last streamed
layer's experts had run, so the next step's set-up began with only the head and the sampling
queued on the device, which then idled between steps. The cost: the last layers' LayerDone
reaches the coordinator up to one layer's compute later.

NOTE [ the layer slots lent to the expert cache ]
The VRAM ring's layer slots (streamed.py) take the layers of steps that stream them whole, the
prompts'. Where every streamed layer is a MoE layer whose other tensors are kept, decode steps
copy into them nothing at all: under a budget they were device memory left idle through decode
(the Qwen3-30B-A3B shape's two held more than the cache the rest of a small budget leaves).
So the ring's slots are views of a room at the end of the expert pool (`ring_room`), and while
steps fetch only chosen experts the room's pool slots are cache slots too (`lend_room`): lent at
the first such step once every streamed layer's dense part is kept, no layer copy is in flight
and the compute stream has waited for the copy stream; taken back at the first step that streams
layers whole, before its first copy: the entries in the room are dropped (their uses stay
counted, so LFU admits them again) and the ring's next copies wait for an event after the last
step that read them. A prompt between decodes costs the room's entries, refilled by the next
misses (the cache's own slots fill first, so it drops as few as it can), and so does each step
that streams whole layers amid expert steps (a verifying step of many drafts, a batch past half the
experts). A step that raises leaves the cache empty and the room not lent (ExpertCache.reset).
On the CPU, which copies layers to memory of their own, the room is memory of its own.
The prompts' dequantization scratch (qlinear.py), where the device reserves one, lies in the room
too, after the layer slots, and is lent with them: a step of few tokens dequantizes nothing (every
quantized matrix takes its rows on a fused kernel and the experts run grouped: up to the plan's
`fused_rows`, memory.Sizes.fused_rows), so the room is lent only at expert steps of no more
tokens than that and taken back at the first step of more, before its layers run;
`qlinear.scratch` refuses while it is lent. Its writes and reads, and the cache's moves into the room, run on the compute stream.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.expert_layout import EXPERT_TENSORS, max_in_flight, slot_bytes, streams_experts
from layerstream.compute.experts import ExpertCache, ExpertSet
from layerstream.compute.model import LayerWeights
from layerstream.compute.qlinear import reserve_scratch
from layerstream.compute.weights import device_weight, layer_weights
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


def ring_room(layouts: list[LayerLayout], resident: set[int], vram_slots: int, dense_resident: bool) -> tuple[int, int]:
    """(layer slots, bytes each) of the VRAM ring that the expert pool holds and lends its cache
    (NOTE [ the layer slots lent to the expert cache ]); (0, 0) unless every streamed layer is a
    MoE layer whose dense part is kept."""
    streamed = [lay for i, lay in enumerate(layouts) if i not in resident]
    if not (dense_resident and streamed and all(any(t.name == EXPERT_TENSORS[0] for t in lay.tensors)
                                                for lay in streamed)):
        return 0, 0
    return max(vram_slots, 1), max(lay.nbytes for lay in layouts)


def make_expert_stream(layouts: list[LayerLayout], resident: set[int], experts: tuple[int, int], cache_bytes: int,
                       dense_resident: bool, policy: str, prefetch: int, cpu: CpuExperts | None, device, dtype,
                       quantized: bool, timeline: Timeline, slot_array: Callable[[int], np.ndarray],
                       layer_done: Callable[[int, int, int], None], vram_slots: int = 0,
                       scratch: tuple[int, int] = (0, 0)) -> "ExpertStream | None":
    """The expert steps of a model with `experts` (n_expert, n_expert_used) and a device cache of
    `cache_bytes`; None where its layers stream whole (no experts, or no cache). `vram_slots`: the
    ring's layer slots, which the pool holds where it may lend them (ring_room); `scratch`: the
    prompts' dequantization scratch (bytes, and the most tokens of a step that use none of it:
    the plan's fused_rows), which the room holds too."""
    if not (experts[0] and cache_bytes):
        return None
    room = ring_room(layouts, resident, vram_slots, dense_resident) if vram_slots else (0, 0)
    cache = ExpertCache(cache_bytes, torch.device(device), dtype, quantized, timeline, policy, slot_bytes(layouts),
                        max_in_flight(*experts), prefetch if dense_resident else 0, room, scratch[0])
    return ExpertStream(cache, layouts, resident, experts, dtype, quantized, slot_array, layer_done,
                        keep_dense=dense_resident, cpu=cpu, scratch_rows=scratch[1])


def reserve_prompt_scratch(experts: "ExpertStream | None", device, dtype, elems: int) -> None:
    """Reserve the prompts' dequantization scratch of `elems` values (none where 0): in the expert
    pool's room where it holds one (NOTE [ the layer slots lent to the expert cache ]), else apart."""
    if elems:
        store = experts.cache.store if experts is not None else None
        room = store.scratch() if store is not None else None
        reserve_scratch(device, dtype, elems, room, experts.cache if room is not None else None)


class ExpertStream:
    """The streamed MoE layers' expert steps (NOTE [ expert streaming ]) over `cache`; `slot_array`
    gives a staging slot's bytes, `layer_done(step, layer, slot)` gives a slot back."""

    def __init__(self, cache: ExpertCache, layouts: list[LayerLayout], resident: set[int], experts: tuple[int, int],
                 dtype, quantized: bool, slot_array: Callable[[int], np.ndarray],
                 layer_done: Callable[[int, int, int], None], keep_dense: bool = False, cpu: CpuExperts | None = None,
                 scratch_rows: int = 0):
        self.cache, self.layouts, self.resident_ids = cache, layouts, set(resident)
        self.n_expert, self.n_expert_used = experts
        self.dtype, self.quantized, self.slot_array, self.layer_done = dtype, quantized, slot_array, layer_done
        self.keep_dense = keep_dense
        self.cpu = cpu if cache.pool is not None else None
        self.step = False  # this step fetches only the chosen experts of streamed MoE layers
        self.tokens = 0  # this step's
        # where the room holds the dequantization scratch, the most tokens of a step that leave it idle
        self.scratch_rows = scratch_rows if cache.store is not None and cache.store.scratch_bytes else None
        self.frac = 0.0  # the CPU's share of this step's missing experts (NOTE [ CPU experts ])
        self.held: dict[int, int] = {}  # layer -> staging slot kept until release (its experts are read from it)
        self.returning: list[tuple] = []  # (event after the layer, step, layer, staging slot) to give back
        self.dense: dict[int, LayerWeights] = {}  # streamed MoE layer -> its tensors but the experts, on the device
        self.sets: dict[int, tuple] = {}  # kept layer -> (its key, its weights with their ExpertSet)

    def set_step(self, tokens: int) -> None:
        """A step of `tokens` tokens: whether it fetches only the chosen experts, and the CPU's share."""
        self.step, self.tokens = streams_experts(self.n_expert, self.n_expert_used, tokens), tokens
        self.frac = self.cpu.set_step(tokens) if self.step and self.cpu else 0.0
        self.cache.ahead.single = tokens == 1  # (NOTE [ copies ahead that land in time ] in expert_pool.py)
        if self.cache.ahead.layers:
            self.cache.drop_prefetched()  # (only a step that failed part-way leaves any)

    def of(self, i: int) -> bool:
        """Whether layer i fetches only its chosen experts in this step."""
        return self.step and i not in self.resident_ids

    @functools.cache  # noqa: B019 - one entry a layer, for the life of the run
    def dense_part(self, i: int) -> LayerLayout:
        """Layer i's layout without its expert tensors (what is copied before the router runs)."""
        lay = self.layouts[i]
        return LayerLayout(lay.layer, tuple(t for t in lay.tensors if t.name not in EXPERT_TENSORS), lay.nbytes)

    def with_experts(self, i: int, w: LayerWeights, slot: int, prefetch: Callable[[int, list[int]], None]) -> LayerWeights:
        """The layer's weights without its expert tensors, and an ExpertSet that fetches the chosen
        experts from the staging slot, which stays held until release(i); `prefetch(j, experts)`
        copies layer j's predicted experts ahead. A kept layer's are made once per (staging slot,
        CPU share, prediction): the step's host time bounds decode."""
        self.held[i] = slot
        ahead = self.predicts(i)
        key = (slot, self.frac, ahead)
        kept = i in self.dense
        got = self.sets.get(i) if kept else None
        if got is not None and got[0] == key:
            return got[1]
        w = {k: v for k, v in w.items() if k not in EXPERT_TENSORS}  # (the kept copy where there is one)
        w["experts"] = ExpertSet(self.cache, i, self.layouts[i], self.slot_array(slot),
                                 dense_fixed=kept, cpu=self.cpu, frac=self.frac,
                                 next_router=self.dense[i + 1] if ahead else None,
                                 prefetch_next=functools.partial(prefetch, i + 1) if ahead else None,
                                 next_lay=self.layouts[i + 1] if ahead else None)
        if kept:
            self.sets[i] = (key, w)
        return w

    def lend_room(self, ring, warm: bool) -> None:
        """At a step's start: lend the pool's room to the cache or take it back (NOTE [ the layer
        slots lent to the expert cache ]); `ring`: the VRAM ring (None on the CPU); `warm`: the
        resident layers are loaded (the first pass loads them through the ring)."""
        cache = self.cache
        if not cache.lendable:
            return
        lends = self.step and (self.scratch_rows is None or self.tokens <= self.scratch_rows)
        if lends and not cache.lent:
            streamed = (i for i in range(len(self.layouts)) if i not in self.resident_ids)
            if warm and all(i in self.dense for i in streamed) and (ring is None or ring.idle()):
                if ring is not None:
                    ring.stream.wait_stream(ring.copy_stream)  # (the prompts' copies into the room are done)
                cache.lend()
        elif not lends and cache.lent:
            cache.reclaim()
            if ring is not None:
                ring.reclaimed()

    def predicts(self, i: int) -> bool:
        """Whether layer i's step predicts the next layer's experts and copies them ahead."""
        return bool(self.cache.prefetch_slots) and i + 1 < len(self.layouts) and self.kept(i + 1)

    def graph_key(self, i: int) -> bool | None:
        """LayerSource.moe_graph_key: for a layer whose attention and router read only kept tensors
        in this step, whether its step also predicts the next layer's experts; None for any other."""
        return self.predicts(i) if self.kept(i) else None

    def keep(self, i: int, raw: torch.Tensor) -> None:
        """Keep streamed layer i's tensors but its experts, copied out of `raw` (its bytes at slot
        offsets, on the device), for its later expert steps."""
        if self.keep_dense and i not in self.resident_ids and i not in self.dense:
            self.dense[i] = {t.name: device_weight(raw[t.slot_offset : t.slot_offset + t.nbytes].clone(), t, self.dtype,
                                                   self.quantized) for t in self.dense_part(i).tensors}

    def dense_weights(self, i: int, raw: torch.Tensor) -> LayerWeights:
        """Layer i's tensors but its experts: the kept copy if there is one, else views of `raw`."""
        kept = self.dense.get(i)
        return dict(kept) if kept is not None else layer_weights(raw, self.dense_part(i), self.dtype, self.quantized)

    def kept(self, i: int) -> bool:
        """Whether layer i's expert step needs nothing copied ahead (its dense part is kept)."""
        return self.of(i) and i in self.dense

    def release(self, i: int, end, step: int, cuda: bool) -> None:
        """Layer i's work is enqueued (`end`: the event after it on CUDA): its staging slot, held
        for its experts, goes back after them."""
        slot = self.held.pop(i, None)
        if slot is not None:  # its experts were read from the staging slot: it goes back after them
            self.cache.done(i, end)  # (the copies out of it, on either stream, come before `end`)
            self.returning.append((end, step, i, slot))
            if not cuda:  # (on CUDA the next layer() gives back what is done by then)
                self.return_slots(wait=False)

    def return_slots(self, wait: bool = True) -> None:
        """Give back the staging slots of the layers whose work is done, their expert copies
        included (`wait`: all of them, waiting for the device). The host never waits for a layer's
        expert copies before the next layer's work is queued, nor at the step's end: only when it
        must wait for the coordinator (NOTE [ the step's end does not wait ])."""
        while self.returning:
            ev, step, i, slot = self.returning[0]
            if ev is not None and not wait and not ev.query():
                return
            if ev is not None:
                ev.synchronize()  # the layer's work, its copies included
            self.returning.pop(0)
            self.layer_done(step, i, slot)
