"""Chat templates: the Jinja template a GGUF file carries, rendered in a bounded sandbox (chat_sandbox.py)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import SecurityError

from layerstream.coordinator.chat_sandbox import (
    MAX_OUTPUT,
    BoundedSandbox,
    GenerationTag,
    LimitExceeded,
    TemplateRaised,
)
from layerstream.errors import ModelError

if TYPE_CHECKING:
    from layerstream.coordinator.tokenizer import Tokenizer

MAX_SOURCE = 256 * 1024  # bytes of template source
MAX_ERROR = 300  # characters of a template's error text that reach the one-line error
BASE_ROLES = ("system", "user", "assistant")
OPTIONAL_ROLES = ("tool", "ipython", "developer", "function")  # accepted where the template names them


def _one_line(e: BaseException) -> str:
    text = str(e)[:MAX_ERROR + 1].strip().splitlines()  # a template's message can be megabytes long
    line = text[0] if text else type(e).__name__
    return line if len(line) <= MAX_ERROR else line[:MAX_ERROR] + "..."


class ChatTemplate:
    """A chat template, compiled on first use (a model whose template is broken still completes
    plain prompts); `render` turns a message list into the prompt text, within the limits above."""

    def __init__(self, template_str: str, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        if len(template_str.encode("utf-8", "replace")) > MAX_SOURCE:
            raise ModelError(f"chat template is {len(template_str)} characters, over the {MAX_SOURCE} allowed")
        self.source = template_str
        self._template = None
        self._tokens = dict(special_tokens, bos_token=bos_token, eos_token=eos_token)
        named = set(re.findall(r"""["']([a-z]+)["']""", template_str))
        self.roles = BASE_ROLES + tuple(r for r in OPTIONAL_ROLES if r in named)

    def check_roles(self, messages: list[dict[str, Any]]) -> None:
        """Refuse a message whose role the template does not take (a role never carries token text)."""
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in self.roles:
                shown = repr(role)[:60] if isinstance(role, str) else type(role).__name__
                raise ModelError(f"message {i} has role {shown}; this model's chat template takes the roles "
                                 f"{', '.join(self.roles)}")

    def _compiled(self):
        if self._template is None:
            env = self._env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                             extensions=[jinja2.ext.loopcontrols, GenerationTag])
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
        if source is None or source == "":
            return None
        if not isinstance(source, str):
            raise ModelError(f"metadata tokenizer.chat_template is {type(source).__name__}, expected a string; "
                             "the file is corrupt or was not written by a known converter")

        def text(token_id: int | None) -> str:
            return tokenizer.token_to_piece(token_id) if token_id is not None else ""

        return cls(source, text(tokenizer.bos_id), text(tokenizer.eos_id))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for `messages` (dicts with "role" and "content"); `extra` reaches the template (e.g. tools)."""
        template = self._compiled()
        env = self._env
        env.start()
        out, size = [], 0
        try:
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self._tokens, **extra):
                size += len(piece)
                if size > MAX_OUTPUT:
                    raise LimitExceeded(f"the prompt grew past {MAX_OUTPUT} characters")
                env.tick()
                out.append(piece)
        except TemplateRaised as e:
            raise ModelError(f"chat template refused the conversation: {_one_line(e)}") from None
        except LimitExceeded as e:
            raise ModelError(f"chat template stopped: {_one_line(e)}") from None
        except SecurityError as e:
            raise ModelError(f"chat template tried an unsafe operation: {_one_line(e)}") from None
        except RecursionError:
            raise ModelError("chat template recursed too deeply") from None
        except Exception as e:  # a template bug or messages of an unexpected shape
            raise ModelError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            env.finish()
        return "".join(out)

    def render_segments(self, messages: list[dict[str, Any]], **kw: Any) -> list[tuple[str, bool]]:
        """The prompt as (text, from_template) pieces: message contents come out as pieces of
        their own (from_template False), so that they can be tokenized without special-token
        parsing: a user's `<|im_start|>` stays text (no role injection); roles are checked first."""
        self.check_roles(messages)
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
