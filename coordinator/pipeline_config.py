"""The streaming pipeline's options: frozen dataclasses by concept, checked and parsed once when made."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from layerstream.bounds import MAX_GB, MAX_READERS, MAX_WINDOW, PIPELINE_COUNTS
from layerstream.compute.cpu.config import CpuShareConfig, parse_cpu_share
from layerstream.compute.expert_policy import EXPERT_POLICIES
from layerstream.coordinator.api_names import python_names
from layerstream.coordinator.spelling import reader_dirs_problem
from layerstream.cpus import too_many_threads
from layerstream.errors import ConfigError, shown

# on_progress(done, total, what): called while the pipeline starts ("processes") and while the
# first pass reads every layer once ("layers"); done == total ends each stage.
ProgressHook = Callable[[int, int, str], None]

TRANSPORTS = ("ipc", "tcp")


def flag(name: str, v, none: str | None = None) -> None:
    """A ConfigError where v is not a bool ("no" and 0 were taken as what their truth says), or
    None where `none` says what None means."""
    if not isinstance(v, bool) and not (none is not None and v is None):
        raise ConfigError(f"{name}={v!r}: must be True or False" + (f" (or None: {none})" if none else ""))


@dataclass(frozen=True)
class Budget:
    """What the plan is given (plan.make_plan's inputs; None: the plan's default)."""

    vram_gb: float | None = None
    host_cache_gb: float | None = None
    resident_layers: int | None = None
    kv_on_host: bool | None = None
    prefetch: int | None = None  # layers staged ahead of compute
    step_tokens: int | None = None  # tokens of one forward step at most (default: from the budget)
    vram_slots: int | None = None  # the streamed layers' VRAM slots under a budget (default 2)
    evaluates: bool = True  # steps may ask every position's logits (perplexity); False: a run that only generates
    job: tuple[int, int] | None = None  # (prompt tokens, reply tokens) of a run that answers one known prompt

    def __post_init__(self) -> None:
        for name in ("vram_gb", "host_cache_gb"):
            v = getattr(self, name)
            if v is not None and not _gib(v):
                raise ConfigError(f"{name}={v!r}: give GiB as a finite number from 0 to {MAX_GB} (or None: the "
                                  "plan's default)")
        # (the plan checked these only when the pipeline opened, named as run-pipeline's flags)
        for name in ("resident_layers", "prefetch", "step_tokens", "vram_slots"):
            v, (low, high) = getattr(self, name), PIPELINE_COUNTS[name]
            if v is not None and not _whole(v, low, high):
                raise ConfigError(f"{name}={v!r}: give a whole number from {low} to {high} (or None: the plan's default)")
        flag("kv_on_host", self.kv_on_host, none="the plan's default")  # (a probe's: "no" put the KV in host memory)
        flag("evaluates", self.evaluates)
        if self.job is not None and not (isinstance(self.job, tuple) and len(self.job) == 2 and _whole(self.job[0], 0)
                                         and _whole(self.job[1], 1)):
            raise ConfigError(f"job={self.job!r}: give (prompt tokens, reply tokens), whole numbers from 0 and from 1 "
                              "(or None: no known job)")


@dataclass(frozen=True)
class ReaderOptions:
    """The reader processes: how many (at most MAX_READERS: each is a process of its own, and an
    unbounded count ran a machine out of memory), the folder each reads from, their threads,
    O_DIRECT."""

    count: int = 1  # --readers
    dirs: tuple[str, ...] = ()  # --reader-dir, one per reader (loader/layout.py, readers_for)
    threads: int | None = None  # threads of each reader (None: loader/reader.py's default_threads)
    direct: bool = False

    @python_names()  # (its messages name run-pipeline's flags: NOTE [ the caller's names ])
    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, numbers.Integral) \
                or not 1 <= self.count <= MAX_READERS:
            raise ConfigError(f"--readers {self.count!r}: give 1 to {MAX_READERS}")
        if isinstance(self.dirs, (str, bytes)):  # (its letters were taken for folders)
            raise ConfigError(f"--reader-dir {self.dirs!r}: give a list of folders, one per reader")
        if why := reader_dirs_problem(len(self.dirs), self.count):  # (run-pipeline refuses it first: args.py)
            raise ConfigError(why)
        if self.threads is not None and not _whole(self.threads, 1):
            raise ConfigError(f"--read-threads {self.threads!r}: must be a whole number, at least 1")
        if not isinstance(self.direct, bool):  # ("no" was taken as true)
            raise ConfigError(f"--direct-io {self.direct!r}: must be True or False")


@dataclass(frozen=True)
class CpuOptions:
    """The CPU's share of the streamed layers (compute/cpu/) and the compute process's threads."""

    # "default" (compute/cpu/config.py), 0, auto (timed and chosen per batch size on CUDA), a fraction
    # or fractions by batch size; and what it splits: "layers" (whole FFN matrices of some layers) or
    # "rows". Parsed once into `parsed`.
    share: str = "default"
    split: str = "layers"
    threads: int | None = None  # CPU threads of the compute process (default: compute/cpu/sizing.py)
    parsed: CpuShareConfig = field(init=False, repr=False)  # share and split, parsed

    @python_names()
    def __post_init__(self) -> None:
        if self.threads is not None and not _whole(self.threads, 1):  # (a str: TypeError)
            raise ConfigError(f"--cpu-threads {self.threads!r}: must be a whole number, at least 1")
        if why := too_many_threads(self.threads):  # (as run-pipeline's -t)
            raise ConfigError(f"--cpu-threads {self.threads}: {why}")
        object.__setattr__(self, "parsed", parse_cpu_share(self.share, self.split))


@dataclass(frozen=True)
class ExpertOptions:
    """How streamed mixture-of-experts layers' experts reach the device (--expert-cache-gb, ...)."""

    cache_gb: float | None = None  # device memory for streamed experts (default: a layer's slot and the budget's rest)
    moe_dense: str = "resident"  # streamed MoE layers' attention and routers: resident (when they fit) or stream
    policy: str = "lfu"  # the expert cache's eviction: lfu or lru (compute/experts.py, ExpertCache)
    prefetch: int | None = None  # experts predicted and copied ahead a layer (None: the plan's default; 0: off)

    @python_names()
    def __post_init__(self) -> None:  # (a bad policy failed in the compute process, a bad size ran)
        if self.cache_gb is not None and not _gib(self.cache_gb):
            raise ConfigError(f"--expert-cache-gb {self.cache_gb!r}: give GiB as a finite number from 0 to {MAX_GB} "
                              "(or None: the plan's default)")
        for flag, got, ok in (("moe-dense", self.moe_dense, ("resident", "stream")),
                              ("expert-policy", self.policy, EXPERT_POLICIES)):
            if got not in ok:
                raise ConfigError(f"--{flag} {got!r}: use {' or '.join(ok)}")
        low, high = PIPELINE_COUNTS["expert_prefetch"]  # (run-pipeline's bound: 10**30 was taken)
        if self.prefetch is not None and not _whole(self.prefetch, low, high):
            raise ConfigError(f"--expert-prefetch {self.prefetch!r}: give a whole number from {low} to {high} (0: off; "
                              "None: the plan's default)")


@dataclass(frozen=True)
class ProcessOptions:
    """How the coordinator links to its children and watches them."""

    transport: str = "ipc"
    host: str = "127.0.0.1"
    trace: bool = False
    ready_timeout_s: float = 180.0
    stall_timeout_s: float = 120.0  # a pending step with no progress for so long ends the run

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport {self.transport!r}: use one of {', '.join(TRANSPORTS)}")
        if not isinstance(self.host, str) or not self.host:  # (a bad name fails as the links bind: ZMQError)
            raise ConfigError(f"host={self.host!r}: give the address the children's links bind to, as a string")
        flag("trace", self.trace)
        for name in ("ready_timeout_s", "stall_timeout_s"):  # (a str or None: TypeError)
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < float("inf"):
                raise ConfigError(f"{name} {v!r}: must be above 0 seconds")


@dataclass(frozen=True)
class PipelineConfig:
    """Budgets and process options of the streaming pipeline, by concept (errors in them: ConfigError, at once)."""

    budget: Budget = Budget()
    readers: ReaderOptions = ReaderOptions()
    cpu: CpuOptions = CpuOptions()
    experts: ExpertOptions = ExpertOptions()  # how streamed MoE layers' experts reach the device
    procs: ProcessOptions = ProcessOptions()
    on_progress: ProgressHook | None = field(default=None, compare=False)  # see ProgressHook
    # processes spawned ahead for the children (supervisor.WarmStarts, NOTE [ warm starts ]); None: spawn each
    warm: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, kind in (("budget", Budget), ("readers", ReaderOptions), ("cpu", CpuOptions),
                           ("experts", ExpertOptions), ("procs", ProcessOptions)):
            if not isinstance(getattr(self, name), kind):  # (a dict failed deep in the launch: AttributeError)
                raise ConfigError(f"PipelineConfig {name}={getattr(self, name)!r}: give a {kind.__name__}(...)")
        if self.warm is not None and not callable(getattr(self.warm, "take", None)):  # (an AttributeError at the start)
            raise ConfigError(f"PipelineConfig warm={shown(self.warm)}: leave it None (the launcher's own hand-off of "
                              "processes spawned ahead)")
        if self.on_progress is not None and not callable(self.on_progress):  # (a TypeError deep in the start)
            raise ConfigError(f"PipelineConfig on_progress={self.on_progress!r}: give a function of (done, total, "
                              "what), or None")


__all__ = ["Budget", "CpuOptions", "CpuShareConfig", "ExpertOptions", "PipelineConfig", "ProcessOptions",
           "ProgressHook", "ReaderOptions", "parse_cpu_share"]


BYTES_A_TOKEN = 4  # a prompt's tokens estimated from its UTF-8 bytes (English text: about four a token)
# an interactive chat's turn, for its plan's step: the mean prompt of LMSYS-Chat-1M's million
# conversations (Zheng et al. 2023, "LMSYS-Chat-1M", Table 1: 69.5 tokens a prompt); a turn's earlier
# ones stay in the KV (turn.py's reused tokens), so a turn feeds only its own message
CHAT_TURN_TOKENS = 70


def _one_prompt(args) -> bool:
    """Whether the run answers a prompt of the command line or a chat's turns, without drafts: not
    the server's requests, --perplexity's windows or a run that drafts."""
    return not (args.serve or args.perplexity or args.lookup or args.draft_model)


def budget_use(args) -> dict:
    """The Budget fields run-pipeline's options say about the run's use: whether steps may evaluate
    every position (`--perplexity`; a server's request may ask for more drafts than the command
    line's, so it keeps the evaluating plan's rows: NOTE [ rows of logits ] in memory.py), and the
    job the plan's step is chosen for (NOTE [ step tokens ]), without drafts: a prompt given on the
    command line, or an interactive chat's typical turn (CHAT_TURN_TOKENS); its tokens, about (with
    --chat, its system message and room for the chat template), and -n's, at most 4096 (past it the
    decode passes decide alone)."""
    prompt = " ".join(args.prompt)
    one = (bool(prompt) or args.chat) and _one_prompt(args)
    tokens = len(prompt.encode()) // BYTES_A_TOKEN if prompt else CHAT_TURN_TOKENS
    if args.chat:
        tokens += len((args.system or "").encode()) // BYTES_A_TOKEN + 48
    reply = min(args.max_tokens, 4096)  # (-n -1 is a whole context's: args maps it to the largest)
    return {"evaluates": bool(args.perplexity or args.serve),
            "job": (tokens + (0 if args.chat else 16), reply) if one else None}


JOB_CTX_SPECIALS = 16  # tokens a one-prompt run's context keeps beyond its bound on the prompt's: BOS and the like


def job_ctx(args) -> int | None:
    """NOTE [ a job's context ]
    The KV ring a run that answers one prompt given as text can fill: the prompt's tokens and -n's.
    A token spans a byte of the prompt at least (a byte-level BPE's, a SentencePiece's byte fallback),
    but for the space a SentencePiece tokenizer puts before each stretch of text, which follows an
    added token of one byte at most (a probe's "\nB" * 100: 301 tokens of 200 bytes). So twice the
    prompt's UTF-8 bytes and JOB_CTX_SPECIALS bound its tokens before the tokenizer loads.
    The plan sizes the device's KV by the context, and a ring of 4096 tokens (the default) held a
    layer's room or more at small budgets (the 8B's and Qwen3-30B-A3B's at 4 GiB) for a reply of 256.
    None where the run's tokens are not known so: a chat (its template adds tokens), the server,
    --perplexity, drafts (they write past the accepted tokens), -n -1 and a sliding window's."""
    prompt = " ".join(args.prompt)
    if not prompt or args.chat or not _one_prompt(args):
        return None
    if args.max_tokens is None or args.max_tokens >= MAX_WINDOW or args.on_context_full == "slide":
        return None  # (-n -1: args maps it to the largest)
    return 2 * len(prompt.encode()) + JOB_CTX_SPECIALS + args.max_tokens


def _whole(v, low: int, high: float = float("inf")) -> bool:
    """Whether v is a whole number (not a bool) from `low` to `high`."""
    return not isinstance(v, bool) and isinstance(v, numbers.Integral) and low <= v <= high


def _gib(v) -> bool:
    """Whether v is a size in GiB: a finite number (not a bool) from 0 to MAX_GB."""
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and 0 <= v <= MAX_GB
