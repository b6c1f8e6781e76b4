"""Crafted GGUF headers whose counts and lengths claim more than the file holds: one line naming the
file and the field, in bounded memory and time (each open runs in a child under an address-space limit)."""

from __future__ import annotations

import re
import struct

import pytest

import ggufgen
from bounded import run_bounded
from layerstream.errors import ModelError
from layerstream.loader.gguf_index import open_model
from layerstream.loader.header_scan import MAX_VALUE_BYTES

U32, STRING, ARRAY = 4, 8, 9


def s(text: str | bytes, claim: int | None = None) -> bytes:
    """A GGUF string: u64 length (or a claimed one) and its bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if claim is None else claim) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def header(kvs: list[bytes], tensors: list[bytes] = (), n_tensors: int | None = None, n_kv: int | None = None,
           pad: int = 120_000) -> bytes:
    """A GGUF v3 header of raw key-values and tensor entries, then `pad` zero bytes."""
    return (b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tensors) + bytes(pad))


def tensor(name: str, dims: list[int], qtype: int = 0, offset: int = 0, name_claim: int | None = None) -> bytes:
    return s(name, name_claim) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack(
        "<IQ", qtype, offset)


ARCH = kv("general.architecture", STRING, s("llama"))
CRAFTED = {
    "array of 2^60 uint32": ([ARCH, kv("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ", U32, 1 << 60))], {},
                             r"metadata key 'tokenizer.ggml.token_type' claims an array of 1152921504606846976 uint32"),
    "array of 2^60 strings": ([ARCH, kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 60))], {},
                              r"'tokenizer.ggml.tokens' claims an array of 1152921504606846976 strings"),
    "array of 2^20 strings": ([ARCH, kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 20))], {},
                              r"'tokenizer.ggml.tokens' \(an array of 1048576 strings\) needs 8388608 bytes"),
    "string of 2 GB": ([ARCH, kv("tokenizer.chat_template", STRING, s(b"{{", 2 << 30))], {},
                       r"metadata key 'tokenizer.chat_template' \(a string\) claims 2147483648 bytes, over the"),
    "string past the end": ([ARCH, kv("general.name", STRING, s(b"x", 200_000))], {},
                            r"'general.name' \(a string\) needs 200000 bytes at byte \d+, but the file has \d+ left"),
    "key name past the end": ([ARCH, s("k", 1 << 40)], {}, r"metadata key 1 claims a name of 1099511627776 bytes"),
    "unknown value type": ([ARCH, kv("general.x", 77, b"")], {}, r"'general.x' has unknown value type 77"),
    "arrays nested deep": ([ARCH, kv("general.x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 6 + struct.pack("<IQ", U32, 0))],
                           {}, r"'general.x' nests arrays more than 4 deep"),
    "2^40 keys": ([ARCH], {"n_kv": 1 << 40}, r"claims 1099511627776 metadata keys"),
    "2^40 tensors": ([ARCH], {"n_tensors": 1 << 40}, r"claims 1099511627776 tensors"),
    "60000 tensors in a small file": ([ARCH], {"n_tensors": 60_000}, r"60000 tensor entries needs 1440000 bytes"),
    "tensor name past the end": ([ARCH], {"tensors": [tensor("t", [4], name_claim=1 << 50)]},
                                 r"tensor 0's name claims a name of 1125899906842624 bytes"),
    "tensor of 9 dimensions": ([ARCH], {"tensors": [tensor("w", [2] * 9)]}, r"tensor 'w' claims 9 dimensions"),
    "tensor data past the end": ([ARCH], {"tensors": [tensor("w", [1 << 20, 1 << 20])]},
                                 r"truncated: tensor w ends at byte \d+ but the file has \d+"),
    # within each value's limits, but gguf-py makes objects a element (probe: 3.2 GB and 36 s for
    # one such key; three took 8 GB and read "corrupt or truncated GGUF file (MemoryError: )")
    "2,000,000 empty strings": ([ARCH, kv("general.tags", ARRAY, struct.pack("<IQ", STRING, 2_000_000)
                                          + bytes(8 * 2_000_000))], {},
                                r"header too large to read: metadata key 'general.tags' \(2000000 elements\) brings "
                                r"its arrays to about 3.2 GiB once parsed, over the 2 GiB allowed"),
    "three keys of 1,000,000 empty strings": (
        [ARCH] + [kv(f"general.tags{i}", ARRAY, struct.pack("<IQ", STRING, 1_000_000) + bytes(8 * 1_000_000))
                  for i in range(3)], {},
        r"metadata key 'general.tags1' \(1000000 elements\) brings its arrays to about 3.2 GiB once parsed"),
    "1,100,000 bytes in each of two arrays": (
        [ARCH] + [kv(f"general.b{i}", ARRAY, struct.pack("<IQ", 0, 1_100_000) + bytes(1_100_000)) for i in range(2)],
        {}, r"metadata key 'general.b1' \(1100000 elements\) brings its arrays to 2200000 elements, over the "
            r"2097152 allowed"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_header_sizes_are_one_line_in_bounded_memory(tmp_path, case):
    kvs, kw, match = CRAFTED[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(header(kvs, **kw))
    got = run_bounded(f"""
        try:
            open_model({str(path)!r})
            print("opened")
        except ModelError as e:
            print(e)
        """, imports="from layerstream.loader.gguf_index import open_model\nfrom layerstream.errors import ModelError",
        headroom=1 << 30, timeout=30)
    assert got.rc == 0 and len(got.lines) == 1, got.lines[-3:]
    line = got.lines[0]
    assert line.startswith(f"{path}: ") and re.search(match, line), line
    assert got.seconds < 10


def test_the_largest_real_vocabularies_pass_the_scan(tmp_path):
    """Gemma 3's 262,144 tokens with scores and types, and Llama 3's 128,256 tokens with 280,147
    merges, in one header: within the arrays' element and parse-size limits."""
    from layerstream.loader.header_scan import scan_header

    def strings(n: int) -> bytes:
        return struct.pack("<IQ", STRING, n) + b"".join(s(f"tok{i}") for i in range(n))

    def numbers(n: int) -> bytes:
        return struct.pack("<IQ", U32, n) + bytes(4 * n)

    path = tmp_path / "vocab.gguf"
    path.write_bytes(header([ARCH, kv("a.tokens", ARRAY, strings(262_144)), kv("a.scores", ARRAY, numbers(262_144)),
                             kv("a.token_type", ARRAY, numbers(262_144)), kv("b.tokens", ARRAY, strings(128_256)),
                             kv("b.merges", ARRAY, strings(280_147)), kv("b.token_type", ARRAY, numbers(128_256))]))
    scan_header(str(path))


def test_a_real_2gb_string_is_refused_and_never_cached(tmp_path, monkeypatch):
    """A file that really holds a 2 GB metadata string (sparse: no disk used) is refused before
    anything reads the string, and nothing reaches the header cache."""
    path = tmp_path / "big.gguf"
    n = 2 << 30
    with open(path, "wb") as fh:
        fh.write(header([ARCH, kv("general.description", STRING, struct.pack("<Q", n))], pad=0))
        fh.truncate(fh.tell() + n + 4096)
    cache = tmp_path / "cache"
    got = run_bounded(f"""
        import os
        os.environ["LAYERSTREAM_CACHE_DIR"] = {str(cache)!r}
        try:
            open_model({str(path)!r})
        except ModelError as e:
            print(e)
        """, imports="from layerstream.loader.gguf_index import open_model\nfrom layerstream.errors import ModelError",
        headroom=3 << 30, timeout=30)  # the file's 2 GB are mapped (address space, not memory)
    assert got.rc == 0 and len(got.lines) == 1, got.lines[-3:]
    assert f"'general.description' (a string) claims {n} bytes, over the {MAX_VALUE_BYTES}" in got.lines[0]
    assert not (cache / "headers").exists() or not list((cache / "headers").iterdir())


def test_the_header_cache_skips_an_entry_over_its_cap(tmp_path, monkeypatch):
    """A header that passes the scan but would make a cache entry over MAX_CACHE_ENTRY is parsed
    every time and never cached."""
    import layerstream.loader.header_cache as hc

    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    src = ggufgen.write_model(tmp_path / "m.gguf")
    monkeypatch.setattr(hc, "MAX_CACHE_ENTRY", 100)  # below this model's header
    assert open_model(src).hparams.n_layer == 2
    assert not (tmp_path / "cache" / "headers").exists() or not list((tmp_path / "cache" / "headers").iterdir())
    monkeypatch.setattr(hc, "MAX_CACHE_ENTRY", 64 << 20)
    assert open_model(src).hparams.n_layer == 2
    assert len(list((tmp_path / "cache" / "headers").iterdir())) == 1


def test_real_models_pass_the_scan(smollm_path, tmp_path):
    """The scan accepts what converters write: the default model and every synthetic architecture."""
    from layerstream.loader.header_scan import scan_header

    scan_header(smollm_path)
    for arch in ggufgen.ARCHS:
        scan_header(ggufgen.write_model(tmp_path / f"{arch}.gguf", arch=arch))
    with pytest.raises(ModelError, match="shorter than a header"):
        p = tmp_path / "short.gguf"
        p.write_bytes(b"GGUF" + bytes(8))
        open_model(p)


def test_find_string_reads_one_key_as_gguf_py_does(smollm_path, tmp_path):
    """find_string walks to one key and decodes only its value: the same text gguf-py's reader
    gives for the key, None for an absent one, NOT_TEXT for another type."""
    import gguf

    from layerstream.loader.header_scan import NOT_TEXT, find_string

    reader = gguf.GGUFReader(smollm_path)
    want = reader.fields["tokenizer.chat_template"].contents()
    assert want and find_string(smollm_path, "tokenizer.chat_template") == want
    assert find_string(smollm_path, "general.architecture") == "llama"
    assert find_string(smollm_path, "llama.block_count") is NOT_TEXT
    assert find_string(smollm_path, "no.such.key") is None
    crafted = tmp_path / "crafted.gguf"
    crafted.write_bytes(header([kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 3) + s("a") + s("bc")
                                   + s("d")), kv("tokenizer.chat_template", STRING, s("{{ x }}"))]))
    assert find_string(str(crafted), "tokenizer.chat_template") == "{{ x }}"
    crafted.write_bytes(header([kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2 ** 40))]))
    with pytest.raises(ModelError, match="crafted.gguf: corrupt GGUF header"):
        find_string(str(crafted), "tokenizer.chat_template")


@pytest.mark.parametrize("version,order", [(99, "<"), (1, "<"), (99, ">")])
def test_a_gguf_version_gguf_py_cannot_read_is_named_not_called_corrupt(tmp_path, version, order):
    """Probe of issue 25: version 99 read 'corrupt or truncated GGUF file (ValueError: Sorry, file
    appears to be version 99 which we cannot handle)': a Python exception, and a newer format called damage."""
    from layerstream.loader.header_scan import find_string

    path = tmp_path / "v.gguf"
    raw = bytearray(open(ggufgen.write_model(tmp_path / "m.gguf"), "rb").read())
    raw[4:8] = struct.pack(f"{order}I", version)
    path.write_bytes(bytes(raw))
    want = (f"{path}: GGUF version {version} is not supported (this build reads versions 2 and 3); convert the "
            "model again with a llama.cpp that writes one of them")
    with pytest.raises(ModelError) as e:
        open_model(str(path))
    assert str(e.value) == want
    with pytest.raises(ModelError) as e:  # (the chat template's quick look, before the whole header)
        find_string(str(path), "tokenizer.chat_template")
    assert str(e.value) == want


def test_a_damaged_key_length_and_an_unknown_tensor_type_are_short_lines_naming_them(tmp_path):
    """A hostile probe's damage: a key's length raised to 5,000 swallowed the keys after it into the
    key's name, and the error line held all 15 KB of them; a tensor type id gguf-py does not know was
    named as numpy's ValueError, without the tensor. Now the name is cut and the tensor named."""
    path = tmp_path / "k.gguf"
    path.write_bytes(header([s("general.architecture", 5000) + struct.pack("<I", 8) + s("llama"),
                             kv("general.name", STRING, s("x" * 6000))]))
    with pytest.raises(ModelError) as e:
        open_model(str(path))
    msg = str(e.value)
    assert len(msg) < 300 and "(5000 characters)" in msg and msg.startswith(f"{path}: "), msg
    path = tmp_path / "t.gguf"
    path.write_bytes(header([ARCH], [tensor("token_embd.weight", [32, 4], qtype=99)]))
    with pytest.raises(ModelError, match=r": tensor token_embd.weight has quant type id 99, which this gguf "
                                         r"\(gguf-py [^)]+\) does not know: a newer type or a damaged file"):
        open_model(str(path))
