"""ModelRunner: runs forward steps over a source of layer weights and a KV store; decode steps
replay CUDA graphs (graphs.py).

NOTE [ drafts verified as decode rows ]
A step that verifies drafts carries a chunk [last, d1..dn] of a sequence and wants the logits of
each of its tokens. Run as a chunk it took the prompt path: eager launches, attention's general
path. So where every sequence of such a step decodes (one token, or a chunk whose every token's
logits are wanted) and the step holds at most `verify_rows` tokens in all, each token runs as a
decode row of its own: token i of the chunk on the sequence's KV row at its slot and position,
with the chunk's slot positions. Every layer writes all the rows' K and V before any row attends
(one RoPE and cache-write launch, or the general path's indexed writes), and a row attends only
to slots holding a position at most its own (the step's mask; the decode kernel's per-row
lengths), so row i sees the rows before it and none after: the chunk's causal mask for free. The
step is then a decode batch of T rows and replays the decode graphs of batch T where a decode
batch of T would (`graph_max_tokens`: any batch in the single-process engine; in the pipeline
the batches its plan counts, which with drafting reach 1 + the drafts, up to the fused kernels'
bound: NOTE [ the plan counts every byte ] in plan.py). It holds because a verified chunk never
evicts (speculation.py: drafts only where the ring has room), so its positions run on from the
ones before and none of its writes hides a slot an earlier row reads. The rows' logits come out
in the chunk's order, as `tails` asks. Host KV gathers each KV row once for all its rows (kv.py).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Callable

import numpy as np
import torch

from layerstream.compute.block import layer_forward
from layerstream.compute.graphs import GraphCapture, LayerGraphs, MoeGraphs
from layerstream.compute.kv import make_kv
from layerstream.compute.model import head_forward
from layerstream.compute.moe import GROUPED_MAX_TOKENS, runs_grouped
from layerstream.compute.qlinear import HEAD_CHUNK
from layerstream.compute.sampling import rows_of
from layerstream.compute.step_meta import SeqStep, StepMeta, build_step_meta, rope_inv_freq
from layerstream.compute.weights import GlobalWeights, LayerSource
from layerstream.loader.gguf_index import HParams

# tokens a verifying step holds at most to run as decode rows (NOTE [ drafts verified as decode
# rows ]): the small batches whose matmuls read each weight once (qlinear's fused kernels); each
# row reads its sequence's KV, so a longer chunk costs attention more than it saves in launches
VERIFY_ROWS = 16
# the shortest padded KV length a decode graph is captured for where decode attention is the Triton
# kernel: each new length captures the whole step again (the warm-up's one, then one at each
# doubling), which a chat's first replies paid in the middle of their tokens; that kernel stops at
# each row's slots in use (attn_kernels.py), so a graph padded past them reads no more of the cache.
# The general path (and a sliding ring's K rotated at read) gathers all L slots: 256 there.
GRAPH_KV_MIN = 1024


def graph_kv_min(triton_attention: bool, sliding: bool) -> int:
    """The shortest padded KV length of a decode graph (GRAPH_KV_MIN where the decode kernel runs)."""
    return GRAPH_KV_MIN if triton_attention and not sliding else 256


class ModelRunner:
    """Forward steps for a batch of sequences over a layer source and a KV store."""

    def __init__(self, hp: HParams, glob: GlobalWeights, source: LayerSource, device, dtype,
                 ctx: int, max_seqs: int = 1, kv_on_host: bool = False, use_graphs: bool = True,
                 sliding: bool = False, kv_device_layers: int | None = None, triton_attention: bool = False,
                 graph_max_tokens: int | None = None, embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 verify_rows: int | None = None, head_chunk: int = HEAD_CHUNK):
        self.hp, self.glob, self.source = hp, glob, source
        self.head_chunk = head_chunk  # rows of logits at once (NOTE [ rows of logits ] in coordinator/memory.py)
        # NOTE above; 0: verified chunks always run as chunks. By default rows only where the decode
        # attention kernel reads the cache in place (Triton's attention, K stored rotated): the general
        # path gathers a row's whole K and V for each of its rows, T copies of the context (BENCHMARKS.md,
        # "Verifying drafts on the CPU")
        self.verify_rows = verify_rows if verify_rows is not None else \
            VERIFY_ROWS if triton_attention and not sliding else 0
        self.verify_paths: Counter[str] = Counter()  # verifying steps run as "rows" or as "chunks"
        # ids [T] on the device -> [T, E]: the pipeline's gather from host memory on the device
        # (embedding.py); else glob.embed
        self.embed = embed
        self.sliding = sliding  # positions in the cache change: K is stored unrotated
        self.use_graphs = use_graphs
        self.triton_attention = triton_attention  # attn_kernels.py: RoPE and cache writes, decode attention
        self.graph_max_tokens = graph_max_tokens  # None: decode steps of any batch are captured
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type == "cuda":
            # NOTE: cuDNN attention builds an execution plan per new shape (tens of ms each,
            # measured as a 56 ms first layer every decode step on H200); the flash and
            # memory-efficient kernels have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.ctx, self.max_seqs = ctx, max_seqs
        self.inv_freq = rope_inv_freq(hp, glob.rope_freqs)
        self.inv_freq_swa = rope_inv_freq(hp, None, hp.rope.theta_swa) if hp.attn.swa_window else None
        if kv_device_layers is None:
            kv_device_layers = 0 if kv_on_host else hp.n_layer
        self.kv = make_kv(hp, max_seqs, ctx, self.device, dtype, kv_device_layers)
        self.capture = GraphCapture(self.device, getattr(source, "tl", None))  # NOTE [ decode graphs ] in graphs.py
        self.layer_graphs = LayerGraphs(self.capture, source, self._captured)
        self.moe_graphs = MoeGraphs(hp, source, self.kv, self.capture)
        self._ahead: deque[tuple] = deque(maxlen=2)  # (sequences, graph layers, meta, stream): NOTE [ a step's meta built ahead ]

    def close(self) -> None:
        pass

    @property
    def ids_on_device(self) -> bool:
        """Whether a step's ids are embedded on the device (a -1 read there from the sampled ids),
        not gathered from the host's table."""
        return self.embed is not None or self.glob.embd_dev is not None

    def _graph_layers(self, seqs: list[SeqStep]) -> tuple[bool, int]:
        """Whether this step replays graphs, and how many leading layers it replays from one (NOTE
        [ decode graphs ] in graphs.py): none but for decode steps (one token a sequence) on CUDA."""
        on = (all(len(s.tokens) == 1 for s in seqs) and self.use_graphs and self.device.type == "cuda"
              and (self.graph_max_tokens is None or len(seqs) <= self.graph_max_tokens)
              and (not self.hp.moe.n_expert or len(seqs) <= GROUPED_MAX_TOKENS))
        n = 0
        while on and n < self.hp.n_layer and self.kv.on_device(n) and (w := self.source.fixed(n)) is not None \
                and (not self.hp.moe.n_expert or runs_grouped(w)):
            n += 1
        return on, n

    def _meta(self, seqs: list[SeqStep], upto: int) -> StepMeta:
        return build_step_meta(self.hp, self.inv_freq, seqs, self.device, self.dtype,
                               kv_len=self._kv_len(seqs, upto > 0), rotate_k_at_read=self.sliding,
                               inv_freq_swa=self.inv_freq_swa, triton_attention=self.triton_attention)

    def prepare(self, seqs: list[SeqStep]) -> None:
        """NOTE [ a step's meta built ahead ]
        The streamed layers keep the host in step with the device (each waits for its router's ids,
        or for its weights), so the host's work between a step's last launch and the next step's
        first is time the device idles. The compute process takes the next Forward in while the step
        before runs, and builds its meta then (here); `step` takes it where its sequences are the
        very ones prepared, with the same graph layers, on the same stream, and builds its own
        otherwise. Only decode steps (a token a sequence), whose meta is small: a prompt chunk's
        masks would be held beside the running step's."""
        if all(len(s.tokens) == 1 for s in seqs):
            upto = self._graph_layers(seqs)[1]
            self._ahead.append((seqs, upto, self._meta(seqs, upto), self._stream()))

    def _stream(self):
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _meta_for(self, seqs: list[SeqStep], upto: int) -> StepMeta:
        """The step's meta: the one prepared for these very sequences where it fits (NOTE above)."""
        for k, (got, at, meta, stream) in enumerate(self._ahead):
            if got is seqs:
                del self._ahead[k]
                if at == upto and stream == self._stream():
                    return meta
                break
        return self._meta(seqs, upto)

    @torch.inference_mode()
    def step(self, seqs: list[SeqStep], want: str = "last", last_ids: torch.Tensor | None = None,
             tails: list[int] | None = None) -> torch.Tensor | None:
        """Run all layers over the new tokens of `seqs`; logits of the last ("last") or every ("all") token;
        with `tails` and "last", of each sequence's last tails[b] tokens (a chunk verifying drafts), in order.
        A token -1 is its row's last sampled id, read from `last_ids` [max_seqs] on the device."""
        for s in seqs:
            if not 0 <= s.row < self.max_seqs or max(s.slots, default=0) >= self.ctx or len(s.kv_pos) > self.ctx:
                raise ValueError(f"sequence row {s.row}, its slots or its {len(s.kv_pos)} KV positions beyond the KV "
                                 f"cache ({self.max_seqs} x {self.ctx})")
        if tails is not None:
            rows = self._as_rows(seqs, want, tails)
            self.verify_paths["chunks" if rows is None else "rows"] += 1
            if rows is not None:
                seqs, tails = rows, None
        on, upto = self._graph_layers(seqs)
        self.moe_graphs.start_step(on)
        meta = self._meta_for(seqs, upto)
        whole = upto == self.hp.n_layer and want == "last" and tails is None  # the whole step, head included
        if upto and self.ids_on_device:
            if last_ids is None and not meta.tok.known:
                raise ValueError("a token -1 (the row's last sampled id) in a step given no sampled ids")
            # the embedding in the graph too, whole or not (NOTE [ decode graphs ] in graphs.py)
            x = self.layer_graphs.replay(None, meta, seqs, upto, head=whole, last_ids=last_ids)
        else:
            x = self._embedded(self._token_ids(meta, last_ids))
            if upto:
                x = self.layer_graphs.replay(x, meta, seqs, upto, head=whole)
        return x if whole else self._forward(x, meta, seqs, want, start=upto, tails=tails)

    def _as_rows(self, seqs: list[SeqStep], want: str, tails: list[int]) -> list[SeqStep] | None:
        """A verifying step's tokens as one-token decode rows, where it may run so (NOTE [ drafts
        verified as decode rows ]); else None."""
        if want != "last" or len(tails) != len(seqs) or sum(tails) > self.verify_rows:
            return None
        for s, t in zip(seqs, tails):
            if t != len(s.tokens) or s.positions != list(range(s.positions[0], s.positions[0] + t)):
                return None  # (a prompt chunk sampling its last token; a chunk whose positions jump)
        return [SeqStep(s.row, [tok], [slot], [p], s.kv_pos)
                for s in seqs for tok, slot, p in zip(s.tokens, s.slots, s.positions)]

    def _token_ids(self, meta: StepMeta, last_ids: torch.Tensor | None) -> torch.Tensor:
        """The step's token ids [T]: on the device, a -1 taken from its row's entry of `last_ids`
        (no host sync: the sampled id never left the device); where the embedding is a host gather
        and every id is known, the host's copy."""
        if not self.ids_on_device and meta.tok.known:
            return meta.on_host(meta.tok.id)
        if meta.tok.known:
            return meta.tok.id
        if last_ids is None:
            raise ValueError("a token -1 (the row's last sampled id) in a step given no sampled ids")
        return self._sampled_in(meta, last_ids)

    @staticmethod
    def _sampled_in(meta: StepMeta, last_ids: torch.Tensor) -> torch.Tensor:
        """The step's ids [T] on the device, each -1 replaced by its row's entry of `last_ids`."""
        return torch.where(meta.tok.id < 0, last_ids.index_select(0, meta.tok.row), meta.tok.id)

    def _embedded(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of token ids [T] that enter the first layer: [T, E]."""
        x = self.embed(ids) if self.embed is not None else self.glob.embed(ids)
        if self.hp.embed_scale != 1.0:  # gemma3: embeddings times sqrt(n_embd)
            x = x * self.hp.embed_scale
        return x

    def _kv_len(self, seqs: list[SeqStep], graph: bool) -> int:
        """The attended KV length, padded (masked) so that kernels and graphs see few shapes:
        multiples of 256 for eager steps, powers of two (at least graph_kv_min's) for captured graphs."""
        L = max(len(s.kv_pos) for s in seqs)
        shortest = graph_kv_min(self.triton_attention, self.sliding)
        padded = max(shortest, 1 << (L - 1).bit_length()) if graph else -(-L // 256) * 256
        return min(self.ctx, padded)

    def _captured(self, x: torch.Tensor | None, meta: StepMeta, upto: int, head: bool, seqs: list[SeqStep],
                  last_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What a graph of layers 0..upto-1 (and the head) holds: their fixed weights over x, or
        with x None over the embedded ids of meta, a -1 taken from `last_ids` on the device (the
        static copy of the meta does not say which ids are known, so the choice is made on the device)."""
        if x is None:
            x = self._embedded(meta.tok.id if last_ids is None else self._sampled_in(meta, last_ids))
        y = self._layers(x, meta, 0, upto, captured=True)
        return head_forward(self.hp, self._last(y, seqs), self.glob.norm, self.glob.head) if head else y

    def _layers(self, x: torch.Tensor, meta: StepMeta, start: int, stop: int, captured: bool = False) -> torch.Tensor:
        """Layers start..stop-1 over x: weights from the source's layer() and release(), or, for
        a graph being `captured`, its fixed() weights."""
        hp = self.hp
        for i in range(start, stop):
            w = self.source.fixed(i) if captured else self.source.layer(i)
            k, v, m = self.kv.layer(i, meta)
            if not captured and hp.moe.n_expert and self.moe_graphs.runs(i, w):
                x = self.moe_graphs.layer(i, w, x, m, k, v, stop)
            else:
                x = layer_forward(hp, w, x, m, k, v, hp.is_swa(i))
            self.kv.write_back(i, m, k, v)
            if not captured:
                self.source.release(i)
        return x

    def _last(self, x: torch.Tensor, seqs: list[SeqStep], tails: list[int] | None = None) -> torch.Tensor:
        """The rows of each sequence's last new token (its last tails[b] tokens, with `tails`)."""
        if x.shape[0] == len(seqs):
            return x
        ends = np.cumsum([len(s.tokens) for s in seqs])
        if tails is None:
            return rows_of(x, (ends - 1).tolist())  # (torch.tensor(..., device=cuda) would wait for the GPU)
        if any(not 1 <= t <= len(s.tokens) for s, t in zip(seqs, tails)) or len(tails) != len(seqs):
            raise ValueError(f"logits of the last {tails} tokens of sequences of {[len(s.tokens) for s in seqs]}")
        rows = [r for e, t in zip(ends.tolist(), tails) for r in range(e - t, e)]
        return rows_of(x, rows)

    def _forward(self, x: torch.Tensor, meta: StepMeta, seqs: list[SeqStep], want: str, start: int = 0,
                 tails: list[int] | None = None):
        x = self._layers(x, meta, start, self.hp.n_layer)
        if want == "none":
            return None
        if want == "last":
            x = self._last(x, seqs, tails)
        n = self.head_chunk
        if x.shape[0] <= n or want != "all":  # (sampled rows stay on the device, where their sampler runs)
            return head_forward(self.hp, x, self.glob.norm, self.glob.head)
        # every position's logits (evaluation), more rows than the plan's: in chunks, each copied
        # out, so the device holds n rows of logits at most (memory.py counts that)
        return torch.cat([head_forward(self.hp, x[r : r + n], self.glob.norm, self.glob.head).cpu()
                          for r in range(0, x.shape[0], n)])
