"""ModelRunner: runs forward steps over a source of layer weights and owns the KV caches."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Iterable, Protocol

import numpy as np
import torch

from layerstream.compute.dequant import check_supported, dequantize
from layerstream.compute.qlinear import FUSED_TYPES, HEAD_CHUNK, QuantWeight, have_triton
from layerstream.compute.block import layer_forward
from layerstream.compute.model import (LayerWeights, SeqStep, StepMeta, attention_block, build_step_meta, head_forward,
                                       rope_inv_freq)
from layerstream.compute.moe import GROUPED_MAX_TOKENS, experts_grouped, moe_route, predict_next, runs_grouped
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import HParams, ModelIndex, TensorInfo


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA; on the CPU bfloat16 where it has bf16 instructions (half the bytes of
    float32 to read per token: measured 32 against 17 tokens/s on SmolLM2, 2 cores), else float32."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None


# Architectures whose activations exceed float16's range: Gemma 3 270M's logits are NaN in
# float16, and match float32's top-1 in bfloat16 (measured on the CPU, 60 positions).
FLOAT16_OVERFLOWS = frozenset({"gemma3"})


def resolve_dtype(name: str | None, device: torch.device, arch: str | None = None) -> torch.dtype:
    """--dtype, or the device's default (default_dtype; bfloat16 instead of float16 for an
    architecture in FLOAT16_OVERFLOWS, which refuses float16)."""
    if name is None:
        dtype = default_dtype(device)
        return torch.bfloat16 if dtype == torch.float16 and arch in FLOAT16_OVERFLOWS else dtype
    try:
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ConfigError(f"--dtype {name}: use float32, float16 or bfloat16") from None
    if dtype == torch.float16 and arch in FLOAT16_OVERFLOWS:
        raise ConfigError(f"--dtype float16: {arch}'s activations exceed float16's range (its logits become NaN); "
                          "use bfloat16 (its default) or float32")
    return dtype


def check_model_quants(index: ModelIndex) -> None:
    """Raise UnsupportedQuantError naming the first tensor whose type cannot be dequantized."""
    for t in index.globals.values():
        check_supported(t.qtype, t.name)
    for layer in index.layers:
        for t in layer.values():
            check_supported(t.qtype, t.name)


def keeps_quantized(device, weights: str = "auto") -> bool:
    """Whether matrices stay as GGUF blocks on `device`: on CUDA with Triton ("auto"), or when
    asked ("quantized"; on the CPU that runs the kernels under Triton's interpreter, for tests).
    On the CPU the fastest form is the dequantized one (torch's CPU GEMV on bf16)."""
    if weights not in ("auto", "quantized", "dense"):
        raise ValueError(f"weights={weights!r}: use auto, quantized or dense")
    cuda = torch.device(device).type == "cuda"
    if weights == "auto":
        return cuda and have_triton()
    if weights == "quantized" and not (have_triton() and (cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ConfigError("quantized weights need Triton and a CUDA device (on the CPU only under Triton's "
                          "interpreter, TRITON_INTERPRET=1, for tests); use the default weights")
    return weights == "quantized"


def device_weight(raw: torch.Tensor, t, dtype, quantized: bool):
    """A tensor from its bytes on the target device: a QuantWeight view for a block-quantized
    matrix when `quantized`, else dequantized into `dtype` (norms, biases, dense matrices)."""
    if quantized and len(t.shape) in (2, 3) and t.qtype in FUSED_TYPES:
        # experts [E, N, K] as one [E * N, K] matrix: expert e is rows e*N..(e+1)*N, a byte range
        return QuantWeight(raw, t.qtype, (math.prod(t.shape[:-1]), t.shape[-1]))
    return dequantize(raw, t.qtype, t.shape, t.name, dtype)


def load_tensor(index: ModelIndex, t: TensorInfo, device, dtype, quantized: bool = False):
    """One tensor of the file on `device` (its bytes copied there first), see `device_weight`."""
    raw = torch.from_numpy(np.ascontiguousarray(index.tensor_bytes(t)))
    return device_weight(raw.to(device, non_blocking=True), t, dtype, quantized)


class LayerSource(Protocol):
    """Where ModelRunner gets each layer's weights for a step (resident or streamed)."""

    def layer(self, i: int) -> LayerWeights: ...
    def release(self, i: int) -> None: ...
    def fixed(self, i: int) -> LayerWeights | None:
        """Layer i's weights if they are the same tensors at every step from now on (a captured
        CUDA graph may read them without layer() and release()), else None."""
    def graph_ran(self, first: int, stop: int, start, end) -> None:
        """Layers first..stop-1 ran from a graph between CUDA events start and end (None: the
        layers' own events time them)."""
    def moe_graph_key(self, i: int) -> bool | None:
        """For a streamed MoE layer whose attention and router read only tensors that stay put,
        whether its step also predicts the next layer's experts (its graphs' key); None for any
        other layer (NOTE [ the next router early ])."""


class ResidentLayers:
    """Every layer loaded once and kept on the device (as blocks when `quantized`): the in-VRAM
    engine and the reference."""

    def __init__(self, index: ModelIndex, device, dtype, layers: Iterable[int] | None = None, progress=None,
                 quantized: bool = False):
        self.weights: dict[int, LayerWeights] = {}
        for i in layers if layers is not None else range(index.hparams.n_layer):
            self.weights[i] = {name: load_tensor(index, t, device, dtype, quantized)
                               for name, t in index.layers[i].items()}
            if progress:
                progress(1)

    def layer(self, i: int) -> LayerWeights:
        return self.weights[i]

    def release(self, i: int) -> None:
        pass

    def fixed(self, i: int) -> LayerWeights:
        return self.weights[i]

    def graph_ran(self, first: int, stop: int, start, end) -> None:
        pass

    def moe_graph_key(self, i: int) -> None:
        return None


class GlobalWeights:
    """Output norm and head on the device (the head as blocks when `quantized`), rope frequency
    factors; the token embedding stays on the host and is a row gather (only the rows of the
    step's tokens are dequantized), or with `embed_on_device` a gather on the device."""

    def __init__(self, index: ModelIndex, device, dtype, embed_on_device: bool = False, quantized: bool = False):
        g = index.globals
        self.device, self.dtype = torch.device(device), dtype
        emb = self.embd_info = g["token_embd.weight"]
        self.embd_rows = index.tensor_bytes(emb).reshape(emb.shape[0], -1)  # [V, bytes per row]
        # the in-VRAM engine keeps the table on the device (as blocks when quantized)
        self.embd_dev = load_tensor(index, emb, device, dtype, quantized) if embed_on_device else None
        self.norm = load_tensor(index, g["output_norm.weight"], device, dtype)
        out = g.get("output.weight")
        if out is None and self.embd_dev is not None:  # tied: the head is the embedding matrix
            self.head = self.embd_dev
        else:
            self.head = load_tensor(index, out if out is not None else emb, device, dtype, quantized)
        rf = g.get("rope_freqs.weight")
        self.rope_freqs = None if rf is None else load_tensor(index, rf, "cpu", torch.float32)

    def embed(self, toks: torch.Tensor) -> torch.Tensor:
        """Rows of the token embedding for token ids toks [T] -> [T, E] on the device."""
        if isinstance(self.embd_dev, QuantWeight):  # gather the rows' blocks, dequantize them
            from layerstream.compute import qkernels

            q = self.embd_dev
            V, E = q.shape
            rows = q.raw.view(V, -1)[toks.to(self.device, non_blocking=True)].reshape(-1)
            out = torch.empty(len(toks), E, dtype=self.dtype, device=self.device)
            return qkernels.dequantize_into(rows, q.qtype, len(toks), E, out)
        if self.embd_dev is not None:
            return self.embd_dev[toks.to(self.device, non_blocking=True)]
        ids = toks.cpu().numpy()
        rows = torch.from_numpy(np.ascontiguousarray(self.embd_rows[ids])).reshape(-1)
        e = self.embd_info
        x = dequantize(rows, e.qtype, (len(ids), e.shape[1]), e.name, torch.float32)
        return x.to(self.device, self.dtype, non_blocking=True)


class DeviceKV:
    """KV caches in device memory: [rows, ctx, n_head_kv, head_dim] for each of `layers`."""

    def __init__(self, hp: HParams, rows: int, ctx: int, device, dtype, layers: Iterable[int] | None = None):
        shape = (rows, ctx, hp.n_head_kv, hp.head_dim)
        ids = list(range(hp.n_layer) if layers is None else layers)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])

    def on_device(self, i: int) -> bool:
        return True

    def layer(self, i: int, meta: StepMeta):
        return self.k[i], self.v[i], meta

    def write_back(self, i: int, meta: StepMeta, k, v) -> None:
        pass


class HostKV(DeviceKV):
    """KV caches in (pinned) host memory, streamed in with their layer; new entries written back.

    NOTE [ host KV on CUDA ]
    A layer's rows [:, :kv_len] are copied on a side stream into one of two device buffers, the
    next host layer's while this one computes (its buffer is reused once the attention that read
    it has run: the side stream waits on that event). New entries go back through pinned memory
    without a host synchronisation: the device-to-host copy is queued on the compute stream and
    scattered into the host cache when the layer is next needed, a step later, by which time the
    step's end (logits to the host) has waited for it.
    """

    def __init__(self, hp: HParams, rows: int, ctx: int, device, dtype, layers: Iterable[int] | None = None):
        super().__init__(hp, rows, ctx, "cpu", dtype, layers)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        order = sorted(self.k)
        self.next_layer = dict(zip(order, order[1:]))  # host layer -> the next one (fetched ahead)
        self._meta_key = None
        if self.cuda:
            self.k = {i: t.pin_memory() for i, t in self.k.items()}
            self.v = {i: t.pin_memory() for i, t in self.v.items()}
            shape = (rows, ctx, hp.n_head_kv, hp.head_dim)
            self.bufs = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                         for _ in range(2)]
            self.buf_free: list = [None, None]  # event: the attention that read buffer b has run
            self.next_buf = 0
            self.stream = torch.cuda.Stream(self.device)
            self.inflight: dict[int, tuple[int, object]] = {}  # layer -> (buffer, copy-done event)
            self.used: dict[int, int] = {}  # layer -> buffer it computes from this step
            self.pending: dict[int, tuple] = {}  # layer -> (event, new K, new V, rows, slots) to scatter

    def on_device(self, i: int) -> bool:
        return False

    def _local(self, meta: StepMeta):
        """The step's meta re-indexed onto a gathered [B, kv_len] cache (rows become 0..B-1)."""
        if self._meta_key is not meta:
            self._meta_key = meta
            self._rows = meta.rows.cpu()
            self._row_list = self._rows.tolist()
            self._tok_row, self._tok_slot = meta.tok_row.cpu(), meta.tok_slot.cpu()
            self._local_meta = dataclasses.replace(
                meta, rows=torch.arange(len(self._rows), device=meta.rows.device), tok_row=meta.tok_b)
        return self._local_meta

    def _apply_pending(self, i: int) -> None:
        p = self.pending.pop(i, None)
        if p is not None:
            ev, kn, vn, rows, slots = p
            ev.synchronize()  # queued a step ago: long done
            self.k[i][rows, slots] = kn
            self.v[i][rows, slots] = vn

    def _fetch(self, i: int, L: int) -> None:
        """Queue the copy of layer i's rows [:, :L] into the next device buffer (side stream)."""
        self._apply_pending(i)
        b = self.next_buf
        self.next_buf ^= 1
        kb, vb = self.bufs[b]
        with torch.cuda.stream(self.stream):
            if self.buf_free[b] is not None:
                self.stream.wait_event(self.buf_free[b])
            for j, r in enumerate(self._row_list):  # each row's [:L] is contiguous in the host cache
                kb[j, :L].copy_(self.k[i][r, :L], non_blocking=True)
                vb[j, :L].copy_(self.v[i][r, :L], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.inflight[i] = (b, ev)

    def layer(self, i: int, meta: StepMeta):
        local = self._local(meta)
        L, B = meta.kv_len, len(self._row_list)
        if not self.cuda:
            return self.k[i][self._rows, :L].clone(), self.v[i][self._rows, :L].clone(), local
        if i not in self.inflight:
            self._fetch(i, L)
        b, ev = self.inflight.pop(i)
        torch.cuda.current_stream(self.device).wait_event(ev)
        self.used[i] = b
        nxt = self.next_layer.get(i)
        if nxt is not None:
            self._fetch(nxt, L)  # the next host layer's KV crosses while this one computes
        kb, vb = self.bufs[b]
        return kb[:B, :L], vb[:B, :L], local

    def write_back(self, i: int, meta: StepMeta, k, v) -> None:
        tb, ts = meta.tok_b, meta.tok_slot
        if not self.cuda:
            self.k[i][self._tok_row, self._tok_slot] = k[tb, ts]
            self.v[i][self._tok_row, self._tok_slot] = v[tb, ts]
            return
        kn = torch.empty((len(self._tok_row), *k.shape[2:]), dtype=k.dtype, pin_memory=True)
        vn = torch.empty_like(kn, pin_memory=True)
        kn.copy_(k[tb, ts], non_blocking=True)
        vn.copy_(v[tb, ts], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.pending[i] = (ev, kn, vn, self._tok_row, self._tok_slot)
        self.buf_free[self.used.pop(i)] = ev


class SplitKV:
    """The first `device_layers` layers' KV on the device, the others' in host memory."""

    def __init__(self, hp: HParams, rows: int, ctx: int, device, dtype, device_layers: int):
        self.n_dev = device_layers
        self.dev = DeviceKV(hp, rows, ctx, device, dtype, range(device_layers))
        self.host = HostKV(hp, rows, ctx, device, dtype, range(device_layers, hp.n_layer))

    def nbytes(self) -> int:
        return self.dev.nbytes() + self.host.nbytes()

    def on_device(self, i: int) -> bool:
        return i < self.n_dev

    def layer(self, i: int, meta: StepMeta):
        return (self.dev if i < self.n_dev else self.host).layer(i, meta)

    def write_back(self, i: int, meta: StepMeta, k, v) -> None:
        (self.dev if i < self.n_dev else self.host).write_back(i, meta, k, v)


def make_kv(hp: HParams, rows: int, ctx: int, device, dtype, device_layers: int):
    """KV stores for `device_layers` of the model's layers on the device, the rest on the host."""
    device_layers = max(0, min(hp.n_layer, device_layers))
    if device_layers == hp.n_layer:
        return DeviceKV(hp, rows, ctx, device, dtype)
    if device_layers == 0:
        return HostKV(hp, rows, ctx, device, dtype)
    return SplitKV(hp, rows, ctx, device, dtype, device_layers)


def _static_meta(meta: StepMeta) -> tuple[StepMeta, list[str]]:
    """A graph's own copy of a step's meta, and the names of its tensor fields (its inputs)."""
    names = [f.name for f in dataclasses.fields(StepMeta) if isinstance(getattr(meta, f.name), torch.Tensor)]
    return dataclasses.replace(meta, **{name: getattr(meta, name).clone() for name in names}), names


def _fill_meta(s_meta: StepMeta, meta: StepMeta, names: list[str]) -> None:
    """The step's inputs into a graph's own tensors."""
    for name in names:
        getattr(s_meta, name).copy_(getattr(meta, name))


class ModelRunner:
    """Forward steps for a batch of sequences over a layer source and a KV store.

    NOTE [ decode graphs ]
    A decode step launches about 24 kernels a layer (8B, measured with `layerstream-bench
    kernels`), each costing more to launch from Python than to run, so decode steps replay CUDA graphs, captured once per (batch, padded KV
    length). The graph covers the leading layers whose weights stay put (`LayerSource.fixed`)
    and whose KV is on the device: every layer and the head in the in-VRAM engine; the resident
    layers in the streaming pipeline, whose streamed layers then run eagerly from their VRAM
    slots. All graphs share one memory pool and one capture stream; each graph's output is
    consumed before the next replays. Under a memory budget (`graph_max_tokens`, the pipeline)
    only steps of up to FUSED_MIN_OF_TYPES sequences are captured: their matmuls are the fused
    kernels (qlinear.FUSED_MIN_OF_TYPES), whereas cuBLAS takes a workspace for each new stream
    (with batch-32 graphs, 8B at 4 GiB ran out of memory at the budget on an H200, one 20 MiB
    allocation short), and at larger batches launches weigh less.
    A mixture-of-experts layer is captured with the others when its experts are resident blocks:
    the grouped kernels find the chosen experts on the device (moe.py, NOTE [ grouped
    experts ]). A streamed MoE layer whose other tensors are kept on the device (`ExpertSet.
    dense_fixed`) runs as two graphs of its own around the host's part: its attention and router
    (graph A); then the host reads the chosen ids, the expert cache copies the missing experts
    into its pool and the pairs' byte offsets go into graph B's input; then its experts (graph
    B), which read the pool (experts.py, NOTE [ the expert pool ]). Those graphs share one copy
    of the step's inputs per shape, filled once a step; graph B writes the layer's output back
    into that copy, where the next layer's graph A reads it.

    NOTE [ the next router early ]
    The host's time bounds a streamed MoE layer at batch 1 (BENCHMARKS.md, issue 9): it waited
    about 110 µs of a 560-µs layer for graph A, and the device waited for the host's bookkeeping
    between layers (the layer's release, the next layer's announcement). So right after graph B
    of layer i (and the next layer's copies ahead), graph A of layer i+1 is launched too, before
    that bookkeeping, when layer i+1 is a streamed MoE layer whose attention and router read only
    kept tensors (`LayerSource.moe_graph_key`) and its graphs exist: they need nothing that
    layer(i+1) returns. The device then runs layer i+1's attention and router while the host
    does the bookkeeping, and the host's wait for the chosen ids mostly vanishes.
    """

    def __init__(self, hp: HParams, glob: GlobalWeights, source: LayerSource, device, dtype,
                 ctx: int, max_seqs: int = 1, kv_on_host: bool = False, use_graphs: bool = True,
                 sliding: bool = False, kv_device_layers: int | None = None, triton_attention: bool = False,
                 graph_max_tokens: int | None = None):
        self.hp, self.glob, self.source = hp, glob, source
        self.sliding = sliding  # positions in the cache change: K is stored unrotated
        self.use_graphs = use_graphs
        self.triton_attention = triton_attention  # attn_kernels.py: RoPE and cache writes, decode attention
        self.graphs: dict[tuple[int, int, int], tuple] = {}  # (layers, batch, padded KV length) -> graph
        self.graph_max_tokens = graph_max_tokens  # None: decode steps of any batch are captured
        self.pool = self.capture_stream = None
        self.moe_graphs: dict[tuple[int, int, int], tuple] = {}  # (layer, batch, padded KV length) -> A, B
        self.moe_inputs: dict[tuple[int, int], tuple] = {}  # (batch, padded KV length) -> (x, meta, names, filled)
        self._early = None  # the graph key of the layer whose graph A already ran (NOTE [ the next router early ])
        self._keep_ones: set = set()  # MoE graph keys whose device keep weights are all 1 (NOTE [ CPU experts ])
        self._graph_step = False  # this step may replay graphs (a decode step within the limits)
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type == "cuda":
            # NOTE: cuDNN attention builds an execution plan per new shape (tens of ms each,
            # measured as a 56 ms first layer every decode step on H200); the flash and
            # memory-efficient kernels have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.ctx, self.max_seqs = ctx, max_seqs
        self.inv_freq = rope_inv_freq(hp, glob.rope_freqs)
        self.inv_freq_swa = rope_inv_freq(hp, None, hp.rope_theta_swa) if hp.swa_window else None
        if kv_device_layers is None:
            kv_device_layers = 0 if kv_on_host else hp.n_layer
        self.kv = make_kv(hp, max_seqs, ctx, self.device, dtype, kv_device_layers)

    def close(self) -> None:
        pass

    def _graph_layers(self, seqs: list[SeqStep], decode: bool) -> int:
        """How many leading layers this step replays from a graph (NOTE [ decode graphs ]): 0 but
        for decode steps (one token a sequence) on CUDA."""
        self._graph_step = (decode and self.use_graphs and self.device.type == "cuda"
                            and (self.graph_max_tokens is None or len(seqs) <= self.graph_max_tokens)
                            and (not self.hp.n_expert or len(seqs) <= GROUPED_MAX_TOKENS))
        if not self._graph_step:
            return 0
        n = 0
        while n < self.hp.n_layer and self.kv.on_device(n) and (w := self.source.fixed(n)) is not None \
                and (not self.hp.n_expert or runs_grouped(w)):
            n += 1
        return n

    @torch.inference_mode()
    def step(self, seqs: list[SeqStep], want: str = "last") -> torch.Tensor | None:
        """Run all layers over the new tokens of `seqs`; logits of the last ("last") or every ("all") token."""
        for s in seqs:
            if not 0 <= s.row < self.max_seqs or max(s.slots, default=0) >= self.ctx:
                raise ValueError(f"sequence row {s.row} or slots beyond the KV cache ({self.max_seqs} x {self.ctx})")
        decode = all(len(s.tokens) == 1 for s in seqs)
        self._early = None
        upto = self._graph_layers(seqs, decode)
        meta = build_step_meta(self.hp, self.inv_freq, seqs, self.device, self.dtype,
                               kv_len=self._kv_len(seqs, upto > 0), rotate_k_at_read=self.sliding,
                               inv_freq_swa=self.inv_freq_swa)
        meta.rope_kernel = self.triton_attention
        meta.decode_kernel = self.triton_attention and decode and not self.sliding
        x = self.glob.embed(torch.tensor([t for s in seqs for t in s.tokens], dtype=torch.long))
        if self.hp.embed_scale != 1.0:  # gemma3: embeddings times sqrt(n_embd)
            x = x * self.hp.embed_scale
        if upto == self.hp.n_layer and want == "last":  # the whole step, head included
            return self._replay(x, meta, seqs, upto, head=True)
        if upto:
            x = self._replay(x, meta, seqs, upto, head=False)
        return self._forward(x, meta, seqs, want, start=upto)

    def _kv_len(self, seqs: list[SeqStep], graph: bool) -> int:
        """The attended KV length, padded (masked) so that kernels and graphs see few shapes:
        multiples of 256 for eager steps, powers of two (at least 256) for captured graphs."""
        L = max(len(s.kv_pos) for s in seqs)
        padded = max(256, 1 << (L - 1).bit_length()) if graph else -(-L // 256) * 256
        return min(self.ctx, padded)

    def _moe_graphed(self, i: int, w: LayerWeights) -> bool:
        """Whether streamed MoE layer i runs as its two graphs in this step (NOTE [ decode graphs ])."""
        ex = w.get("experts")
        return self._graph_step and ex is not None and ex.dense_fixed and ex.grouped and self.kv.on_device(i)

    def _moe_layer(self, i: int, w: LayerWeights, x: torch.Tensor, meta: StepMeta, k, v, stop: int) -> torch.Tensor:
        """Streamed MoE layer i through its graphs: attention and router, the host's fetch, experts;
        then the next layer's attention and router, where they may run early (NOTE [ the next
        router early ])."""
        T = x.shape[0]
        ex = w["experts"]
        key = (i, T, meta.kv_len, ex.next_router is not None)
        g = self.moe_graphs.get(key)
        s_x, s_meta = self._moe_inputs(x, meta)
        if self._early != key:
            if x is not s_x:  # (graph B of the layer before wrote it there)
                s_x.copy_(x)
            if g is None:
                x_in = s_x.clone()  # capturing graph B runs it once, writing s_x
                g = self.moe_graphs[key] = self._capture_moe(i, w, s_x, s_meta, k, v)
                s_x.copy_(x_in)
            g[0].replay()
        self._early = None
        graph_a, graph_b, (x1, h, weight, ids), offs, pinned, keep, out = g
        ids = ex.read_ids(ids)  # the layer's host sync: its chosen experts, then those predicted for the next
        n = T * self.hp.n_expert_used
        # into this layer's own pinned buffers: their last copies crossed a step ago
        _, keep_host, run_cpu = ex.prepare(ids[:n], h, weight, out=pinned[0])
        offs.copy_(pinned[0], non_blocking=True)
        if keep is not None and (keep_host is not None or key not in self._keep_ones):
            # captured with the CPU's share (NOTE [ CPU experts ]): its pairs weigh 0 on the device;
            # all 1 where it takes none (uploaded only when that changes)
            if keep_host is None:
                pinned[1].fill_(1.0)
                self._keep_ones.add(key)
            else:
                pinned[1].copy_(keep_host)
                self._keep_ones.discard(key)
            keep.copy_(pinned[1], non_blocking=True)
        graph_b.replay()
        ex.prefetch(ids[n:])  # the next layer's, while the device computes (NOTE [ expert prefetch ])
        if run_cpu is not None:  # while the device computes its experts
            pinned[2].copy_(run_cpu())
            out.add_(pinned[2].to(self.device, non_blocking=True))
        self.source.graph_ran(i, i + 1, None, None)
        if i + 1 < stop:
            self._next_router_early(i + 1, T, meta.kv_len)
        return out

    def _next_router_early(self, j: int, T: int, kv_len: int) -> None:
        """Launch graph A of layer j now, if it is a streamed MoE layer that allows it and its
        graphs exist (NOTE [ the next router early ]); its input is already in place."""
        ahead = self.source.moe_graph_key(j)
        if ahead is None or not self.kv.on_device(j):
            return
        key = (j, T, kv_len, ahead)
        g = self.moe_graphs.get(key)
        if g is not None:
            g[0].replay()
            self._early = key

    def _moe_inputs(self, x: torch.Tensor, meta: StepMeta) -> tuple:
        """The graphs' copy of the step's inputs for this shape, holding this step's meta."""
        key = (x.shape[0], meta.kv_len)
        got = self.moe_inputs.get(key)
        if got is None:
            got = self.moe_inputs[key] = (x.clone(), *_static_meta(meta), meta)
        s_x, s_meta, names, filled = got
        if filled is not meta:  # once a step
            _fill_meta(s_meta, meta, names)
            self.moe_inputs[key] = (s_x, s_meta, names, meta)
        return s_x, s_meta

    def _capture_moe(self, i: int, w: LayerWeights, s_x, s_meta, k, v) -> tuple:
        hp, ex = self.hp, w["experts"]
        T, kk = s_x.shape[0], hp.n_expert_used

        def part_a():
            x1 = attention_block(hp, w, s_x, s_meta, k, v, hp.is_swa(i))
            h, weight, chosen = moe_route(hp, w, x1)
            ids = chosen.flatten()
            if ex.next_router is not None:  # NOTE [ expert prefetch ] in experts.py
                ids = torch.cat((ids, predict_next(hp, ex.next_router, x1).flatten()))
            return x1, h, weight, ids

        graph_a, outs_a = self._capture(part_a)
        x1, h, weight, _ = outs_a
        offs = torch.zeros(3, T * kk, dtype=torch.int64, device=self.device)  # slot 0 until the first fetch
        pool, parts = ex.cache.pool, ex.parts
        keep = None if ex.cpu is None else torch.ones(T, kk, dtype=torch.float32, device=self.device)
        graph_b, out = self._capture(lambda: s_x.copy_(x1 + experts_grouped(
            h, weight if keep is None else weight * keep, pool, offs, parts).to(x1.dtype)))
        # pinned: the offsets, and with the CPU's share the pairs' weights and the CPU's sum
        pin = self.device.type == "cuda"
        pinned = (torch.empty(3, T * kk, dtype=torch.int64, pin_memory=pin),
                  *((None, None) if keep is None else (torch.empty(T, kk, dtype=torch.float32, pin_memory=pin),
                                                       torch.empty(T, x1.shape[1], dtype=torch.float32, pin_memory=pin))))
        return graph_a, graph_b, outs_a, offs, pinned, keep, out

    def _replay(self, x: torch.Tensor, meta: StepMeta, seqs: list[SeqStep], upto: int, head: bool) -> torch.Tensor:
        """Layers 0..upto-1 (and the head) through the graph captured for this shape: their output,
        a new tensor."""
        key = (upto + head, len(seqs), meta.kv_len)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture_layers(x, meta, seqs, upto, head)
        graph, s_x, s_meta, s_out, names = g
        s_x.copy_(x)
        _fill_meta(s_meta, meta, names)
        cur = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(cur)
        graph.replay()
        end.record(cur)
        self.source.graph_ran(0, upto, start, end)
        return s_out.clone()

    def _capture_layers(self, x, meta, seqs, upto: int, head: bool):
        s_x = x.clone()
        s_meta, names = _static_meta(meta)

        def run():
            y = self._layers(s_x, s_meta, 0, upto, captured=True)
            return head_forward(self.hp, self._last(y, seqs), self.glob.norm, self.glob.head) if head else y

        graph, s_out = self._capture(run)
        return graph, s_x, s_meta, s_out, names

    def _capture(self, run):
        """A CUDA graph of run() (after one warm-up run outside it) and the outputs it writes."""
        if self.pool is None:
            self.pool, self.capture_stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        side = self.capture_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, kernel selection)
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            out = run()
        return graph, out

    def _layers(self, x: torch.Tensor, meta: StepMeta, start: int, stop: int, captured: bool = False) -> torch.Tensor:
        """Layers start..stop-1 over x: weights from the source's layer() and release(), or, for
        a graph being `captured`, its fixed() weights."""
        hp = self.hp
        for i in range(start, stop):
            w = self.source.fixed(i) if captured else self.source.layer(i)
            k, v, m = self.kv.layer(i, meta)
            if not captured and hp.n_expert and self._moe_graphed(i, w):
                x = self._moe_layer(i, w, x, m, k, v, stop)
            else:
                x = layer_forward(hp, w, x, m, k, v, hp.is_swa(i))
            self.kv.write_back(i, m, k, v)
            if not captured:
                self.source.release(i)
        return x

    def _last(self, x: torch.Tensor, seqs: list[SeqStep]) -> torch.Tensor:
        """The rows of each sequence's last new token."""
        if x.shape[0] == len(seqs):
            return x
        ends = torch.tensor(np.cumsum([len(s.tokens) for s in seqs]) - 1, device=self.device)
        return x[ends]

    def _forward(self, x: torch.Tensor, meta: StepMeta, seqs: list[SeqStep], want: str, start: int = 0):
        x = self._layers(x, meta, start, self.hp.n_layer)
        if want == "none":
            return None
        if want == "last":
            x = self._last(x, seqs)
        if x.shape[0] <= HEAD_CHUNK or self.device.type != "cuda":
            return head_forward(self.hp, x, self.glob.norm, self.glob.head)
        # every position's logits (evaluation): rows in chunks, each copied out, so the device
        # holds HEAD_CHUNK rows of logits at most (plan.py counts that)
        return torch.cat([head_forward(self.hp, x[r : r + HEAD_CHUNK], self.glob.norm, self.glob.head).cpu()
                          for r in range(0, x.shape[0], HEAD_CHUNK)])
