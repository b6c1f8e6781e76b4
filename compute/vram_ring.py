"""The VRAM ring that streamed layers are copied into (streamed.py, NOTE [ slot ownership between
compute and coordinator ]), CUDA only."""

from __future__ import annotations

import torch


class VramRing:
    """The ring of VRAM slots that announced layers are copied into on their own stream, and the
    events that say when a slot may be overwritten (CUDA only). `room`: the slots as views of
    the expert pool's room, which its cache borrows between prompts (expert_stream.py, NOTE [ the
    layer slots lent to the expert cache ]); None: allocations of their own."""

    def __init__(self, device: torch.device, nbytes: int, n_slots: int, room: list[torch.Tensor] | None = None):
        self.vram = room or [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(max(n_slots, 1))]
        self.copy_stream = torch.cuda.Stream(device)
        self.freed = [None] * len(self.vram)  # event: dequant done reading that VRAM slot
        self.free_vram = list(range(len(self.vram)))
        self.copies: dict[int, tuple] = {}  # layer -> (vram slot, staging slot, c0, c1, bytes copied)
        self.ahead: dict[int, tuple] = {}  # the same, copies for step `ahead_step` issued during the step before
        self.ahead_step = -1
        self.gpu_events: list[tuple] = []
        self.layer_start: dict[int, torch.cuda.Event] = {}
        self.in_use: dict[int, int] = {}  # layer -> VRAM slot its blocks are read from
        self.stream = torch.cuda.current_stream(device)  # the compute stream (looked up once a step)

    def free_slot(self, k: int, event) -> None:
        self.freed[k] = event  # the copy stream waits on it before overwriting slot k
        self.free_vram.append(k)

    def idle(self) -> bool:
        """No slot holds a layer or takes a copy."""
        return not (self.copies or self.ahead or self.in_use) and len(self.free_vram) == len(self.vram)

    def reclaimed(self) -> None:
        """The room is the ring's again: a copy into any slot waits for the compute stream's work
        so far (the last step that read the cache's entries there)."""
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self.freed = [ev] * len(self.vram)
