"""Every pipeline message type, declared once: frozen dataclasses with a tag, encoded positionally.

NOTE [ message rules ]
- A message is a small frozen dataclass whose fields hold plain Python values only (int, float,
  str, bytes, bool, None, list, dict). The codec sends the fields as one msgpack list in
  declaration order, so adding, removing or reordering a field is a protocol change: bump
  PROTOCOL_VERSION.
- Use lists, not tuples, inside fields: msgpack gives lists back, and a message compares equal
  to its round trip only if it was built with lists.
- A record nested in a field (a Forward's sequences, the arena's description) is a `@struct`:
  a frozen dataclass of plain fields, sent as a positional list like a message. A field
  `list[S]` of a struct S, or `list[int]`, is checked item by item when decoded (arity and
  types), so a receiver never meets a record of the wrong shape.
- Weights and KV never travel in messages: readers write into shared-memory staging slots and
  messages carry slot handles. Other bulk data (logits, small tensors) may ride as extra raw
  frames next to a message (see `codec.encode(msg, extra=...)`).
- Tags are small ints, unique, grouped by link: 1-9 lifecycle (every child <-> coordinator),
  10-19 readers <-> coordinator, 20-29 compute <-> coordinator.
"""

from __future__ import annotations

import dataclasses
import traceback as _traceback
import types
import typing
from typing import Any, ClassVar

# 2: LayerDone and LayerReady carry lists of [layer, slot]
# 3: Forward.seqs holds ForwardSeq records, checked item by item; list[int] fields are checked
#    item by item; staging's Ready carries its arena as an ArenaDesc record
# 4: the compute side samples: ForwardSeq.sample, Forward.starts (SamplerStart records),
#    ForwardDone.ids and .bad (a decode token -1 is its row's last sampled id)
# 5: ForwardSeq.sample is a count (k > 1 verifies the chunk's last k - 1 tokens as drafts);
#    ForwardDone.accepted: per sequence, the drafts accepted
# 6: StepFailed (a step that raised in the compute process; the run goes on); Forward.failed
# 7: AttachArena: readers and compute get the arena in a message, not in their config (they start
#    beside staging: NOTE [ the arena after Ready ] in pipeline.py)
# 8: ForwardSeq.kv_count: a row whose slots hold positions 0..n-1 in order sends n, not the list
PROTOCOL_VERSION = 8

# A byte range that a reader copies into a staging slot: [file_index, offset, nbytes, slot_offset].
ByteRange = list[int]
# A layer whose bytes sit in a staging slot: [layer, slot].
LayerSlot = list[int]

WANT_LOGITS = ("last", "all", "none")


class Message:
    """Base of every message type; `TAG` is its one-byte type tag on the wire."""

    __slots__ = ()
    TAG: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[str, ...]] = ()
    # Per field, the Python types a decoded value may have (top level only; cheap to check).
    FIELD_TYPES: ClassVar[tuple[tuple[type, ...], ...]] = ()
    # Per field name, the values it may take (for small enumerations such as want_logits).
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # Fields that are lists of [layer, slot] pairs of ints >= 0 (checked item by item).
    LAYER_SLOTS: ClassVar[tuple[str, ...]] = ()
    # Per field, the type of a list's items that is checked when decoded (int or a Struct), else None.
    ITEM_TYPES: ClassVar[tuple[type | None, ...]] = ()


class Struct:
    """Base of a record nested in a message field: plain fields, sent as a positional list."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()
    FIELD_TYPES: ClassVar[tuple[tuple[type, ...], ...]] = ()
    ITEM_TYPES: ClassVar[tuple[type | None, ...]] = ()


# tag -> message class, filled by @message.
MESSAGE_TYPES: dict[int, type[Message]] = {}


def _accepted_types(hint: Any) -> tuple[type, ...]:
    """The isinstance() types for one field annotation (float also takes int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _accepted_types(arg))
    if hint is Any:
        return (object,)
    if hint is None or hint is type(None):
        return (type(None),)
    if hint is float:
        return (float, int)
    base = origin if origin is not None else hint
    if base not in (int, float, str, bytes, bool, list, dict):
        raise TypeError(f"message field type {hint!r} is not a plain msgpack type")
    return (base,)


def _item_type(hint: Any) -> type | None:
    """For a `list[int]` or `list[SomeStruct]` field, the item type the codec checks; else None."""
    if typing.get_origin(hint) is not list:
        return None
    (item,) = typing.get_args(hint) or (None,)
    if item is int or (isinstance(item, type) and issubclass(item, Struct)):
        return item
    return None


def _typed(cls: type) -> type:
    """Make cls a frozen slotted dataclass and record its field names and checked types."""
    cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
    hints = typing.get_type_hints(cls, globals())
    fields = dataclasses.fields(cls)
    cls.FIELDS = tuple(f.name for f in fields)
    cls.FIELD_TYPES = tuple(_accepted_types(hints[f.name]) for f in fields)
    cls.ITEM_TYPES = tuple(_item_type(hints[f.name]) for f in fields)
    return cls


@typing.dataclass_transform(frozen_default=True)
def struct(cls: type) -> type:
    """Declare a record type nested in messages (a subclass of Struct)."""
    if not issubclass(cls, Struct):
        raise TypeError(f"{cls.__name__}: a @struct must subclass Struct")
    return _typed(cls)


@typing.dataclass_transform(frozen_default=True)
def message(tag: int):
    """Declare a message type: makes the class a frozen slotted dataclass and registers its tag."""

    def wrap(cls: type) -> type:
        if not 0 < tag < 256:
            raise ValueError(f"{cls.__name__}: tag {tag} does not fit in one byte (1..255)")
        if tag in MESSAGE_TYPES:
            raise ValueError(f"{cls.__name__}: tag {tag} already used by {MESSAGE_TYPES[tag].__name__}")
        cls = _typed(cls)
        cls.TAG = tag
        MESSAGE_TYPES[tag] = cls
        return cls

    return wrap


# ---- records nested in messages ----


@struct
class ForwardSeq(Struct):
    """One sequence's part of a Forward: its KV row, new tokens with their slots and positions,
    and the position each of its KV slots holds after the writes (-1: empty): `kv_pos`, or, where
    slots 0..n-1 hold positions 0..n-1 (a ring that has not slid: every step but a slid ring's),
    `kv_count` n and no list, so a step's message and its decoding do not grow with the context."""

    row: int
    tokens: list[int]  # -1: the row's last sampled id, which never left the compute side
    slots: list[int]
    positions: list[int]
    kv_pos: list[int]  # (empty where kv_count >= 0)
    sample: int = 0  # 1: draw the next token from the last one's logits; k > 1: verify the last k - 1 tokens (drafts)
    kv_count: int = -1  # >= 0: slots 0..kv_count-1 hold positions 0..kv_count-1

    @classmethod
    def of(cls, row: int, tokens: list[int], slots: list[int], positions: list[int], kv_pos, sample: int
           ) -> "ForwardSeq":
        """The record of a sequence whose slots hold `kv_pos` (a list, or a range from 0: kv_count)."""
        if isinstance(kv_pos, range) and kv_pos.start == 0 and kv_pos.step == 1:
            return cls(row, tokens, slots, positions, [], sample, len(kv_pos))
        return cls(row, tokens, slots, positions, list(kv_pos), sample)

    def kv_positions(self) -> list[int] | range:
        """The position each KV slot holds: kv_pos, or range(kv_count); ValueError for a record that
        gives both, or a count below -1."""
        if self.kv_count < -1 or (self.kv_count >= 0 and self.kv_pos):
            raise ValueError(f"ForwardSeq of row {self.row}: kv_count {self.kv_count} with {len(self.kv_pos)} "
                             "kv_pos entries (a count >= 0 and no list, or -1 and the list)")
        return range(self.kv_count) if self.kv_count >= 0 else self.kv_pos


@struct
class SamplerStart(Struct):
    """A request's sampler, sent with its first chunk: the compute side keeps it for its KV row
    (the seeded generator, and the prompt's tail the repetition penalty looks at)."""

    row: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int  # 0..2^64-1
    history: list[int]


@struct
class ArenaDesc(Struct):
    """What a process needs to attach to the staging arena (loader/arena.py)."""

    name: str
    n_slots: int
    slot_bytes: int


# ---- lifecycle: every child <-> coordinator (control link) ----


@message(1)
class Ready(Message):
    """Child to coordinator: started and ready for work; `info` says what it holds (device, slots;
    staging's is {"arena": ArenaDesc as a list})."""

    role: str
    ident: str
    pid: int
    info: dict[str, Any]


@message(3)
class Shutdown(Message):
    """Coordinator to child: finish the current step, close sockets and exit."""

    reason: str


@message(4)
class Failed(Message):
    """Child to coordinator: its last frame before dying; the error as data (one line + traceback)."""

    role: str
    ident: str
    where: str
    error: str
    traceback: str

    @classmethod
    def from_exception(cls, role: str, ident: str, where: str, exc: BaseException) -> Failed:
        """Build the message from a caught exception."""
        error = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(role, ident, where, error, tb)


@message(7)
class AttachArena(Message):
    """Coordinator to a reader or compute, on its work link: the staging arena to map, sent once
    the child is Ready and staging has described the arena; before any other work message
    (NOTE [ the arena after Ready ] in pipeline.py). The ArenaDesc's fields, each checked by the codec."""

    name: str
    n_slots: int
    slot_bytes: int

    @classmethod
    def of(cls, arena: ArenaDesc) -> AttachArena:
        return cls(arena.name, arena.n_slots, arena.slot_bytes)

    @property
    def desc(self) -> ArenaDesc:
        return ArenaDesc(self.name, self.n_slots, self.slot_bytes)


@message(5)
class StatsRequest(Message):
    """Coordinator to child: send your counters."""


@message(6)
class StatsReply(Message):
    """Child to coordinator: counters and timings (plain values only)."""

    role: str
    ident: str
    stats: dict[str, Any]


# ---- readers <-> coordinator (reader link) ----


@message(10)
class LoadLayer(Message):
    """Coordinator to reader: read these byte ranges ([file_index, offset, nbytes, slot_offset]) into `slot`."""

    req: int
    layer: int
    slot: int
    ranges: list[ByteRange]


@message(11)
class LayerStaged(Message):
    """Reader to coordinator: `layer`'s bytes are in `slot` (`nbytes` in `read_s` seconds)."""

    req: int
    layer: int
    slot: int
    nbytes: int
    read_s: float
    reader: str


@message(12)
class ReadFailed(Message):
    """Reader to coordinator: a LoadLayer failed; the slot holds no valid bytes."""

    req: int
    layer: int
    slot: int
    error: str


# ---- compute <-> coordinator (compute link) ----


@message(20)
class Forward(Message):
    """Coordinator to compute: run one step over these sequences."""

    step: int
    seqs: list[ForwardSeq]
    want_logits: str = "last"  # the logits sent back (sampling uses the last ones whatever this says)
    starts: list[SamplerStart] = dataclasses.field(default_factory=list)
    # the last step whose StepFailed the coordinator had passed on when it sent this one (0: none):
    # a step sent before it knew of a failure fails too (NOTE [ a failed step ] in compute_proc.py)
    failed: int = 0

    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {"want_logits": WANT_LOGITS}


@message(21)
class LayerDone(Message):
    """Compute to coordinator: finished with these layers' staging slots ([layer, slot] each); they
    may be reused. Several go in one message where compute can wait (a streamed MoE layer's
    slot): a message costs the compute process's host time, which bounds MoE decode."""

    step: int
    done: list[LayerSlot]

    LAYER_SLOTS: ClassVar[tuple[str, ...]] = ("done",)


@message(22)
class ForwardDone(Message):
    """Compute to coordinator: step finished; per sequence the id it sampled (-1: none; after a
    verified chunk, the id after its accepted drafts), its logits' code (0: finite; sampling.NAN,
    INF, NO_FINITE) and the drafts it accepted; logits, when asked, ride as one extra raw frame of
    `dtype`."""

    step: int
    shape: list[int]
    dtype: str
    stats: dict[str, Any]
    ids: list[int] = dataclasses.field(default_factory=list)
    bad: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)


@message(23)
class StepFailed(Message):
    """Compute to coordinator: the step raised (an out-of-memory error, a bad input) or was sent
    before the coordinator knew that an earlier one did; its requests fail, the process goes on
    (NOTE [ a failed step ] in compute_proc.py). `error`: one line."""

    step: int
    error: str


@message(25)
class LayerReady(Message):
    """Coordinator to compute: these layers' bytes for `step` are staged ([layer, slot] each), all
    that became ready at once in one message."""

    step: int
    ready: list[LayerSlot]

    LAYER_SLOTS: ClassVar[tuple[str, ...]] = ("ready",)


__all__ = [
    "PROTOCOL_VERSION",
    "WANT_LOGITS",
    "ByteRange",
    "LayerSlot",
    "Message",
    "Struct",
    "struct",
    "ForwardSeq",
    "SamplerStart",
    "ArenaDesc",
    "MESSAGE_TYPES",
    "message",
    "Ready",
    "Shutdown",
    "Failed",
    "AttachArena",
    "StatsRequest",
    "StatsReply",
    "LoadLayer",
    "LayerStaged",
    "ReadFailed",
    "Forward",
    "LayerDone",
    "ForwardDone",
    "StepFailed",
    "LayerReady",
]
