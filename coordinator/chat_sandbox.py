"""The bounded Jinja sandbox that chat templates render in: every operation that can build a large
string, list or number checks the size it would make (chat_sizes.py) before making it."""

from __future__ import annotations

import functools
import inspect
import json
import threading
import time
import types
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from layerstream.coordinator.chat_sizes import (
    CONTAINERS,
    FILTER_ITERABLES,
    FILTER_SIZES,
    FILTER_WORK,
    GROUPING,
    MAX_FILTER_WORK,
    MAX_INT_BITS,
    MAX_LOOP_STEPS,
    MAX_OUTPUT,
    MAX_RANGE_TOTAL,
    MAX_RENDER_TOTAL,
    MAX_STRFTIME,
    RENDER_SECONDS,
    TEXTLESS,
    WALKING,
    LimitExceeded,
    as_listed,
    bounded_str,
    check_deadline,
    deadline_checked,
    format_size,
    grouped_size,
    percent_size,
    render_clock,
    str_method_size,
    total_size,
    with_measure,
)


class TemplateRaised(jinja2.TemplateError):
    """What a template's `raise_exception(msg)` raises."""


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(message if isinstance(message, str) else bounded_str(message))


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
    bounded before it runs (wordwrap's long words: FILTER_WORK; batch and slice: their result's
    measure, worked out from their input's), and what a filter walks in python (its input, an
    attribute per element, a value being measured) tests the deadline as it goes.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kw: Any):
        super().__init__(optimized=False, finalize=bounded_str, **kw)
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
        render_clock.deadline = time.monotonic() + RENDER_SECONDS
        render_clock.cpu_start = time.thread_time()  # (check_deadline: the limit is this thread's CPU time)
        for name, full in self._FULL.items():
            setattr(self._budget, name, full)

    def finish(self) -> None:
        """Disarm the deadline (a later compile folds constants without one)."""
        render_clock.deadline = float("inf")

    def _left(self, name: str, n: int) -> int:
        """Take n from this render's budget `name`; what is left."""
        b = self._budget
        left = getattr(b, name, self._FULL[name]) - n
        setattr(b, name, left)
        return left

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Guards().visit(super()._parse(source, name, filename))

    def tick(self) -> None:
        check_deadline()

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
        check_deadline()  # (filters that take an attribute, e.g. groupby, look it up for every element)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        check_deadline()
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
        return self._concat([bounded_str(p) for p in parts])

    def _checked_value(self, value: Any, built: bool = True) -> Any:
        """A list, tuple or dict, measured: one the template built (a literal or a call's result)
        counts into the render's total, one it was given (a filter's input) does not."""
        size = total_size(value)
        if size > MAX_OUTPUT:  # (measured only as far as the limit)
            raise LimitExceeded(f"a value of more than {MAX_OUTPUT} characters and elements")
        if built:
            self._grow(size, "a value", "characters and elements")
        return value

    def _concat(self, parts: Any) -> str:
        parts = as_listed(parts)
        self._grow(sum(len(p) for p in parts), "a string")
        return "".join(parts)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        sized = (str, list, tuple)
        if operator == "*":
            n, k = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(n, sized) and isinstance(k, int):
                self._grow(total_size(n) * k, "a product", "elements")
            elif isinstance(n, int) and isinstance(k, int) and n.bit_length() + k.bit_length() > MAX_INT_BITS:
                raise LimitExceeded(f"a product of {n.bit_length()}- and {k.bit_length()}-bit numbers")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            self._grow(total_size(left) + total_size(right), "a sum", "elements")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
                raise LimitExceeded(f"a power of {right}")
        elif operator == "%" and isinstance(left, str):
            self._grow(percent_size(left, right), "a formatted string")
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
                args = (as_listed(args[0]), *args[1:])
            __self._check_size(str_method_size(__obj.__name__, owner, args, kwargs), f"a str.{__obj.__name__}()")
        return __self._checked_result(super().call(__context, __obj, *args, **kwargs))

    def _checked_result(self, out: Any) -> Any:
        if isinstance(out, str):
            self._grow(len(out), "a string")
        elif isinstance(out, CONTAINERS):
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
                self._check_size(format_size(fmt, (), args[0]), "a formatted string")
            else:
                self._check_size(format_size(fmt, args, kwargs), "a formatted string")
            return self._checked_result(wrapper(*args, **kwargs))

        return functools.update_wrapper(checked, value)

    def _checked_filter(self, name: str, f: Callable) -> Callable:
        """`f` checking its arguments, and where it can grow its input the size it would make."""
        size_of = FILTER_SIZES.get(name)
        listed = FILTER_ITERABLES.get(name)
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
            if args and isinstance(args[0], CONTAINERS) and name not in TEXTLESS:  # (most make text of it)
                self._checked_value(args[0], built=False)
            if name in WALKING and args and not (hasattr(args[0], "__len__") and len(args[0]) <= 4096):
                args = (deadline_checked(args[0]), *args[1:])
            if size_of is not None and sig is not None:
                try:
                    bound = sig.bind(*args, **kwargs)
                except TypeError:
                    return f(*first, *args, **kwargs)  # wrong arguments: the filter says so
                bound.apply_defaults()
                a = bound.arguments
                if listed is not None:
                    a[listed] = as_listed(a[listed])
                if name == "slice":
                    self._range(0, a["slices"] if isinstance(a["slices"], int) else 0)
                self._check_size(size_of(a), f"the filter {name}'s result")
                work = FILTER_WORK[name](a) if name in FILTER_WORK else 0
                if work > MAX_FILTER_WORK:
                    raise LimitExceeded(f"the filter {name} would take about {work} steps (at most {MAX_FILTER_WORK})")
                if name in GROUPING:
                    measured = grouped_size(a, GROUPING[name])[:3]
                    a["value"] = deadline_checked(a["value"])
                    return self._checked_result(with_measure(list(f(*first, *bound.args, **bound.kwargs)), measured))
                args, kwargs = bound.args, bound.kwargs
            return self._checked_result(f(*first, *args, **kwargs))

        return checked
