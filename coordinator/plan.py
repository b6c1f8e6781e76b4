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
A draft model (coordinator/draft.py, NOTE [ the draft on the device ]) runs in the coordinator's
process on the same device: its weights, KV and scratch (`DraftMemory`) come off the budget
first, and the compute process's cap is what is left, so that both stay within `--vram-gb`.
With drafts, a verifying step's 1 + drafts tokens run as decode rows (NOTE [ drafts verified as decode
rows ] in runner.py): the plan counts their decode graphs, which the compute process captures (`graph_rows`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable

from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.compute.qlinear import HEAD_CHUNK
from layerstream.coordinator.draft_plan import DraftCost, DraftMemory
from layerstream.coordinator.memory import SLACK_FRACTION, SLACK_MIN, Sizes, mem_available
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import ModelIndex
from layerstream.loader.layout import LayerLayout

GiB = 1 << 30
MiB = 1 << 20
STEP_TOKENS = 512  # the largest step the plan makes unless --step-tokens asks for more
DECODE_GAIN = 0.05  # a smaller step is named where its decode passes move this share fewer bytes
PROMPT_STEP_COST = 2.0  # a prompt-sized step is kept while its decode passes move at most this many times the least
# a known job's passes in seconds (NOTE [ step tokens ]): their bytes cross at the pinned link's rate, and a
# prompt pass, run eagerly, takes at least its layers' launches from the host (both measured on an H200
# host: BENCHMARKS.md, the link's rate and the 8B's 32-token prompt passes)
LINK_BPS = 54e9
EAGER_LAYER_S = 1.0e-3


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
    kv_rows: int = 1  # sequences whose KV the plan holds (the server admits this many at once)
    host_parts: tuple[tuple[str, int], ...] = ()  # host memory the plan takes, by item (NOTE [ host memory ])
    smaller_step: tuple[int, int] | None = None  # a step size that keeps more layers, and how many (NOTE [ step tokens ])
    draft: DraftMemory | None = None  # a draft model's memory, off the budget before the rest (NOTE above)
    graph_rows: int = 1  # decode steps of 1..graph_rows rows replay graphs (memory.Sizes.graph_rows; compute_proc reads it)
    logit_rows: int = HEAD_CHUNK  # rows of logits a step holds at once (NOTE [ rows of logits ] in memory.py)
    dequant_scratch: bool = True  # a step may dequantize a matrix: the compute process reserves the buffer counted
    fused_rows: int = 0  # a step of up to this many rows dequantizes nothing (memory.Sizes.fused_rows)
    for_job: bool = False  # the step was chosen for a known prompt and reply (NOTE [ step tokens ])

    @property
    def host_bytes(self) -> int:
        return sum(v for _, v in self.host_parts)

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
                + (f"; CPU share packs up to {_gib(self.cpu_share_bytes)} of host memory" if self.cpu_share_bytes else "")
                + (f"; --step-tokens {self.smaller_step[0]} would keep {self.smaller_step[1]} layers resident "
                   "(faster decode, prompts fed in that many tokens a pass)" if self.smaller_step else "")
                + ("; the step chosen for the prompts and -n this run expects (--step-tokens sets another)" if self.for_job else "")
                + (f"; decode graphs of up to {self.graph_rows} rows (a verifying step's tokens replay them)"
                   if self.graph_rows > self.kv_rows else "")
                + (f"; {self.draft.line()}, beside it" if self.draft else ""))

    def breakdown(self) -> str:
        draft = [(f"draft model's {k}", v) for k, v in self.draft.parts] if self.draft else []
        return ", ".join(f"{k} {_gib(v)}" for k, v in [*self.parts, *draft] if v)


FIT_MARGIN = 1 * GiB  # left free when the budget is the device's free memory (as llama.cpp's --fit)


def fit_budget(device) -> int:
    """The device's free memory less FIT_MARGIN, read through NVML (no CUDA context is made in this
    process); without NVML, 90% of its total memory less the margin."""
    import torch

    try:
        props = torch.cuda.get_device_properties(device)
    except RuntimeError as e:  # (a device NVML sees whose driver cannot start: device.cuda_visible)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"the CUDA device could not start ({why}); update its driver, or give --device cpu") from None
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
    return mem_available()


def make_plan(index: ModelIndex, layouts: list[LayerLayout], **kw) -> Plan:
    """The plan of `_fit` (its arguments); beside a draft model under a budget, with what the draft
    takes from it (`DraftMemory.cost`, NOTE [ what a draft costs the target ])."""
    plan, moved = _fit(index, layouts, **kw)
    if plan.draft is None or kw.get("vram_bytes") is None:
        return plan
    alone, moved_alone = _fit(index, layouts, **(kw | {"draft": None, "draft_tokens": 0}))  # (fits: more room)
    cost = DraftCost(len(alone.resident), moved_alone, len(plan.resident), moved, kw.get("draft_tokens", 0))
    return dataclasses.replace(plan, draft=dataclasses.replace(plan.draft, cost=cost))


def _fit(index: ModelIndex, layouts: list[LayerLayout], *, vram_bytes: int | None, host_cache_bytes: int | None,
              dtype_bytes: int, ctx: int, max_seqs: int, quantized: bool = False, step_tokens: int | None = None,
              prefetch: int | None = None, kv_on_host: bool | None = None,
              resident_layers: int | None = None, max_prefetch: int | None = None,
              expert_cache_bytes: int | None = None, moe_dense: str = "resident",
              vram_slots: int | None = None, expert_prefetch: int | None = None,
              device_type: str | None = None, sliding: bool = False, host_bytes: int | None = None,
              draft: DraftMemory | None = None, draft_tokens: int = 0, evaluates: bool = True,
              job: tuple[int, int] | None = None) -> tuple[Plan, int]:
    """Fit the model into the budgets (see NOTE above); a budget too small for one step is a
    ConfigError naming the minimum. vram_bytes None means no limit (every layer resident).
    vram_slots: the streamed layers' VRAM slots under a budget (default 2, see the NOTE below).
    device_type: "cuda" or "cpu" (None: CUDA where the weights stay quantized); `sliding`: the KV
    ring slides (decode then takes attention's general path); host_bytes: the host memory
    available (None: MemAvailable), which the plan's host side must fit (NOTE [ host memory ]);
    `draft`: a draft model's memory, taken off vram_bytes first (NOTE [ the plan counts every byte ]);
    `draft_tokens`: the tokens a sequence drafts a step (a draft model's or prompt lookup's; 0: none),
    whose verifying steps' rows get decode graphs too (memory.Sizes.graph_rows); `evaluates`: steps
    may ask every position's logits (False: the run only generates; NOTE [ rows of logits ] in
    memory.py); `job`: (prompt tokens, tokens to generate) of a run that answers one known prompt
    (NOTE [ step tokens ]). Returns the plan and the bytes a decode pass of it moves over the link."""
    budget = vram_bytes  # (the errors name --vram-gb as given)
    if draft is not None and vram_bytes is not None:
        if draft.total >= vram_bytes:
            raise ConfigError(draft.refusal(vram_bytes, index.path))
        vram_bytes -= draft.total
    if vram_slots is not None and not 2 <= vram_slots <= 16:
        raise ConfigError(f"--vram-slots {vram_slots}: give 2 to 16")
    hp = index.hparams
    n = hp.n_layer
    cuda = quantized if device_type is None else device_type == "cuda"
    sz = Sizes(index, layouts, dtype_bytes, ctx, max_seqs, quantized, cuda, sliding, evaluates, draft_tokens)
    slot_bytes = sz.slot_bytes
    kv_layer = sz.kv_layer
    if step_tokens is not None and step_tokens < 1:
        raise ConfigError(f"--step-tokens {step_tokens}: must be at least 1")
    if step_tokens is not None:  # (a step holds at most its sequences' contexts: more sized memory never used)
        step_tokens = min(step_tokens, ctx * max_seqs)
    if draft_tokens < 0:
        raise ConfigError(f"--draft-tokens {draft_tokens}: must be at least 0")

    def slack(total: int) -> int:
        return SLACK_MIN + int(total * SLACK_FRACTION)

    # a mixture-of-experts model's decode steps fetch only their chosen experts into a cache of
    # their own (compute/streamed.py, NOTE [ expert streaming ]): a layer's worth by default, and the rest (below)
    experts = in_flight = ahead = 0
    if hp.moe.n_expert:
        experts = slot_bytes if expert_cache_bytes is None else expert_cache_bytes
    if experts:
        from layerstream.compute.expert_layout import max_in_flight, slot_bytes as expert_slot

        # a step's chosen experts that the cache does not keep are on the device until its layer
        # is done: at most every expert the largest expert step can choose in one layer, each in
        # a slot of the expert pool (compute/experts.py, NOTE [ the expert pool ])
        in_flight = max_in_flight(hp.moe.n_expert, hp.moe.n_expert_used) * expert_slot(layouts)
        # the next layer's predicted experts, copied ahead into two sets of slots (compute/
        # experts.py, NOTE [ expert prefetch ]): twice a token's choice each by default
        if expert_prefetch is None:
            expert_prefetch = 2 * hp.moe.n_expert_used
        if why := hp.moe.prefetch_problem(expert_prefetch):
            raise ConfigError(f"--expert-prefetch {expert_prefetch}: {why}")
        ahead = 2 * expert_prefetch * expert_slot(layouts)
    if moe_dense not in ("resident", "stream"):
        raise ConfigError(f"--moe-dense {moe_dense!r}: use resident or stream")
    # each layer's tensors but its experts, for the layers whose experts stream
    dense = [sum(t.nbytes if quantized else math.prod(t.shape) * dtype_bytes for t in lay.tensors
                 if t.name not in EXPERT_TENSORS) for lay in layouts] if experts and moe_dense == "resident" else []

    def fit(T: int, slots: int, r: int, kv_dev: int, keep_dense: bool = False) -> tuple[int, list[tuple[str, int]]]:
        parts = [("head", sz.head), ("resident layers", sz.resident_prefix[r]), ("layer slots", sz.slots(slots, r < n)),
                 ("expert cache", experts if r < n else 0), ("experts in flight", in_flight if r < n else 0),
                 ("streamed layers' attention", sum(dense[r:]) if keep_dense else 0),
                 ("experts copied ahead", ahead if keep_dense else 0),
                 ("KV", sz.kv(kv_dev)), ("host KV in flight", sz.host_kv_in_flight() if kv_dev < n else 0),
                 ("step scratch", sz.step(max(T, max_seqs))), ("dequantization scratch", sz.dequant_scratch(T)),
                 ("cuBLAS workspace", sz.cublas(max(T, max_seqs))),
                 ("decode graphs", sz.graphs(r == n, sz.graph_rows(T, draft_tokens)))]
        used = sum(v for _, v in parts)
        parts.append(("slack", slack(used)))
        return used + slack(used), parts

    def fits(T: int, slots: int, r: int, kv_dev: int, keep_dense: bool = False) -> bool:
        return fit(T, slots, r, kv_dev, keep_dense)[0] <= vram_bytes

    def most(lo: int, hi: int, ok) -> int:
        """The largest x in [lo, hi] with ok(x), ok being monotone and ok(lo) assumed."""
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo

    # NOTE [ KV or layers first ]
    # A layer whose KV is in host memory moves its filled slots over the link every pass; a streamed
    # layer moves its weights. The plan fits the KV first (every layer's on the device, then as many
    # layers as fit) and, where more layers fit with only theirs and as many streamed layers' KV as
    # room remains, it takes those layers when a pass at a full context moves no more bytes: below
    # a full context the host KV layers move fewer (8B at 4 GiB, --ctx 4096: 22 layers and the KV
    # of 24 rather than 21 and all 32, the same bytes at 4096 tokens). llama.cpp's -ngl keeps the
    # KV of the layers it offloads only, likewise.
    def residency(T: int, slots: int) -> tuple[int, int, bool]:
        """(resident layers, layers whose KV is on the device, streamed MoE layers' dense parts kept)
        for steps of T tokens (NOTE [ KV or layers first ])."""
        # KV first (the host path moves it every pass), then as many layers as fit
        kv_dev = 0 if kv_on_host else most(0, n, lambda k: fits(T, slots, 0, k))
        if kv_on_host is False and kv_dev < n:
            raise ConfigError(f"--vram-gb {budget / GiB:.2f}: the KV cache ({_gib(n * kv_layer)}) does not "
                              "fit on the device; drop the KV placement option or lower --ctx or --batch")
        # then the streamed MoE layers' attention and routers, then as many whole layers as fit
        keep_dense = bool(dense) and fits(T, slots, 0, kv_dev, True)
        if resident_layers is not None:
            return max(0, min(n, resident_layers)), kv_dev, keep_dense
        r = most(0, n, lambda x: fits(T, slots, x, kv_dev, keep_dense))
        if kv_on_host is None and not dense:
            # layers first: the KV of the resident layers only, then of as many streamed ones as fit
            r2 = most(0, n, lambda x: fits(T, slots, x, x))
            kv2 = most(r2, n, lambda k: fits(T, slots, r2, k))
            if sz.link_bytes(r2, kv2) <= sz.link_bytes(r, kv_dev) and r2 > r:
                return r2, kv2, False
        return r, kv_dev, keep_dense

    T = step_tokens or STEP_TOKENS
    smaller_step = None  # (tokens a step, resident layers) of a decode-sized step (NOTE [ step tokens ])
    for_job = False
    if vram_bytes is None:  # no limit: everything on the device
        r = n if resident_layers is None else max(0, min(n, resident_layers))
        slots = 4 if r < n else 0  # no budget to save: copies issued further ahead
        kv_dev = 0 if kv_on_host else n
        keep_dense = bool(dense) and r < n
        total, parts = fit(T, slots, r, kv_dev, keep_dense)
    else:
        # NOTE: two VRAM slots keep the copy engine busy: a streamed layer is computed straight
        # from its slot, so slot A is free again once layer i is computed, which at decode
        # batch sizes is long before the copy of layer i+1 into slot B ends; when compute is the
        # longer of the two, compute bounds the pass and the copy waits without cost.
        # With a CPU share (compute/cpu/) a CPU layer's matmuls are long, and a third
        # slot lets the copy engine run one layer further ahead meanwhile (--vram-slots).
        slots = vram_slots or 2
        # NOTE [ step tokens ]: by default the largest step of up to 512 tokens that leaves room to
        # stream, since a prompt is fed in chunks of the step and every chunk is a pass over the
        # streamed layers. A smaller step needs less scratch (a one-token step needs no
        # dequantization buffer, no cuBLAS and no attention temporaries beyond the decode kernel's)
        # and so keeps more layers resident, which speeds decode but multiplies a prompt's passes
        # (8B at 4 GiB: 26 layers instead of 23, but 512 passes for a 512-token prompt instead of
        # one). So the plan takes the largest step whose decode passes move at most
        # PROMPT_STEP_COST times the bytes of the step that moves fewest (a budget so small that a
        # prompt-sized step leaves few layers resident gets the decode-sized step), and where a
        # smaller step would move at least DECODE_GAIN fewer, its line says so (`smaller_step`).
        # A run whose job is known (`job`: a prompt given on the command line, or a chat's typical
        # turn, its tokens, about, and the reply's at most) on a GPU takes the step whose passes, the
        # prompt's and the reply's, move the fewest bytes: a decode pass of a streamed plan is bound
        # by its copies there, and a pass's host KV is the job's own length (8B at 4 GiB, a short
        # prompt and 256 tokens: 32-token steps and 26 layers rather than 512-token steps and 25).
        # A prompt pass runs eagerly and takes at least its layers' launches from the host
        # (EAGER_LAYER_S), more than its bytes at a small step: so a prompt of about a thousand
        # tokens before 256 takes large steps, where by bytes alone it took 32-token ones.
        candidates = [T] if step_tokens is not None else _step_candidates(max_seqs)
        fitting = [t for t in candidates if fits(t, 2, 0, 0)]
        if not fitting:
            T = candidates[-1]
            least, parts = fit(T, 2, 0, 0)
            raise ConfigError(
                f"--vram-gb {budget / GiB:.5g} is too small for {os.path.basename(index.path)} with "
                f"{T} token{'s' if T != 1 else ''} a step: it needs at least "
                f"{math.ceil(least / GiB * 100) / 100:.2f} GiB "
                f"({', '.join(f'{k} {_gib(v)}' for k, v in parts if v)})"
                + (f" beside the draft model's {_gib(draft.total)}" if draft else "")
                + "; raise --vram-gb, or lower --step-tokens, --batch or --ctx")
        every = resident_layers is None and kv_on_host is not True
        full = [t for t in fitting if every and fits(t, 0, n, n)]
        if full:
            T, r, kv_dev, keep_dense = full[0], n, n, False
        else:
            T = fitting[0]
            r, kv_dev, keep_dense = residency(T, slots)
            if step_tokens is None and len(fitting) > 1 and not hp.moe.n_expert:  # (MoE decode copies experts only)
                got = {t: residency(t, slots) for t in fitting}
                moved = {t: sz.link_bytes(got[t][0], got[t][1]) for t in fitting}
                least = min(moved.values())
                T = next(t for t in fitting if moved[t] <= PROMPT_STEP_COST * least)
                by_job = job is not None and cuda
                if by_job:  # (its KV at the job's length, not a full context's)
                    prompt, reply = job
                    pass_s = {t: sz.link_bytes(*got[t][:2], prompt + reply) / LINK_BPS for t in fitting}
                    cost = {t: -(-prompt // t) * max(pass_s[t], n * EAGER_LAYER_S) + reply * pass_s[t] for t in fitting}
                    best = min(fitting, key=lambda t: (cost[t], -t))
                    T, for_job = best, best != T
                r, kv_dev, keep_dense = got[T]
                small = next(t for t in fitting if moved[t] == least)
                if small != T and least <= (1 - DECODE_GAIN) * moved[T] and not by_job:
                    smaller_step = (small, got[small][0])  # (a job's step is already the fewest bytes)
        slots, keep_dense = (0, False) if r == n else (slots, keep_dense)
        total, parts = fit(T, slots, r, kv_dev, keep_dense)
        if total > vram_bytes:  # the slots past two where two fit (`fitting` holds two and no layer), else -ngl's
            by_slots = resident_layers is None or (slots > 2 and fit(T, 2, r, kv_dev, keep_dense)[0] <= vram_bytes)
            what = f"--vram-slots {slots}" if by_slots else f"--resident-layers {resident_layers}" + f" (all {n} layers)" * (resident_layers > n)
            raise ConfigError(f"{what} does not fit --vram-gb {budget / GiB:.2f}: the plan needs {_gib(total)}; "
                              f"lower {what.split()[0]}")
        if experts and expert_cache_bytes is None and r < n:
            # what the budget leaves beside the resident layers (as many as fit, or -ngl's) goes to the
            # expert cache in whole expert slots: room that held nothing saves a copy on each of its hits
            base, unit = experts, expert_slot(layouts)

            def cache_fits(k: int) -> bool:
                nonlocal experts
                experts = base + k * unit
                return fit(T, slots, r, kv_dev, keep_dense)[0] <= vram_bytes
            experts = base + most(0, (vram_bytes - total) // unit, cache_fits) * unit
            total, parts = fit(T, slots, r, kv_dev, keep_dense)
    resident = tuple(range(r))
    streamed = tuple(range(r, n))
    if prefetch is None:
        prefetch = min(slots + 2, max(1, len(streamed))) if streamed else 1
    if prefetch < 1:
        raise ConfigError(f"--prefetch {prefetch}: must be at least 1")
    if max_prefetch is not None and prefetch > max_prefetch:
        raise ConfigError(f"--prefetch {prefetch}: at most {max_prefetch} (the model's layer count)")
    stream_slots = prefetch + 1
    # on CUDA pinned tensors (each layer's K and V, kv.HostKV; the embedding table the device reads,
    # compute/embedding.py) take their size rounded up to a power of two (torch's pinned allocator)
    host = host_needs(n_slots=stream_slots, slot_bytes=slot_bytes,
                      host_kv=(n - kv_dev) * (2 * pinned_bytes(kv_layer // 2) if cuda else kv_layer),
                      device=0 if cuda else total)
    if cuda:
        host.append(("token embedding (pinned)", pinned_bytes(index.globals["token_embd.weight"].nbytes)))
    avail = _mem_available() if host_bytes is None else host_bytes
    loads = len(streamed)
    if host_cache_bytes is None:
        host_cache_bytes = min(loads * slot_bytes, max(0, avail - sum(v for _, v in host)) // 2)
    cache_layers = min(loads, host_cache_bytes // slot_bytes)
    host.append(("host cache", cache_layers * slot_bytes))
    check_host(host, avail, index)
    plan = Plan(resident, streamed, slots, kv_dev, prefetch, stream_slots, cache_layers, slot_bytes, T,
                total, vram_bytes, tuple(parts), expert_cache_bytes=experts if streamed else 0,
                dense_resident=keep_dense, expert_prefetch=(expert_prefetch or 0) if keep_dense and experts else 0,
                kv_rows=max_seqs, host_parts=tuple(host), smaller_step=smaller_step, draft=draft,
                graph_rows=sz.graph_rows(T, draft_tokens) if cuda and quantized else 0,
                logit_rows=sz.logit_rows(max(T, max_seqs)), dequant_scratch=sz.dequant_scratch(T) > 0,
                for_job=for_job, fused_rows=sz.fused_rows)
    return plan, sz.link_bytes(r, kv_dev)


def _step_candidates(max_seqs: int) -> list[int]:
    """Step sizes the plan tries, largest first: STEP_TOKENS halved down to the batch (a decode
    step holds a token of every sequence)."""
    out, t = [], STEP_TOKENS
    while t > max_seqs:
        out.append(t)
        t //= 2
    return out + [max(1, max_seqs)] if max_seqs <= STEP_TOKENS else [max_seqs]


# NOTE [ host memory ]
# What the plan puts in host memory: the staging slots and the host cache (one shared-memory
# arena), the KV of the layers whose KV is not on the device (pinned on CUDA), and, where the
# compute device is the CPU, everything the device holds. Each must fit what the host has free
# (MemAvailable) before any of it is allocated: an option that cannot fit is one line naming what
# it needs and what to lower, not a machine swapping or killed. The host cache takes half of what
# is left by default; the CPU share packs from what the cache leaves (fit_cpu_share).
def pinned_bytes(n: int) -> int:
    """Host memory a pinned tensor of n bytes holds: torch's pinned allocator rounds to a power of two."""
    return 1 << max(0, n - 1).bit_length() if n > 0 else 0


def host_needs(*, n_slots: int, slot_bytes: int, host_kv: int, device: int) -> list[tuple[str, int]]:
    return [("staging slots", n_slots * slot_bytes), ("KV in host memory", host_kv), ("the CPU device's memory", device)]


def check_host(parts: list[tuple[str, int]], avail: int, index: ModelIndex) -> None:
    """Refuse a plan whose host side does not fit the available host memory (NOTE [ host memory ])."""
    need = sum(v for _, v in parts)
    if need > avail:
        what = ", ".join(f"{k} {_gib(v)}" for k, v in parts if v)
        raise ConfigError(f"{os.path.basename(index.path)} with these options needs {_gib(need)} of host memory ({what}); "
                          f"{_gib(avail)} is available: lower --ctx or --batch"
                          + (", or --host-cache-gb" if dict(parts).get("host cache") else ""))


def check_local_host(index: ModelIndex, *, dtype_bytes: int, ctx: int, max_seqs: int, step_tokens: int,
                     host_bytes: int | None = None) -> int:
    """The single-process engine on the CPU: its dequantized weights, token embedding and head,
    every layer's KV and a step's tensors must fit the host's available memory (NOTE [ host
    memory ]); returns the bytes it needs, or raises the plan's one line."""
    sz = Sizes(index, [], dtype_bytes, ctx, max_seqs, False, False, False)
    g = index.globals
    head = sum(math.prod(t.shape) * dtype_bytes for k, t in g.items() if k != "rope_freqs.weight")
    parts = [("weights", sum(sz.layer_dense) + head), ("KV", index.hparams.n_layer * sz.kv_layer),
             ("step", sz.step(max(min(step_tokens, ctx * max_seqs), max_seqs)))]  # (no step holds more than its KV)
    check_host(parts, _mem_available() if host_bytes is None else host_bytes, index)
    return sum(v for _, v in parts)


def largest_batch(index: ModelIndex, layouts: list[LayerLayout], *, most: int = 64, kv_on_device_above: int = 8,
                  draft_for: Callable[[int], DraftMemory] | None = None, **plan_kw) -> int:
    """The most sequences (KV rows) the budgets hold, up to `most`: the largest batch whose plan
    fits; above `kv_on_device_above` only while every layer's KV stays on the device (no pass
    moves KV). `draft_for(rows)`: a draft model's memory at that many rows (its KV grows with
    them), taken off the budget of each plan tried. plan_kw: make_plan's other arguments
    (max_seqs and draft aside). ConfigError where not even one sequence fits (the plan's own message)."""
    def plan_of(rows: int) -> Plan:
        return make_plan(index, layouts, max_seqs=rows, draft=draft_for(rows) if draft_for else None, **plan_kw)

    def ok(rows: int) -> bool:
        try:
            p = plan_of(rows)
        except ConfigError:
            return False
        return rows <= kv_on_device_above or p.kv_device_layers == index.hparams.n_layer

    plan_of(1)  # raises the plan's own error
    lo, hi = 1, max(1, most)
    while lo < hi:  # plans hold fewer layers as rows grow: feasibility falls once
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


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
