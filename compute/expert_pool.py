"""The device buffer that holds streamed block experts, and the copies into it.

NOTE [ the expert pool ]
Block experts (what the grouped kernel reads) live in one device buffer of equal slots, `slot`
bytes each: the cache's slots, then `in_flight` slots where a step's misses land (those the cache
admits are moved into its slots after the step's experts, NOTE [ misses first, bookkeeping after ]
in experts.py; the last of them, `zero`, is never written), then two sets of `prefetch` slots for
the experts predicted for the next layer, copied ahead on a side stream (NOTE [ expert prefetch ]
in experts.py), then, where the VRAM ring's layer slots are lent to the cache, their room and the
prompts' dequantization scratch (NOTE [ the layer slots lent to the expert cache ] in
expert_stream.py). Copies land in place, with no allocation, and every expert sits at a byte
offset from one fixed anchor, the pool, so a CUDA graph can read whichever experts a step chose
from offsets in a tensor (graphs.py, NOTE [ decode graphs ]). A fetch never evicts an expert that
the same fetch serves. The (token, choice) pairs the CPU computes stay in the grouped launches with
weight 0 (NOTE [ CPU experts ]), reading the slot of zeros: zero blocks of every type are zero
matrices, while another slot's bytes read as another type (a Q4_K gate read as a Q6_K down) may
hold an infinite scale, and 0 * inf is NaN. Dense experts (dequantized) are tensors of their own,
outside the pool.
"""

from __future__ import annotations

import numpy as np
import torch

from layerstream.compute.expert_layout import expert_bytes
from layerstream.compute.h2d import DriverCopies
from layerstream.loader.layout import LayerLayout

ROOM_ALIGN = 4096  # where the room and each of its layer slots start in the pool (a layer's blocks are read in place)


class ExpertPool:
    """One device buffer of `cached` + `in_flight` + 2 * `prefetch` slots of `slot` bytes (the last
    in-flight slot the slot of zeros) and the ring's room (its layer slots and the prompts'
    dequantization scratch), and the copies into it: through the driver where it is at hand (h2d.py,
    NOTE [ driver copies ]), else torch's copies from views made once."""

    def __init__(self, slot: int, cached: int, in_flight: int, prefetch: int, device: torch.device,
                 room: tuple[int, int] = (0, 0), scratch: int = 0):
        self.slot, self.cached, self.in_flight, self.prefetch = slot, cached, in_flight, prefetch
        self.device = device
        self.zero = cached + in_flight - 1 if in_flight else None  # the slot of zeros (None: the pool's start)
        # `room`: (layer slots, bytes each) of the VRAM ring, at the pool's end, lent to the cache
        # between prompts (NOTE [ the layer slots lent to the expert cache ] in expert_stream.py)
        self.room_n, self.room_stride = room[0], -(-room[1] // ROOM_ALIGN) * ROOM_ALIGN
        self.room_at = (cached + in_flight + 2 * prefetch) * slot
        self.room_at += -self.room_at % ROOM_ALIGN if self.room_n else 0
        # then the prompts' dequantization scratch, `scratch` bytes (lent with the layer slots)
        self.scratch_at = self.room_at + self.room_n * self.room_stride
        self.scratch_bytes = scratch if self.room_n else 0
        end = self.scratch_at + self.scratch_bytes
        self.buf = torch.zeros(end, dtype=torch.uint8, device=device)
        # the pool slots that lie wholly within the room (what it lends the cache), worked out once
        self.room_slots = tuple(range(-(-self.room_at // slot), end // slot)) if self.room_n and slot else ()
        self.ptr = self.buf.data_ptr()  # (the pool never moves)
        self.driver = DriverCopies.open() if self.device.type == "cuda" else None
        self.dst_views: dict[tuple[int, int, int], torch.Tensor] = {}  # (slot, offset, bytes) -> pool view
        self.src_views: dict[tuple[int, int], tuple] = {}  # (layer, staging address) -> (views, bytes)
        self.copy_groups: dict[int, list] = {}  # layer -> groups

    def flight(self):
        """The in-flight slots but the slot of zeros, in order (for one fetch's newcomers)."""
        return iter(range(self.cached, self.cached + max(0, self.in_flight - 1)))

    def room(self, nbytes: int) -> list[torch.Tensor]:
        """The layer slots of the room, `nbytes` each (the ring's views; none without a room)."""
        assert nbytes <= self.room_stride or not self.room_n
        return [self.buf[self.room_at + k * self.room_stride :][:nbytes] for k in range(self.room_n)]

    def scratch(self) -> torch.Tensor | None:
        """The room's dequantization scratch (qlinear.reserve_scratch's buffer; None without one)."""
        return self.buf[self.scratch_at : self.scratch_at + self.scratch_bytes] if self.scratch_bytes else None

    def prefetch_base(self, k: int) -> int:
        """The first slot of prefetch set k (0 or 1)."""
        return self.cached + self.in_flight + k * self.prefetch

    def move(self, dst: int, src: int, stream) -> None:
        """Copy slot `src` into slot `dst` on the device, on `stream` (None: the current one)."""
        if self.driver is not None:
            self.driver.d2d(self.ptr + dst * self.slot, self.ptr + src * self.slot, self.slot,
                            stream.cuda_stream if stream is not None else 0)
        else:
            self.buf[dst * self.slot : (dst + 1) * self.slot].copy_(self.buf[src * self.slot : (src + 1) * self.slot])

    def copy(self, i: int, items: list[tuple[int, int]], lay: LayerLayout, host: np.ndarray, parts: list,
             stream, driver_stream, n_layers: int) -> None:
        """Copy each (pool slot, expert) of layer i (`parts`: its expert_parts) out of its staging
        bytes `host`, on `stream` (None: the current one; the driver's copies go on
        `driver_stream()` then); `n_layers`: layers seen, which bounds the views kept."""
        if self.driver is not None:
            src, dst, groups = host.ctypes.data, self.ptr, self.groups(lay, parts)
            self.driver.issue([(dst + slot * self.slot + off, src + a + e * per, per, h, dp, sp)
                               for slot, e in items for a, per, off, h, dp, sp in groups],
                              (stream or driver_stream()).cuda_stream if self.device.type == "cuda" else 0)
            return
        view = self._sources(i, host, n_layers)
        dsts = [self.dst(slot, off, per) for slot, e in items for t, per, off, _, _ in parts]
        srcs = [view(e, j, t, per) for slot, e in items for j, (t, per, _, _, _) in enumerate(parts)]
        if stream is None:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
        else:
            with torch.cuda.stream(stream):
                torch._foreach_copy_(dsts, srcs, non_blocking=True)

    def groups(self, lay: LayerLayout, parts: list) -> list[tuple[int, int, int, int, int, int]]:
        """An expert's parts as the driver's copies (h2d.py, NOTE [ driver copies ]): runs of parts
        of the same bytes, evenly spaced in staging and in the pool slot, each as (staging offset
        of the first part's expert 0, bytes a part, offset in the slot, parts, slot pitch,
        staging pitch)."""
        got = self.copy_groups.get(lay.layer)
        if got is None:
            got = []
            for t, per, off, _, _ in parts:
                if got:
                    a, p, o, h, dp, sp = got[-1]
                    step, dstep = t.slot_offset - a - (h - 1) * sp, off - o - (h - 1) * dp
                    if p == per and (h == 1 or (step, dstep) == (sp, dp)) and step >= per and dstep >= per:
                        got[-1] = (a, p, o, h + 1, dstep, step)
                        continue
                got.append((t.slot_offset, per, off, 1, 0, 0))
            self.copy_groups[lay.layer] = got
        return got

    def dst(self, slot: int, off: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes at `off` in pool slot `slot`: a part of an expert, as a view made once."""
        key = (slot, off, nbytes)
        v = self.dst_views.get(key)
        if v is None:
            base = slot * self.slot + off
            v = self.dst_views[key] = self.buf[base : base + nbytes]
        return v

    def _sources(self, i: int, host: np.ndarray, n_layers: int):
        """A function (e, j, tensor, bytes an expert) -> expert e's part j in layer i's staging
        bytes `host`, as views made once per (layer, staging address)."""
        key = (i, host.ctypes.data)
        views = self.src_views.get(key)
        if views is None:
            if len(self.src_views) > 4 * (n_layers + 1):
                self.src_views.clear()  # staging slots were reassigned: start over
            views = self.src_views[key] = ({}, torch.from_numpy(host))

        def src(e: int, j: int, t, per: int) -> torch.Tensor:
            v = views[0].get((e, j))
            if v is None:
                v = views[0][(e, j)] = expert_bytes(views[1], t, per, e)
            return v

        return src


class PrefetchSets:
    """The experts copied ahead for each layer (NOTE [ expert prefetch ] in experts.py), which
    set of slots each layer's step reads, when each set may be overwritten, and how many a layer
    may copy (NOTE [ copies ahead that land in time ])."""

    def __init__(self, slots: int = 0):
        self.layers: dict[int, tuple[dict[int, int], object]] = {}  # layer -> ({expert: slot}, copies' event)
        self.set_free: list = [None, None]  # per set: event after the last read of its slots
        self.reading: dict[int, int] = {}  # layer -> the set its step reads
        self.hits = 0  # chosen experts that a prefetch had copied
        self.copied = 0  # experts copied ahead (hits or not)
        self.slots = slots  # each set's slots: the most a layer copies ahead
        self.limit = slots  # the most the next layer copies ahead now
        self.late = 0  # layers whose copies ahead had not landed by their fetch, which waited for one not needed first
        self.limits = 0  # the sum of `limit` over one-token steps' layers that copied ahead (its mean, with `issued`)
        self.issued = 0  # one-token steps' layers that copied ahead
        self.single = True  # this step has one token: its copies ahead follow `limit`

    def landed(self, on_time: bool, waited: bool) -> None:
        """NOTE [ copies ahead that land in time ]
        A layer's copies ahead are issued after its graph B and must be on the device by the next
        layer's fetch; there, that layer's missed experts are copied, on the compute stream,
        beside any still running (NOTE [ misses before copies ahead ] in experts.py). Copies ahead
        that are still running then delay the misses, and with them the layer's experts, by their
        own time whether or not they were chosen: a prediction's lower ranks then cost the chain
        more than they save. So the number a layer copies ahead follows what lands in time: one
        more after a layer whose copies had all landed by its fetch (`on_time`, its event passed),
        one fewer after a layer whose copies had not and that waited for a copy it did not need
        first (`waited`: misses behind them, or a copy ahead of an expert it did not choose, which
        its experts waited for all the same); a late layer that chose every expert it copied ahead
        and missed none changes nothing. (Cut only for misses, the limit climbed towards the whole
        prediction in a batch-1 run that was its tree's slowest; whether as cause or effect is not
        known, and the cut for a copy for nothing did not stop such climbs: BENCHMARKS.md.) The
        predicted experts are copied best first (ExpertSet.prefetch), so the cut drops the least
        likely. A prediction of 8 experts on the Qwen3-30B-A3B shape, all copied, ran slower than
        its 5 best (BENCHMARKS.md).
        Only steps of one token follow the limit (`single`, set each step). In a step of several
        tokens the copies ahead are the most often predicted of the step's union, nearly all used,
        and the link is busy with that union anyway: a late copy that is used delays the misses by
        no more than their own copy would have, so cutting on lateness only moved bytes from ahead
        of the router to after it, and batch 8 ran slower (BENCHMARKS.md). There each layer copies
        ahead up to its set's slots."""
        if not self.single:
            return
        if on_time:
            self.limit = min(self.slots, self.limit + 1)
        elif waited:
            self.late += 1
            self.limit = max(1, self.limit - 1)

    def take(self, n: int) -> int:
        """How many of `n` wanted experts a layer copies ahead now (at most `limit` in a step of one
        token, else the set's slots)."""
        n = min(n, self.limit if self.single else self.slots)
        if n and self.single:
            self.limits += self.limit
            self.issued += 1
        return n

    def has(self, i: int, e: int) -> bool:
        return e in self.layers.get(i, ({},))[0]
