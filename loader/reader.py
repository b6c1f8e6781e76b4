"""LayerReader: pread GGUF byte ranges straight into staging slots; and which reader reads what.

O_DIRECT: with `direct=True` each range is read as its aligned superset
`[align_down(file_offset), align_up(file_offset + nbytes))` into the slot at
`slot_offset - file_offset % 4096`. The slot layout (see NOTE [ slot layout and O_DIRECT ]
in layout.py) keeps `slot_offset % 4096 == file_offset % 4096` and reserves each run's
padding, so the extra head and tail bytes fall on the run's own slack and the wanted bytes
land exactly at `slot_offset`: no bounce buffer, no copy. A range that breaks that rule
(hand-made) or a destination that is not page-aligned is read buffered instead.

NOTE [ parallel reads ]
One thread filling new staging slots from the page cache moved 0.6 to 1.4 GB/s on this
project's CPU and 2.1 to 2.8 GB/s on the GPU machine (a new slot's pages are made as they are
written; BENCHMARKS.md, "Start-up"), where the page cache and a fast drive serve several threads
at once.
So a reader splits each range into pieces of CHUNK bytes (page-aligned for O_DIRECT) and
reads them on `threads` threads: os.preadv releases the GIL. read_into returns only once
every piece is done or has failed, so no thread writes into a slot after it is handed on.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from layerstream.cpus import usable_cpus
from layerstream.errors import ConfigError, ModelError
from layerstream.loader.layout import ALIGN, ReadRange, align_down, align_up


def _truncated(file: str, fd: int, offset: int, nbytes: int) -> ModelError:
    """The file (open as fd) ends inside data wanted: its size now (a read past the end said only where
    it began), as the message's byte."""
    try:
        at = os.fstat(fd).st_size
    except OSError:
        at = "?"
    return ModelError(
        f"{file}: file ends at byte {at}, inside data wanted at offset {offset} ({nbytes} bytes); "
        f"the file was truncated or replaced while in use; re-download it"
    )


def _address(buf: memoryview) -> int:
    return np.frombuffer(buf, dtype=np.uint8, count=min(1, len(buf))).ctypes.data


CHUNK = 8 << 20  # bytes of one read (a multiple of ALIGN): a 150 MB layer is ~19 pieces for the threads
MAX_THREADS = 64


def default_threads(cpus: int | None = None) -> int:
    """Read threads a reader uses by default: half the cores this process may run on, 2 to 8
    (NOTE [ parallel reads ]; the reads of a start or of a pass beyond the host cache come while
    compute waits for them)."""
    if cpus is None:
        cpus = usable_cpus()
    return max(2, min(8, cpus // 2))


class _Piece(NamedTuple):
    """One pread of a range's part: `want` bytes of the file from `start` into `out` (for a direct
    piece, `out` is the aligned length that O_DIRECT reads)."""

    r: ReadRange  # the range it belongs to (errors name it)
    direct: bool
    start: int
    want: int
    out: memoryview


class LayerReader:
    """Reads byte ranges of a model's files into a caller's buffer (a shared-memory slot)."""

    def __init__(self, files: Sequence[str], direct: bool = False, threads: int = 1):
        if not 1 <= threads <= MAX_THREADS:
            raise ConfigError(f"--read-threads {threads}: use 1 to {MAX_THREADS}")
        self.files = [os.fspath(f) for f in files]
        self.direct = direct
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="layer-read") if threads > 1 else None
        self._fds: dict[str, int] = {}  # buffered descriptors
        self._dfds: dict[str, int] = {}  # O_DIRECT descriptors (direct mode, where supported)
        self._refused: set[str] = set()  # files whose O_DIRECT reads the filesystem refused
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
        """O_DIRECT is refused for f (e.g. on tmpfs or some FUSE mounts): read it buffered. Its
        descriptor stays open until close(), since another read thread may still be using it."""
        self._refused.add(f)
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
        pieces: list[_Piece] = []
        total = 0
        try:
            for r in ranges:
                r = ReadRange(*r)
                if r.slot_offset < 0 or r.slot_offset + r.nbytes > len(dest):
                    raise ConfigError(
                        f"range {r.file}@{r.file_offset}+{r.nbytes} -> slot offset {r.slot_offset} "
                        f"does not fit a {len(dest)}-byte slot; make the slots larger"
                    )
                if r.file not in self._fds:
                    raise ConfigError(f"{r.file}: this reader was not opened on that file")
                direct = (base_aligned and r.file in self._dfds and r.file not in self._refused
                          and self._direct_ok(r, len(dest)))
                pieces += self._pieces(r, dest, direct)
                total += r.nbytes
            results = self._run(pieces)
        finally:
            for p in pieces:
                p.out.release()
            self._busy += time.perf_counter() - t0
        refused = [p for p, (_, _, fell_back) in zip(pieces, results) if fell_back]
        if refused:
            self._fall_back(refused[0].r.file, "read")
        self._reads += sum(n for n, _, _ in results)
        self._direct_bytes += sum(d for _, d, _ in results)
        self._bytes += total
        return total

    @staticmethod
    def _direct_ok(r: ReadRange, dest_len: int) -> bool:
        head = r.file_offset % ALIGN
        return r.slot_offset % ALIGN == head and r.slot_offset - head + align_up(head + r.nbytes) <= dest_len

    @staticmethod
    def _pieces(r: ReadRange, dest: memoryview, direct: bool) -> list[_Piece]:
        """r cut into CHUNK-sized reads. A direct range is read as its aligned superset
        [align_down(file_offset), ...) landing `file_offset % ALIGN` bytes before slot_offset."""
        if direct:
            start = align_down(r.file_offset)
            lo, end = r.slot_offset - (r.file_offset - start), r.file_offset + r.nbytes
        else:
            start, lo, end = r.file_offset, r.slot_offset, r.file_offset + r.nbytes
        out = []
        for a in range(start, end, CHUNK):
            want = min(CHUNK, end - a)
            span = align_up(want) if direct else want
            out.append(_Piece(r, direct, a, want, dest[lo + a - start : lo + a - start + span]))
        return out

    def _run(self, pieces: list[_Piece]) -> list[tuple[int, int, bool]]:
        """Read every piece (on the pool's threads where there is one); each one's (syscalls,
        direct bytes, fell back). Waits for all before raising the first piece's error."""
        if self._pool is None or len(pieces) < 2:
            return [self._read_piece(p) for p in pieces]
        futures = [self._pool.submit(self._read_piece, p) for p in pieces]
        errors = [f.exception() for f in futures]  # (waits for each)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    def _read_piece(self, p: _Piece) -> tuple[int, int, bool]:
        if p.direct and p.r.file not in self._refused:
            got = self._read_direct_exact(p)
            if got is not None:
                return got, p.want - max(0, p.r.file_offset - p.start), False  # (not the aligned head)
        n = self._read_exact(self._fds[p.r.file], p, p.start, p.want)
        return n, 0, p.direct

    def _read_direct_exact(self, p: _Piece) -> int | None:
        """Read p with O_DIRECT; its syscalls, or None when the filesystem refuses (read it buffered)."""
        fd, got, calls = self._dfds[p.r.file], 0, 0
        while got < p.want:
            try:
                with p.out[got:] as part:
                    n = os.preadv(fd, [part], p.start + got)
            except OSError as e:
                if e.errno != errno.EINVAL or got:
                    raise ModelError(f"{p.r.file}: read error at byte {p.start + got}: {e.strerror}") from None
                return None
            calls += 1
            if n == 0:
                raise _truncated(p.r.file, fd, p.r.file_offset, p.r.nbytes)
            got += n
            if got < p.want and got % ALIGN:  # partial non-aligned read can only mean end of file
                raise _truncated(p.r.file, fd, p.r.file_offset, p.r.nbytes)
        return calls

    def _read_exact(self, fd: int, p: _Piece, offset: int, want: int) -> int:
        """Read `want` bytes from `offset` into the start of p.out; the syscalls it took."""
        got = calls = 0
        while got < want:
            try:
                with p.out[got:want] as part:
                    n = os.preadv(fd, [part], offset + got)
            except OSError as e:
                raise ModelError(f"{p.r.file}: read error at byte {offset + got}: {e.strerror}") from None
            calls += 1
            if n == 0:
                raise _truncated(p.r.file, fd, p.r.file_offset, p.r.nbytes)
            got += n
        return calls

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
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
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
        some = f"{len(dirs)} reader {'directory' if len(dirs) == 1 else 'directories'}"
        raise ConfigError(f"{some} given for {n_readers} reader{'s' if n_readers > 1 else ''}; give one per reader")
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
