"""The header cache: each GGUF file's parsed header (its metadata and tensor table) kept as msgpack,
so that a later open skips gguf-py's parse."""

from __future__ import annotations

import os
import stat
from typing import Any

# NOTE [ the header cache ]
# gguf-py's reader parses a metadata array one element at a time: seconds at every start for a large
# vocabulary (BENCHMARKS.md, "The header's first parse"). So each file's parsed header (its metadata
# and tensor table) is kept in a cache directory as msgpack, keyed by the file's real path, size,
# inode, change times and first MiB; a later open reads it in well under a second. A cache entry
# that is missing, unreadable or of another format is parsed again and rewritten; a file that
# changes gets a new key. The tensors' extents are checked against the file either way. A header
# whose entry would pass MAX_CACHE_ENTRY is not cached (real ones are a few MB;
# NOTE [ header sizes ] bounds what a parse may hold), and an entry that large is not read.
# The directory keeps the MAX_ENTRIES entries used last (a hit refreshes its entry's time; a write
# removes the oldest past them): each change of a file (a touch, a copy, a download again) made one
# more entry, and none went. LAYERSTREAM_CACHE_DIR sets the directory (default:
# $XDG_CACHE_HOME/layerstream, else ~/.cache/layerstream); 0 turns it off.
HEADER_CACHE_FORMAT = 3  # 2: headers checked by scan_header before they are cached; 3: its tensors' layout too
MAX_CACHE_ENTRY = 64 << 20
MAX_ENTRIES = 32


def cache_dir() -> str | None:
    """The entries' directory (NOTE [ the header cache ]), or None where the cache is off."""
    d = os.environ.get("LAYERSTREAM_CACHE_DIR")
    if d == "0":
        return None
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "layerstream")
    return os.path.join(d, "headers")


def cache_path(path: str) -> str | None:
    """The entry of the file at `path` as it is now, or None where the cache is off (OSError where
    the file cannot be read)."""
    import hashlib

    d = cache_dir()
    if d is None:
        return None
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # (a FIFO, `-m <(zcat m.gguf.gz)`: reading it here waited forever)
        raise OSError(f"{path}: not a regular file")
    # (the path as the file system's bytes: a name that is not UTF-8, as a Latin-1 one, stays encodable)
    key = hashlib.sha256(f"{HEADER_CACHE_FORMAT}\0{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0"
                         f"{st.st_ctime_ns}\0{st.st_ino}\0".encode("utf-8", "surrogateescape"))
    with open(path, "rb") as fh:  # and the header's first bytes, where timestamps are coarse
        key.update(fh.read(1 << 20))
    return os.path.join(d, key.hexdigest()[:32] + ".msgpack")


def read_cached(cache: str) -> tuple[dict[str, Any], list[list]] | None:
    """(metadata, tensor rows [name, qtype, shape, offset, nbytes]) from a cache entry, or None where
    it is absent, too large, of another format or damaged."""
    import msgpack

    try:
        with open(cache, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_CACHE_ENTRY:
                return None
            got = msgpack.unpackb(fh.read(), strict_map_key=False)
        if got.get("format") != HEADER_CACHE_FORMAT or not isinstance(got.get("metadata"), dict):
            return None
        rows = got["tensors"]
        if not isinstance(rows, list) or not all(_row(r) for r in rows):
            return None
        try:
            os.utime(cache)  # (used now: the last to go)
        except OSError:
            pass
        return got["metadata"], rows
    except (OSError, ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException):
        return None  # absent or damaged: parsed again


def _row(r) -> bool:
    """[name, qtype, shape, offset, nbytes] with their types."""
    return (isinstance(r, list) and len(r) == 5 and isinstance(r[0], str) and isinstance(r[2], list)
            and all(isinstance(v, int) for v in (r[1], r[3], r[4], *r[2])))


def write_cached(cache: str, md: dict[str, Any], rows: list[list]) -> None:
    """Write an entry whole or not at all (its rows as read_cached returns them)."""
    import msgpack

    body = {"format": HEADER_CACHE_FORMAT, "metadata": md, "tensors": rows}
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        packed = msgpack.packb(body)
        if len(packed) > MAX_CACHE_ENTRY:
            return
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(packed)
        os.replace(tmp, cache)  # (whole or not at all, for a reader in another process)
    except (OSError, TypeError, ValueError):
        try:
            os.unlink(tmp)
        except OSError:
            pass  # a cache that cannot be written costs a parse next time, nothing else
        return
    _evict(os.path.dirname(cache), cache)


def _evict(d: str, keep: str) -> None:
    """Remove the entries of `d` used longest ago past MAX_ENTRIES, never `keep` (NOTE above)."""
    try:
        entries = []
        for e in os.scandir(d):
            if e.name.endswith(".msgpack") and e.path != keep:
                try:
                    entries.append((e.stat().st_mtime_ns, e.path))
                except OSError:
                    pass  # (gone meanwhile: another process's eviction)
    except OSError:
        return
    for _, path in sorted(entries)[: max(0, len(entries) + 1 - MAX_ENTRIES)]:
        try:
            os.unlink(path)
        except OSError:
            pass


def header_cached(path: str) -> bool:
    """Whether the header cache holds an entry for the file as it is now (NOTE [ the header cache ])."""
    try:
        cache = cache_path(path)
    except OSError:
        return False
    return cache is not None and os.path.isfile(cache)
