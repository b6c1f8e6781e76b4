"""The residency plan's tests' common ground: models of real shapes (no files) and a plan of them."""

from __future__ import annotations

from layerstream.coordinator.plan import GiB, make_plan
from layerstream.loader.layout import layer_layouts
from layerstream.loader.synth import shaped_index


def shaped(shape: str):
    """(index, layouts) of a synthetic model of `shape`, as the plan sees it."""
    index = shaped_index(shape)
    return index, layer_layouts(index)


def plan(model, gib, **kw):
    """The plan of `model` under `gib` GiB (None: no limit), batch 1, 4096 tokens, blocks kept."""
    index, layouts = model
    # (the host's memory as a large machine's: these check the device's arithmetic, not this host's RAM)
    kw = dict(host_cache_bytes=0, dtype_bytes=2, ctx=4096, max_seqs=1, quantized=True, host_bytes=512 * GiB) | kw
    return make_plan(index, layouts, vram_bytes=None if gib is None else int(gib * GiB), **kw)
