"""Chat templates: the Jinja template a GGUF file carries, rendered in jinja2's immutable sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class ChatTemplate:
    """A chat template compiled once; `render` turns a message list into the prompt text."""

    def __init__(self, template_str: str, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(template_str)
        except jinja2.TemplateSyntaxError as e:
            raise ModelError(f"chat template does not parse (line {e.lineno}): {_one_line(e)}") from None
        self.source = template_str
        self._tokens = dict(special_tokens, bos_token=bos_token, eos_token=eos_token)

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
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._tokens, **extra)
        except _TemplateRaised as e:
            raise ModelError(f"chat template refused the conversation: {_one_line(e)}") from None
        except jinja2.sandbox.SecurityError as e:
            raise ModelError(f"chat template tried an unsafe operation: {_one_line(e)}") from None
        except Exception as e:  # a template bug or messages of an unexpected shape
            raise ModelError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
