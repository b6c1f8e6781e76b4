"""The one codec: messages to ZeroMQ frames and back (msgpack, positional, versioned; never pickle).

Wire format of one message (after any ROUTER identity frame):

    frame 0   2 bytes   [PROTOCOL_VERSION, TAG]   a router dispatches on it without decoding
    frame 1   msgpack   a list of the message's fields, in declaration order
    frame 2+  raw       optional extra buffers (zero-copy; logits, small tensors)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import msgpack

from ..errors import shown
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, Struct

S = TypeVar("S", bound=Struct)

Buffer = bytes | bytearray | memoryview  # also anything with the buffer protocol (zmq.Frame)

_PREVIEW = 60  # bytes of a bad frame shown in an error message


class ProtocolError(Exception):
    """Base of every error about what crossed (or was about to cross) a socket."""


class UnknownTag(ProtocolError):
    """The header names a message type this process does not know."""


class VersionMismatch(ProtocolError):
    """The sender speaks another protocol version."""


class MalformedMessage(ProtocolError):
    """Frames missing, bad msgpack, wrong arity or wrong field types."""


class EncodeError(ProtocolError):
    """The message cannot be encoded (not a message, or a field of the wrong type)."""


class Decoded(NamedTuple):
    """A decoded message and its extra raw frames (empty when there are none)."""

    msg: Message
    extra: list[Any]


def _preview(frame: Any) -> str:
    data = bytes(memoryview(frame)[:_PREVIEW])
    return data.hex() + ("..." if len(memoryview(frame)) > _PREVIEW else "")


def _type_error(cls: type, values: Sequence[Any]) -> str | None:
    """One line naming the first field whose value has the wrong type, or None."""
    for name, types_, value in zip(cls.FIELDS, cls.FIELD_TYPES, values):
        # bool is an int subclass; an int field given True/False is almost surely a bug.
        if not isinstance(value, types_) or (type(value) is bool and bool not in types_):
            want = " or ".join(t.__name__ for t in types_)
            return f"{cls.__name__}.{name} must be {want}, got {type(value).__name__}"
    return None


def _decode_items(cls: type, values: list[Any]) -> str | None:
    """Check list items of the types in cls.ITEM_TYPES, building nested structs in place; one
    line naming the first bad item, or None."""
    for i, (name, item) in enumerate(zip(cls.FIELDS, cls.ITEM_TYPES)):
        if item is None:
            continue
        items = values[i]
        if item is int:
            if not set(map(type, items)) <= {int}:  # (about 30 ns an item: kv_pos lists are long)
                bad = next(v for v in items if type(v) is not int)
                return f"{cls.__name__}.{name} must hold ints, got {bad!r}"
            continue
        built = []
        for k, v in enumerate(items):
            if not isinstance(v, list) or len(v) != len(item.FIELDS):
                return (f"{cls.__name__}.{name}[{k}] must be a {item.__name__} list of {len(item.FIELDS)} fields "
                        f"({', '.join(item.FIELDS)}), got {shown(v, _PREVIEW)}")
            problem = _type_error(item, v) or _decode_items(item, v)
            if problem is not None:
                return f"{cls.__name__}.{name}[{k}]: {problem}"
            built.append(item(*v))
        values[i] = built
    return None


def _choice_error(cls: type[Message], values: Sequence[Any]) -> str | None:
    for name, allowed in cls.CHOICES.items():
        value = values[cls.FIELDS.index(name)]
        if value not in allowed:
            return f"{cls.__name__}.{name} must be one of {allowed}, got {value!r}"
    for name in cls.LAYER_SLOTS:
        for item in values[cls.FIELDS.index(name)]:
            if not (isinstance(item, list) and len(item) == 2
                    and all(type(v) is int and v >= 0 for v in item)):
                return f"{cls.__name__}.{name} must hold [layer, slot] pairs of ints >= 0, got {item!r}"
    return None


def _wire_values(obj: Message | Struct) -> list[Any]:
    """Fields in declaration order, nested structs as lists; raises EncodeError on a wrong type
    (list items other than structs are left to the receiver's check)."""
    cls = type(obj)
    values = [getattr(obj, name) for name in cls.FIELDS]
    problem = _type_error(cls, values)
    if problem is not None:
        raise EncodeError(problem)
    for i, (name, item) in enumerate(zip(cls.FIELDS, cls.ITEM_TYPES)):
        if isinstance(item, type) and issubclass(item, Struct):
            for k, v in enumerate(values[i]):
                if type(v) is not item:
                    raise EncodeError(f"{cls.__name__}.{name}[{k}] must be a {item.__name__}, got {type(v).__name__}")
            values[i] = [_wire_values(v) for v in values[i]]
    return values


def to_wire(record: Struct) -> list[Any]:
    """A struct as the list that travels (checked as encode checks a message)."""
    return _wire_values(record)


def from_wire(cls: type[S], value: Any) -> S:
    """A struct from the list that travelled; MalformedMessage when its arity or a type is wrong."""
    if not isinstance(value, list) or len(value) != len(cls.FIELDS):
        raise MalformedMessage(f"{cls.__name__} must be a list of {len(cls.FIELDS)} fields ({', '.join(cls.FIELDS)}), "
                               f"got {shown(value, _PREVIEW)}")
    value = list(value)
    problem = _type_error(cls, value) or _decode_items(cls, value)
    if problem is not None:
        raise MalformedMessage(problem)
    return cls(*value)


def encode(msg: Message, extra: Sequence[Buffer] = ()) -> list[Any]:
    """Frames for one message: [header, body, *extra]; extra buffers are passed through uncopied."""
    tag = getattr(msg, "TAG", None)
    if MESSAGE_TYPES.get(tag) is not type(msg):
        raise EncodeError(f"not a registered message type: {type(msg).__name__}")
    values = _wire_values(msg)
    problem = _choice_error(type(msg), values)
    if problem is not None:
        raise EncodeError(problem)
    try:
        body = msgpack.packb(values, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{type(msg).__name__}: cannot pack fields: {exc}") from None
    return [bytes((PROTOCOL_VERSION, tag)), body, *extra]


def peek_tag(frames: Sequence[Any]) -> int:
    """The message's tag from its header frame alone (checks the version and that the tag is known)."""
    if len(frames) < 2:
        raise MalformedMessage(f"expected at least 2 frames (header, body), got {len(frames)}")
    header = memoryview(frames[0])
    if header.nbytes != 2:
        raise MalformedMessage(f"header frame must be 2 bytes [version, tag], got {header.nbytes}: {_preview(frames[0])}")
    version, tag = header.tobytes()
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version} received, this process speaks {PROTOCOL_VERSION}")
    if tag not in MESSAGE_TYPES:
        raise UnknownTag(f"unknown message tag {tag} (protocol version {version})")
    return tag


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack extension type {code} is not allowed in messages")


def decode_extra(frames: Sequence[Any]) -> Decoded:
    """Decode frames into (message, extra raw frames); raises a ProtocolError subclass on bad input."""
    tag = peek_tag(frames)
    cls = MESSAGE_TYPES[tag]
    try:
        body = msgpack.unpackb(
            frames[1], raw=False, strict_map_key=False, use_list=True, ext_hook=_refuse_ext
        )
    except MalformedMessage:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedMessage(
            f"{cls.__name__}: body is not valid msgpack ({type(exc).__name__}: {exc}): {_preview(frames[1])}"
        ) from None
    if not isinstance(body, list):
        raise MalformedMessage(f"{cls.__name__}: body must be a list of fields, got {type(body).__name__}")
    if len(body) != len(cls.FIELDS):
        raise MalformedMessage(
            f"{cls.__name__}: body has {len(body)} fields, expected {len(cls.FIELDS)} ({', '.join(cls.FIELDS)})"
        )
    problem = _type_error(cls, body) or _choice_error(cls, body) or _decode_items(cls, body)
    if problem is not None:
        raise MalformedMessage(problem)
    return Decoded(cls(*body), list(frames[2:]))


def decode(frames: Sequence[Any]) -> Message:
    """Decode frames into a message (extra raw frames, if any, are ignored: see decode_extra)."""
    return decode_extra(frames).msg


class BadMessageCounter:
    """Counts and logs frames that fail to decode, so a receiver survives them.

    Logs the first bad message at once, then at most one line per `log_every_s` seconds with how
    many were seen meanwhile.
    """

    def __init__(self, name: str = "receiver", logger: logging.Logger | None = None, log_every_s: float = 5.0):
        self.name = name
        self.logger = logger or logging.getLogger(__name__)
        self.log_every_s = log_every_s
        self.total = 0
        self.by_kind: Counter[str] = Counter()
        self.last_error: ProtocolError | None = None
        self._last_log = float("-inf")
        self._unlogged = 0

    def record(self, exc: ProtocolError, peer: bytes | str | None = None) -> None:
        """Count one bad message and log it (rate-limited)."""
        self.total += 1
        self.by_kind[type(exc).__name__] += 1
        self.last_error = exc
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            origin = f" from {peer!r}" if peer is not None else ""
            more = f" ({self._unlogged - 1} more since last report)" if self._unlogged > 1 else ""
            self.logger.warning(
                "%s: dropped bad message%s: %s: %s%s; %d bad in total",
                self.name, origin, type(exc).__name__, exc, more, self.total,
            )
            self._last_log = now
            self._unlogged = 0

    def decode(self, frames: Sequence[Any], peer: bytes | str | None = None) -> Decoded | None:
        """decode_extra(frames), or None (counted and logged) when they are bad."""
        try:
            return decode_extra(frames)
        except ProtocolError as exc:
            self.record(exc, peer)
            return None

    def stats(self) -> dict[str, Any]:
        """Counters as plain values (fit for StatsReply)."""
        return {"bad_messages": self.total, "bad_by_kind": dict(self.by_kind)}


__all__ = [
    "ProtocolError",
    "UnknownTag",
    "VersionMismatch",
    "MalformedMessage",
    "EncodeError",
    "Decoded",
    "encode",
    "to_wire",
    "from_wire",
    "peek_tag",
    "decode",
    "decode_extra",
    "BadMessageCounter",
]
