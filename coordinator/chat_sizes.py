"""What the chat template sandbox measures: the size a value has or an operation would make,
the work some filters would take, and the limits each is held to (chat_sandbox.py holds them)."""

from __future__ import annotations

import json
import re
import string
import threading
import time
from itertools import compress, repeat
from typing import Any, Callable

from jinja2.sandbox import SecurityError
from jinja2.utils import Namespace

MAX_OUTPUT = 4 * 1024 * 1024  # characters of rendered prompt (also the largest value a template may build)
MAX_RENDER_TOTAL = 16 * MAX_OUTPUT  # characters and elements of all the values one render builds
MAX_FILTER_WORK = 10_000_000  # steps one filter may take (a step: about a character copied)
MAX_RANGE_TOTAL = 1_000_000  # range() elements over one render
MAX_LOOP_STEPS = 1_000_000  # for-loop iterations over one render
MAX_INT_BITS = 1 << 16  # the largest integer a template may compute
MAX_JSON_INDENT = 16
MAX_STRFTIME = 256  # characters of a strftime_now format
RENDER_SECONDS = 2.0  # of the rendering thread's own CPU time
render_clock = threading.local()  # this thread's render deadline: measuring and filters test it as they go


def check_deadline() -> None:
    """Stop a render that has used RENDER_SECONDS of its thread's CPU time. The clock's time is
    the cheap test, made at every check; only past that deadline is the thread's CPU time read
    (a system call), and where the render has used less, it was waiting for a core or the GIL
    (a loaded server, a busy host) and goes on, its deadline moved by its own time left."""
    if time.monotonic() > getattr(render_clock, "deadline", float("inf")):
        used = time.thread_time() - render_clock.cpu_start
        if used > RENDER_SECONDS:
            raise LimitExceeded(f"rendering took longer than {RENDER_SECONDS:g} s")
        render_clock.deadline = time.monotonic() + RENDER_SECONDS - used


class LimitExceeded(SecurityError):
    """A hostile template's render went past a size, time or loop limit."""


MAX_DEPTH = 200  # nesting of lists and maps a template may build
_FLAT = (str, int, float, type(None))  # elements measured without a walk


def measure(obj: Any, budget: int = MAX_OUTPUT) -> tuple[int, int, int]:
    """(characters, elements, depth) of a value: the length of its strings, the count of its
    containers' elements and how deeply they nest. A container shared many times is measured
    once; counting stops just past `budget`, so a huge value costs no more than that."""
    memo: dict[int, tuple[int, int, int]] = {}

    def walk(x: Any, d: int) -> tuple[int, int, int]:
        if isinstance(x, (str, bytes)):
            return len(x), 0, 0
        if type(x) is Sized:
            return x.measured
        if not len(memo) & 4095:
            check_deadline()
        if d > MAX_DEPTH:
            raise LimitExceeded(f"a value nested more than {MAX_DEPTH} deep")
        key = id(x)
        if key in memo:
            return memo[key]
        memo[key] = (0, 1, 0)  # (a namespace that holds itself: counted once)
        inner = x._Namespace__attrs if isinstance(x, Namespace) else x
        kids = ([v for kv in inner.items() for v in kv] if isinstance(inner, dict)
                else inner if isinstance(inner, (list, tuple, set, frozenset)) else ())
        if len(kids) > budget:
            return 0, 1 + len(kids), 1  # past the limit already
        if isinstance(kids, (list, tuple)) and all(map(isinstance, kids, repeat(_FLAT))):  # (at C speed)
            memo[key] = (sum(map(len, compress(kids, map(isinstance, kids, repeat(str))))), 1 + len(kids),
                         1 if kids else 0)
            return memo[key]
        chars, items, depth = 0, 1, 0
        for v in kids:
            c, i, dv = walk(v, d + 1)
            chars, items, depth = chars + c, items + i, max(depth, dv + 1)
            if chars + items > budget:
                break
        memo[key] = (chars, items, depth)
        return memo[key]

    return walk(obj, 0)


class Sized(list):
    """A list a filter made whose measure was worked out as it was made (batch, slice): measuring
    it again costs nothing (the sandbox keeps lists immutable)."""

    measured: tuple[int, int, int]


def with_measure(items: list, measured: tuple[int, int, int]) -> Sized:
    out = Sized(items)
    out.measured = measured
    return out


def total_size(obj: Any) -> int:
    chars, items, _ = measure(obj)
    return chars + items


CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)


def bounded_str(value: Any) -> str:
    """str(value), refused where the value is too large to show (a repr escapes a character in at most 6)."""
    if isinstance(value, CONTAINERS) and total_size(value) > MAX_OUTPUT:
        raise LimitExceeded(f"a value of more than {MAX_OUTPUT} characters and elements made into text")
    return str(value)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _shown_size(values: tuple, as_repr: bool) -> int:
    """The longest str() (or repr()) of `values`: a repr escapes a character in at most 6."""
    return max((len(v) if isinstance(v, str) and not as_repr else total_size(v) * 6 for v in values), default=0)


def percent_size(fmt: str, args: Any) -> int:
    """An upper bound on the length of `fmt % args`."""
    values = tuple(args.values()) if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
    specs = _PERCENT_SPEC.findall(fmt)
    widest = _shown_size(values, any(kind in "ra" for *_, kind in specs))
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    total = len(fmt)
    for width, precision, _ in specs:
        for n in (width, precision):
            total += star if n == "*" else int(n) if n else 0
        total += widest
        if total > MAX_OUTPUT:
            break
    return total


def format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on the length of `fmt.format(*args, **kwargs)`."""
    values = (*args, *kwargs.values())
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return 0  # malformed: format() itself says so
    widest = _shown_size(values, any(conv in ("r", "a") for *_, conv in fields))
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    total = 0
    for literal, field, spec, _ in fields:
        total += len(literal)
        if field is not None:
            spec = spec or ""
            total += widest + sum(int(n) for n in re.findall(r"\d+", spec)) + (star if "{" in spec else 0)
        if total > MAX_OUTPUT:
            break
    return total


def _wordwrap_size(s: str, width: Any, wrapstring: str) -> int:
    lines = min(len(s) + 1, s.count(" ") + s.count("\n") + len(s) // max(width if isinstance(width, int) else 1, 1) + 1)
    return len(s) + lines * len(wrapstring)


def _wordwrap_work(s: str, width: Any) -> int:
    """About the steps textwrap takes: one a character, a few a line, and for a word longer than a
    line its rest copied at every cut (quadratic: 1.9 M characters at width 1 took 32 s)."""
    w = max(width if isinstance(width, int) else 1, 1)
    long_words = sum(len(x) * len(x) for x in re.findall(f"\\S{{{w + 1},}}", s)) // (w * 6000)
    return len(s) + 8 * _wordwrap_size(s, w, "") + long_words


def grouped_size(a: dict, count: str) -> tuple[int, int, int, int]:
    """(characters, elements, depth, groups) of batch's or slice's result: every element of the
    input, in `a[count]`-many lists (batch: lists of that length), filled where asked."""
    value, n = a["value"], a[count] if isinstance(a[count], int) else 1
    chars, items, depth = measure(value)
    items = len(value) if isinstance(value, str) else items
    if count == "slices":
        groups, fill = n, n  # (a slice gets at most one filler)
    else:
        groups, fill = (-(-len(value) // n) if n > 0 else 1), n  # (the last batch gets up to linecount)
    fill = fill if a["fill_with"] is not None else 0
    return chars, items + groups + fill + 1, depth + 1, groups


def deadline_checked(items: Any):
    """`items`, testing the render deadline as a filter walks them."""
    for i, x in enumerate(items):
        if not i & 1023:
            check_deadline()
        yield x


def _replace_size(s: str, old: str, new: str, count: int | None) -> int:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(sep: str, items: list) -> int:
    return total_size(items) + len(sep) * max(len(items) - 1, 0)


def as_listed(x: Any) -> Any:
    """A one-shot iterable (generator, map) as a list, so it can be measured and still used."""
    return x if isinstance(x, (str, list, tuple, dict, set, frozenset)) else list(x)


def _json_size(value: Any, indent: Any, separators: Any) -> int:
    """An upper bound on the length of `tojson(value, indent=indent, separators=separators)`."""
    chars, items, depth = measure(value)
    if chars + items > MAX_OUTPUT:
        return chars + items
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if width > MAX_JSON_INDENT:
        raise LimitExceeded(f"a JSON indent of {width}")
    seps = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 0
    try:
        compact = len(json.dumps(value, ensure_ascii=False, default=str))  # at most ~6x its measure
    except (TypeError, ValueError, RecursionError):
        return 0  # the filter itself says what is wrong
    return compact + items * (seps + (1 + width * (depth + 1) if indent is not None else 0))


def _pprint_size(value: Any) -> int:
    chars, items, depth = measure(value)
    return chars * 6 + items * (depth + 4)


# The size a filter would produce, from its bound arguments (names as jinja2.filters has them).
FILTER_SIZES: dict[str, Callable[[dict], int]] = {
    "center": lambda a: max(len(str(a["value"])), a["width"] if isinstance(a["width"], int) else 0),
    "indent": lambda a: len(str(a["s"])) + (str(a["s"]).count("\n") + 1) * (
        len(a["width"]) if isinstance(a["width"], str) else a["width"] if isinstance(a["width"], int) else 0),
    "format": lambda a: percent_size(str(a["value"]), a["kwargs"] or a["args"]),
    "join": lambda a: _join_size(str(a["d"]), a["value"]),
    "replace": lambda a: _replace_size(str(a["s"]), str(a["old"]), str(a["new"]), a["count"]),
    "wordwrap": lambda a: _wordwrap_size(str(a["s"]), a["width"], str(a["wrapstring"] or "\n")),
    "batch": lambda a: sum(grouped_size(a, "linecount")[:2]),
    "slice": lambda a: sum(grouped_size(a, "slices")[:2]),
    "sum": lambda a: (total_size(a["iterable"]) * len(a["iterable"]) if isinstance(a["start"], (list, tuple, str))
                      else 0),
    "pprint": lambda a: _pprint_size(a["value"]),
    "tojson": lambda a: _json_size(a["value"], a["indent"], a["separators"]),
}
FILTER_ITERABLES = {"join": "value", "sum": "iterable", "batch": "value", "slice": "value"}  # listed first
FILTER_WORK: dict[str, Callable[[dict], int]] = {"wordwrap": lambda a: _wordwrap_work(str(a["s"]), a["width"])}
# Filters that never make text of a whole container they are given: its measure is not needed (the
# messages were measured at every `messages|length`, which made a template like Qwen3's quadratic).
TEXTLESS = frozenset({"length", "count", "first", "last", "random", "select", "reject", "selectattr", "rejectattr",
                       "map", "sort", "unique", "min", "max", "list", "reverse", "default", "d", "attr", "items",
                       "dictsort", "groupby", "batch", "slice"})
GROUPING = {"batch": "linecount", "slice": "slices"}  # their results are made whole, with their measure
WALKING = frozenset({"groupby", "unique", "map", "select", "reject", "selectattr", "rejectattr", "sort", "sum",
                      "min", "max", "list"})  # walk any iterable in python: given one that tests the deadline


def str_method_size(method: str, s: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on the length of `s.method(*args)` for the str methods that can grow a string."""
    a = (*args, *kwargs.values())
    if method == "replace" and len(a) >= 2:
        return _replace_size(s, str(a[0]), str(a[1]), a[2] if len(a) > 2 and isinstance(a[2], int) else None)
    if method == "expandtabs":
        tab = a[0] if a and isinstance(a[0], int) else 8
        return len(s) + s.count("\t") * max(tab, 0)
    if method == "join" and a:
        return _join_size(s, a[0])
    if method == "translate" and a and isinstance(a[0], dict):
        return len(s) * max([1] + [len(v) for v in a[0].values() if isinstance(v, str)])
    return 0
