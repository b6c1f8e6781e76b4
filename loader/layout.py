"""Slot layouts: where each tensor of a layer (or of the globals) lies in a staging slot.

NOTE [ slot layout and O_DIRECT ]
GGUF aligns tensor data to `general.alignment` (32 bytes by default), not to 4096, so a
tensor's file offset is almost never page-aligned. An O_DIRECT read must start at a
page-aligned file offset *and* land at a page-aligned memory address, so the only way to
read a tensor with O_DIRECT straight into its final place (no bounce buffer, no copy) is
to place it in the slot at the same offset modulo 4096 as in the file. The layout does
exactly that:

- tensors are grouped into *runs*: tensors of one file that follow each other in the file
  (gaps under MERGE_GAP bytes are read along and ignored);
- each run starts at a 4096-aligned slot position `base`, and a tensor at file offset `f`
  of a run starting at file offset `f0` lies at `base + (f0 % 4096) + (f - f0)`;
- so every tensor satisfies `slot_offset % 4096 == file_offset % 4096`, and a run's aligned
  superset `[align_down(f0), align_up(f_end))` maps onto `[base, base + ...)` inside the
  run's own padded region: one aligned read per run (usually one per layer) in either mode.

Tensor slot offsets are therefore aligned to the file's tensor alignment (>= 32 bytes,
enough for every dtype view and vectorized GPU load), not to 4096; each run's base and
the layout's total `nbytes` are 4096-aligned. A layout is plain data and travels to the
compute process as `to_wire()` (lists of ints and strings, msgpack-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

from layerstream.loader.gguf_index import ModelIndex, TensorInfo

ALIGN = 4096  # page size and O_DIRECT block: run bases, read offsets and lengths
MERGE_GAP = 64 * 1024  # tensors of one file closer than this are read in one run
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")
GLOBALS = -1  # LayerLayout.layer of the globals layout


def align_down(x: int, a: int = ALIGN) -> int:
    return x - x % a


def align_up(x: int, a: int = ALIGN) -> int:
    return -(-x // a) * a


class ReadRange(NamedTuple):
    """One pread: `nbytes` bytes of `file` from `file_offset` go to `slot_offset` of a slot."""

    file: str
    file_offset: int
    nbytes: int
    slot_offset: int


@dataclass(frozen=True)
class SlotTensor:
    """One tensor's place in a slot and in its file."""

    name: str  # short name within the layer ("attn_q.weight"), full name for globals
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (rows, cols)
    slot_offset: int
    nbytes: int
    file: str
    file_offset: int

    def to_wire(self) -> list:
        return [self.name, self.qtype, list(self.shape), self.slot_offset, self.nbytes, self.file, self.file_offset]

    @classmethod
    def from_wire(cls, w: list) -> "SlotTensor":
        name, qtype, shape, slot_offset, nbytes, file, file_offset = w
        return cls(name, int(qtype), tuple(int(d) for d in shape), int(slot_offset), int(nbytes), file, int(file_offset))


@dataclass(frozen=True)
class LayerLayout:
    """A layer's tensors packed into one slot buffer of `nbytes` bytes (a multiple of 4096)."""

    layer: int  # block index, or GLOBALS
    tensors: tuple[SlotTensor, ...]  # in slot order (= file order)
    nbytes: int

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    def tensor(self, name: str) -> SlotTensor:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def data_nbytes(self) -> int:
        """Bytes of tensor data (without padding and gap bytes)."""
        return sum(t.nbytes for t in self.tensors)

    def ranges(self) -> list[ReadRange]:
        """The reads that fill a slot: one per run of adjacent tensors of one file."""
        out: list[ReadRange] = []
        for t in self.tensors:
            if out:
                r = out[-1]
                # same file, after the previous end, and at the same displacement in slot and file
                if (
                    r.file == t.file
                    and t.file_offset >= r.file_offset + r.nbytes
                    and t.file_offset - r.file_offset == t.slot_offset - r.slot_offset
                ):
                    out[-1] = r._replace(nbytes=t.file_offset + t.nbytes - r.file_offset)
                    continue
            out.append(ReadRange(t.file, t.file_offset, t.nbytes, t.slot_offset))
        return out

    def to_wire(self) -> list:
        return [self.layer, self.nbytes, [t.to_wire() for t in self.tensors]]

    @classmethod
    def from_wire(cls, w: list) -> "LayerLayout":
        layer, nbytes, tensors = w
        return cls(int(layer), tuple(SlotTensor.from_wire(t) for t in tensors), int(nbytes))


def pack(layer: int, named: Iterable[tuple[str, TensorInfo]]) -> LayerLayout:
    """Lay out tensors in file order, one 4096-aligned run per group of adjacent tensors."""
    items = sorted(named, key=lambda nt: (nt[1].file, nt[1].offset))
    placed: list[SlotTensor] = []
    cursor = 0  # end of the slot region used so far (always a multiple of ALIGN)
    run_file, run_base, run_f0, run_end = None, 0, 0, 0  # current run: file offsets [run_f0, run_end)
    for name, t in items:
        same_run = t.file == run_file and run_end <= t.offset < run_end + MERGE_GAP
        if not same_run:
            cursor = align_up(run_base + (run_end - align_down(run_f0))) if run_file is not None else cursor
            run_file, run_base, run_f0 = t.file, cursor, t.offset
        run_end = t.offset + t.nbytes
        slot_offset = run_base + (t.offset - align_down(run_f0))
        placed.append(SlotTensor(name, t.qtype, tuple(t.shape), slot_offset, t.nbytes, t.file, t.offset))
    if run_file is not None:
        cursor = align_up(run_base + (run_end - align_down(run_f0)))
    return LayerLayout(layer, tuple(placed), cursor)


def layer_layouts(index: ModelIndex) -> list[LayerLayout]:
    """One layout per transformer block of the model."""
    return [pack(i, layer.items()) for i, layer in enumerate(index.layers)]


def globals_layout(index: ModelIndex, names: Iterable[str] | None = None) -> LayerLayout:
    """A layout of the global tensors present (by default token_embd, output_norm, output, rope_freqs).

    Pass `names` to lay out a subset, e.g. only the output head to keep it resident apart from
    the embedding (which may be larger than a layer slot).
    """
    names = GLOBAL_TENSORS if names is None else tuple(names)
    return pack(GLOBALS, [(n, index.globals[n]) for n in names if n in index.globals])
