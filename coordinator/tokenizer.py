"""Text to token ids and back, built on the `tokenizers` library from a GGUF file's tokenizer metadata.

Two vocabulary kinds, named by `tokenizer.ggml.model` as llama.cpp names them:

- "gpt2": byte-level BPE from `tokens` + `merges`, text first cut by the pre-tokenizer regexes that
  llama.cpp's llama-vocab.cpp picks by `tokenizer.ggml.pre`.
- "llama": SentencePiece-style BPE whose merge order comes from the token scores (as llama.cpp's SPM
  tokenizer merges the best-scoring bigram first), byte fallback to `<0xNN>` tokens, spaces as "▁".

Decoding never goes through `tokenizers`: each token maps to its bytes here, so `decode` and
`StreamDecoder` agree byte for byte and partial UTF-8 characters can be held back (where the ids end
mid-character, `decode` shows a U+FFFD that `StreamDecoder` drops).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import logging
import numbers
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, Tokenizer as _HFTokenizer, decoders, models, normalizers, pre_tokenizers

from layerstream.errors import ConfigError, ModelError
from layerstream.loader.metadata import meta

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPACE = "\u2581"  # SentencePiece's "▁"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # no text the tokenizer takes: U+FFFD in its place

# Pre-tokenizer regexes, as llama-vocab.cpp lists them per pre type. Several regexes apply in turn:
# each one cuts the pieces the previous one left (matches and the gaps between them both kept).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS_ANY_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class _PreType:
    """How llama.cpp treats one `tokenizer.ggml.pre` value."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a whole piece found in the vocab is taken as is
    add_bos: bool = False  # default when the file has no add_bos_token key


_PRE_TYPES: dict[str, _PreType] = {}
for _names, _pre in [
    (("default",), _PreType((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
    (("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion"), _PreType((_GPT2,))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     _PreType((_LLAMA3,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe"), _PreType((_LLAMA3,))),
    (("chatglm-bpe",), _PreType((_LLAMA3,))),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     _PreType((r"\p{N}", _GPT2))),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"), _PreType((_QWEN2,))),
    (("falcon",), _PreType((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
    (("poro-chat", "bloom", "gpt3-finnish"), _PreType((_BLOOM,))),
    (("viking",), _PreType((_BLOOM, r"\p{N}"))),
    (("tekken",), _PreType((_TEKKEN,), ignore_merges=True, add_bos=True)),
    (("gpt-4o", "llama4"), _PreType((_GPT4O,))),
]:
    for _name in _names:
        _PRE_TYPES[_name] = _pre

# Texts llama.cpp also treats as end of generation when the file marks them as control tokens.
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
              "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>"}


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, others move to U+0100 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_level_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _byte_level_spelling(text: str) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


def _byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for; characters outside the alphabet count as themselves."""
    if all(c in _CHAR_TO_BYTE for c in token):
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    return token.encode("utf-8")


def _spm_merges(scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges implied by a scored SentencePiece vocabulary, best merged score first."""
    ranked = []
    for piece, idx in vocab.items():
        if len(piece) < 2:
            continue
        score = scores[idx]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, idx, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


class Tokenizer:
    """Encodes and decodes text the way llama.cpp does for the vocabulary a GGUF file carries."""

    def __init__(self, hf: _HFTokenizer, tokens: list[str], token_types: list[int], *, kind: str,
                 bos_id: int | None, eos_id: int | None, eos_ids: set[int], add_bos: bool, add_eos: bool,
                 add_space_prefix: bool):
        self._hf = hf
        self._hf_lock = threading.Lock()  # encode_special_tokens is a flag on the shared object
        self._tokens = tokens
        self._types = token_types
        self.kind = kind
        self.bos_id, self.eos_id, self.eos_ids = bos_id, eos_id, frozenset(eos_ids)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self._piece_cache: list[bytes | None] = [None] * len(tokens)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> "Tokenizer":
        """Build from a GGUF metadata dict (`ModelIndex.metadata` or `read_metadata`)."""
        kind = meta(md, "tokenizer.ggml.model", str, None)
        tokens = meta(md, "tokenizer.ggml.tokens", list, None, items=str)
        if not tokens:
            raise ModelError("the model file has no tokenizer (tokenizer.ggml.tokens is missing)")
        tokens = list(tokens)
        n = len(tokens)
        types = list(meta(md, "tokenizer.ggml.token_type", list, None, items=int) or [NORMAL] * n)
        if len(types) != n:
            raise ModelError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

        def token_id(key: str) -> int | None:
            v = meta(md, f"tokenizer.ggml.{key}", int, None)
            if v is not None and not 0 <= v < n and key in ("bos_token_id", "eos_token_id"):
                raise ModelError(f"tokenizer.ggml.{key} = {v} is outside the vocabulary of {n} tokens; the file is "
                                 "corrupt or was not written by a known converter")
            return v if v is not None and 0 <= v < n else None  # (others out of range: llama.cpp ignores them)

        if kind == "gpt2":
            hf, pre = _build_byte_level(md, tokens, types)
            add_bos_default, add_space_prefix = pre.add_bos, False
        elif kind == "llama":
            add_space_prefix = bool(meta(md, "tokenizer.ggml.add_space_prefix", bool, True))
            hf = _build_sentencepiece(md, tokens, types, token_id("unknown_token_id"), add_space_prefix)
            add_bos_default = True
        else:
            raise ModelError(f"tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
        eos_ids = {i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        eos_ids |= {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in _EOG_TEXTS}
        return cls(hf, tokens, types, kind=kind, bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids,
                   add_bos=bool(meta(md, "tokenizer.ggml.add_bos_token", bool, add_bos_default)) and bos_id is not None,
                   add_eos=bool(meta(md, "tokenizer.ggml.add_eos_token", bool, False)) and eos_id is not None,
                   add_space_prefix=add_space_prefix)

    # ---- encoding -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS as the file asks when `add_special`; control tokens whole when `parse_special`."""
        if not isinstance(text, str):  # (None raised AttributeError: 'NoneType' object has no attribute 'isascii')
            raise TypeError(f"encode() takes the text as a str, not {type(text).__name__}")
        if not text.isascii():  # (a lone surrogate: from a chat template's own text, an API caller's message)
            text = _LONE_SURROGATE.sub("\ufffd", text)
        with self._hf_lock:
            self._hf.encode_special_tokens = not parse_special
            # encode_batch releases the GIL while it runs (encode holds it), so a long prompt
            # tokenized in a server's worker thread does not stall its event loop
            ids = self._hf.encode_batch([text], add_special_tokens=False)[0].ids if text else []
        if add_special and self.add_bos:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    # ---- decoding -----------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (control tokens: their text)."""
        piece = self._piece_cache[token_id]
        if piece is None:
            piece = self._piece_cache[token_id] = self._compute_piece(token_id)
        return piece

    @functools.cached_property
    def longest_piece(self) -> int:
        """Bytes of the vocabulary's longest token (1 at least). A text of more than n times this many
        bytes is more than n tokens whatever it says, so a text too long for a context is known
        without tokenizing it (which holds the GIL, for seconds a megabyte)."""
        longest = 1
        for i in range(len(self._tokens)):
            with contextlib.suppress(Exception):  # (a piece that cannot be spelled holds no text)
                longest = max(longest, len(self.token_bytes(i)))
        return longest

    def token_to_piece(self, token_id: int) -> str:
        """Token `token_id` as text; a lone byte of a longer character shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def is_control(self, token_id: int) -> bool:
        return self._types[token_id] == CONTROL

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; control tokens are dropped when `skip_special`."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):  # (a str's characters compared with ints)
            raise TypeError(f"decode() takes token ids (ints), not a {type(ids).__name__}; encode() makes them")
        out = bytearray()
        first = True
        for i in ids:
            piece, first = self._emit(i, skip_special, first)
            out += piece
        return out.decode("utf-8", "replace")

    def _emit(self, token_id: int, skip_special: bool, first: bool) -> tuple[bytes, bool]:
        """(bytes to emit, still-at-start) for one token in a decoded sequence."""
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):  # (True decoded as token 1)
            raise TypeError(f"token id {token_id!r:.40}: token ids are ints")
        if not 0 <= token_id < len(self._tokens):  # (as generate()'s ids: a ConfigError, not a bare ValueError)
            raise ConfigError(f"token id {token_id} is outside the vocabulary (0..{len(self._tokens) - 1})")
        if skip_special and self._types[token_id] == CONTROL:
            return b"", first
        piece = self.token_bytes(token_id)
        if first and piece and self.add_space_prefix and piece.startswith(b" "):
            piece = piece[1:]  # the space the encoder put in front of the text
        return piece, False

    def _compute_piece(self, token_id: int) -> bytes:
        text, ty = self._tokens[token_id], self._types[token_id]
        if ty in (CONTROL, UNKNOWN) or ty == USER_DEFINED and self.kind == "gpt2":
            return text.encode("utf-8")  # stored as plain text, not in the byte alphabet
        if ty == UNUSED:
            return b""
        if self.kind == "gpt2":
            return _byte_level_bytes(text)
        m = _BYTE_TOKEN.match(text)
        if m and ty in (BYTE, NORMAL):  # files without token types mark byte tokens NORMAL
            return bytes([int(m.group(1), 16)])
        return text.replace(_SPACE, " ").encode("utf-8")


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only whole characters; joined output equals `decode`
    (less the U+FFFD of a character the ids leave unfinished)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tk = tokenizer
        self._skip_special = skip_special
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """The text newly completed by `token_id` (may be empty while a character is incomplete)."""
        piece, self._first = self._tk._emit(token_id, self._skip_special, self._first)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """The end of the text: an unfinished character held back is dropped, not shown as U+FFFD.

        Its tokens were cut off by max_tokens, EOS or a stop, so no byte that would finish it is
        coming; a U+FFFD tells the reader nothing, and a text that ends in one is not what the model
        would have written (llama-server drops the tail likewise). Everything else came out of push."""
        self._utf8.reset()
        return ""


# ---- builders -------------------------------------------------------------------------------------


def _added_tokens(tokens: list[str], types: list[int]) -> tuple[list[AddedToken], list[AddedToken]]:
    """(special, plain) added tokens: control/unknown tokens match only when parsing specials, user-defined always."""
    special, plain = [], []
    for t, ty in zip(tokens, types):
        if not t:
            continue
        if ty in (CONTROL, UNKNOWN):
            special.append(AddedToken(t, special=True, normalized=False))
        elif ty == USER_DEFINED:
            plain.append(AddedToken(t, special=False, normalized=False))
    return special, plain


def _finish(hf: _HFTokenizer, tokens: list[str], types: list[int]) -> _HFTokenizer:
    special, plain = _added_tokens(tokens, types)
    hf.add_special_tokens(special)
    hf.add_tokens(plain)
    for t in special + plain:
        if hf.token_to_id(t.content) >= len(tokens):
            raise ModelError(f"tokenizer: token {t.content!r} is missing from the BPE vocabulary")
    return hf


def _build_byte_level(md: dict, tokens: list[str], types: list[int]) -> tuple[_HFTokenizer, _PreType]:
    pre_name = meta(md, "tokenizer.ggml.pre", str, None) or "default"
    pre = _PRE_TYPES.get(pre_name)
    if pre is None:
        log.warning("tokenizer.ggml.pre %r is unknown; splitting text as GPT-2 does", pre_name)
        pre = _PRE_TYPES["gpt2"]
    merges_raw = meta(md, "tokenizer.ggml.merges", list, None, items=str)
    if merges_raw is None:
        raise ModelError("a gpt2 tokenizer needs tokenizer.ggml.merges, which the file lacks")
    alphabet = set(_CHAR_TO_BYTE)
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Control and user-defined tokens are stored as plain text; the merges may still reach their
        # byte-level spelling, so the vocabulary gets both.
        vocab[t] = i
        if ty in (CONTROL, USER_DEFINED) and not set(t) <= alphabet:
            vocab.setdefault(_byte_level_spelling(t), i)
    merges = []
    for i, m in enumerate(merges_raw):
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0 or cut == len(m) - 1:
            raise ModelError(f"tokenizer.ggml.merges[{i}] = {m[:40]!r} is not two pieces separated by a space; "
                             "the file is corrupt or was not written by a known converter")
        merges.append((m[:cut], m[cut + 1:]))
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False)
    except Exception as e:  # (the library's message can run to several lines)
        raise ModelError(f"tokenizer: the BPE vocabulary and merges do not fit together "
                         f"({' '.join(str(e).split())[:200]})") from None
    hf = _HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return _finish(hf, tokens, types), pre


def _build_sentencepiece(md: dict, tokens: list[str], types: list[int], unk_id: int | None,
                         add_space_prefix: bool) -> _HFTokenizer:
    scores = meta(md, "tokenizer.ggml.scores", list, None, items=float)
    if scores is None or len(scores) != len(tokens):
        raise ModelError("a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores, one per token")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = tokens[unk_id] if unk_id is not None else None
    model = models.BPE(vocab=vocab, merges=_spm_merges(list(scores), vocab), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    hf = _HFTokenizer(model)
    steps = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return _finish(hf, tokens, types)


def token_ids(tokens, n_vocab: int, what: str, text_ok: bool = False) -> list[int]:
    """`tokens` as a list of ids, each in the vocabulary, else TypeError or ConfigError naming it."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens):
        raise TypeError(f"{what}: give {'text (a str) or ' if text_ok else ''}a list of token ids (ints), "
                        f"not {tokens!r:.60}")
    if not tokens:
        raise ConfigError(f"{what} is empty: give at least one token")
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
    return [int(t) for t in tokens]
