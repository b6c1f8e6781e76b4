"""A bounded first pass over a GGUF header: every count and length is checked against the bytes the
file has (and against limits no real model comes near) before gguf-py parses it."""

from __future__ import annotations

import mmap
import os
import struct

from layerstream.errors import ModelError

# NOTE [ header sizes ]
# gguf-py trusts the counts and lengths a header claims: an array that claims 2^60 elements grows
# its parse without end, and a 2 GB string is read, decoded and cached whole. This pass walks the
# header with struct over a memory map (no copy), checks that each length fits in the bytes left,
# and refuses values no converter writes: a value over MAX_VALUE_BYTES (the largest real ones, a
# 262k-token vocabulary and its merges, are under 10 MB), a string array over MAX_ARRAY_STRINGS
# (gguf-py keeps two views per string), more than MAX_KV keys or MAX_TENSORS tensors, more than
# MAX_DIMS dimensions. A tensor's data must lie inside the file too.
# Bytes in the file are not what a parse costs: gguf-py makes numpy views for every array element
# (two for a string), and read_metadata a Python object, about 1.6 KB a string and 0.75 KB a number
# measured (gguf 0.17): 2,000,000 empty strings, 16 MB of file, took 3.2 GB and 36 s. So the arrays of
# the whole header may hold MAX_ARRAY_ELEMENTS elements and an estimated MAX_PARSE_BYTES of parsed
# objects (PARSE_COST a element, rounded up from those figures). The largest real vocabularies come
# well under both: Gemma 3's 262,144 tokens, scores and types are 786k elements and about 0.9 GB;
# Llama 4's 202k tokens, 440k merges and types about 0.85M elements and 1.3 GB.
MAX_VALUE_BYTES = 64 << 20
MAX_HEADER_BYTES = 256 << 20
MAX_ARRAY_STRINGS = 1 << 21
MAX_ARRAY_ELEMENTS = 1 << 21
MAX_PARSE_BYTES = 2 << 30
PARSE_COST = {"string": 1700, "number": 800}  # bytes a parsed element takes (gguf-py's views, the list)
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_NAME = 1 << 16  # bytes of a key or tensor name
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays

_SCALARS = {0: ("uint8", 1), 1: ("int8", 1), 2: ("uint16", 2), 3: ("int16", 2), 4: ("uint32", 4), 5: ("int32", 4),
            6: ("float32", 4), 7: ("bool", 1), 10: ("uint64", 8), 11: ("int64", 8), 12: ("float64", 8)}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a buffer, refusing any length past the buffer's end."""

    def __init__(self, buf, order: str, path: str):
        self.buf, self.order, self.path, self.pos, self.header = buf, order, path, 0, 0
        self.elements, self.parse_bytes = 0, 0  # over every array of the header (NOTE [ header sizes ])

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: corrupt GGUF header: {what}; re-download or re-convert the file")

    def need(self, n: int, what: str) -> None:
        left = len(self.buf) - self.pos
        if n > left:
            raise self.fail(f"{what} needs {n} bytes at byte {self.pos}, but the file has {left} left")

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def uint(self, size: int, what: str) -> int:
        self.need(size, what)
        (v,) = struct.unpack_from(self.order + ("I" if size == 4 else "Q"), self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str, limit: int) -> int:
        """Skip a string; its length."""
        n = self.uint(8, what)
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes, over the {limit} allowed")
        self.skip(n, what)
        return n

    def name(self, what: str) -> str:
        n = self.uint(8, what)
        if n > MAX_NAME:
            raise self.fail(f"{what} claims a name of {n} bytes, over the {MAX_NAME} allowed")
        self.need(n, what)
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return text

    def count(self, n: int, cost: int, what: str) -> None:
        """Add n array elements of `cost` parsed bytes each to the header's totals; refuse past their limits."""
        self.elements += n
        self.parse_bytes += n * cost
        why = None
        if self.elements > MAX_ARRAY_ELEMENTS:
            why = f"{self.elements} elements, over the {MAX_ARRAY_ELEMENTS} allowed"
        elif self.parse_bytes > MAX_PARSE_BYTES:
            why = (f"about {self.parse_bytes / (1 << 30):.1f} GiB once parsed, over the {MAX_PARSE_BYTES >> 30} GiB "
                   "allowed")
        if why:
            raise ModelError(f"{self.path}: GGUF header too large to read: {what} ({n} elements) brings its arrays "
                             f"to {why}; no converter writes a header that large")

    def value(self, vtype: int, what: str, depth: int = 0) -> int:
        """Skip one metadata value of type `vtype`; the bytes it takes."""
        start = self.pos
        if vtype in _SCALARS:
            self.skip(_SCALARS[vtype][1], what)
        elif vtype == _STRING:
            self.string(f"{what} (a string)", MAX_VALUE_BYTES)
        elif vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
            etype, count = self.uint(4, what), self.uint(8, what)
            if etype in _SCALARS:
                kind, size = _SCALARS[etype]
                if count * size > MAX_VALUE_BYTES:
                    raise self.fail(f"{what} claims an array of {count} {kind} elements ({count * size} bytes), "
                                    f"over the {MAX_VALUE_BYTES} a metadata value may hold")
                self.skip(count * size, f"{what} (an array of {count} {kind})")
                self.count(count, PARSE_COST["number"], what)
            elif etype in (_STRING, _ARRAY):
                least = 8 if etype == _STRING else 12  # a string's length; an array's type and count
                if etype == _STRING and count > MAX_ARRAY_STRINGS:
                    raise self.fail(f"{what} claims an array of {count} strings, over the {MAX_ARRAY_STRINGS} allowed")
                self.need(count * least, f"{what} (an array of {count} {'strings' if etype == _STRING else 'arrays'})")
                self.count(count, PARSE_COST["string" if etype == _STRING else "number"], what)
                for _ in range(count):
                    if etype == _STRING:
                        self.string(f"{what} (a string in an array)", MAX_VALUE_BYTES)
                    else:
                        self.value(_ARRAY, what, depth + 1)
                    if self.pos - start > MAX_VALUE_BYTES:
                        raise self.fail(f"{what} holds more than the {MAX_VALUE_BYTES} bytes a metadata value may hold")
            else:
                raise self.fail(f"{what} is an array of unknown element type {etype}")
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")
        return self.pos - start


def _byte_order(buf, path: str) -> str:
    """The header's byte order ("<" or ">"); ModelError naming the version where gguf-py reads none
    of that version (its own error named a Python exception and called the file corrupt)."""
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS as READ

    order, (version,) = "<", struct.unpack_from("<I", buf, 4)
    if not version & 0xFFFF:  # written on a machine of the other byte order (as gguf-py tells)
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in READ:
        known = " and ".join(map(str, sorted(READ)))
        raise ModelError(f"{path}: GGUF version {version} is not supported (this build reads versions {known}); "
                         "convert the model again with a llama.cpp that writes one of them")
    return order


def scan_header(path: str) -> None:
    """Check a GGUF file's header sizes against the file (NOTE [ header sizes ]); one line naming
    the file and the field where one does not fit, or its GGUF version where gguf-py cannot read it."""
    import gguf

    size = os.path.getsize(path)
    if size < 24:
        raise ModelError(f"{path}: truncated GGUF file ({size} bytes, shorter than a header); re-download the file")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        order = _byte_order(buf, path)
        c = _Cursor(buf, order, path)
        c.pos = 8
        n_tensors, n_kv = c.uint(8, "the tensor count"), c.uint(8, "the key count")
        if n_kv > MAX_KV:
            raise c.fail(f"the header claims {n_kv} metadata keys, over the {MAX_KV} allowed")
        if n_tensors > MAX_TENSORS:
            raise c.fail(f"the header claims {n_tensors} tensors, over the {MAX_TENSORS} allowed")
        c.need(n_kv * 13, f"{n_kv} metadata keys")  # a key's length, type and a one-byte value at least
        alignment, total = 32, 0
        for i in range(n_kv):
            key = c.name(f"metadata key {i}")
            vtype = c.uint(4, f"metadata key {_shown(key)}")
            if key == "general.alignment" and vtype == 4:
                alignment = struct.unpack_from(order + "I", buf, c.pos)[0] if c.pos + 4 <= size else 32
            total += c.value(vtype, f"metadata key {_shown(key)}")
            if total > MAX_HEADER_BYTES:
                raise c.fail(f"the metadata holds more than {MAX_HEADER_BYTES} bytes (at key {_shown(key)})")
        c.need(n_tensors * 24, f"{n_tensors} tensor entries")  # a name's length, dims, type and offset at least
        tensors = []
        for i in range(n_tensors):
            name = c.name(f"tensor {i}'s name")
            shown = _shown(name)
            n_dims = c.uint(4, f"tensor {shown}")
            if n_dims > MAX_DIMS:
                raise c.fail(f"tensor {shown} claims {n_dims} dimensions, over the {MAX_DIMS} allowed")
            dims = [c.uint(8, f"tensor {shown}'s shape") for _ in range(n_dims)]
            qtype, offset = c.uint(4, f"tensor {shown}'s type"), c.uint(8, f"tensor {shown}'s offset")
            tensors.append((name, dims, qtype, offset))
        if not alignment or alignment & (alignment - 1):
            return  # gguf-py says what is wrong with it
        data = -(-c.pos // alignment) * alignment
        extents = []  # (start, bytes, name) of each tensor whose size its type gives
        for name, dims, qtype, offset in tensors:
            known = _qtype(qtype)
            if known is None:  # (gguf-py's own error named numpy and no tensor)
                raise ModelError(f"{path}: tensor {_shown(name, quote=False)} has quant type id {qtype}, which this gguf "
                                 f"(gguf-py {_gguf_version()}) does not know: a newer type or a damaged file; "
                                 "re-download or re-convert the file")
            block = gguf.GGML_QUANT_SIZES.get(known)
            if block is None:
                continue  # a known type without a block size: the loader names it
            n = 1
            for d in dims:
                n *= d
            nbytes = n // block[0] * block[1]
            if data + offset + nbytes > size:
                raise ModelError(f"{path}: truncated: tensor {_shown(name, quote=False)} ends at byte {data + offset + nbytes} "
                                 f"but the file has {size}; re-download the file")
            extents.append((data + offset, nbytes, _shown(name, quote=False)))
        _check_layout(extents, alignment, path)


def _check_layout(extents: list[tuple[int, int, str]], alignment: int, path: str) -> None:
    """Each tensor's data (start, bytes, name) at a multiple of the file's alignment (its data section
    starts at one), and no two overlapping, as llama.cpp checks at load: a header whose offsets were
    edited otherwise loaded, and read one tensor's bytes as another's (a probe's: text that changed,
    or NaN logits at the first step)."""
    last = None
    for start, nbytes, name in sorted(extents, key=lambda x: x[0]):
        if start % alignment:
            raise ModelError(f"{path}: corrupt GGUF file: tensor {name}'s data at byte {start} is not a multiple of "
                             f"the file's alignment ({alignment}); re-download or re-convert the file")
        if last is not None and start < last[0] + last[1]:
            raise ModelError(f"{path}: corrupt GGUF file: tensors {last[2]} and {name} overlap (bytes {start} to "
                             f"{last[0] + last[1]}); re-download or re-convert the file")
        last = (start, nbytes, name)


NOT_TEXT = object()  # find_string's answer for a key whose value is not a string


def find_string(path: str, key: str) -> str | object | None:
    """One metadata key's value, read by walking the header as scan_header does (within its
    limits) and decoding only that value: the string, NOT_TEXT for a value of another type, None
    where the key is absent. A fraction of a second where gguf-py's parse of a large vocabulary
    takes many (Gemma 3: 0.4 s against 17 to 24 s on a 2-core machine). ModelError on a header
    that does not hold together; OSError where the file cannot be read."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < 24 or fh.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, _byte_order(buf, path), path)
            c.pos = 16
            n_kv = c.uint(8, "the key count")
            if n_kv > MAX_KV:
                raise c.fail(f"the header claims {n_kv} metadata keys, over the {MAX_KV} allowed")
            for i in range(n_kv):
                name = c.name(f"metadata key {i}")
                vtype = c.uint(4, f"metadata key {name!r}")
                if name == key:
                    if vtype != _STRING:
                        return NOT_TEXT
                    start = c.pos + 8
                    n = c.string(f"metadata key {name!r} (a string)", MAX_VALUE_BYTES)
                    return bytes(buf[start:start + n]).decode("utf-8", "replace")
                c.value(vtype, f"metadata key {name!r}")
    return None


def _shown(name: str, most: int = 60, quote: bool = True) -> str:
    """A key or tensor name for a message: quoted (or bare where `quote` is off and it is printable),
    escaped where not printable, cut to `most` characters (a damaged length made a 15 KB error line
    of the bytes that followed)."""
    text = name if not quote and name.isprintable() else repr(name)
    return text if len(text) <= most else f"{text[:most]}... ({len(name)} characters)"


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown version"


def _qtype(value: int):
    import gguf

    try:
        return gguf.GGMLQuantizationType(value)
    except ValueError:
        return None
