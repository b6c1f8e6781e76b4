"""A byte-level GPT-2 style tokenizer for synthetic GGUF files: its vocabulary and its GGUF keys."""

from __future__ import annotations

from collections import Counter

import gguf

_BPE_TEXT = (
    "the quick brown fox jumps over the lazy dog and then the dog sleeps in the sun "
    "there is nothing in the world that the other one knows better than this one thing "
    "hello world hello there in the beginning was the word and the word was with them"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe_merges(n: int) -> list[tuple[str, str]]:
    """Up to n merges learned by plain BPE on a fixed English text (GPT-2 style 'Ġ' spaces)."""
    b2u = bytes_to_unicode()
    words = Counter(tuple(b2u[b] for b in (" " + w).encode()) for w in _BPE_TEXT.split())
    merges: list[tuple[str, str]] = []
    while len(merges) < n:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def tokenizer_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], int, int]:
    """(tokens, token types, merges, bos id, eos id) of a byte-level GPT-2 style vocab of n_vocab tokens.

    Tokens: the byte alphabet (GPT-2's bytes_to_unicode, by byte value), merges learned on a
    fixed text, <|unused_k|> fillers, and the control tokens <|bos|>, <|endoftext|> (eos) last. GGUF
    cannot hold an empty merges array (and llama.cpp requires the key), so there is always
    one merge at least; when n_vocab < 259 the top bytes 0xFF, 0xFE, ... (never found in
    UTF-8 text) give up their slots to the merge and the two control tokens.
    """
    if n_vocab < 256:
        raise ValueError(f"n_vocab={n_vocab}: a byte-level vocab needs at least 256 tokens")
    n_bytes = min(256, n_vocab - 3)
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(n_bytes)]
    types = [int(gguf.TokenType.NORMAL)] * n_bytes
    merges = _bpe_merges(n_vocab - n_bytes - 2)
    assert merges, "the fixed BPE text always yields merges"
    for a, b in merges:
        tokens.append(a + b)
        types.append(int(gguf.TokenType.NORMAL))
    k = 0
    while len(tokens) < n_vocab - 2:
        tokens.append(f"<|unused_{k}|>")
        types.append(int(gguf.TokenType.UNUSED))
        k += 1
    tokens += ["<|bos|>", "<|endoftext|>"]
    types += [int(gguf.TokenType.CONTROL)] * 2
    return tokens, types, [f"{a} {b}" for a, b in merges], n_vocab - 2, n_vocab - 1


def add_tokenizer(w, n_vocab: int) -> None:
    """Write a minimal gpt2-style byte-level tokenizer of n_vocab tokens into a GGUFWriter."""
    tokens, types, merges, bos, eos = tokenizer_vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)


# A plain chat template (each turn its role, its text and the end-of-text token), which synth's
# models carry so that --chat and the server's chat completions run on them as on an instruct
# model (benchmarks); the tests' own models (tests/ggufgen.py) stay base models, without one.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
