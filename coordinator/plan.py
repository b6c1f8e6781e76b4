"""The residency plan: what stays in VRAM, what streams through it, where each layer's KV lives.

NOTE [ the plan counts every byte ]
The compute device holds, and the plan counts: resident layers (as their GGUF blocks when the
weights stay quantized, else dequantized), the output head and norm, `vram_slots` ring slots
for streamed layers, the KV cache of the first `kv_device_layers` layers, two device buffers
for the host-KV layers' caches in flight, the scratch of one step of `step_tokens` tokens
(activations, attention temporaries, logits, the dequantization buffer of the prompt path),
and the allocator's slack. A mixture-of-experts model adds its expert cache, the chosen
experts a step holds beyond it (those the cache does not keep), and, when they fit
after the KV, every streamed layer's tensors but its experts (attention, router, norms: about a
thirtieth of a Qwen3-30B-A3B layer), so that a decode step copies only the chosen experts, as
llama.cpp users keep them with `-ot exps=CPU`. The compute process caps torch's allocator at the budget
(`set_per_process_memory_fraction`), so the peak reserved memory never exceeds `--vram-gb`:
if the plan undercounted, a step fails with an out-of-memory error instead of overrunning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.compute.model import ATTN_TEMP_BYTES
from layerstream.compute.qlinear import FUSED_MIN_OF_TYPES, HEAD_CHUNK, model_scratch_elems
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import ModelIndex
from layerstream.loader.layout import LayerLayout

GiB = 1 << 30
MiB = 1 << 20
SLOT_ROUND = 1 << 16
SLACK_FRACTION = 0.04  # the caching allocator's rounding and fragmentation
SLACK_MIN = 128 * MiB


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class Plan:
    """Made once from the budgets; every process gets the part it needs."""

    resident: tuple[int, ...]  # layers kept on the compute device after their first load
    streamed: tuple[int, ...]  # layers copied in every forward pass
    vram_slots: int  # VRAM ring slots for streamed layers
    kv_device_layers: int  # layers 0..kv_device_layers-1 keep their KV on the device, the rest on the host
    prefetch: int  # layers staged ahead of compute
    stream_slots: int  # staging slots for streaming
    cache_layers: int  # further staging slots that keep layers in host RAM between passes
    slot_bytes: int
    step_tokens: int  # tokens of one forward step at most (prompt chunks; decode batches up to max_seqs)
    device_bytes: int  # what the plan expects to use on the compute device, slack included
    budget_bytes: int | None  # the device budget (None: no limit)
    parts: tuple[tuple[str, int], ...] = ()  # device_bytes by item, for the stats table
    cpu_share_bytes: int = 0  # host memory of the CPU share's packed rows, at most
    expert_cache_bytes: int = 0  # device memory for streamed experts (mixture-of-experts models)
    dense_resident: bool = False  # streamed MoE layers keep all but their experts on the device (NOTE below)
    expert_prefetch: int = 0  # experts a layer copied ahead of its router, in each of two sets of slots

    @property
    def n_slots(self) -> int:
        return self.stream_slots + self.cache_layers

    @property
    def kv_on_host(self) -> bool:
        """Any layer's KV in host memory."""
        return self.kv_device_layers < len(self.resident) + len(self.streamed)

    def describe(self) -> str:
        n = len(self.resident) + len(self.streamed)
        kv = ("KV on the device" if self.kv_device_layers == n else "KV in host memory" if not self.kv_device_layers
              else f"KV of {self.kv_device_layers} layers on the device, {n - self.kv_device_layers} in host memory")
        budget = "" if self.budget_bytes is None else f" of {_gib(self.budget_bytes)}"
        return (f"{len(self.resident)} layers resident, {len(self.streamed)} streamed through "
                f"{self.vram_slots} VRAM slots; {kv}; {self.step_tokens} tokens a step; prefetch {self.prefetch}; "
                f"host cache {self.cache_layers} layers; device memory {_gib(self.device_bytes)}{budget}"
                + ("; the streamed layers' attention and routers resident" if self.dense_resident else "")
                + (f", {self.expert_prefetch} experts a layer copied ahead on a prediction" if self.expert_prefetch else "")
                + (f"; CPU share packs up to {_gib(self.cpu_share_bytes)} of host memory" if self.cpu_share_bytes else ""))

    def breakdown(self) -> str:
        return ", ".join(f"{k} {_gib(v)}" for k, v in self.parts if v)


FIT_MARGIN = 1 * GiB  # left free when the budget is the device's free memory (as llama.cpp's --fit)


def fit_budget(device) -> int:
    """The device's free memory less FIT_MARGIN, read through NVML (no CUDA context is made in this
    process); without NVML, 90% of its total memory less the margin."""
    import torch

    props = torch.cuda.get_device_properties(device)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
            free = pynvml.nvmlDeviceGetMemoryInfo(h).free
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (or an old driver): fall back on the total
        free = int(props.total_memory * 0.9)
    if free <= FIT_MARGIN:
        raise ConfigError(f"the GPU has {_gib(free)} free: too little to run; free some memory or give --vram-gb")
    return free - FIT_MARGIN


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def step_scratch(index: ModelIndex, T: int, *, dtype_bytes: int, ctx: int, max_seqs: int,
                 quantized: bool, want_all: bool = True) -> int:
    """Device bytes of one forward step's temporaries for T tokens (T >= max_seqs)."""
    hp = index.hparams
    E, F, V = hp.n_embd, hp.n_ff, hp.n_vocab
    H, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    # residual, norm, q/k/v, attention output, gate, up, their product and the down output
    act = T * (4 * E + H * D + 2 * Hkv * D + 3 * F) * dtype_bytes
    # attention: its temporaries in groups bounded by ATTN_TEMP_BYTES (model.py), the step's
    # mask (bool, and additive in the compute dtype) and the softmax statistics
    attn = ATTN_TEMP_BYTES + max(T * ctx, max_seqs * ctx) * (dtype_bytes + 1) + hp.n_head * T * 4
    rows = min(T, HEAD_CHUNK) if want_all else max_seqs
    logits = rows * V * (dtype_bytes + 4) + T * E * dtype_bytes
    dq = 0
    if quantized and T > FUSED_MIN_OF_TYPES:
        dq = model_scratch_elems(index) * dtype_bytes
    partials = 64 * MiB  # split-K partial sums of the fused kernels, RoPE tables, step metadata
    return act + attn + logits + dq + partials


def make_plan(index: ModelIndex, layouts: list[LayerLayout], *, vram_bytes: int | None, host_cache_bytes: int | None,
              dtype_bytes: int, ctx: int, max_seqs: int, quantized: bool = False, step_tokens: int | None = None,
              prefetch: int | None = None, kv_on_host: bool | None = None,
              resident_layers: int | None = None, max_prefetch: int | None = None,
              expert_cache_bytes: int | None = None, moe_dense: str = "resident",
              vram_slots: int | None = None, expert_prefetch: int | None = None) -> Plan:
    """Fit the model into the budgets (see NOTE above); a budget too small for one step is a
    ConfigError naming the minimum. vram_bytes None means no limit (every layer resident).
    vram_slots: the streamed layers' VRAM slots under a budget (default 2, see the NOTE below)."""
    if vram_slots is not None and not 2 <= vram_slots <= 16:
        raise ConfigError(f"--vram-slots {vram_slots}: give 2 to 16")
    hp = index.hparams
    n = hp.n_layer
    raw = [lay.nbytes for lay in layouts]
    slot_bytes = -(-max(raw) // SLOT_ROUND) * SLOT_ROUND
    if quantized:
        weights = raw
    else:
        weights = [sum(math.prod(t.shape) for t in index.layers[i].values()) * dtype_bytes for i in range(n)]
    g = index.globals
    out = g.get("output.weight") or g["token_embd.weight"]
    head = (out.nbytes if quantized and len(out.shape) == 2 else math.prod(out.shape) * dtype_bytes) \
        + hp.n_embd * dtype_bytes
    kv_layer = 2 * max_seqs * ctx * hp.n_head_kv * hp.head_dim * dtype_bytes
    if step_tokens is not None and step_tokens < 1:
        raise ConfigError(f"--step-tokens {step_tokens}: must be at least 1")

    def scratch(T: int) -> int:
        return step_scratch(index, max(T, max_seqs), dtype_bytes=dtype_bytes, ctx=ctx, max_seqs=max_seqs,
                            quantized=quantized)

    def slack(total: int) -> int:
        return max(SLACK_MIN, int(total * SLACK_FRACTION))

    # a mixture-of-experts model's decode steps fetch only their chosen experts into a cache of
    # their own (compute/streamed.py, NOTE [ expert streaming ]): one layer's worth by default
    experts = in_flight = ahead = 0
    if hp.n_expert:
        experts = slot_bytes if expert_cache_bytes is None else expert_cache_bytes
    if experts:
        from layerstream.compute.expert_layout import max_in_flight, slot_bytes as expert_slot

        # a step's chosen experts that the cache does not keep are on the device until its layer
        # is done: at most every expert the largest expert step can choose in one layer, each in
        # a slot of the expert pool (compute/experts.py, NOTE [ the expert pool ])
        in_flight = max_in_flight(hp.n_expert, hp.n_expert_used) * expert_slot(layouts)
        # the next layer's predicted experts, copied ahead into two sets of slots (compute/
        # experts.py, NOTE [ expert prefetch ]): twice a token's choice each by default
        if expert_prefetch is None:
            expert_prefetch = 2 * hp.n_expert_used
        if not 0 <= expert_prefetch <= hp.n_expert:
            raise ConfigError(f"--expert-prefetch {expert_prefetch}: use 0 (off) to {hp.n_expert} (the model's experts)")
        ahead = 2 * expert_prefetch * expert_slot(layouts)
    if moe_dense not in ("resident", "stream"):
        raise ConfigError(f"--moe-dense {moe_dense!r}: use resident or stream")
    # each layer's tensors but its experts, for the layers whose experts stream
    dense = [sum(t.nbytes if quantized else math.prod(t.shape) * dtype_bytes for t in lay.tensors
                 if t.name not in EXPERT_TENSORS) for lay in layouts] if experts and moe_dense == "resident" else []

    def fit(T: int, slots: int, r: int, kv_dev: int, keep_dense: bool = False) -> tuple[int, list[tuple[str, int]]]:
        parts = [("head", head), ("resident layers", sum(weights[:r])), ("layer slots", slots * slot_bytes),
                 ("expert cache", experts if r < n else 0), ("experts in flight", in_flight if r < n else 0),
                 ("streamed layers' attention", sum(dense[r:]) if keep_dense else 0),
                 ("experts copied ahead", ahead if keep_dense else 0),
                 ("KV", kv_dev * kv_layer), ("host KV in flight", 2 * kv_layer if kv_dev < n else 0),
                 ("step scratch", scratch(T))]
        used = sum(v for _, v in parts)
        parts.append(("slack", slack(used)))
        return used + slack(used), parts

    T = step_tokens or 512
    if vram_bytes is None:  # no limit: everything on the device
        r = n if resident_layers is None else max(0, min(n, resident_layers))
        slots = 4 if r < n else 0  # no budget to save: copies issued further ahead
        kv_dev = 0 if kv_on_host else n
        keep_dense = bool(dense) and r < n
        total, parts = fit(T, slots, r, kv_dev, keep_dense)
    else:
        if step_tokens is None:  # the largest step of 64..512 tokens that leaves room to stream
            while T > 64 and fit(T, 2, 0, 0)[0] > vram_bytes:
                T //= 2
        least, parts = fit(T, 2, 0, 0)
        if least > vram_bytes:
            raise ConfigError(
                f"--vram-gb {vram_bytes / GiB:.2f} is too small for {os.path.basename(index.path)} with "
                f"{T} tokens a step: it needs at least {_gib(least)} ({', '.join(f'{k} {_gib(v)}' for k, v in parts if v)})"
                f"; raise --vram-gb, or lower --step-tokens, --batch or --ctx")
        if resident_layers is None and kv_on_host is not True and fit(T, 0, n, n)[0] <= vram_bytes:
            r, slots, kv_dev, keep_dense = n, 0, n, False
        else:
            # NOTE: two VRAM slots keep the copy engine busy: a streamed layer is computed straight
            # from its slot, so slot A is free again once layer i is computed, which at decode
            # batch sizes is long before the copy of layer i+1 into slot B ends; when compute is the
            # longer of the two, compute bounds the pass and the copy waits without cost.
            # With a CPU share (compute/cpu/) a CPU layer's matmuls are long, and a third
            # slot lets the copy engine run one layer further ahead meanwhile (--vram-slots).
            slots = vram_slots or 2
            # KV first (the host path moves it every pass), then as many layers as fit
            kv_dev = 0
            if not kv_on_host:
                while kv_dev < n and fit(T, slots, 0, kv_dev + 1)[0] <= vram_bytes:
                    kv_dev += 1
                if kv_on_host is False and kv_dev < n:
                    raise ConfigError(f"--vram-gb {vram_bytes / GiB:.2f}: the KV cache ({_gib(n * kv_layer)}) does not "
                                      "fit on the device; drop the KV placement option or lower --ctx or --batch")
            # then the streamed MoE layers' attention and routers, then as many whole layers as fit
            keep_dense = bool(dense) and fit(T, slots, 0, kv_dev, True)[0] <= vram_bytes
            if resident_layers is None:
                r = 0
                while r < n and fit(T, slots, r + 1, kv_dev, keep_dense)[0] <= vram_bytes:
                    r += 1
            else:
                r = max(0, min(n, resident_layers))
            if r == n:
                slots = 0
            keep_dense = keep_dense and r < n
        total, parts = fit(T, slots, r, kv_dev, keep_dense)
        if total > vram_bytes:
            raise ConfigError(f"--resident-layers {r} does not fit --vram-gb {vram_bytes / GiB:.2f}: the plan needs "
                              f"{_gib(total)}; lower --resident-layers")
    resident = tuple(range(r))
    streamed = tuple(range(r, n))
    if prefetch is None:
        prefetch = min(slots + 2, max(1, len(streamed))) if streamed else 1
    if prefetch < 1:
        raise ConfigError(f"--prefetch {prefetch}: must be at least 1")
    if max_prefetch is not None and prefetch > max_prefetch:
        raise ConfigError(f"--prefetch {prefetch}: at most {max_prefetch} (the model's layer count)")
    stream_slots = prefetch + 1
    loads = len(streamed)
    if host_cache_bytes is None:
        host_cache_bytes = min(loads * slot_bytes, _mem_available() // 2)
    cache_layers = min(loads, host_cache_bytes // slot_bytes)
    return Plan(resident, streamed, slots, kv_dev, prefetch, stream_slots, cache_layers, slot_bytes, T,
                total, vram_bytes, tuple(parts), expert_cache_bytes=experts if streamed else 0,
                dense_resident=keep_dense, expert_prefetch=(expert_prefetch or 0) if keep_dense and experts else 0)


def fit_cpu_share(plan: Plan, layouts: list[LayerLayout], pack_frac: float, explicit: bool,
                  split: str = "layers") -> float:
    """The CPU share's packed rows take host memory after the host cache, never from it (a host
    cache that no longer holds the streamed layers costs far more than the share saves: measured,
    a 70B pass went from 0.66 s to 3.3 s). Returns the largest share up to `pack_frac` whose
    packed rows fit half the memory left; an explicit share that does not fit is a ConfigError."""
    from layerstream.compute.cpu.sizing import packed_bytes

    if not pack_frac or not plan.streamed:
        return 0.0
    streamed = [layouts[i] for i in plan.streamed]
    spare = max(0, _mem_available() - plan.cache_layers * plan.slot_bytes) // 2
    f = pack_frac
    while f > 0 and packed_bytes(streamed, f, split) > spare:
        if explicit:
            raise ConfigError(f"--cpu-share {pack_frac:g} packs {_gib(packed_bytes(streamed, f, split))} of host memory; "
                              f"{_gib(spare)} is free beside the host cache: lower --cpu-share or --host-cache-gb")
        f = round(f - 0.05, 2)
    return max(f, 0.0)
