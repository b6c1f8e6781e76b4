"""An error's settings named as its caller gives them: run-pipeline's flags, or the Python API's names.

NOTE [ the caller's names ]
An error says which setting to change, and the Python API's caller sets none of run-pipeline's flags.
The messages are written once, in the flags (`--ctx`, `--vram-gb`), since most are raised deep in the
plan, the loader, the device or the KV ring, beside the command line's own checks. Where the Python API
calls into them (Engine.open and load, the engine's calls, the pipeline's option classes),
`python_names` rewrites, as the error leaves, each flag into the keyword or option field that sets it
(`lower --ctx or --batch` reads `lower ctx or max_seqs`; `--readers 0:` reads `ReaderOptions.count=0:`).
run-pipeline and bin/bench run inside `cli_names`, under which the text stays as written: the same
option classes and engine calls serve them, for users who typed the flags.
"""

from __future__ import annotations

import contextlib
import re

from layerstream.errors import LayerstreamError

# each flag's keyword (Engine.load, EngineConfig) or option class field (PipelineConfig's)
NAMES = {
    "ctx": "ctx", "batch": "max_seqs", "device": "device", "dtype": "dtype", "model": "model",
    "draft-model": "draft_model", "draft-tokens": "draft_tokens", "draft-policy": "draft_policy", "lookup": "lookup",
    "sink-tokens": "sink_tokens", "on-context-full": "on_context_full", "weights": "weights",
    "prefill-chunk": "prefill_chunk",
    "vram-gb": "Budget.vram_gb", "host-cache-gb": "Budget.host_cache_gb", "resident-layers": "Budget.resident_layers",
    "step-tokens": "Budget.step_tokens", "vram-slots": "Budget.vram_slots", "prefetch": "Budget.prefetch",
    "kv-on-host": "Budget.kv_on_host",
    "readers": "ReaderOptions.count", "reader-dir": "ReaderOptions.dirs", "read-threads": "ReaderOptions.threads",
    "direct-io": "ReaderOptions.direct",
    "cpu-share": "CpuOptions.share", "cpu-split": "CpuOptions.split", "cpu-threads": "CpuOptions.threads",
    "expert-cache-gb": "ExpertOptions.cache_gb", "moe-dense": "ExpertOptions.moe_dense",
    "expert-policy": "ExpertOptions.policy", "expert-prefetch": "ExpertOptions.prefetch",
    "stall-timeout": "ProcessOptions.stall_timeout_s", "transport": "ProcessOptions.transport",
}
# phrases whose words change with their flag's (a flag's value that is a word, a boolean flag)
PHRASES = (
    ("pass --model with the path of a .gguf file", "give the path of a .gguf file"),  # (or draft_model's)
    ("or pass --model FILE.gguf", "or give Engine.load a .gguf file's path"),
    ("or pass --model", "or give Engine.load a .gguf file's path"),
    ("--on-context-full slide", "on_context_full='slide'"),
    ("run without --chat", "call it without chat=True"),
    ("--chat:", "chat=True:"),
    ("--device cpu", "device='cpu'"),
    ("--weights dense", "weights='dense'"),
)
# a flag, and its value where one follows: a number, a quoted value, or a word that ends at a colon
FLAG = re.compile(r"--([a-z][a-z-]*)(?: (-?\d[\w.+-]*|'[^']*'|\"[^\"]*\"|[^\s:'\"]+(?=:)))?")

_cli = 0  # cli_names' depth: the command line's run, in which the flags stay


def for_python(text: str) -> str:
    """`text` with run-pipeline's flags named as the Python API sets them (NOTE above); flags of
    no such setting stay as written."""
    for flag, name in PHRASES:
        text = text.replace(flag, name)

    def name(m: re.Match) -> str:
        got = NAMES.get(m[1])
        if got is None:
            return m[0]
        return f"{got}={m[2]}" if m[2] is not None else got
    return FLAG.sub(name, text)


class python_names(contextlib.ContextDecorator):  # noqa: N801 - used as a function, as cli_names
    """Errors leaving this block (or the function it decorates) name the Python API's settings
    (for_python), outside cli_names. A plain object, not a generator: it wraps the engine core's
    step, and so costs nothing on a step that raises nothing."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if isinstance(e, LayerstreamError) and not _cli and e.args and isinstance(e.args[0], str):
            e.args = (for_python(e.args[0]), *e.args[1:])
        return False


@contextlib.contextmanager
def cli_names():
    """A command line's run: its errors keep the flags its user typed."""
    global _cli
    _cli += 1
    try:
        yield
    finally:
        _cli -= 1
