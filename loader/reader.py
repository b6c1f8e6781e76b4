"""LayerReader: pread GGUF byte ranges straight into staging slots; and which reader reads what.

O_DIRECT: with `direct=True` each range is read as its aligned superset
`[align_down(file_offset), align_up(file_offset + nbytes))` into the slot at
`slot_offset - file_offset % 4096`. The slot layout (see NOTE [ slot layout and O_DIRECT ]
in layout.py) keeps `slot_offset % 4096 == file_offset % 4096` and reserves each run's
padding, so the extra head and tail bytes fall on the run's own slack and the wanted bytes
land exactly at `slot_offset`: no bounce buffer, no copy. A range that breaks that rule
(hand-made) or a destination that is not page-aligned is read buffered instead.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from layerstream.errors import ConfigError, ModelError
from layerstream.loader.layout import ALIGN, ReadRange, align_down, align_up


def _truncated(file: str, at: int, offset: int, nbytes: int) -> ModelError:
    return ModelError(
        f"{file}: file ends at byte {at}, inside data wanted at offset {offset} ({nbytes} bytes); "
        f"the file was truncated or replaced while in use; re-download it"
    )


def _address(buf: memoryview) -> int:
    return np.frombuffer(buf, dtype=np.uint8, count=min(1, len(buf))).ctypes.data


class LayerReader:
    """Reads byte ranges of a model's files into a caller's buffer (a shared-memory slot)."""

    def __init__(self, files: Sequence[str], direct: bool = False):
        self.files = [os.fspath(f) for f in files]
        self.direct = direct
        self._fds: dict[str, int] = {}  # buffered descriptors
        self._dfds: dict[str, int] = {}  # O_DIRECT descriptors (direct mode, where supported)
        self._warned = False
        self._bytes = 0
        self._busy = 0.0
        self._reads = 0
        self._direct_bytes = 0
        try:
            for f in self.files:
                try:
                    self._fds[f] = os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise ModelError(f"{f}: cannot open model file: {e.strerror}") from None
                if direct:
                    self._open_direct(f)
        except BaseException:
            self.close()
            raise

    def _open_direct(self, f: str) -> None:
        try:
            self._dfds[f] = os.open(f, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise ModelError(f"{f}: cannot open model file with O_DIRECT: {e.strerror}") from None
            self._fall_back(f, "open")

    def _fall_back(self, f: str, where: str) -> None:
        """O_DIRECT is refused for f (e.g. on tmpfs or some FUSE mounts): read it buffered."""
        fd = self._dfds.pop(f, None)
        if fd is not None:
            os.close(fd)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{f}: the filesystem refuses O_DIRECT ({where}: EINVAL); reading it through the page cache",
                RuntimeWarning,
                stacklevel=3,
            )

    def read_into(self, ranges: Sequence[ReadRange], dest: memoryview) -> int:
        """Fill dest[slot_offset : slot_offset + nbytes] from each range's file; returns bytes wanted."""
        t0 = time.perf_counter()
        dest = memoryview(dest)
        if dest.readonly:
            raise ValueError("read_into needs a writable destination")
        base_aligned = self.direct and bool(self._dfds) and _address(dest) % ALIGN == 0
        total = 0
        try:
            for r in ranges:
                r = ReadRange(*r)
                if r.slot_offset < 0 or r.slot_offset + r.nbytes > len(dest):
                    raise ConfigError(
                        f"range {r.file}@{r.file_offset}+{r.nbytes} -> slot offset {r.slot_offset} "
                        f"does not fit a {len(dest)}-byte slot; make the slots larger"
                    )
                fd = self._fds.get(r.file)
                if fd is None:
                    raise ConfigError(f"{r.file}: this reader was not opened on that file")
                if base_aligned and r.file in self._dfds and self._direct_ok(r, len(dest)):
                    if self._read_direct(r, dest):
                        total += r.nbytes
                        continue
                with dest[r.slot_offset : r.slot_offset + r.nbytes] as out:
                    self._read_exact(fd, r.file, r.file_offset, out)
                total += r.nbytes
        finally:
            self._busy += time.perf_counter() - t0
        self._bytes += total
        return total

    @staticmethod
    def _direct_ok(r: ReadRange, dest_len: int) -> bool:
        head = r.file_offset % ALIGN
        return r.slot_offset % ALIGN == head and r.slot_offset - head + align_up(head + r.nbytes) <= dest_len

    def _read_direct(self, r: ReadRange, dest: memoryview) -> bool:
        """Read r's aligned superset with O_DIRECT; False when the filesystem refuses (fall back)."""
        start = align_down(r.file_offset)
        want = r.file_offset + r.nbytes - start  # bytes from `start` that must arrive
        lo = r.slot_offset - (r.file_offset - start)
        with dest[lo : lo + align_up(want)] as out:
            ok = self._read_direct_exact(r, start, want, out)
        if ok:
            self._direct_bytes += r.nbytes
        return ok

    def _read_direct_exact(self, r: ReadRange, start: int, want: int, out: memoryview) -> bool:
        fd = self._dfds[r.file]
        got = 0
        while got < want:
            try:
                with out[got:] as part:
                    n = os.preadv(fd, [part], start + got)
            except OSError as e:
                if e.errno != errno.EINVAL or got:
                    raise ModelError(f"{r.file}: read error at byte {start + got}: {e.strerror}") from None
                self._fall_back(r.file, "read")
                return False
            self._reads += 1
            if n == 0:
                raise _truncated(r.file, start + got, r.file_offset, r.nbytes)
            got += n
            if got < want and got % ALIGN:  # partial non-aligned read can only mean end of file
                raise _truncated(r.file, start + got, r.file_offset, r.nbytes)
        return True

    def _read_exact(self, fd: int, file: str, offset: int, out: memoryview) -> None:
        got = 0
        while got < len(out):
            try:
                with out[got:] as part:
                    n = os.preadv(fd, [part], offset + got)
            except OSError as e:
                raise ModelError(f"{file}: read error at byte {offset + got}: {e.strerror}") from None
            self._reads += 1
            if n == 0:
                raise _truncated(file, offset + got, offset, len(out))
            got += n

    def stats(self) -> dict:
        """Bytes delivered, seconds spent in read_into, syscalls, and how many bytes went O_DIRECT."""
        busy = self._busy
        return {
            "bytes": self._bytes,
            "busy_s": busy,
            "reads": self._reads,
            "direct_bytes": self._direct_bytes,
            "gb_per_s": self._bytes / busy / 1e9 if busy else 0.0,
        }

    def close(self) -> None:
        for fds in (self._fds, self._dfds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()

    def __enter__(self) -> "LayerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ReaderPlan:
    """Which reader serves which ranges.

    Reader r opens `files[r]`. A range of file F goes to one of the readers that serve F,
    chosen round-robin by layer (`layer % len(those readers)`), so readers over the same
    files take turns layer by layer, and a layer split over drives is read by one reader per
    drive at once (each fills its part of the same slot).
    """

    files: tuple[tuple[str, ...], ...]  # per reader: the files it opens

    @property
    def n_readers(self) -> int:
        return len(self.files)

    def readers_of(self, file: str) -> list[int]:
        return [r for r, fs in enumerate(self.files) if file in fs]

    def split(self, layer: int, ranges: Sequence[ReadRange]) -> dict[int, list[ReadRange]]:
        """The ranges of one layer (or the globals, layer -1), grouped by the reader that reads them."""
        out: dict[int, list[ReadRange]] = {}
        for r in ranges:
            serving = self.readers_of(r.file)
            if not serving:
                raise ConfigError(f"{r.file}: no reader serves this file")
            out.setdefault(serving[layer % len(serving)], []).append(r)
        return out


def readers_for(files: Sequence[str], n_readers: int, dirs: Sequence[str] | None = None) -> ReaderPlan:
    """Assign a model's files to readers: all readers over all files, or reader r over the files under dirs[r]."""
    files = [os.fspath(f) for f in files]
    if n_readers < 1:
        raise ConfigError(f"need at least one reader (got {n_readers})")
    if not dirs:
        return ReaderPlan(tuple(tuple(files) for _ in range(n_readers)))
    if len(dirs) != n_readers:
        raise ConfigError(f"{len(dirs)} reader directories given for {n_readers} readers; give one per reader")
    roots = [os.path.realpath(d) for d in dirs]
    per_reader = []
    for root in roots:
        per_reader.append(tuple(f for f in files if os.path.realpath(f).startswith(root.rstrip(os.sep) + os.sep)))
    for f in files:
        if not any(f in fs for fs in per_reader):
            raise ConfigError(f"{f}: not under any reader directory ({', '.join(dirs)}); add its drive's directory")
    for d, fs in zip(dirs, per_reader):
        if not fs:
            raise ConfigError(f"reader directory {d} holds none of the model's files")
    return ReaderPlan(tuple(per_reader))
