"""The streaming pipeline's options: one frozen dataclass, checked and parsed once when made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from layerstream.compute.cpu.config import CpuShareConfig, parse_cpu_share
from layerstream.errors import ConfigError

# on_progress(done, total, what): called while the pipeline starts ("processes") and while the
# first pass reads every layer once ("layers"); done == total ends each stage.
ProgressHook = Callable[[int, int, str], None]

TRANSPORTS = ("ipc", "tcp")


@dataclass(frozen=True)
class ExpertOptions:
    """How streamed mixture-of-experts layers' experts reach the device (--expert-cache-gb, ...)."""

    cache_gb: float | None = None  # device memory for streamed experts (default: one layer's slot)
    moe_dense: str = "resident"  # streamed MoE layers' attention and routers: resident (when they fit) or stream
    policy: str = "lfu"  # the expert cache's eviction: lfu or lru (compute/experts.py, ExpertCache)
    prefetch: int | None = None  # experts predicted and copied ahead a layer (None: the plan's default; 0: off)


@dataclass(frozen=True)
class PipelineConfig:
    """Budgets and process options of the streaming pipeline (errors in them: ConfigError, at once)."""

    readers: int = 1
    reader_dirs: tuple[str, ...] = ()
    read_threads: int | None = None  # threads of each reader (None: loader/reader.py's default_threads)
    direct: bool = False
    vram_gb: float | None = None
    host_cache_gb: float | None = None
    prefetch: int | None = None
    kv_on_host: bool | None = None
    resident_layers: int | None = None
    step_tokens: int | None = None  # tokens of one forward step at most (default: from the budget)
    transport: str = "ipc"
    host: str = "127.0.0.1"
    trace: bool = False
    ready_timeout_s: float = 180.0
    stall_timeout_s: float = 120.0  # a pending step with no progress for so long ends the run
    # the CPU's share of the streamed layers (compute/cpu/): 0 (default), auto (timed and chosen per
    # batch size on CUDA) or a fraction; and what it splits: "layers" (whole FFN matrices of some
    # layers) or "rows". Parsed once into `cpu`.
    cpu_share: str = "0"
    cpu_split: str = "layers"
    vram_slots: int | None = None  # the streamed layers' VRAM slots under a budget (plan.make_plan; default 2)
    cpu_threads: int | None = None  # CPU threads of the compute process (default: compute/cpu/sizing.py)
    experts: ExpertOptions = ExpertOptions()  # how streamed MoE layers' experts reach the device
    on_progress: ProgressHook | None = field(default=None, compare=False)  # see ProgressHook
    # processes spawned ahead for the children (supervisor.WarmStarts, NOTE [ warm starts ]); None: spawn each
    warm: Any = field(default=None, compare=False, repr=False)
    cpu: CpuShareConfig = field(init=False, repr=False)  # cpu_share and cpu_split, parsed

    def __post_init__(self) -> None:
        if self.readers < 1:
            raise ConfigError(f"--readers {self.readers}: must be at least 1")
        if self.reader_dirs and len(self.reader_dirs) != self.readers:
            raise ConfigError(f"--reader-dir given {len(self.reader_dirs)} times for --readers {self.readers}; "
                              "give one per reader")
        if self.read_threads is not None and self.read_threads < 1:
            raise ConfigError(f"--read-threads {self.read_threads}: must be at least 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"--cpu-threads {self.cpu_threads}: must be at least 1")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport {self.transport!r}: use one of {', '.join(TRANSPORTS)}")
        for name in ("ready_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} {getattr(self, name)}: must be above 0 seconds")
        object.__setattr__(self, "cpu", parse_cpu_share(self.cpu_share, self.cpu_split))


__all__ = ["ExpertOptions", "PipelineConfig", "ProgressHook", "CpuShareConfig", "parse_cpu_share"]
