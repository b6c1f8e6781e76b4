"""Independent dense float64 reference forward for llama / qwen2 / qwen3 / gemma3 GGUF models.

Reads the file with gguf.GGUFReader and dequantizes with gguf.quants.dequantize only
(no layerstream code), following llama.cpp's semantics. For tests: slow and simple.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import gguf
import numpy as np
from gguf.quants import dequantize

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class RefConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_theta: float
    rope_scale: float
    norm_eps: float
    neox: bool
    n_expert_used: int = 0  # mixture of experts: experts each token uses (softmax, top-k, renormalised)
    swa_window: int = 0  # gemma3: local layers see keys fewer than this many positions back
    swa_pattern: int = 0  # gemma3: layer L is global when (L + 1) % swa_pattern == 0
    rope_theta_swa: float = 10000.0


def _files(path: str) -> list[str]:
    m = _SPLIT_RE.match(path)
    if not m:
        return [path]
    n = int(m["count"])
    return [f"{m['prefix']}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def load(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, name -> float64 array in torch order) of a GGUF model or gguf-split set."""
    files = _files(os.fspath(path))
    readers = [gguf.GGUFReader(f) for f in files]
    md = {k: f.contents() for k, f in readers[0].fields.items() if not k.startswith("GGUF.")}
    weights = {}
    for r in readers:
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            weights[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)
    return md, weights


def config(md: dict) -> RefConfig:
    arch = md["general.architecture"]
    g = lambda k, d=None: md.get(f"{arch}.{k}", d)  # noqa: E731
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    n_head_kv = g("attention.head_count_kv", n_head)
    n_head_kv = int(n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv)
    head_dim = int(g("attention.key_length", n_embd // n_head))
    scale = float(g("rope.scaling.factor", 1.0)) if g("rope.scaling.type") == "linear" else 1.0
    return RefConfig(
        arch=arch,
        n_layer=int(g("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        rope_dim=int(g("rope.dimension_count", head_dim)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scale=scale,
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        neox=arch in ("qwen2", "qwen3", "qwen3moe", "gemma3"),
        n_expert_used=int(g("expert_used_count", 0)),
        swa_window=int(g("attention.sliding_window", 0)) if arch == "gemma3" else 0,
        swa_pattern=int(g("attention.sliding_window_pattern", 6)) if arch == "gemma3" else 0,
        rope_theta_swa=float(g("rope.freq_base_swa", 10000.0)),
    )


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, pos: np.ndarray, cfg: RefConfig, factors: np.ndarray | None, local: bool = False) -> np.ndarray:
    """Rotate the first rope_dim dims of each head. x: [T, H, D]; NORM pairs (2i, 2i+1), NEOX (i, i+d/2).
    A gemma3 local layer uses its own base, unscaled."""
    d = cfg.rope_dim
    i = np.arange(d // 2)
    freq = (cfg.rope_theta_swa if local else cfg.rope_theta) ** (-2.0 * i / d)
    if factors is not None:
        freq = freq / factors
    ang = (pos[:, None] / (1.0 if local else cfg.rope_scale)) * freq[None, :]  # [T, d/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    if cfg.neox:
        a, b = x[..., : d // 2], x[..., d // 2 : d]
        out[..., : d // 2] = a * cos - b * sin
        out[..., d // 2 : d] = a * sin + b * cos
    else:
        a, b = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2] = a * cos - b * sin
        out[..., 1:d:2] = a * sin + b * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def forward(md: dict, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits [T, V] for the whole sequence (positions 0..T-1), causal attention."""
    cfg = config(md)
    T, H, Hkv, D = len(tokens), cfg.n_head, cfg.n_head_kv, cfg.head_dim
    pos = np.arange(T, dtype=np.float64)
    factors = w.get("rope_freqs.weight")
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    gemma = cfg.arch == "gemma3"
    # a local layer also hides keys swa_window or more positions back
    far = np.where(np.subtract.outer(np.arange(T), np.arange(T)) >= max(cfg.swa_window, 1), -np.inf, 0.0)
    x = w["token_embd.weight"][np.asarray(tokens)]  # [T, E]
    if gemma:
        x = x * np.sqrt(cfg.n_embd)
    for L in range(cfg.n_layer):
        p = lambda n: w[f"blk.{L}.{n}"]  # noqa: E731
        local = gemma and cfg.swa_window > 0 and (L + 1) % cfg.swa_pattern != 0
        h = rms_norm(x, p("attn_norm.weight"), cfg.norm_eps)
        q, k, v = h @ p("attn_q.weight").T, h @ p("attn_k.weight").T, h @ p("attn_v.weight").T
        if f"blk.{L}.attn_q.bias" in w:
            q, k, v = q + p("attn_q.bias"), k + p("attn_k.bias"), v + p("attn_v.bias")
        q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        if f"blk.{L}.attn_q_norm.weight" in w:
            q = rms_norm(q, p("attn_q_norm.weight"), cfg.norm_eps)
            k = rms_norm(k, p("attn_k_norm.weight"), cfg.norm_eps)
        q, k = rope(q, pos, cfg, factors, local), rope(k, pos, cfg, factors, local)
        group = H // Hkv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [T, H, D]: q head h uses kv head h // group
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask + (far if local else 0.0)  # [H, T, T]
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, H * D) @ p("attn_output.weight").T
        if gemma:
            o = rms_norm(o, p("post_attention_norm.weight"), cfg.norm_eps)
        x = x + o
        h = rms_norm(x, p("ffn_norm.weight"), cfg.norm_eps)
        act = gelu_tanh if gemma else silu
        if f"blk.{L}.ffn_gate_inp.weight" in w:  # experts: each token's top-k, softmax weights renormalised
            logits = h @ p("ffn_gate_inp.weight").T  # [T, n_expert]
            prob = np.exp(logits - logits.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(-prob[t])[: cfg.n_expert_used]
                for e in top:
                    ge, ue, de = p("ffn_gate_exps.weight")[e], p("ffn_up_exps.weight")[e], p("ffn_down_exps.weight")[e]
                    y[t] += prob[t, e] / prob[t, top].sum() * ((act(ge @ h[t]) * (ue @ h[t])) @ de.T)
        else:
            y = (act(h @ p("ffn_gate.weight").T) * (h @ p("ffn_up.weight").T)) @ p("ffn_down.weight").T
        if gemma:
            y = rms_norm(y, p("post_ffw_norm.weight"), cfg.norm_eps)
        x = x + y
    x = rms_norm(x, w["output_norm.weight"], cfg.norm_eps)
    head = w.get("output.weight", w["token_embd.weight"])
    return x @ head.T


def reference_logits(path: str | os.PathLike, tokens: list[int]) -> np.ndarray:
    """float64 logits [T, V] of `tokens` under the model at `path`."""
    md, w = load(path)
    return forward(md, w, tokens)
