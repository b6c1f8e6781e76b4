"""CUDA graphs of decode steps: the leading layers whose weights stay put, and a streamed MoE
layer's two graphs around the host's expert fetch.

NOTE [ decode graphs ]
A decode step launches about 24 kernels a layer (8B), each costing more to launch from Python
than to run, so decode steps replay CUDA graphs, captured once per (batch, padded KV length).
The graph covers the leading layers whose weights stay put (`LayerSource.fixed`) and whose KV is
on the device: every layer and the head in the in-VRAM engine and in a pipeline that streams
nothing; the resident layers in a pipeline that streams others, which then run eagerly from
their VRAM slots. Where the embedding is on the device, the graph embeds the step's ids too
(the embedding's gather and dequantization were host launches every step; the pipeline's gather
reads its pinned table in place, from the graph as from a launch: embedding.py). In a pipeline
that streams layers this is on the step's critical path: the streamed layers keep the host in
step with the device (each waits for its router's ids), so the host's work between the last
layer's launch and the next step's graph (the head, the sampling, the next step's set-up) is
time the device idles.
All graphs share one memory pool and one capture stream (`GraphCapture`); each graph's output is
consumed before the next replays. Under a memory budget (`graph_max_tokens`, the pipeline) only the
steps the plan counts are captured (`DevicePlan.graph_rows`): up to --batch rows, or 1 + the
drafts where a verifying step's rows replay them, and never beyond the rows every matrix keeps a
fused kernel for (qlinear's per-type limits), since cuBLAS takes a workspace for each new stream
(graphs of larger batches ran out of memory at the budget) and at larger batches launches weigh
less. A dense model's decode batches keep to the bound of every type (Q5_K's); a mixture of
experts' keep to its own matrices' bound, since its streamed layers run graphs of their own (below),
and eagerly their host launches held each layer's fetch back.
A mixture-of-experts layer is captured with the others when its experts are resident blocks:
the grouped kernels find the chosen experts on the device (moe.py, NOTE [ grouped experts ]).
A streamed MoE layer whose other tensors are kept on the device (`ExpertSet.dense_fixed`) runs
as two graphs of its own around the host's part (`MoeGraphs`): its attention and router (graph
A); then the host reads the chosen ids, the expert cache copies the missing experts into its
pool and the pairs' byte offsets go into graph B's input; then its experts (graph B), which read
the pool (experts.py, NOTE [ the expert pool ]). Those graphs share one copy of the step's inputs
per shape, filled once a step; graph B writes the layer's output back into that copy, where the
next layer's graph A reads it. With a CPU share, graph B's last kernel adds the CPU's experts'
sum once the CPU posts it (NOTE [ the CPU's sum posted to the device ] in cpu/qdot.c), so the host
launches the next layer's graph A without waiting for the CPU.

NOTE [ the next router early ]
The host's time bounds a streamed MoE layer at batch 1: it waited a fifth of the layer for graph
A, and the device waited for the host's bookkeeping between layers (the layer's release, the
next layer's announcement). So right after graph B of layer i (and the next layer's copies
ahead), graph A of layer i+1 is launched too, before that bookkeeping, when layer i+1 is a
streamed MoE layer whose attention and router read only kept tensors
(`LayerSource.moe_graph_key`) and its graphs exist: they need nothing that layer(i+1) returns.
The device then runs layer i+1's attention and router while the host does the bookkeeping, and
the host's wait for the chosen ids mostly vanishes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from layerstream.compute.model import LayerWeights, attention_block
from layerstream.compute.moe import experts_grouped, moe_route, predict_next, with_inputs
from layerstream.compute.step_meta import SeqStep, StepMeta
from layerstream.loader.gguf_index import HParams


def static_meta(meta: StepMeta) -> tuple[StepMeta, list[str]]:
    """A graph's own copy of a step's meta (its inputs), and the paths of the tensor fields that
    fill_meta copies one by one: none but those set apart from the step's buffer (NOTE [ one
    buffer a step ] in step_meta.py), every one where there is no buffer."""
    fields = meta.tensors()
    if meta.store is None:
        return meta.with_tensors({name: t.clone() for name, t in fields.items()}), list(fields)
    src = meta.store.buf
    buf, own = src.clone(), {}
    loose = []
    for name, t in fields.items():
        off = t.data_ptr() - src.data_ptr()
        if t.device == buf.device and t.is_contiguous() and 0 <= off <= buf.numel() - t.nbytes:
            own[name] = buf[off : off + t.nbytes].view(t.dtype).view(t.shape)
        else:
            own[name], loose = t.clone(), loose + [name]
    return meta.with_tensors(own, store=dataclasses.replace(meta.store, buf=buf, host_buf=None)), loose


def fill_meta(s_meta: StepMeta, meta: StepMeta, names: list[str]) -> None:
    """The step's inputs into a graph's own tensors: its buffer in one copy, then `names`."""
    if s_meta.store is not None:
        if meta.store is None or meta.store.layout != s_meta.store.layout:
            raise ValueError("internal: a step's meta laid out otherwise than the graph it replays")
        s_meta.store.buf.copy_(meta.store.buf)
    if names:
        own, new = s_meta.tensors(), meta.tensors()
        for name in names:
            own[name].copy_(new[name])


class GraphCapture:
    """CUDA graphs captured into one memory pool from one side stream, shared by a runner's graphs;
    `tl`: the timeline that keeps each capture's host time (`graph_warm`, `graph_capture`)."""

    def __init__(self, device, tl=None):
        self.device, self.tl = torch.device(device), tl
        self.pool = self.stream = None

    def capture(self, run, what: str = "graph"):
        """A CUDA graph of run() (after one warm-up run outside it) and the outputs it writes."""
        if self.pool is None:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        side = self.stream
        t0 = time.monotonic_ns()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, kernel selection)
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        t1 = time.monotonic_ns()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            out = run()
        if self.tl is not None:
            self.tl.add("graph_warm", f"warm-up {what}", t0, t1 - t0)
            self.tl.add("graph_capture", f"capture {what}", t1, time.monotonic_ns() - t1)
        return graph, out


class LayerGraphs:
    """Layers 0..upto-1 (and the head) of decode steps, one graph per (layers, batch, padded KV
    length, embedding); `forward(x, meta, upto, head, seqs, last_ids)` is what a graph holds."""

    def __init__(self, capture: GraphCapture, source, forward: Callable[..., torch.Tensor]):
        self.capture, self.source, self.forward = capture, source, forward
        # (layers, batch, padded KV length, embedding: None, or the sampled ids' address) -> graph
        self.graphs: dict[tuple[int, int, int, int | None], tuple] = {}

    def replay(self, x: torch.Tensor | None, meta: StepMeta, seqs: list[SeqStep], upto: int, head: bool,
               last_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Layers 0..upto-1 (and the head) through the graph captured for this shape: their output,
        a new tensor. With x None the graph embeds the step's ids itself, a -1 read from `last_ids`
        (a tensor that stays put: its address is part of the graph's key)."""
        embeds = None if x is not None else 0 if last_ids is None else last_ids.data_ptr()
        key = (upto + head, len(seqs), meta.q.kv_len, embeds)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(x, meta, seqs, upto, head, last_ids)
        graph, s_x, s_meta, s_out, names = g
        if s_x is not None:
            s_x.copy_(x)
        fill_meta(s_meta, meta, names)
        if not self.source.times_graphs:
            graph.replay()
            self.source.graph_ran(0, upto, None, None)
            return s_out.clone()
        cur = torch.cuda.current_stream(self.capture.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(cur)
        graph.replay()
        end.record(cur)
        self.source.graph_ran(0, upto, start, end)
        return s_out.clone()

    def _capture(self, x, meta, seqs, upto: int, head: bool, last_ids):
        s_x = None if x is None else x.clone()
        s_meta, names = static_meta(meta)
        graph, s_out = self.capture.capture(lambda: self.forward(s_x, s_meta, upto, head, seqs, last_ids),
                                            f"layers 0-{upto - 1}")
        return graph, s_x, s_meta, s_out, names


class MoeGraphs:
    """Streamed MoE layers' graphs A and B (NOTE [ decode graphs ]), and the next layer's graph A
    launched early (NOTE [ the next router early ])."""

    def __init__(self, hp: HParams, source, kv, capture: GraphCapture):
        self.hp, self.source, self.kv, self.capture = hp, source, kv, capture
        self.device = capture.device
        self.graphs: dict[tuple[int, int, int, bool], tuple] = {}  # (layer, batch, padded KV length, ahead) -> A, B
        self.inputs: dict[tuple[int, int], tuple] = {}  # (batch, padded KV length) -> (x, meta, names, filled)
        self.early = None  # the graph key of the layer whose graph A already ran (NOTE [ the next router early ])
        self.keep_ones: set = set()  # graph keys whose device keep weights are all 1 (NOTE [ CPU experts ])
        self.on = False  # this step may replay graphs (a decode step within the limits)

    def start_step(self, on: bool) -> None:
        """A new step, which may replay graphs (`on`) or not."""
        self.on, self.early = on, None

    def runs(self, i: int, w: LayerWeights) -> bool:
        """Whether streamed MoE layer i runs as its two graphs in this step (NOTE [ decode graphs ])."""
        ex = w.get("experts")
        return self.on and ex is not None and ex.dense_fixed and ex.grouped and self.kv.on_device(i)

    def layer(self, i: int, w: LayerWeights, x: torch.Tensor, meta: StepMeta, k, v, stop: int) -> torch.Tensor:
        """Streamed MoE layer i through its graphs: attention and router, the host's fetch, experts;
        then the next layer's attention and router, where they may run early (NOTE [ the next
        router early ])."""
        T = x.shape[0]
        ex = w["experts"]
        key = (i, T, meta.q.kv_len, ex.next_router is not None)
        g = self.graphs.get(key)
        s_x, s_meta = self._inputs(x, meta)
        if self.early != key:
            if x is not s_x:  # (graph B of the layer before wrote it there)
                s_x.copy_(x)
            if g is None:
                x_in = s_x.clone()  # capturing graph B runs it once, writing s_x
                g = self.graphs[key] = self._capture_ab(i, w, s_x, s_meta, k, v)
                s_x.copy_(x_in)
            self._launch(g[0], "A", i, ex.cache.tl)
        self.early = None
        graph_a, graph_b, (x1, h, weight, ids), offs, pinned, keep, out = g
        n = T * self.hp.moe.n_expert_used
        inputs, n_ids = None, n * (2 if ex.next_router is not None else 1)
        if ex.stages_inputs:  # (with the experts' inputs: NOTE [ one sync a layer ] in experts.py)
            ids, inputs = ex.read_step(ids, n_ids, h.shape, weight.shape)
        else:  # the ids alone, the layer's host sync: its chosen experts, then those predicted for the next
            ids = ex.read_ids(ids[:n_ids])  # (a graph captured with a share carries its inputs after them)
        # into this layer's own pinned buffers: their last copies crossed a step ago
        _, keep_host, cpu_sum = ex.prepare(ids[:n], h, weight, out=pinned[0], inputs=inputs, post=pinned[2])
        offs.copy_(pinned[0], non_blocking=True)
        if keep is not None and (keep_host is not None or key not in self.keep_ones):
            # captured with the CPU's share (NOTE [ CPU experts ]): its pairs weigh 0 on the device;
            # all 1 where it takes none (uploaded only when that changes)
            if keep_host is None:
                pinned[1].fill_(1.0)
                self.keep_ones.add(key)
            else:
                pinned[1].copy_(keep_host)
                self.keep_ones.discard(key)
            keep.copy_(pinned[1], non_blocking=True)
        self._launch(graph_b, "B", i, ex.cache.tl)
        ex.cache.settle()  # (NOTE [ misses first, bookkeeping after ] in experts.py)
        ex.prefetch(ids[n:])  # the next layer's, while the device computes (NOTE [ expert prefetch ])
        self.source.graph_ran(i, i + 1, None, None)
        if i + 1 < stop:  # (graph B adds the CPU's sum once posted: NOTE [ the CPU's sum posted to the device ])
            self._next_router_early(i + 1, T, meta.q.kv_len, ex.cache.tl)
        if cpu_sum is not None:  # begun in prepare: the call's end, its error if it failed, and its time
            with ex.cache.tl.span("wait_cpu", f"cpu sum L{i}", layer=i):
                cpu_sum()
        return out

    def _next_router_early(self, j: int, T: int, kv_len: int, tl) -> None:
        """Launch graph A of layer j now, if it is a streamed MoE layer that allows it and its
        graphs exist (NOTE [ the next router early ]); its input is already in place."""
        ahead = self.source.moe_graph_key(j)
        if ahead is None or not self.kv.on_device(j):
            return
        key = (j, T, kv_len, ahead)
        g = self.graphs.get(key)
        if g is not None:
            self._launch(g[0], "A", j, tl)
            self.early = key

    @staticmethod
    def _launch(graph, part: str, i: int, tl) -> None:
        """Replay graph A or B of layer i, its host time kept as `moe_launch` (a launch that waits
        for the device shows there, not as the device's time)."""
        t0 = time.monotonic_ns()
        graph.replay()
        tl.add("moe_launch", f"launch {part} L{i}", t0, time.monotonic_ns() - t0, layer=i)

    def _inputs(self, x: torch.Tensor, meta: StepMeta) -> tuple:
        """The graphs' copy of the step's inputs for this shape, holding this step's meta."""
        key = (x.shape[0], meta.q.kv_len)
        got = self.inputs.get(key)
        if got is None:
            got = self.inputs[key] = (x.clone(), *static_meta(meta), meta)
        s_x, s_meta, names, filled = got
        if filled is not meta:  # once a step
            fill_meta(s_meta, meta, names)
            self.inputs[key] = (s_x, s_meta, names, meta)
        return s_x, s_meta

    def _capture_ab(self, i: int, w: LayerWeights, s_x, s_meta, k, v) -> tuple:
        hp, ex = self.hp, w["experts"]
        T, kk = s_x.shape[0], hp.moe.n_expert_used

        def part_a():
            x1 = attention_block(hp, w, s_x, s_meta, k, v, hp.is_swa(i))
            h, weight, chosen = moe_route(hp, w, x1)
            ids = chosen.flatten()
            if ex.next_router is not None:  # NOTE [ expert prefetch ] in experts.py
                ids = torch.cat((ids, predict_next(hp, ex.next_router, x1).flatten()))
            if ex.cpu is not None:  # NOTE [ one sync a layer ] in experts.py
                ids = with_inputs(ids, h, weight)
            return x1, h, weight, ids

        graph_a, outs_a = self.capture.capture(part_a, f"A L{i}")
        x1, h, weight, _ = outs_a
        offs = torch.zeros(3, T * kk, dtype=torch.int64, device=self.device)  # slot 0 until the first fetch
        pool, parts = ex.cache.pool, ex.parts
        keep = None if ex.cpu is None else torch.ones(T, kk, dtype=torch.float32, device=self.device)
        # with the CPU's share, where it posts its sum for graph B's last kernel to add
        mail = None
        if ex.cpu is not None:
            from layerstream.compute.host_wait import Mailbox  # (it needs Triton)
            mail = Mailbox(T, x1.shape[1], self.device)

        def part_b():
            experts_grouped(h, weight if keep is None else weight * keep, pool, offs, parts, aligned=True,
                            res=x1, out=s_x)  # (the pool's parts: ALIGN apart)
            if mail is not None:  # NOTE [ the CPU's sum posted to the device ] in cpu/qdot.c
                mail.add_to(s_x)
            return s_x

        graph_b, out = self.capture.capture(part_b, f"B L{i}")
        # pinned: the offsets, and with the CPU's share the pairs' weights and its mailbox
        pin = self.device.type == "cuda"
        pinned = (torch.empty(3, T * kk, dtype=torch.int64, pin_memory=pin),
                  *((None, None) if keep is None else (torch.empty(T, kk, dtype=torch.float32, pin_memory=pin), mail)))
        return graph_a, graph_b, outs_a, offs, pinned, keep, out
