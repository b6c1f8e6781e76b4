"""Typed reads of GGUF metadata: a value of the wrong type is one line naming the key and the type expected."""

from __future__ import annotations

from typing import Any

from layerstream.errors import ModelError

REQUIRED = object()
_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("a boolean", "booleans"),
          str: ("a string", "strings")}


def _is(v: Any, want: type) -> bool:
    if want is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if want is bool:
        return isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))
    return isinstance(v, want)


def _described(v: Any) -> str:
    if isinstance(v, list):
        kinds = sorted({type(x).__name__ for x in v[:1000]})
        return f"a list of {len(v)} ({', '.join(kinds) or 'empty'})"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:40] + '...'}"


def meta(md: dict[str, Any], key: str, want: type, default: Any = REQUIRED, *, items: type | None = None,
         path: str = "") -> Any:
    """md[key] checked to be a `want` (with `want` list: a list whose elements are `items`); `default`
    where the key is absent (REQUIRED: absent is an error). Integers pass as numbers, 0 and 1 as booleans."""
    where = f"{path}: " if path else ""
    if key not in md:
        if default is REQUIRED:
            raise ModelError(f"{where}metadata key {key!r} is missing; the file was not written by a known converter")
        return default
    v = md[key]
    if want is list:
        ok = isinstance(v, list) and (items is None or all(_is(x, items) for x in v))
        expected = f"a list of {_NAMES[items][1]}" if items is not None else "a list"
    else:
        ok, expected = _is(v, want), _NAMES[want][0]
    if not ok:
        raise ModelError(f"{where}metadata {key} is {_described(v)}, expected {expected}; the file is corrupt or "
                         "was not written by a known converter")
    return v
