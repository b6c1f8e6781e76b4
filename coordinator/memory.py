"""The plan's memory arithmetic: what one forward step allocates, what torch's caching allocator
keeps for it, what each part of a plan takes on the device (`Sizes`), and how much host memory is
free.

NOTE [ the caching allocator's rounding ]
torch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp; the sizes in c10's allocator
config) rounds every request up to 512 bytes. Requests up to 1 MiB are cut from 2 MiB segments
(the small pool); from 1 MiB to 10 MiB, from 20 MiB segments, several to a segment, best fit; from
10 MiB on, each gets a segment of its own rounded up to 2 MiB. A freed block stays cached for later
requests of its stream; when a request would pass the cap (set_per_process_memory_fraction) the
allocator first hands every wholly free segment back to the driver and tries again. So what stays
reserved beyond the live tensors is (1) the rounding and unfilled parts of the segments that hold
long-lived tensors, which `reserved_bytes` works out for them in their order of allocation, and
(2) for the step's short-lived tensors, the segments a live block pins: `transient_reserve` adds a
partly used segment of each pool and 2 MiB of rounding for each large block to the step's peak.
Two figures are not the allocator's: cuBLAS keeps a workspace for every stream it runs on
(CUBLAS_WORKSPACE; torch's default is 32 MiB on Hopper, 8 MiB before), allocated once through the
same allocator, and CUDA graphs keep a private pool (what a captured decode step allocates, and its
outputs, one set per captured shape). tests/coordinator/test_gpu.py measures the peak against the
budget on a device (test_peak_device_memory_stays_within_the_budget).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

from layerstream.compute.cpu.native import NATIVE_TYPES
from layerstream.compute.dequant import FUSED_TYPES
from layerstream.compute.kernel_shapes import SMALL_ROWS, SMALL_SPLITS, TARGET_PROGRAMS, small_shape
from layerstream.compute.model import attention_bytes, attention_path
from layerstream.compute.moe import GROUPED_MAX_TOKENS
from layerstream.compute.qlinear import (
    CPU_DEQUANT_BYTES,
    FUSED_MAX_TOKENS,
    FUSED_MAX_TOKENS_BY_TYPE,
    FUSED_MIN_OF_TYPES,
    HEAD_CHUNK,
    NATIVE_MAX_ROWS,
    cpu_chunk_elems,
    fused_max_rows,
    model_scratch_elems,
)
from layerstream.compute.runner import VERIFY_ROWS, graph_kv_min
from layerstream.compute.sample_graphs import KEEP as SAMPLE_GRAPHS_KEPT, MAX_K as SAMPLE_MAX_K
from layerstream.loader.gguf_index import HParams, ModelIndex
from layerstream.loader.layout import LayerLayout

MiB = 1 << 20
# beyond what the plan counts tensor by tensor, with the allocator's rounding (memory.py): a margin
# for what it does not model (tensors of a few KiB made per layer, the streams' events)
SLACK_FRACTION = 0.002
SLACK_MIN = 16 * MiB
BLOCK = 512
SMALL_SIZE = 1 * MiB  # the largest request of the small pool
SMALL_SEGMENT = 2 * MiB
LARGE_SEGMENT = 20 * MiB  # shared by requests from SMALL_SIZE up to MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB
CUBLAS_WORKSPACE = 32 * MiB + 4 * MiB  # cuBLAS's per-stream workspace on Hopper, and cuBLASLt's
DECODE_PROGRAMS = 512  # attn_kernels.TARGET_PROGRAMS on a GPU: the decode kernel's split of the slots
DECODE_BLOCK = 32  # attn_kernels.BL
SLOT_ROUND = 1 << 16  # staging slots' size is a multiple of it
MOE_GRAPHS = 64 * MiB  # a MoE model's streamed layers' decode graphs, one pair a layer and shape, batches 1..4


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def reserved_bytes(sizes, cuda: bool = True) -> int:
    """What the caching allocator reserves for long-lived tensors of `sizes` bytes, allocated in
    this order and never freed (NOTE above); on the CPU, their sum."""
    if not cuda:
        return sum(sizes)
    small: list[int] = []  # free bytes left in each small segment
    large: list[int] = []  # the same for the 20 MiB segments
    total = 0
    for s in sizes:
        if s <= 0:
            continue
        s = _up(s, BLOCK)
        if s >= MIN_LARGE_ALLOC:
            total += _up(s, ROUND_LARGE)
            continue
        pool, seg = (small, SMALL_SEGMENT) if s <= SMALL_SIZE else (large, LARGE_SEGMENT)
        fits = [i for i, free in enumerate(pool) if free >= s]
        if fits:
            i = min(fits, key=pool.__getitem__)  # best fit
        else:
            total += seg
            pool.append(seg)
            i = len(pool) - 1
        pool[i] -= s
        if pool is large and pool[i] <= SMALL_SIZE:
            pool[i] = 0  # a large block is split only where more than 1 MiB remains
    return total


def transient_reserve(peak: int, largest: int, cuda: bool = True) -> int:
    """Reserved bytes for short-lived tensors of `peak` bytes live at once, none over `largest`
    (NOTE above): the peak, a partly used segment of each pool, and 2 MiB of rounding for each
    block of 10 MiB or more that can be live at once."""
    if not cuda or peak <= 0:
        return max(peak, 0)
    extra = SMALL_SEGMENT
    if largest > SMALL_SIZE:
        extra += LARGE_SEGMENT
    if largest >= MIN_LARGE_ALLOC:
        extra += ROUND_LARGE * min(8, -(-peak // MIN_LARGE_ALLOC))
    return peak + extra


def decode_attention(hp: HParams, T: int, L: int, e: int) -> int:
    """Bytes of attn_kernels.decode_attention for T one-token queries over L slots: its output and
    the partial softmaxes of its split of the slots."""
    H, D = hp.attn.n_head, hp.attn.head_dim
    n_split = max(1, min(-(-L // DECODE_BLOCK), -(-DECODE_PROGRAMS // (T * H))))
    parts = T * H * n_split * (1 << (D - 1).bit_length()) * 4 + 2 * T * H * n_split * 4 if n_split > 1 else 0
    return T * H * D * e + parts


def activations(hp: HParams, T: int, e: int, cuda: bool) -> tuple[int, int, int]:
    """(bytes while attention runs, bytes while the FFN runs, largest tensor) of one layer's
    activations for T tokens. Attention: the residual stream, the norm, q/k/v and the rotated q,
    attention's output, its projection (and norm) and the sum; the FFN: the residual stream, the
    norm, gate, up, the activation (silu in place), the down output (and norm) and the sum; a MoE
    layer's router, the pairs' activations and outputs; on the CPU the norm's float32 copies."""
    E, F, H, Hkv, D = hp.n_embd, hp.n_ff, hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim
    if hp.moe.n_expert:
        F = hp.moe.n_ff_exp or F
    attn = T * (5 * E + 3 * H * D + 2 * Hkv * D) * e
    ffn = T * (5 * E + 3 * F) * e  # (the activation and its product in place where the activation allows)
    largest = T * max(E, H * D, F) * e
    if hp.moe.n_expert:
        k = hp.moe.n_expert_used
        ffn += T * (2 * hp.moe.n_expert * 4 + E * 4 + k * (2 * E + 3 * F) * e + k * E * 4)
        largest = max(largest, T * k * max(E, F) * max(e, 4))
    if not cuda:
        attn += 2 * T * E * 4
        ffn += 2 * T * E * 4
    return attn, ffn, largest


def step_meta(hp: HParams, B: int, S: int, T: int, L: int, e: int, sliding: bool) -> int:
    """Bytes of a step's StepMeta on the device: masks, RoPE tables and index tensors."""
    masks = B * S * L * (2 if hp.attn.swa_window else 1)
    rope = T * hp.rope.dim * e * (2 if hp.attn.swa_window else 1)
    if sliding:  # K rotated at read time: tables for every slot
        rope += B * L * hp.rope.dim * e * (2 if hp.attn.swa_window else 1)
    return masks + rope + 8 * (4 * T + 3 * B + B * S) + 64 * 1024


def captured_partials(hp: HParams, T: int, part: str | None = None) -> int:
    """The largest float32 partial sums one matmul of T rows holds, captured in a decode step or
    launched eagerly (compute/kernel_shapes.py: qsmall's split of K on its shapes, the split-K
    kernel's until about TARGET_PROGRAMS programs run; qgemv's one- and two-row kernels on the larger
    matrices hold none): over a layer's matrices and the head, whatever their types (an upper bound);
    `part`: "attn", "ffn" or "head" for that part's matrices only."""
    E, F, H, Hkv, D, V = hp.n_embd, hp.n_ff, hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim, hp.n_vocab
    if hp.moe.n_expert:
        F = hp.moe.n_ff_exp or F
    out = 0
    mats = {"attn": ((H * D, E), (Hkv * D, E), (E, H * D)), "ffn": ((F, E), (E, F)), "head": ((V, E),)}
    for N, K in sum(mats.values(), ()) if part is None else mats[part]:
        if small_shape(T, N, K):  # qsmall's kernel (qkernels._small_config)
            splits = SMALL_SPLITS
        elif T <= 2 and N >= 1024 and K >= 4096:
            continue  # qgemv's
        else:
            tiles = -(-N // ((8 if N >= 32768 else 4) if T <= 2 else 32)) * (T if T <= 2 else -(-T // 16))
            splits = max(1, min(K // 256 // 2, -(-TARGET_PROGRAMS // tiles)))
        out = max(out, splits * T * N * 4 if splits > 1 else 0)
    return out


def head(hp: HParams, rows: int, e: int) -> tuple[int, int]:
    """(bytes, largest tensor) of the final norm and output head for `rows` rows: the normed rows,
    the logits in the compute dtype (the dequantizing path writes its row chunks' products into
    them) and in float32."""
    V = hp.n_vocab
    return rows * (hp.n_embd * e + V * (e + 4)), rows * V * 4


def mem_available() -> int:
    """Host memory free for new allocations: /proc/meminfo's MemAvailable (half the physical
    memory where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def kv_buckets(ctx: int, shortest: int = 256) -> int:
    """Padded KV lengths a decode graph is captured for (runner._kv_len): `shortest` (runner.graph_kv_min),
    twice that, ... up to ctx."""
    return 1 + max(0, math.ceil(math.log2(max(ctx, shortest) / shortest)))


def step_peak(hp: HParams, T: int, *, e: int, ctx: int, max_seqs: int, quantized: bool, cuda: bool,
              sliding: bool = False, head_chunk: int = 64, decode_only: bool = False) -> tuple[int, int]:
    """(bytes, largest tensor) of the short-lived tensors of the largest step a plan of T tokens a
    step runs: a decode step of every sequence, and, where T allows a sequence several tokens, a
    prompt chunk (alone, or beside the other sequences' decode tokens). Decode attention reads the
    cache in place where Triton runs the matmuls and K is stored rotated (attn_kernels.py); other
    steps take attention's general path (NOTE [ attention's temporaries ] in compute/model.py).
    A layer's attention and its FFN are never live at once; a dequantized matmul writes its row
    chunks' products into its output (qlinear.linear). Every position's logits are counted,
    `head_chunk` rows at a time on CUDA (evaluation runs on the same plan); `decode_only`: the
    decode step alone (what a CUDA graph captures)."""
    L = ctx
    B = max(1, min(max_seqs, T))
    kinds = [(B, 1)]  # (sequences, query rows of the longest)
    if T >= 2 and not decode_only:
        kinds.append((1, T))
        if B > 1 and T > B:
            kinds.append((B, T - B + 1))
    peak = largest = 0
    path = attention_path(hp, e, cuda)
    for b, s in kinds:
        toks = b if s == 1 else min(T, (b - 1) + s)
        attn_act, ffn_act, big = activations(hp, toks, e, cuda)
        if hp.moe.n_expert and quantized and toks > FUSED_MIN_OF_TYPES:  # (kept for the experts' prompt path, moe.py)
            ffn_act += toks * max(hp.n_embd, hp.moe.n_ff_exp or hp.n_ff) * e
        if s == 1 and quantized and not sliding:
            attn, abig = decode_attention(hp, toks, L, e), toks * hp.attn.n_head * hp.attn.head_dim * e
        else:
            attn, abig = attention_bytes(hp, b, s, toks, L, e, path, sliding)
        rows = min(toks, head_chunk) if cuda else toks
        hb, hbig = head(hp, rows, e)
        meta = step_meta(hp, b, s, toks, L, e, sliding)
        # an eager fused matmul's float32 partial sums, beside its phase's tensors (a graph's are
        # counted with its pool: Sizes.graphs)
        p_attn, p_ffn, p_head = (captured_partials(hp, toks, "attn"), captured_partials(hp, toks, "ffn"),
                                 captured_partials(hp, rows, "head")) \
            if cuda and quantized and toks <= SMALL_ROWS[1] and not decode_only else (0, 0, 0)
        peak = max(peak, meta + max(attn_act + attn + p_attn, ffn_act + p_ffn, toks * hp.n_embd * e + hb + p_head))
        largest = max(largest, big, abig, hbig, p_attn, p_ffn, p_head)
    return peak, largest


@dataclass(frozen=True, eq=False)
class Sizes:
    """What the plan weighs for one model at one dtype, device and context (see make_plan)."""

    index: ModelIndex
    layouts: list[LayerLayout]
    e: int  # bytes of the compute dtype
    ctx: int
    max_seqs: int
    quantized: bool
    cuda: bool  # the caching allocator's rounding applies (NOTE [ the caching allocator's rounding ])
    sliding: bool
    evaluates: bool = True  # steps may ask every position's logits (NOTE [ rows of logits ])
    draft_tokens: int = 0  # tokens a sequence drafts a step (its verifying rows' logits)

    # NOTE [ rows of logits ]
    # A step that evaluates a text (perplexity) wants every position's logits: the runner computes
    # them HEAD_CHUNK rows at a time. A run that only generates wants a row a sequence, and a
    # verifying step 1 + drafts rows a sequence: that many, at most the step's tokens, is what it
    # holds. The plan counts the run's rows (`logit_rows`) and the runner computes a wider head of
    # every position in chunks of it, so a generating run asked to evaluate stays within its
    # budget, slower; sampled rows are never chunked (their sampler runs on the device). So only
    # a run whose drafts a step are known plans this way: the CLI without --perplexity or --serve
    # (a server's request may ask for more drafts than the command line's) and the benches. At
    # one row the float32 logits (half a MiB at a 128k vocabulary) also stay out of the allocator's
    # large pool; 64 rows of them were most of a small step's scratch (8B at 4 GiB, 16-token steps).
    def logit_rows(self, T: int) -> int:
        """Rows of logits a step of T tokens holds on the device at once (NOTE [ rows of logits ])."""
        if self.evaluates:
            return HEAD_CHUNK
        return max(1, min(T, self.max_seqs * (1 + self.draft_tokens)))

    @functools.cached_property
    def slot_bytes(self) -> int:
        return -(-max(lay.nbytes for lay in self.layouts) // SLOT_ROUND) * SLOT_ROUND

    def dense_bytes(self, t) -> int:
        return math.prod(t.shape) * self.e

    def kept_as_blocks(self, t) -> bool:
        if not self.cuda:  # the native kernel's matrices (qlinear.py, NOTE [ native blocks on the CPU device ])
            return self.quantized and len(t.shape) == 2 and t.qtype in NATIVE_TYPES
        return self.quantized and len(t.shape) in (2, 3) and t.qtype in FUSED_TYPES

    def layer_allocs(self, i: int) -> list[int]:
        """A resident layer's device allocations in their order: its bytes as one copy when the
        weights stay blocks, then every tensor the fused kernels do not read, dequantized."""
        out = [self.layouts[i].nbytes] if self.quantized else []
        return out + [self.dense_bytes(t) for t in self.index.layers[i].values() if not self.kept_as_blocks(t)]

    @functools.cached_property
    def layer_dense(self) -> list[int]:
        """Each layer's tensors in the compute dtype (a streamed layer's working copy without blocks)."""
        return [sum(self.dense_bytes(t) for t in layer.values()) for layer in self.index.layers]

    @functools.cached_property
    def resident_prefix(self) -> list[int]:
        """resident_prefix[r]: the device bytes the first r resident layers hold, the allocator's rounding included."""
        allocs: list[int] = []
        out = [0]
        for i in range(len(self.layouts)):
            allocs += self.layer_allocs(i)
            out.append(reserved_bytes(allocs, self.cuda))
        return out

    @functools.cached_property
    def head(self) -> int:
        g = self.index.globals
        out = g.get("output.weight") or g["token_embd.weight"]
        sizes = [self.dense_bytes(g["output_norm.weight"]), out.nbytes if self.kept_as_blocks(out) else self.dense_bytes(out)]
        return reserved_bytes(sizes, self.cuda)

    @functools.cached_property
    def kv_tensor(self) -> int:
        """One layer's K (or V): [rows, ctx, n_head_kv, head_dim] in the compute dtype."""
        hp = self.index.hparams
        return self.max_seqs * self.ctx * hp.attn.n_head_kv * hp.attn.head_dim * self.e

    @property
    def kv_layer(self) -> int:
        return 2 * self.kv_tensor

    def kv(self, k: int) -> int:
        """The KV of k layers on the device (one allocation: kv.DeviceKV)."""
        return reserved_bytes([self.kv_tensor * 2 * k], self.cuda)

    def host_kv_in_flight(self) -> int:
        """Two device buffers for the host KV layers (CUDA, one allocation), or a gathered copy of one layer's (CPU)."""
        if self.cuda:
            return reserved_bytes([self.kv_tensor * 4])
        return self.kv_layer

    def slots(self, n: int, streamed: bool) -> int:
        """The streamed layers' VRAM slots (CUDA: one even when every layer is resident, which loads
        them); with dense weights the streamed layer's dequantized copy, two at once; on the CPU each
        streamed layer is copied out of its staging slot and dequantized (the layer before's
        tensors still held meanwhile)."""
        if not self.cuda:
            if streamed and self.quantized:  # the copy is the weights (blocks), the layer before's still held
                return 2 * (self.slot_bytes + max(sum(self.dense_bytes(t) for t in layer.values() if not self.kept_as_blocks(t))
                                                  for layer in self.index.layers))
            return self.slot_bytes + 2 * max(self.layer_dense) if streamed else 0
        ring = reserved_bytes([max(lay.nbytes for lay in self.layouts)] * max(n, 1))
        return ring + (reserved_bytes([max(self.layer_dense)] * 2) if streamed and not self.quantized else 0)

    @functools.cache  # noqa: B019 - one Sizes per plan
    def step(self, T: int) -> int:
        """The step's short-lived tensors with what the allocator keeps for them (step_peak)."""
        peak, largest = step_peak(self.index.hparams, T, e=self.e, ctx=self.ctx, max_seqs=self.max_seqs,
                                         quantized=self.quantized, cuda=self.cuda, sliding=self.sliding,
                                         head_chunk=self.logit_rows(T))
        return transient_reserve(peak, largest, self.cuda)

    @functools.cached_property
    def _fused_bounds(self) -> tuple[int, int]:
        """The most rows of x that every layer matrix this model reads as blocks takes on a fused
        kernel, and that its head does (qlinear.fused_max_rows, over the model's own types and shapes,
        its experts' included; a mixture of experts' grouped kernels up to GROUPED_MAX_TOKENS, above
        which its prompt path dequantizes the experts)."""
        def most(mats, none: int) -> int:  # (none: where no matrix is kept as blocks)
            return min((fused_max_rows(int(t.qtype), *t.shape) if len(t.shape) == 2
                        else FUSED_MAX_TOKENS_BY_TYPE.get(int(t.qtype), FUSED_MAX_TOKENS)
                        for t in mats if self.kept_as_blocks(t)), default=none)

        g = self.index.globals
        layers = most((t for layer in self.index.layers for t in layer.values() if len(t.shape) in (2, 3)),
                      FUSED_MAX_TOKENS)
        if self.index.hparams.moe.n_expert:
            layers = min(layers, GROUPED_MAX_TOKENS)
        # a head not kept as blocks (F16, BF16, or a type dequantized at load) never dequantizes
        return layers, most([g.get("output.weight") or g["token_embd.weight"]], 1 << 30)

    @functools.cached_property
    def fused_rows(self) -> int:
        """The most rows a step may hold with every matrix, its head's included, on a fused kernel
        (a captured step computes the head of each of its rows)."""
        return min(self._fused_bounds)

    def dequant_scratch(self, T: int) -> int:
        """The prompt path's dequantization buffer, reserved at start (compute_proc.py) where a step
        may dequantize: more rows than its layers' fused kernels take, or more rows of logits than
        its head's do (a step's head reads only the rows it samples, NOTE [ rows of logits ])."""
        rows = max(T, self.max_seqs)
        layers, head = self._fused_bounds
        if self.cuda and self.quantized and (rows > layers or min(rows, self.logit_rows(rows)) > head):
            return reserved_bytes([model_scratch_elems(self.index) * self.e])
        if not self.cuda and self.quantized and max(T, self.max_seqs) > NATIVE_MAX_ROWS:  # a row chunk's temporaries
            g = self.index.globals
            mats = [t for layer in self.index.layers for t in layer.values()] + [g.get("output.weight") or g["token_embd.weight"]]
            return cpu_chunk_elems(t.shape for t in mats if self.kept_as_blocks(t)) * CPU_DEQUANT_BYTES
        return 0

    @functools.cached_property
    def dense_matrices(self) -> bool:
        """Whether some matrix runs through F.linear (not blocks the fused kernels read)."""
        ts = [t for layer in self.index.layers for t in layer.values() if len(t.shape) >= 2]
        return any(not self.kept_as_blocks(t) for t in ts)

    def cublas(self, T: int) -> int:
        """cuBLAS's workspaces: the compute stream's where a step may run cuBLAS (a dequantized
        matmul, attention's general path, a dense matrix), and the graph capture stream's where a
        captured decode step does (a MoE router, a dense matrix)."""
        if not self.cuda:
            return 0
        hp = self.index.hparams
        in_graph = self.quantized and bool(hp.moe.n_expert or self.dense_matrices)
        main = T >= 2 or not self.quantized or in_graph or self.sliding
        return CUBLAS_WORKSPACE * (int(main) + int(in_graph))

    @functools.cached_property
    def rows_graphed(self) -> int:
        """The most rows a captured decode step may hold: every matrix it reads as blocks stays on a
        fused kernel (qlinear's FUSED_MAX_TOKENS_BY_TYPE: no dequantization buffer or cuBLAS inside
        a graph), a MoE layer on its grouped kernels, and a verifying step runs as rows up to
        VERIFY_ROWS (runner.py, NOTE [ drafts verified as decode rows ])."""
        return max(1, min(VERIFY_ROWS, self.fused_rows))

    def graph_rows(self, T: int, draft_tokens: int = 0) -> int:
        """The largest decode batch the pipeline captures in graphs, for steps of T tokens (the plan
        says it, compute_proc captures it): up to FUSED_MIN_OF_TYPES sequences, or `rows_graphed` for
        a mixture of experts (NOTE [ decode graphs ] in graphs.py); where sequences draft
        `draft_tokens` tokens a step, a verifying step's rows too (every sequence's chunk of 1 +
        drafts), up to `rows_graphed` and T."""
        # (a streamed MoE layer replays graphs of its own; under the bound of every type, Q5_K's, its
        # batches above it ran eagerly even where the model has no Q5_K matrix: their attention, router
        # and prediction launched from Python before the host could read the chosen experts, BENCHMARKS.md W8)
        plain = max(1, min(self.max_seqs, self.rows_graphed if self.index.hparams.moe.n_expert else FUSED_MIN_OF_TYPES))
        if draft_tokens <= 0:
            return plain
        return max(plain, min(self.max_seqs * (1 + draft_tokens), self.rows_graphed, max(T, self.max_seqs)))

    @functools.cache  # noqa: B019
    def graphs(self, all_resident: bool, rows: int | None = None) -> int:
        """CUDA graphs of decode steps of 1..rows sequences (default: graph_rows without drafts;
        runner.py, NOTE [ decode graphs ]): their private pool holds a captured step's tensors (the
        largest batch's, its matmuls' split partial sums among them) and each captured shape's
        outputs (logits where the head is captured too), and the capture's warm-up leaves its
        tensors cached on the capture stream."""
        if not (self.cuda and self.quantized):
            return 0
        hp = self.index.hparams
        bg = self.graph_rows(1) if rows is None else rows
        peak, largest = step_peak(hp, bg, e=self.e, ctx=self.ctx, max_seqs=bg, quantized=True, cuda=True,
                                  sliding=self.sliding, head_chunk=HEAD_CHUNK, decode_only=True)
        if bg > FUSED_MIN_OF_TYPES:  # (up to it, a few MiB at most: a dense plan without drafts keeps to the slack)
            parts = captured_partials(hp, bg)
            peak, largest = peak + parts, max(largest, parts)
        outs = [b * (hp.n_vocab * 4 if all_resident else hp.n_embd * self.e) for b in range(1, bg + 1)
                for _ in range(kv_buckets(self.ctx, graph_kv_min(True, self.sliding)))]  # (quantized: Triton's attention)
        # one row's sampling graphs share the pool (compute/sample_graphs.py): a draw's temporaries (the logits
        # in float32 and their finite copy, then top-k's few) and each kept graph's logits and noise, outside it
        peak = max(peak, 8 * hp.n_vocab + 64 * SAMPLE_MAX_K)
        outs += [hp.n_vocab * 4, SAMPLE_MAX_K * 4] * SAMPLE_GRAPHS_KEPT
        # the streamed MoE layers' graphs, one pair a layer and shape: MOE_GRAPHS for batches 1..4, and as much
        # again for each further four
        moe = MOE_GRAPHS * -(-bg // FUSED_MIN_OF_TYPES) if hp.moe.n_expert else 0
        return 2 * transient_reserve(peak, largest) + reserved_bytes(outs) + moe

    def link_bytes(self, r: int, kv_dev: int, tokens: int | None = None) -> int:
        """Bytes a decode pass moves over the link: the streamed layers, and the host KV layers'
        caches at a full context (`tokens`: at that many tokens of it)."""
        n = len(self.layouts)
        kv = self.kv_layer if tokens is None else self.kv_layer * min(tokens, self.ctx) // self.ctx
        return sum(lay.nbytes for lay in self.layouts[r:]) + (n - min(kv_dev, n)) * kv


def step_scratch(index: ModelIndex, T: int, *, dtype_bytes: int, ctx: int, max_seqs: int, quantized: bool,
                 cuda: bool = True, sliding: bool = False) -> int:
    """Device bytes of one forward step's short-lived tensors for T tokens a step, as the allocator keeps them."""
    s = Sizes(index, [], dtype_bytes, ctx, max_seqs, quantized, cuda, sliding)
    return s.step(max(T, max_seqs))
