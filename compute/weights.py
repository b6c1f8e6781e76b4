"""Weights on the compute device: tensors from their GGUF bytes, layers kept resident, the global
tensors, and the LayerSource protocol through which ModelRunner gets each layer's weights."""

from __future__ import annotations

import math
from typing import Iterable, Protocol

import numpy as np
import torch

from layerstream.compute.cpu.native import NATIVE_TYPES
from layerstream.compute.dequant import FUSED_TYPES, check_supported, dequantize
from layerstream.compute.model import LayerWeights
from layerstream.compute.qlinear import QuantWeight
from layerstream.errors import UnsupportedQuantError
from layerstream.loader.gguf_index import ModelIndex, TensorInfo
from layerstream.loader.layout import LayerLayout


def check_model_quants(index: ModelIndex) -> None:
    """Raise UnsupportedQuantError naming the first tensor whose type cannot be dequantized, and its
    file (as every other error about a model file does)."""
    for t in (*index.globals.values(), *(t for layer in index.layers for t in layer.values())):
        try:
            check_supported(t.qtype, t.name)
        except UnsupportedQuantError as e:
            raise UnsupportedQuantError(f"{t.file}: {e}") from None


def weight_form(quantized: bool | str) -> str:
    """The form of weights_form (compute/device.py) that `quantized` names: a form itself, or a
    bool (True: the Triton kernels' blocks, False: dense)."""
    if isinstance(quantized, str):
        if quantized not in ("triton", "native", "dense"):
            raise ValueError(f"weights form {quantized!r}: use triton, native or dense")
        return quantized
    return "triton" if quantized else "dense"


def device_weight(raw: torch.Tensor, t, dtype, quantized: bool | str):
    """A tensor from its bytes on the target device: a QuantWeight view of a block-quantized
    matrix where the form (weight_form) computes from blocks, else dequantized into `dtype` (norms,
    biases, dense matrices; under "native" also expert tensors and the types its kernel lacks)."""
    form = weight_form(quantized)
    if form == "triton" and len(t.shape) in (2, 3) and t.qtype in FUSED_TYPES:
        # experts [E, N, K] as one [E * N, K] matrix: expert e is rows e*N..(e+1)*N, a byte range
        return QuantWeight(raw, t.qtype, (math.prod(t.shape[:-1]), t.shape[-1]))
    if form == "native" and len(t.shape) == 2 and t.qtype in NATIVE_TYPES and raw.device.type == "cpu":
        return QuantWeight(raw.contiguous(), t.qtype, tuple(t.shape), native=True)
    return dequantize(raw, t.qtype, t.shape, t.name, dtype)


def layer_weights(raw: torch.Tensor, layout: LayerLayout, dtype, quantized: bool | str = False) -> LayerWeights:
    """A layer's tensors from its slot bytes (uint8, on the target device): matrices as views of
    their blocks where the form `quantized` keeps them (device_weight), the rest dequantized."""
    return {t.name: device_weight(raw[t.slot_offset : t.slot_offset + t.nbytes], t, dtype, quantized)
            for t in layout.tensors}


def load_tensor(index: ModelIndex, t: TensorInfo, device, dtype, quantized: bool | str = False):
    """One tensor of the file on `device` (its bytes copied there first), see `device_weight`."""
    raw = torch.from_numpy(np.ascontiguousarray(index.tensor_bytes(t)))
    return device_weight(raw.to(device, non_blocking=True), t, dtype, quantized)


class LayerSource(Protocol):
    """Where ModelRunner gets each layer's weights for a step (resident or streamed)."""

    times_graphs: bool  # graph_ran wants each replay's CUDA events (a timeline of the compute)

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
    """Every layer loaded once and kept on the device (as blocks where the form `quantized` keeps
    them, device_weight): the in-VRAM engine and the reference."""

    times_graphs = False  # no timeline: two events a step cost the host's decode loop, which bounds a small model

    def __init__(self, index: ModelIndex, device, dtype, layers: Iterable[int] | None = None, progress=None,
                 quantized: bool | str = False):
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
    """Output norm and head on the device (the head as blocks where the form `quantized` keeps
    it, device_weight), rope frequency factors; the token embedding stays on the host and is a row gather (only the rows of the
    step's tokens are dequantized), or with `embed_on_device` a gather on the device."""

    def __init__(self, index: ModelIndex, device, dtype, embed_on_device: bool = False,
                 quantized: bool | str = False):
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
            q = self.embd_dev
            V, E = q.shape
            rows = q.raw.view(V, -1)[toks.to(self.device, non_blocking=True)].reshape(-1)
            if q.native:  # torch's ops on the CPU, through float32 as the host gather
                return dequantize(rows, q.qtype, (len(toks), E), self.embd_info.name).to(self.dtype)
            from layerstream.compute import qkernels

            out = torch.empty(len(toks), E, dtype=self.dtype, device=self.device)
            return qkernels.dequantize_into(rows, q.qtype, len(toks), E, out)
        if self.embd_dev is not None:
            return self.embd_dev[toks.to(self.device, non_blocking=True)]
        ids = toks.cpu().numpy()
        rows = torch.from_numpy(np.ascontiguousarray(self.embd_rows[ids])).reshape(-1)
        e = self.embd_info
        x = dequantize(rows, e.qtype, (len(ids), e.shape[1]), e.name, torch.float32)
        return x.to(self.device, self.dtype, non_blocking=True)
