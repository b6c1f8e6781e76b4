"""The staging arena: a POSIX shared-memory segment of equal, page-aligned slots.

NOTE [ arena ownership ]
One process (staging) creates the arena and is the only one that unlinks it;
readers and the compute process attach by name and only map it. Python's resource
tracker (3.11, 3.12) registers every SharedMemory it opens, attached ones too, and unlinks
them when the process exits; worse, `spawn` children share their parent's tracker, so an
attached child that unregistered afterwards would also cancel the owner's registration.
Attaching therefore never registers (`track=False` on 3.13+, the register call suppressed
while opening before that). The owner stays registered, so even a SIGKILLed owner's
segment is unlinked by the tracker; a normal exit or an exception is handled by a
finalizer that unlinks at interpreter exit. A SIGKILL of the whole process group takes the
tracker too: the segment's name carries its creator's pid (`layerstream-PID-pPPID-xxxxxxxx`), and
every `Arena.create` first removes this user's segments whose creator is gone
(`sweep_orphans`). The creator lives as long as the segment is in use (staging for a run),
so a segment whose creator is gone is nobody's, once its run is gone too: the name also
carries the creator's parent, and while that lives (the run's coordinator, whose staging was
killed) the segment is left to it, which removes it and takes it off the resource tracker's
list (another run's sweep would leave the tracker to warn of a leak at exit).
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import stat
import sys
import threading
import weakref
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from layerstream.errors import ConfigError, PipelineError
from layerstream.proto.messages import ArenaDesc

PREFIX = "layerstream-"
PAGE = 4096
SHM_DIR = "/dev/shm"
# what Arena.create names a segment: its creator's pid and its creator's parent's (-pPID; a name
# without one, from an older version, is judged by its creator alone)
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)(?:-p(\d+))?-[0-9a-f]{8}")

_attach_lock = threading.Lock()

# NOTE [ populating the arena ]
# A page of a new shared-memory segment is allocated and zeroed when it is first touched: a
# reader writing a layer into a new slot moved 0.5 to 1.4 GB/s on one thread (this project's
# 2-core machine), where it moves 5 to 10 GB/s into pages that exist. Every slot of the host
# cache is written once in the first pass, so that is the host cache's fill rate, and on CUDA
# the compute process's cudaHostRegister of the whole arena allocates the pages it finds
# missing in its own one thread. So the staging process allocates them ahead, on several
# threads at once, as it reports the arena (madvise MADV_POPULATE_WRITE, Linux 5.14:
# it makes pages without writing to them, so it is safe beside readers already writing, and
# a failure only leaves pages to be made on first touch, as before).
POPULATE_CHUNK = 64 << 20
_MADV_POPULATE_WRITE = 23
_libc = None


def _populate_write(addr: int, n: int) -> bool:
    """madvise(MADV_POPULATE_WRITE) over [addr, addr + n); False where the kernel cannot."""
    global _libc
    try:
        if _libc is None:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.madvise.restype = ctypes.c_int
            _libc = lib
        return _libc.madvise(addr, n, _MADV_POPULATE_WRITE) == 0
    except (OSError, AttributeError):  # no libc to call (not Linux)
        return False


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Bytes free in the shared-memory filesystem, or None where it cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _alive(pid: int) -> bool:
    """Whether process pid runs; a zombie (killed, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]  # (the name before it may hold spaces)
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _named(shm_dir: str) -> list[tuple[str, int, int | None]]:
    """(name, creator pid, its parent's pid or None) of each segment in `shm_dir` named by Arena.create."""
    try:
        names = os.listdir(shm_dir)
    except OSError:  # no /dev/shm here: nothing of ours can be in it
        return []
    return [(n, int(m.group(1)), int(m.group(2)) if m.group(2) else None)
            for n in names if (m := _NAME.fullmatch(n)) is not None]


def sweep_orphans(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink this user's segments named by Arena.create whose creator and its parent are gone
    (NOTE [ arena ownership ]); returns their names. Other names, other users' segments and
    those of live runs are left alone."""
    removed = []
    for name, creator, parent in _named(shm_dir):
        if _alive(creator) or (parent is not None and _alive(parent)):
            continue  # (a run whose staging died while its coordinator lives: the coordinator removes it)
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
            if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                continue
            os.unlink(path)
        except OSError:  # gone meanwhile (its run's coordinator removed it), or not ours to remove
            continue
        removed.append(name)
    return removed


def segments_of(pid: int, parent: int, shm_dir: str = SHM_DIR) -> list[str]:
    """The segments that Arena.create made in process `pid` under `parent` (their names say so):
    what a staging that died before it named its arena leaves for its run to remove."""
    return [name for name, creator, up in _named(shm_dir) if (creator, up) == (pid, parent)]


def remove_orphan(name: str) -> None:
    """Unlink the segment of an owner that died (and take it off this process tree's resource
    tracker, which would otherwise report a leak at exit); a missing segment is fine."""
    try:
        shm = _open_untracked(name)
    except FileNotFoundError:
        return
    shm.close()
    try:
        shm.unlink()  # shm_unlink, and (before 3.13) unregister from the tracker spawn children share
    except FileNotFoundError:
        return
    if sys.version_info >= (3, 13):  # an untracked handle's unlink leaves the owner's registration
        resource_tracker.unregister(shm._name, "shared_memory")


def remove_staging_arena(name: str | None, proc) -> None:
    """Remove the arena of a staging process `proc` that is gone (its own cleanup never ran): by the
    name it reported, or, dead before it did, by the names that carry its pid and this process's."""
    if name is not None:
        remove_orphan(name)
    elif proc is not None and proc.pid is not None and proc.exitcode is not None:
        for segment in segments_of(proc.pid, os.getpid()):
            remove_orphan(segment)


def _open_untracked(name: str) -> SharedMemory:
    """Attach to an existing segment without registering it with the resource tracker."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    with _attach_lock:
        register = resource_tracker.register

        def skip_shm(rname, rtype):
            if rtype != "shared_memory":
                register(rname, rtype)

        resource_tracker.register = skip_shm
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def _close_lazily(shm: SharedMemory) -> None:
    """Close shm; while views of it are alive, leave the mapping to die with the last of them.

    A slot view held anywhere (a caller, or an exception's traceback) would make
    SharedMemory.close raise BufferError, now and again in its __del__. Dropping our own
    references instead lets the mmap object unmap itself when its last export goes.
    """
    try:
        shm.close()
    except BufferError:
        if shm._fd >= 0:
            os.close(shm._fd)
            shm._fd = -1
        shm._buf = None
        shm._mmap = None


def _unlink_at_exit(shm: SharedMemory) -> None:
    """Finalizer of an owner arena: unlink the segment and unmap it."""
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    _close_lazily(shm)


class Arena:
    """N equal slots of one shared-memory segment; slot i spans [i*slot_bytes, (i+1)*slot_bytes)."""

    def __init__(self, shm: SharedMemory, n_slots: int, slot_bytes: int, owner: bool):
        self._shm = shm
        self.name = shm.name.lstrip("/")
        self.n_slots = n_slots
        self.slot_bytes = slot_bytes
        self.owner = owner
        self._finalizer = weakref.finalize(self, _unlink_at_exit, shm) if owner else None
        self._closed = False
        base = self._base_address()
        if base % PAGE:
            raise PipelineError(f"arena {self.name}: segment base {base:#x} is not {PAGE}-aligned")

    def _base_address(self) -> int:
        a = np.frombuffer(self._shm.buf, dtype=np.uint8, count=1)
        addr = a.ctypes.data
        del a
        return addr

    @classmethod
    def create(cls, n_slots: int, slot_bytes: int, name: str | None = None) -> "Arena":
        """Create a new segment (this process owns it and unlinks it); slot_bytes rounds up to 4096."""
        if n_slots < 1 or slot_bytes < 1:
            raise ConfigError(f"arena needs at least one slot of at least one byte (got {n_slots} x {slot_bytes})")
        slot_bytes = -(-slot_bytes // PAGE) * PAGE
        need = n_slots * slot_bytes
        sweep_orphans()  # (before the space check: a killed run's segment holds space)
        free = shm_free_bytes()
        if free is not None and need > free:
            raise ConfigError(
                f"staging arena needs {_gib(need)} ({n_slots} slots of {_gib(slot_bytes)}) but {SHM_DIR} has "
                f"{_gib(free)} free; lower the host-cache size or the number of slots, or enlarge {SHM_DIR} "
                f"(e.g. docker --shm-size, or mount -o remount,size=... {SHM_DIR})"
            )
        name = name or f"{PREFIX}{os.getpid()}-p{os.getppid()}-{secrets.token_hex(4)}"
        try:
            shm = SharedMemory(name=name, create=True, size=need)
        except FileExistsError:
            raise ConfigError(f"shared-memory segment {name} already exists; pick another name") from None
        except OSError as e:
            raise ConfigError(f"cannot create a {_gib(need)} shared-memory segment {name}: {e}") from None
        return cls(shm, n_slots, slot_bytes, owner=True)

    @classmethod
    def attach(cls, name: str, n_slots: int, slot_bytes: int) -> "Arena":
        """Map an existing segment made by Arena.create (never unlinks it)."""
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise PipelineError(f"shared-memory arena {name} does not exist (did its owner exit?)") from None
        if shm.size < n_slots * slot_bytes:
            shm.close()
            raise PipelineError(f"arena {name} has {shm.size} bytes, fewer than {n_slots} slots of {slot_bytes}")
        return cls(shm, n_slots, slot_bytes, owner=False)

    @classmethod
    def from_wire(cls, desc: ArenaDesc) -> "Arena":
        """Attach to the arena that `desc` (from describe(), in another process) names."""
        return cls.attach(desc.name, desc.n_slots, desc.slot_bytes)

    def describe(self) -> ArenaDesc:
        """What another process needs to attach."""
        return ArenaDesc(self.name, self.n_slots, self.slot_bytes)

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def _check(self, i: int) -> None:
        if self._closed:
            raise PipelineError(f"arena {self.name} is closed")
        if not 0 <= i < self.n_slots:
            raise IndexError(f"slot {i} out of range 0..{self.n_slots - 1}")

    def slot_view(self, i: int) -> memoryview:
        """Writable view of slot i (release it, or let it go, before close())."""
        self._check(i)
        return self._shm.buf[i * self.slot_bytes : (i + 1) * self.slot_bytes]

    def slot_array(self, i: int) -> np.ndarray:
        """Slot i as a writable uint8 array (no copy)."""
        self._check(i)
        return np.frombuffer(self._shm.buf, dtype=np.uint8, count=self.slot_bytes, offset=i * self.slot_bytes)

    def slot_address(self, i: int) -> int:
        """Virtual address of slot i in this process (for cudaHostRegister and alignment checks)."""
        self._check(i)
        return self._base_address() + i * self.slot_bytes

    def populate(self, threads: int, stop: threading.Event | None = None) -> int:
        """Allocate the segment's pages now, on `threads` threads (NOTE [ populating the arena ]);
        returns the bytes done (less where `stop` was set, or the kernel cannot populate)."""
        base, size = self._base_address(), self.nbytes
        step, n_threads = POPULATE_CHUNK, max(1, threads)
        done = [0] * n_threads  # bytes each thread made: thread i takes chunks i, i + n_threads, ... (no lock)

        def work(i: int) -> None:
            for lo in range(i * step, size, n_threads * step):
                n = min(step, size - lo)
                if (stop is not None and stop.is_set()) or not _populate_write(base + lo, n):
                    return
                done[i] += n

        pool = [threading.Thread(target=work, args=(i,), name=f"arena-populate-{i}", daemon=True)
                for i in range(n_threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return sum(done)

    def close(self) -> None:
        """Unmap the segment in this process (at once, or when the last slot view or array dies)."""
        if self._closed:
            return
        self._closed = True
        _close_lazily(self._shm)

    def unlink(self) -> None:
        """Remove the segment's name (owner only); mappings stay valid until closed."""
        if not self.owner:
            raise PipelineError(f"arena {self.name} is attached, not owned: only its creator unlinks it")
        if self._finalizer is not None and self._finalizer.alive:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            self._finalizer.detach()  # (after the unlink: one cut short leaves the segment to the finalizer)

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            if self.owner:
                self.unlink()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "attached"
        return f"Arena({self.name!r}, {self.n_slots} x {self.slot_bytes} bytes, {role})"
