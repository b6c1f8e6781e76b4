"""Chat templates: the Jinja template a GGUF file carries, rendered in jinja2's immutable sandbox."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from layerstream.errors import ModelError

if TYPE_CHECKING:
    from layerstream.coordinator.tokenizer import Tokenizer


class _TemplateRaised(jinja2.TemplateError):
    """What a template's `raise_exception(msg)` raises."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """`tojson` as chat templates expect it: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _LimitExceeded(SecurityError):
    """A hostile template's render went past a size, time or loop limit."""


MAX_SOURCE = 256 * 1024  # bytes of template source
MAX_OUTPUT = 4 * 1024 * 1024  # characters of rendered prompt (also the largest string a template may build)
MAX_RANGE_TOTAL = 1_000_000  # range() elements over one render
RENDER_SECONDS = 2.0


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with limits a hostile template cannot pass.

    NOTE [ hostile chat templates ]
    The template comes from the GGUF file: untrusted. Jinja's optimizer folds constant
    expressions at compile time, outside the sandbox (`{{ 'a' * 4000000000 }}` took 15 GB), so it
    is off; string and list products, sums and powers are checked for size before they are made;
    every call, attribute and item access checks a render deadline; range() counts its elements
    over the whole render; the output is generated in pieces and cut at MAX_OUTPUT.
    """

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, **kw):
        super().__init__(optimized=False, **kw)
        self.deadline = float("inf")
        self.range_left = MAX_RANGE_TOTAL
        self.globals["range"] = self._range

    def _tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"rendering took longer than {RENDER_SECONDS:g} s")

    def _range(self, *args):
        r = range(*args)
        self.range_left -= len(r)
        if self.range_left < 0:
            raise _LimitExceeded(f"loops over more than {MAX_RANGE_TOTAL} range() elements")
        return r

    def call_binop(self, context, operator, left, right):
        self._tick()
        sized = (str, list, tuple)
        if operator == "*":
            n, k = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(n, sized) and isinstance(k, int) and len(n) * k > MAX_OUTPUT:
                raise _LimitExceeded(f"a product of {len(n) * k} elements")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            if len(left) + len(right) > MAX_OUTPUT:
                raise _LimitExceeded(f"a sum of {len(left) + len(right)} elements")
        elif operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise _LimitExceeded(f"a power of {right}")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        __self._tick()
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT:
                raise _LimitExceeded(f"a call with the argument {a}")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._tick()
        return super().getitem(obj, argument)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class ChatTemplate:
    """A chat template, compiled on first use (a model whose template is broken still completes
    plain prompts); `render` turns a message list into the prompt text, within the limits above."""

    def __init__(self, template_str: str, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        if len(template_str.encode("utf-8", "replace")) > MAX_SOURCE:
            raise ModelError(f"chat template is {len(template_str)} characters, over the {MAX_SOURCE} allowed")
        self.source = template_str
        self._template = None
        self._tokens = dict(special_tokens, bos_token=bos_token, eos_token=eos_token)

    def _compiled(self):
        if self._template is None:
            env = self._env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja2.ext.loopcontrols, _GenerationTag])
            env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise ModelError(f"chat template does not parse (line {e.lineno}): {_one_line(e)}") from None
            except RecursionError:
                raise ModelError("chat template nests too deeply to compile") from None
        return self._template

    @classmethod
    def from_metadata(cls, md: dict[str, Any], tokenizer: "Tokenizer") -> "ChatTemplate | None":
        """The file's `tokenizer.chat_template`, or None when it has none."""
        source = md.get("tokenizer.chat_template")
        if not source:
            return None

        def text(token_id: int | None) -> str:
            return tokenizer.token_to_piece(token_id) if token_id is not None else ""

        return cls(source, text(tokenizer.bos_id), text(tokenizer.eos_id))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for `messages` (dicts with "role" and "content"); `extra` reaches the template (e.g. tools)."""
        template = self._compiled()
        env = self._env
        env.deadline, env.range_left = time.monotonic() + RENDER_SECONDS, MAX_RANGE_TOTAL
        out, size = [], 0
        try:
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self._tokens, **extra):
                size += len(piece)
                if size > MAX_OUTPUT:
                    raise _LimitExceeded(f"the prompt grew past {MAX_OUTPUT} characters")
                env._tick()
                out.append(piece)
        except _TemplateRaised as e:
            raise ModelError(f"chat template refused the conversation: {_one_line(e)}") from None
        except _LimitExceeded as e:
            raise ModelError(f"chat template stopped: {_one_line(e)}") from None
        except SecurityError as e:
            raise ModelError(f"chat template tried an unsafe operation: {_one_line(e)}") from None
        except RecursionError:
            raise ModelError("chat template recursed too deeply") from None
        except Exception as e:  # a template bug or messages of an unexpected shape
            raise ModelError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            env.deadline = float("inf")
        return "".join(out)

    def render_segments(self, messages: list[dict[str, Any]], **kw: Any) -> list[tuple[str, bool]]:
        """The prompt as (text, from_template) pieces: message contents come out as pieces of
        their own (from_template False), so that they can be tokenized without special-token
        parsing: a user's `<|im_start|>` stays text (no role injection)."""
        marks = [f"\uE000{i}\uE001" for i in range(len(messages))]
        masked = [dict(m, content=mark) if isinstance(m.get("content"), str) else m
                  for m, mark in zip(messages, marks)]
        text = self.render(masked, **kw)
        by_mark = {mark: m["content"] for m, mark in zip(messages, marks) if isinstance(m.get("content"), str)}
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for hit in re.finditer("\uE000\\d+\uE001", text):
            if hit.group() not in by_mark:
                continue
            pieces.append((text[pos:hit.start()], True))
            pieces.append((by_mark[hit.group()], False))
            pos = hit.end()
        pieces.append((text[pos:], True))
        return [(t, tmpl) for t, tmpl in pieces if t]
