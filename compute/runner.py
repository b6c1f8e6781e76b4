"""ModelRunner: runs forward steps over a source of layer weights and owns the KV caches."""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
import torch

from layerstream.compute.dequant import check_supported, dequantize
from layerstream.compute.model import (
    LayerWeights,
    SeqStep,
    build_step_meta,
    head_forward,
    layer_forward,
    rope_inv_freq,
)
from layerstream.loader.gguf_index import HParams, ModelIndex, TensorInfo


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def check_model_quants(index: ModelIndex) -> None:
    """Raise UnsupportedQuantError naming the first tensor whose type cannot be dequantized."""
    for t in index.globals.values():
        check_supported(t.qtype, t.name)
    for layer in index.layers:
        for t in layer.values():
            check_supported(t.qtype, t.name)


def tensor_to_device(raw: np.ndarray | torch.Tensor, t: TensorInfo, device, dtype) -> torch.Tensor:
    """Dequantize one tensor's bytes (host or device uint8) into `dtype` on `device`."""
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw))
    return dequantize(raw.to(device, non_blocking=True), t.qtype, t.shape, t.name, dtype)


class LayerSource(Protocol):
    """Where ModelRunner gets each layer's weights for a step (resident or streamed)."""

    def begin_step(self) -> None: ...
    def layer(self, i: int) -> LayerWeights: ...
    def release(self, i: int) -> None: ...


class ResidentLayers:
    """Every layer dequantized once and kept on the device: the in-VRAM engine and the reference."""

    def __init__(self, index: ModelIndex, device, dtype, layers: Iterable[int] | None = None, progress=None):
        self.weights: dict[int, LayerWeights] = {}
        for i in layers if layers is not None else range(index.hparams.n_layer):
            self.weights[i] = {
                name: tensor_to_device(index.tensor_bytes(t), t, device, dtype)
                for name, t in index.layers[i].items()
            }
            if progress:
                progress(1)

    def begin_step(self) -> None:
        pass

    def layer(self, i: int) -> LayerWeights:
        return self.weights[i]

    def release(self, i: int) -> None:
        pass


class GlobalWeights:
    """Token embedding (a row gather), output norm and head, rope frequency factors."""

    def __init__(self, index: ModelIndex, device, dtype):
        g = index.globals
        self.embd = tensor_to_device(index.tensor_bytes(g["token_embd.weight"]), g["token_embd.weight"], device, dtype)
        self.norm = tensor_to_device(index.tensor_bytes(g["output_norm.weight"]), g["output_norm.weight"], device, dtype)
        out = g.get("output.weight")
        self.head = self.embd if out is None else tensor_to_device(index.tensor_bytes(out), out, device, dtype)
        rf = g.get("rope_freqs.weight")
        self.rope_freqs = None if rf is None else tensor_to_device(index.tensor_bytes(rf), rf, "cpu", torch.float32)


class ModelRunner:
    """Forward steps for a batch of sequences; KV caches [rows, ctx, n_head_kv, head_dim] per layer."""

    def __init__(self, hp: HParams, glob: GlobalWeights, source: LayerSource, device, dtype,
                 ctx: int, max_seqs: int = 1, kv_dtype: torch.dtype | None = None):
        self.hp, self.glob, self.source = hp, glob, source
        self.device, self.dtype = torch.device(device), dtype
        self.ctx, self.max_seqs = ctx, max_seqs
        self.inv_freq = rope_inv_freq(hp, glob.rope_freqs)
        shape = (max_seqs, ctx, hp.n_head_kv, hp.head_dim)
        kv_dtype = kv_dtype or dtype
        self.k_cache = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(hp.n_layer)]
        self.v_cache = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(hp.n_layer)]

    @torch.inference_mode()
    def step(self, seqs: list[SeqStep], want: str = "last") -> torch.Tensor | None:
        """Run all layers over the new tokens of `seqs`; logits of the last ("last") or every ("all") token."""
        hp = self.hp
        meta = build_step_meta(hp, self.inv_freq, seqs, self.device, self.dtype)
        toks = torch.tensor([t for s in seqs for t in s.tokens], dtype=torch.long, device=self.device)
        x = self.glob.embd[toks]  # [T, E]
        self.source.begin_step()
        for i in range(hp.n_layer):
            w = self.source.layer(i)
            x = layer_forward(hp, w, x, meta, self.k_cache[i], self.v_cache[i])
            self.source.release(i)
        if want == "none":
            return None
        if want == "last":
            ends = torch.tensor(np.cumsum([len(s.tokens) for s in seqs]) - 1, device=self.device)
            x = x[ends]
        return head_forward(hp, x, self.glob.norm, self.glob.head)
