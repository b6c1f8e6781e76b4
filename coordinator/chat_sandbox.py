"""The bounded Jinja sandbox that chat templates render in: every operation that can build a large
string, list or number checks the size it would make before making it."""

from __future__ import annotations

import functools
import inspect
import json
import re
import string
import threading
import time
import types
from datetime import datetime
from itertools import compress, repeat
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

MAX_OUTPUT = 4 * 1024 * 1024  # characters of rendered prompt (also the largest value a template may build)
MAX_RENDER_TOTAL = 16 * MAX_OUTPUT  # characters and elements of all the values one render builds
MAX_FILTER_WORK = 10_000_000  # steps one filter may take (a step: about a character copied)
MAX_RANGE_TOTAL = 1_000_000  # range() elements over one render
MAX_LOOP_STEPS = 1_000_000  # for-loop iterations over one render
MAX_INT_BITS = 1 << 16  # the largest integer a template may compute
MAX_JSON_INDENT = 16
MAX_STRFTIME = 256  # characters of a strftime_now format
RENDER_SECONDS = 2.0
_clock = threading.local()  # this thread's render deadline: measuring and filters test it as they go


def _tick() -> None:
    if time.monotonic() > getattr(_clock, "deadline", float("inf")):
        raise LimitExceeded(f"rendering took longer than {RENDER_SECONDS:g} s")


class LimitExceeded(SecurityError):
    """A hostile template's render went past a size, time or loop limit."""


class TemplateRaised(jinja2.TemplateError):
    """What a template's `raise_exception(msg)` raises."""


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(message if isinstance(message, str) else _bounded_str(message))


def _strftime_now(fmt: str) -> str:
    if len(fmt) > MAX_STRFTIME:
        raise LimitExceeded(f"a strftime format of {len(fmt)} characters")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """`tojson` as chat templates expect it: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


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
            _tick()
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


def _sized(items: list, measured: tuple[int, int, int]) -> Sized:
    out = Sized(items)
    out.measured = measured
    return out


def _size(obj: Any) -> int:
    chars, items, _ = measure(obj)
    return chars + items


_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)


def _bounded_str(value: Any) -> str:
    """str(value), refused where the value is too large to show (a repr escapes a character in at most 6)."""
    if isinstance(value, _CONTAINERS) and _size(value) > MAX_OUTPUT:
        raise LimitExceeded(f"a value of more than {MAX_OUTPUT} characters and elements made into text")
    return str(value)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _shown_size(values: tuple, as_repr: bool) -> int:
    """The longest str() (or repr()) of `values`: a repr escapes a character in at most 6."""
    return max((len(v) if isinstance(v, str) and not as_repr else _size(v) * 6 for v in values), default=0)


def _percent_size(fmt: str, args: Any) -> int:
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


def _format_size(fmt: str, args: tuple, kwargs: dict) -> int:
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


def _grouped(a: dict, count: str) -> tuple[int, int, int, int]:
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


def _ticking(items: Any):
    """`items`, testing the render deadline as a filter walks them."""
    for i, x in enumerate(items):
        if not i & 1023:
            _tick()
        yield x


def _replace_size(s: str, old: str, new: str, count: int | None) -> int:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(sep: str, items: list) -> int:
    return _size(items) + len(sep) * max(len(items) - 1, 0)


def _listed(x: Any) -> Any:
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
_FILTER_SIZES: dict[str, Callable[[dict], int]] = {
    "center": lambda a: max(len(str(a["value"])), a["width"] if isinstance(a["width"], int) else 0),
    "indent": lambda a: len(str(a["s"])) + (str(a["s"]).count("\n") + 1) * (
        len(a["width"]) if isinstance(a["width"], str) else a["width"] if isinstance(a["width"], int) else 0),
    "format": lambda a: _percent_size(str(a["value"]), a["kwargs"] or a["args"]),
    "join": lambda a: _join_size(str(a["d"]), a["value"]),
    "replace": lambda a: _replace_size(str(a["s"]), str(a["old"]), str(a["new"]), a["count"]),
    "wordwrap": lambda a: _wordwrap_size(str(a["s"]), a["width"], str(a["wrapstring"] or "\n")),
    "batch": lambda a: sum(_grouped(a, "linecount")[:2]),
    "slice": lambda a: sum(_grouped(a, "slices")[:2]),
    "sum": lambda a: (_size(a["iterable"]) * len(a["iterable"]) if isinstance(a["start"], (list, tuple, str))
                      else 0),
    "pprint": lambda a: _pprint_size(a["value"]),
    "tojson": lambda a: _json_size(a["value"], a["indent"], a["separators"]),
}
_FILTER_ITERABLES = {"join": "value", "sum": "iterable", "batch": "value", "slice": "value"}  # listed first
_FILTER_WORK: dict[str, Callable[[dict], int]] = {"wordwrap": lambda a: _wordwrap_work(str(a["s"]), a["width"])}
# Filters that never make text of a whole container they are given: its measure is not needed (the
# messages were measured at every `messages|length`, which made a template like Qwen3's quadratic).
_TEXTLESS = frozenset({"length", "count", "first", "last", "random", "select", "reject", "selectattr", "rejectattr",
                       "map", "sort", "unique", "min", "max", "list", "reverse", "default", "d", "attr", "items",
                       "dictsort", "groupby", "batch", "slice"})
_GROUPING = {"batch": "linecount", "slice": "slices"}  # their results are made whole, with their measure
_WALKING = frozenset({"groupby", "unique", "map", "select", "reject", "selectattr", "rejectattr", "sort", "sum",
                      "min", "max", "list"})  # walk any iterable in python: given one that tests the deadline


def _str_method_size(method: str, s: str, args: tuple, kwargs: dict) -> int:
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


class _Guards(NodeTransformer):
    """Rewrites `a ~ b`, `{% for %}` loops and list, tuple and dict literals to call the environment's
    checked versions."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("checked_concat"), [nodes.List(node.nodes)], [], None, None,
                          lineno=node.lineno)

    def _checked(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("checked_value"), [node], [], None, None, lineno=node.lineno)

    visit_List = visit_Dict = _checked

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._checked(node) if node.ctx == "load" else node  # (not an assignment's target)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("checked_loop"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with limits a hostile template cannot pass.

    NOTE [ hostile chat templates ]
    The template comes from the GGUF file: untrusted. Limiting the output is not enough: one
    operation can build gigabytes before it is written out. So every operation that can make a
    large value checks, before it runs, the size it would make: `*`, `+`, `%` and `**` (call_binop),
    the str methods that grow strings and str.format (call, wrap_str_format), every filter (wrapped,
    with a size rule for those that grow their input), `~` and block captures (checked_concat,
    concat). Values built without an operator (list, tuple and dict literals, calls' results, a
    filter's input) are measured, and so is a value before it is made into text (finalize), so
    no value in a render grows past MAX_OUTPUT characters and elements. Jinja evaluates constant
    expressions at compile time, outside the sandbox hooks: the optimizer is off, and the folding
    that remains (an output's constant filters) calls the same wrapped filters. Every check also
    tests a render deadline; range() and for loops count their elements over the whole render.
    Every value built also counts into the render's total (MAX_RENDER_TOTAL), so many values
    within the limit cannot add up to gigabytes. Work that grows faster than its result is
    bounded before it runs (wordwrap's long words: _FILTER_WORK; batch and slice: their result's
    measure, worked out from their input's), and what a filter walks in python (its input, an
    attribute per element, a value being measured) tests the deadline as it goes.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kw: Any):
        super().__init__(optimized=False, finalize=_bounded_str, **kw)
        self._budget = threading.local()  # one render's limits: renders in other threads keep their own
        self.globals.pop("lipsum", None)  # builds text of any length from two numbers
        self.filters.pop("urlize", None)  # ~100 bytes of working memory a character; no chat template uses it
        self.globals.update(range=self._range, raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.filters["tojson"] = _tojson
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}
        self.concat = self._concat
        self.checked_concat, self.checked_loop, self.checked_value = (self._checked_concat, self._checked_loop,
                                                                      self._checked_value)
        self._own = (self._range, self._checked_concat, self._checked_loop, self._checked_value)  # check their own

    _FULL = {"range_left": MAX_RANGE_TOTAL, "loop_left": MAX_LOOP_STEPS, "total_left": MAX_RENDER_TOTAL}

    def start(self) -> None:
        """Arm the limits for one render (in this thread)."""
        _clock.deadline = time.monotonic() + RENDER_SECONDS
        for name, full in self._FULL.items():
            setattr(self._budget, name, full)

    def finish(self) -> None:
        """Disarm the deadline (a later compile folds constants without one)."""
        _clock.deadline = float("inf")

    def _left(self, name: str, n: int) -> int:
        """Take n from this render's budget `name`; what is left."""
        b = self._budget
        left = getattr(b, name, self._FULL[name]) - n
        setattr(b, name, left)
        return left

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Guards().visit(super()._parse(source, name, filename))

    def tick(self) -> None:
        _tick()

    @staticmethod
    def _check_size(size: int, what: str, unit: str = "characters") -> None:
        if size > MAX_OUTPUT:
            raise LimitExceeded(f"{what} of {size} {unit} (at most {MAX_OUTPUT})")

    def _grow(self, size: int, what: str, unit: str = "characters") -> None:
        """Check a value the render builds, and count it into the render's total: many values,
        each within MAX_OUTPUT, must not add up to gigabytes (a value held and then dropped is
        counted too: the total bounds the work as well as the memory)."""
        self._check_size(size, what, unit)
        if self._left("total_left", size) < 0:
            raise LimitExceeded(f"the template built more than {MAX_RENDER_TOTAL} characters and elements in all")

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()  # (filters that take an attribute, e.g. groupby, look it up for every element)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def _range(self, *args: Any) -> range:
        r = range(*args)
        if self._left("range_left", len(r)) < 0:
            raise LimitExceeded(f"loops over more than {MAX_RANGE_TOTAL} range() elements")
        return r

    def _checked_loop(self, iterable: Any):
        for i, x in enumerate(iterable):
            if not i & 1023:
                self.tick()
            if self._left("loop_left", 1) < 0:
                raise LimitExceeded(f"loops run more than {MAX_LOOP_STEPS} times")
            yield x

    def _checked_concat(self, parts: list) -> str:
        return self._concat([_bounded_str(p) for p in parts])

    def _checked_value(self, value: Any, built: bool = True) -> Any:
        """A list, tuple or dict, measured: one the template built (a literal or a call's result)
        counts into the render's total, one it was given (a filter's input) does not."""
        size = _size(value)
        if size > MAX_OUTPUT:  # (measured only as far as the limit)
            raise LimitExceeded(f"a value of more than {MAX_OUTPUT} characters and elements")
        if built:
            self._grow(size, "a value", "characters and elements")
        return value

    def _concat(self, parts: Any) -> str:
        parts = _listed(parts)
        self._grow(sum(len(p) for p in parts), "a string")
        return "".join(parts)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        sized = (str, list, tuple)
        if operator == "*":
            n, k = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(n, sized) and isinstance(k, int):
                self._grow(_size(n) * k, "a product", "elements")
            elif isinstance(n, int) and isinstance(k, int) and n.bit_length() + k.bit_length() > MAX_INT_BITS:
                raise LimitExceeded(f"a product of {n.bit_length()}- and {k.bit_length()}-bit numbers")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            self._grow(_size(left) + _size(right), "a sum", "elements")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
                raise LimitExceeded(f"a power of {right}")
        elif operator == "%" and isinstance(left, str):
            self._grow(_percent_size(left, right), "a formatted string")
        return super().call_binop(context, operator, left, right)

    def _check_args(self, args: tuple, kwargs: dict) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT:
                raise LimitExceeded(f"a call with the argument {a}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        __self.tick()
        if any(__obj == own for own in __self._own):
            return __context.call(__obj, *args, **kwargs)
        __self._check_args(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and isinstance(__obj, types.BuiltinMethodType):
            if __obj.__name__ == "join" and args:
                args = (_listed(args[0]), *args[1:])
            __self._check_size(_str_method_size(__obj.__name__, owner, args, kwargs), f"a str.{__obj.__name__}()")
        return __self._checked_result(super().call(__context, __obj, *args, **kwargs))

    def _checked_result(self, out: Any) -> Any:
        if isinstance(out, str):
            self._grow(len(out), "a string")
        elif isinstance(out, _CONTAINERS):
            self._checked_value(out)
        return out

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            self.tick()
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                self._check_size(_format_size(fmt, (), args[0]), "a formatted string")
            else:
                self._check_size(_format_size(fmt, args, kwargs), "a formatted string")
            return self._checked_result(wrapper(*args, **kwargs))

        return functools.update_wrapper(checked, value)

    def _checked_filter(self, name: str, f: Callable) -> Callable:
        """`f` checking its arguments, and where it can grow its input the size it would make."""
        size_of = _FILTER_SIZES.get(name)
        listed = _FILTER_ITERABLES.get(name)
        skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # eval context or environment first
        try:
            params = list(inspect.signature(f).parameters.values())
            if skip and params and params[0].name in ("eval_ctx", "environment", "env", "context", "ctx"):
                params = params[1:]  # (async variants show the signature without it)
            sig = inspect.Signature(params)
        except (TypeError, ValueError):
            sig = None

        @functools.wraps(f)
        def checked(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            first, args = args[:skip], args[skip:]
            self._check_args(args, kwargs)
            if args and isinstance(args[0], _CONTAINERS) and name not in _TEXTLESS:  # (most make text of it)
                self._checked_value(args[0], built=False)
            if name in _WALKING and args and not (hasattr(args[0], "__len__") and len(args[0]) <= 4096):
                args = (_ticking(args[0]), *args[1:])
            if size_of is not None and sig is not None:
                try:
                    bound = sig.bind(*args, **kwargs)
                except TypeError:
                    return f(*first, *args, **kwargs)  # wrong arguments: the filter says so
                bound.apply_defaults()
                a = bound.arguments
                if listed is not None:
                    a[listed] = _listed(a[listed])
                if name == "slice":
                    self._range(0, a["slices"] if isinstance(a["slices"], int) else 0)
                self._check_size(size_of(a), f"the filter {name}'s result")
                work = _FILTER_WORK[name](a) if name in _FILTER_WORK else 0
                if work > MAX_FILTER_WORK:
                    raise LimitExceeded(f"the filter {name} would take about {work} steps (at most {MAX_FILTER_WORK})")
                if name in _GROUPING:
                    measured = _grouped(a, _GROUPING[name])[:3]
                    a["value"] = _ticking(a["value"])
                    return self._checked_result(_sized(list(f(*first, *bound.args, **bound.kwargs)), measured))
                args, kwargs = bound.args, bound.kwargs
            return self._checked_result(f(*first, *args, **kwargs))

        return checked
