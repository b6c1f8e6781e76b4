"""The engine's warm-up: a prompt chunk and a decode step before any request.

NOTE [ warm-up ]
A process's first steps pay once for what later steps reuse: the device's libraries set up, each
kernel loaded on its first launch, the decode graphs captured (graphs.py), the resident layers'
first load. On a small model these outweigh a short reply's decode: they stalled a reply's first
token and its first decode step (BENCHMARKS.md, "SmolLM2 through run-pipeline"). So where the
backend says it pays (`warm_up_pays`: on a GPU that holds every layer and its KV), the engine runs
at start, before any request, a chunk of two prompt tokens and one decode step after it, sampled
with every filter on, on a free row, its ids discarded: the chat's first turn and the server's
first request find the device ready. A request later given that row writes its KV from position 0
over the warm-up's before it attends to any slot (and the row keeps no prefix-reuse record), and
sends its own sampler. It runs on a new engine core only: later, a row's prefix record would name
KV that the warm-up overwrote.
"""

from __future__ import annotations

from layerstream.compute.sampling import SamplingParams
from layerstream.compute.step_meta import SeqStep
from layerstream.coordinator.core import sampler_start
from layerstream.errors import LayerstreamError

# the warm-up's sampler: the CLI's defaults (every filter on), a fixed seed: its decode step captures
# the sampling graph the CLI's replies replay (compute/sample_graphs.py); a penalty would take the eager path
WARM_PARAMS = SamplingParams()


def warm_up(core) -> None:
    """Run a two-token prompt chunk and a decode step on the first free row of EngineCore `core`'s
    backend, before any request; their ids are discarded (NOTE above)."""
    if core.has_unfinished() or core.steps or core.row_tokens or not core.free_rows:
        raise RuntimeError("internal: the warm-up runs on a new engine core, before any request")
    row, n = core.free_rows[0], min(2, core.step_tokens, core.ctx - 1)
    if n < 1:
        return  # (a context of one token has no room for a decode step)
    start = sampler_start(row, WARM_PARAMS, 0, [])
    positions = list(range(n))
    try:  # (slot i holds position i: the KV positions as a range, as a ring that has not slid gives them)
        core.backend.submit([SeqStep(row, [0] * n, positions, positions, range(n))], [1], [start], "none")
        core.backend.collect()
        core.backend.submit([SeqStep(row, [-1], [n], [n], range(n + 1))], [1], [], "none")
        core.backend.collect()
    except LayerstreamError as e:  # (a step that failed in the compute process: say when)
        raise LayerstreamError(f"the engine's first steps (its warm-up at start) failed: {e}") from None
