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
from layerstream.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from layerstream.coordinator.tokenizer import Tokenizer

MAX_SOURCE = 256 * 1024  # bytes of template source
MAX_ERROR = 300  # characters of a template's error text that reach the one-line error
BASE_ROLES = ("system", "user", "assistant")
OPTIONAL_ROLES = ("tool", "ipython", "developer", "function")  # accepted where the template names them
_TWIN_FIRST = 0xF0000  # twins: characters of contents, each as a private-use character
_TWIN_ROOM = 0x10FFFD - _TWIN_FIRST  # (planes 15 and 16)


MAX_TRIE_TEXT = 200  # control-token texts longer than this are matched as plain alternatives (trie depth)


def _texts_pattern(texts: list[str]) -> str:
    """A regex matching any of `texts`, longest first, written as a trie: a position is tried once
    a character, not once a text (a plain alternation of 6,000 `<unusedN>` control tokens took
    5 s over 2.7 M characters of HTML)."""
    trie: dict = {}
    for t in texts:
        if len(t) <= MAX_TRIE_TEXT:
            node = trie
            for c in t:
                node = node.setdefault(c, {})
            node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(c) + emit(node[c]) for c in sorted(k for k in node if k)]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 and "" not in node else "(?:" + "|".join(alts) + ")"
        return body + ("?" if "" in node else "")

    longer = sorted((t for t in texts if len(t) > MAX_TRIE_TEXT), key=len, reverse=True)
    return "|".join([*map(re.escape, longer), emit(trie)] if trie else map(re.escape, longer))


def _split(text: str, hits) -> list[tuple[str, bool]]:
    """`text` in (piece, from_template) pieces: the places of `hits` (in a render of the same length) are not."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for hit in hits:
        pieces += [(text[pos:hit.start()], True), (text[hit.start():hit.end()], False)]
        pos = hit.end()
    pieces.append((text[pos:], True))
    return pieces


def _one_line(e: BaseException) -> str:
    text = str(e)[:MAX_ERROR + 1].strip().splitlines()  # a template's message can be megabytes long
    line = text[0] if text else type(e).__name__
    return line if len(line) <= MAX_ERROR else line[:MAX_ERROR] + "..."


class ChatTemplate:
    """A chat template, compiled on first use (a model whose template is broken still completes
    plain prompts); `render` turns a message list into the prompt text, within the limits above."""

    def __init__(self, template_str: str, bos_token: str = "", eos_token: str = "", controls: tuple[str, ...] = (),
                 **special_tokens: str):
        if len(template_str.encode("utf-8", "replace")) > MAX_SOURCE:
            raise ModelError(f"chat template is {len(template_str)} characters, over the {MAX_SOURCE} allowed")
        self.source = template_str
        self._template = None
        self._tokens = dict(special_tokens, bos_token=bos_token, eos_token=eos_token)
        named = set(re.findall(r"""["']([a-z]+)["']""", template_str))
        self.roles = BASE_ROLES + tuple(r for r in OPTIONAL_ROLES if r in named)
        # the texts the tokenizer reads as control tokens, which a message's content must not make
        texts = sorted({t for t in controls if t}, key=len, reverse=True)
        self._controls = re.compile(_texts_pattern(texts)) if texts else None
        alphabet = sorted(set("".join(texts)))
        self._twin = str.maketrans({c: chr(_TWIN_FIRST + k) for k, c in enumerate(alphabet)})
        self._untwin = str.maketrans({chr(_TWIN_FIRST + k): c for k, c in enumerate(alphabet)})
        self._twins = re.compile(f"[{chr(_TWIN_FIRST)}-{chr(_TWIN_FIRST + max(len(alphabet) - 1, 0))}]+")

    def check_roles(self, messages: list[dict[str, Any]]) -> None:
        """Refuse a message whose role the template does not take (a role never carries token text):
        the caller's message, so a ConfigError, not the model file's ModelError."""
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in self.roles:
                shown = repr(role)[:60] if isinstance(role, str) else type(role).__name__
                raise ConfigError(f"message {i} has role {shown}; this model's chat template takes the roles "
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

        controls = tuple(tokenizer.token_to_piece(i) for i in range(tokenizer.vocab_size) if tokenizer.is_control(i))
        return cls(source, text(tokenizer.bos_id), text(tokenizer.eos_id), controls)

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
        """The prompt as (text, from_template) pieces, joined exactly the text `render` gives: the
        text of a message's content comes out in pieces of its own (from_template False), so that
        it is tokenized without special-token parsing: a user's `<|im_start|>` stays text (no role
        injection). Roles are checked first. NOTE [ content spans ] says how the pieces are found."""
        self.check_roles(messages)
        text = self.render(messages, **kw)
        contents = [m["content"] if isinstance(m.get("content"), str) else None for m in messages]
        pieces = self._placed(messages, contents, text, kw)
        if pieces is None:
            pieces = self._disguised(messages, contents, text, kw)
        if pieces is None:
            pieces = self._twinned(messages, contents, text, kw)
        return [(t, tmpl) for t, tmpl in pieces if t]

    def continued_segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """render_segments' pieces of a conversation whose last message, the assistant's, is continued
        (a prefill, as llama-server's and Ollama's chats take it, vLLM's continue_final_message): the
        render without a generation prompt, cut after the last piece of a message's words, where that
        piece is the last message's content (trimmed, where the template trims it), so that the reply
        goes on from its last character rather than opening a new turn. Found by the pieces, not by
        searching the text: a short content (`<`, `|`) is also text of the template's own end of turn.
        A template that does not copy that content into the prompt as such a piece: ModelError."""
        last = messages[-1] if messages else {}
        content = last.get("content") if last.get("role") == "assistant" else None
        if not isinstance(content, str) or not content.strip():
            raise ConfigError("only an assistant's message with text can be continued; end the conversation with one")
        pieces = self.render_segments(messages, add_generation_prompt=False)
        words = [k for k, (_, from_template) in enumerate(pieces) if not from_template]
        if not words or pieces[words[-1]][0] not in (content, content.strip()):
            raise ModelError("the chat template changes the last assistant message as it renders it, so the "
                             "reply cannot continue it; send it without that message")
        return pieces[: words[-1] + 1]

    # NOTE [ content spans ]
    # The render itself must see the real contents: templates trim them (Llama 3), test them
    # (`startswith('<think>')`) and cut them (Qwen3's `split('</think>')`), so the pieces are
    # found afterwards, in the first of three ways that checks out against the real render:
    # - placed: render again with each content swapped for a mark; where putting the contents
    #   back in place of the marks gives the real text exactly, the template copied each content
    #   whole, and the marks show where. Most templates and messages take this way.
    # - disguised: otherwise, render with every character of the contents but whitespace swapped
    #   for a private-use twin (one a distinct character). Where swapping back gives the real text,
    #   the template kept or trimmed the contents (Llama 3's `|trim`), and the twins, with the
    #   whitespace between them, are the contents' text.
    # - twinned: otherwise (the template tested or cut a content's text), only the control-token
    #   texts inside contents matter: render again with each of their characters swapped for a
    #   private-use twin that no template names. Where swapping the twins back gives the real
    #   text, the twins' places are exactly the characters of the contents' control-token texts
    #   (whole, or cut by the template), and those become text pieces. Where it does not, the
    #   template treated a content's control-token text differently from text, and the
    #   conversation is refused: no choice of pieces would be both exact and safe.
    # Left open: the twinned way (only) does not see a control token made by joining two pieces
    # of content (`<|im_` then `start|>`) in a template that also tests or cuts contents.

    def _placed(self, messages, contents, text, kw) -> list[tuple[str, bool]] | None:
        marks = [f"\uE000{i}\uE001" for i in range(len(messages))]
        masked = [dict(m, content=mark) if c is not None else m for m, c, mark in zip(messages, contents, marks)]
        try:
            shape = self.render(masked, **kw)
        except ModelError:
            return None  # (a template that tests a content may refuse a mark)
        by_mark = {mark: c for c, mark in zip(contents, marks) if c is not None}
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for hit in re.finditer("\uE000\\d+\uE001", shape):
            if hit.group() in by_mark:
                pieces += [(shape[pos:hit.start()], True), (by_mark[hit.group()], False)]
                pos = hit.end()
        pieces.append((shape[pos:], True))
        return pieces if "".join(t for t, _ in pieces) == text else None

    def _disguised(self, messages, contents, text, kw) -> list[tuple[str, bool]] | None:
        shown = sorted(c for c in set().union(*(c for c in contents if c)) if not c.isspace())
        if not shown or len(shown) > _TWIN_ROOM or max(shown) >= chr(_TWIN_FIRST):
            return None  # (too many distinct characters to twin, or some already twins)
        there = str.maketrans({c: chr(_TWIN_FIRST + k) for k, c in enumerate(shown)})
        back = str.maketrans({chr(_TWIN_FIRST + k): c for k, c in enumerate(shown)})
        disguised = [dict(m, content=c.translate(there)) if c is not None else m for m, c in zip(messages, contents)]
        try:
            shape = self.render(disguised, **kw)
        except ModelError:
            return None
        if shape.translate(back) != text:
            return None
        twin = f"{chr(_TWIN_FIRST)}-{chr(_TWIN_FIRST + len(shown) - 1)}"
        return _split(text, re.finditer(f"[{twin}](?:[{twin}\\s]*[{twin}])?", shape))

    def _twinned(self, messages, contents, text, kw) -> list[tuple[str, bool]]:
        found = [self._controls.search(c) if c is not None and self._controls else None for c in contents]
        if not any(found):
            return [(text, True)]  # no content holds a control token's text
        twinned = [dict(m, content=self._controls.sub(lambda h: h.group().translate(self._twin), c))
                   if c is not None else m for m, c in zip(messages, contents)]
        try:
            shape = self.render(twinned, **kw)
        except ModelError:
            shape = None
        if shape is None or shape.translate(self._untwin) != text:
            i = next(i for i, f in enumerate(found) if f)
            raise ModelError(f"message {i}'s content holds the control token {found[i].group()[:40]!r}, which this "
                             "model's chat template treats differently from text; remove it from the message")
        return _split(text, self._twins.finditer(shape))
