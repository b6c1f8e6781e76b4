"""The dense transformer math: RMSNorm, RoPE, grouped-query attention over a KV ring, SwiGLU
(the mixture of experts: moe.py; one whole block: block.py).

Free of I/O, sockets and globals. A layer's weights come in as a dict of tensors, so resident
and streamed layers run the same code. Tokens of a batch are packed: T is the total number of
new tokens over all B sequences of the step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerstream.compute.qlinear import QuantWeight, linear, linear_many
from layerstream.loader.gguf_index import HParams

LayerWeights = dict[str, "torch.Tensor | QuantWeight"]  # short GGUF names: "attn_q.weight", ...
# attention's general path: the temporaries of one group of sequences / query rows at most
# (NOTE [ attention's temporaries ]; the plan counts them through attention_bytes)
ATTN_TEMP_BYTES = 64 << 20
BIAS_ALIGN = 16  # the memory-efficient kernel's alignment of the mask's rows (elements)


@dataclass(frozen=True)
class StepMeta:
    """What every layer of one forward step needs to know about the batch (built once a step)."""

    tok_row: torch.Tensor  # [T] KV-cache row (sequence slot) of each new token
    tok_b: torch.Tensor  # [T] batch index of each new token
    tok_slot: torch.Tensor  # [T] physical KV slot each new token writes
    q_index: torch.Tensor  # [B, S] index of each padded query into the packed tokens
    q_valid: torch.Tensor  # [B, S] bool, False on padding
    out_index: torch.Tensor  # [T] index of each packed token in the flattened [B*S] padded layout
    rows: torch.Tensor  # [B] KV-cache row of each sequence
    kv_len: int  # slots 0..kv_len-1 of the rows are read by attention
    cos_q: torch.Tensor  # [T, rope_dim/2]
    sin_q: torch.Tensor
    cos_k: torch.Tensor | None  # [B, kv_len, rope_dim/2]; None when K is stored rotated
    sin_k: torch.Tensor | None
    mask: torch.Tensor  # [B, 1, S, kv_len] bool, True where a query may attend
    # the local (sliding-window) layers' RoPE tables and mask (Gemma 3); None without such layers
    cos_q_swa: torch.Tensor | None = None
    sin_q_swa: torch.Tensor | None = None
    cos_k_swa: torch.Tensor | None = None
    sin_k_swa: torch.Tensor | None = None
    mask_swa: torch.Tensor | None = None
    # Triton kernels of attn_kernels.py, where Triton runs the matmuls (build_step_meta's
    # `triton_attention`): RoPE with the cache write in one launch, and, when every sequence adds
    # one token and K is stored rotated, attention read from the cache in place (NOTE [ decode
    # attention ])
    rope_kernel: bool = False
    decode_kernel: bool = False


def rope_inv_freq(hp: HParams, freq_factors: torch.Tensor | None = None, theta: float | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] in float64; Llama 3.1 factors divide them."""
    i = torch.arange(0, hp.rope_dim, 2, dtype=torch.float64)
    inv = (theta or hp.rope_theta) ** (-i / hp.rope_dim)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64).cpu()
    return inv


def rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin of shape [*pos.shape, rope_dim/2] for integer positions."""
    ang = (pos.to(torch.float64) / scale).unsqueeze(-1) * inv_freq.to(pos.device)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate the first rope_dim features of x [..., H, D]; cos/sin [..., rope_dim/2]."""
    rd = cos.shape[-1] * 2
    xr, xpass = x[..., :rd], x[..., rd:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if neox:  # pairs (i, i + rd/2)
        a, b = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:  # llama.cpp NORM: adjacent pairs (2i, 2i+1)
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((out, xpass), dim=-1) if xpass.shape[-1] else out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one fused kernel (it computes in float32 inside)
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


@functools.cache
def _attn_kernels():
    """compute.attn_kernels, imported on first use (it needs Triton, which the caller of
    build_step_meta has checked before it asks for the kernels: `triton_attention`)."""
    from layerstream.compute import attn_kernels

    return attn_kernels


# NOTE [ attention's temporaries ]
# The general path (prompts, mixed steps, a sliding ring, the CPU) gathers each sequence's K and V
# and runs scaled_dot_product_attention under the step's boolean mask. Given that mask and grouped
# queries, torch on CUDA takes its math kernel, which computes half precision in float32, expands
# K and V to every query head and keeps three [H, S, L] float32 score tensors: 600 MiB for one
# 512-token chunk of an 8B at a 4096-token context. Instead the query heads that share a KV head
# are folded into its query rows ([b, Hkv, G * s, D], G = H / Hkv), so K and V are read as they
# lie, and the mask becomes an additive bias in the compute dtype, its rows padded to BIAS_ALIGN
# elements; on CUDA the memory-efficient kernel then runs (pinned: cuDNN's and flash's are not
# asked), whose only temporaries are its output and, for heads over 128 wide, a float32
# accumulator. attention_temps counts what a group holds per sequence and per query row on the
# path taken; groups of sequences and of query rows keep it under ATTN_TEMP_BYTES.
def attention_path(hp: HParams, e: int, cuda: bool, bf16_unsupported: bool = False) -> str:
    """"folded" (query heads folded into rows, a float bias; the memory-efficient kernel on CUDA)
    or "math" (CUDA's math kernel, where the efficient one cannot take the head size or dtype):
    e bytes of the compute dtype; `bf16_unsupported`: bfloat16 on a GPU older than sm80."""
    if not cuda:
        return "folded"
    return "math" if hp.head_dim % (4 if e == 4 else 8) or bf16_unsupported else "folded"


def attention_temps(hp: HParams, L: int, e: int, path: str, sliding: bool) -> tuple[int, int]:
    """(bytes per sequence, bytes per query row) attention's general path holds at once for a group
    of sequences over L slots (NOTE [ attention's temporaries ])."""
    H, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    per_seq = 2 * L * Hkv * D * e  # K and V gathered
    if sliding:  # K rotated at read time: the rotated halves and their concatenation
        per_seq += 3 * L * Hkv * D * e
    if path == "math":  # K and V in float32, expanded to every head; the scores, masked, their softmax
        per_seq += L * D * (2 * Hkv * 4 + 2 * H * 4)
        return per_seq, H * D * (e + 2 * 4) + L * (3 * H * 4 + 4 + 1)
    Lp = -(-L // BIAS_ALIGN) * BIAS_ALIGN
    G = H // Hkv
    # the gathered and the folded queries, the negated mask, the bias, the output (and its float32
    # accumulator for heads over 128)
    return per_seq, 3 * H * D * e + L + G * Lp * e + (H * D * 4 if D > 128 else 0)


def attention_groups(hp: HParams, B: int, S: int, L: int, e: int, path: str, sliding: bool,
                     cap: int | None = None) -> tuple[int, int]:
    """(sequences, query rows) attention's general path takes at once: as many as keep a group's
    temporaries under `cap` (default ATTN_TEMP_BYTES), one sequence and one row at least."""
    cap = ATTN_TEMP_BYTES if cap is None else cap
    per_seq, per_row = attention_temps(hp, L, e, path, sliding)
    bc = max(1, min(B, cap // max(1, per_seq + S * per_row)))
    sc = S if bc > 1 else max(1, min(S, (cap - per_seq) // per_row))
    return (1 if sc < S else bc), sc


def attention_bytes(hp: HParams, B: int, S: int, T: int, L: int, e: int, path: str, sliding: bool,
                    cap: int | None = None) -> tuple[int, int]:
    """(bytes, largest tensor) of attention's general path for B sequences of up to S query rows
    (T in all) over L slots: one group's temporaries, the padded output and its packed rows."""
    H, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    bc, sc = attention_groups(hp, B, S, L, e, path, sliding, cap)
    per_seq, per_row = attention_temps(hp, L, e, path, sliding)
    out = B * S * H * D * e + T * H * D * e
    if path == "math":
        largest = max(bc * L * H * D * 4, bc * sc * L * H * 4)
    else:
        largest = max(bc * L * Hkv * D * e, bc * sc * (H // Hkv) * (-(-L // BIAS_ALIGN) * BIAS_ALIGN) * e)
    return bc * (per_seq + sc * per_row) + out, max(largest, B * S * H * D * e)


def _sdpa(Q: torch.Tensor, Kt: torch.Tensor, Vt: torch.Tensor, mask: torch.Tensor, scale: float | None,
          path: str, out: torch.Tensor) -> None:
    """Attention of queries Q [b, s, H, D] over Kt, Vt [b, Hkv, L, D] under mask [b, 1, s, L] (bool,
    True where a query may attend), written into out [b, s, H * D] (NOTE [ attention's temporaries ])."""
    b, s, H, D = Q.shape
    Hkv, L = Kt.shape[1], Kt.shape[2]
    if path == "math":
        o = F.scaled_dot_product_attention(Q.transpose(1, 2), Kt, Vt, attn_mask=mask, enable_gqa=(H != Hkv),
                                           scale=scale)  # [b, H, s, D]
        out.view(b, s, H, D).copy_(o.transpose(1, 2))
        return
    G = H // Hkv
    Qf = Q.view(b, s, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(b, Hkv, G * s, D)  # row g * s + i: head hk * G + g
    Lp = -(-L // BIAS_ALIGN) * BIAS_ALIGN
    bias = torch.full((b, 1, G, s, Lp), float("-inf"), dtype=Q.dtype, device=Q.device)[..., :L]
    bias.masked_fill_(mask.unsqueeze(2), 0.0)  # every folded row takes its query's mask
    bias = bias.view(b, 1, G * s, L)
    if Q.is_cuda:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = F.scaled_dot_product_attention(Qf, Kt, Vt, attn_mask=bias, scale=scale)  # [b, Hkv, G * s, D]
    else:
        o = F.scaled_dot_product_attention(Qf, Kt, Vt, attn_mask=bias, scale=scale)
    out.view(b, s, Hkv, G, D).copy_(o.view(b, Hkv, G, s, D).permute(0, 3, 1, 2, 4))


def attention_block(hp: HParams, w: LayerWeights, x: torch.Tensor, meta: StepMeta,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, swa: bool = False) -> torch.Tensor:
    """Self-attention of the packed tokens x [T, E]; writes their K/V into the caches.

    k_cache, v_cache: [rows, cap, n_head_kv, head_dim]. With a sliding ring K is stored before
    RoPE and rotated at read time, since positions within the cache change as it slides
    (StreamingLLM); otherwise (meta.cos_k None) it is stored rotated. A local layer (`swa`) takes
    the step's sliding-window mask and its own RoPE tables.
    """
    cos_q, sin_q, cos_k_all, sin_k_all, mask_all = (
        (meta.cos_q_swa, meta.sin_q_swa, meta.cos_k_swa, meta.sin_k_swa, meta.mask_swa) if swa
        else (meta.cos_q, meta.sin_q, meta.cos_k, meta.sin_k, meta.mask))
    T = x.shape[0]
    H, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    h = rms_norm(x, w["attn_norm.weight"], hp.norm_eps)
    q, k, v = linear_many(h, [w["attn_q.weight"], w["attn_k.weight"], w["attn_v.weight"]],
                          [w.get("attn_q.bias"), w.get("attn_k.bias"), w.get("attn_v.bias")])
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    if "attn_q_norm.weight" in w:  # qwen3, gemma3: per-head RMSNorm before RoPE
        q = rms_norm(q, w["attn_q_norm.weight"], hp.norm_eps)
        k = rms_norm(k, w["attn_k_norm.weight"], hp.norm_eps)
    # positions never change without sliding (cos_k None): K is stored rotated, once
    if meta.rope_kernel:
        q = _attn_kernels().rope_and_store(q, k, v, cos_q, sin_q, k_cache, v_cache, meta.tok_row, meta.tok_slot,
                                           hp.rope_neox, rotate_k=cos_k_all is None)
    else:
        q = apply_rope(q, cos_q, sin_q, hp.rope_neox)
        if cos_k_all is None:
            k = apply_rope(k, cos_q, sin_q, hp.rope_neox)
        k_cache[meta.tok_row, meta.tok_slot] = k.to(k_cache.dtype)
        v_cache[meta.tok_row, meta.tok_slot] = v.to(v_cache.dtype)
    if meta.decode_kernel and cos_k_all is None:  # token t is sequence t's only one
        o = _attn_kernels().decode_attention(q, k_cache, v_cache, mask_all[:, 0, 0], meta.rows, meta.kv_len,
                                             hp.attn_scale or 1 / math.sqrt(D))
        return _attn_out(hp, w, x, o)

    B, S = meta.q_index.shape
    L = meta.kv_len
    e = x.element_size()
    path = attention_path(hp, e, x.is_cuda, x.dtype == torch.bfloat16 and x.is_cuda
                          and torch.cuda.get_device_capability(x.device)[0] < 8)
    bc, sc = attention_groups(hp, B, S, L, e, path, cos_k_all is not None)
    scale = hp.attn_scale or None
    o = torch.empty(B, S, H * D, dtype=x.dtype, device=x.device)  # every group's output, in padded order
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        rows = meta.rows[b0:b1]
        K = k_cache[rows, :L].to(x.dtype)  # [b, L, Hkv, D]
        V = v_cache[rows, :L].to(x.dtype)
        if cos_k_all is not None:
            K = apply_rope(K, cos_k_all[b0:b1], sin_k_all[b0:b1], hp.rope_neox)
        Kt, Vt = K.transpose(1, 2), V.transpose(1, 2)  # [b, Hkv, L, D]
        for s0 in range(0, S, sc):
            s1 = min(S, s0 + sc)
            Q = q[meta.q_index[b0:b1, s0:s1]]  # [b, s, H, D]
            mask = mask_all[b0:b1, :, s0:s1]  # [b, 1, s, L]
            _sdpa(Q, Kt, Vt, mask, scale, path, o[b0:b1, s0:s1])
    o = o.view(B * S, H * D)[meta.out_index]  # back to packed order (no host sync)
    return _attn_out(hp, w, x, o)


def _attn_out(hp: HParams, w: LayerWeights, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The residual stream after attention's output o [T, H * D] is projected (and normed)."""
    o = linear(o, w["attn_output.weight"], w.get("attn_output.bias"))
    if "post_attention_norm.weight" in w:  # gemma3: the block's output is normed before the residual
        o = rms_norm(o, w["post_attention_norm.weight"], hp.norm_eps)
    return x + o


_ACTS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}  # HParams.ffn_act


def ffn_block(hp: HParams, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    h = rms_norm(x, w["ffn_norm.weight"], hp.norm_eps)
    gate, up, down = w["ffn_gate.weight"], w["ffn_up.weight"], w["ffn_down.weight"]
    act = _ACTS.get(hp.ffn_act, F.silu)
    if all(getattr(m, "cpu_only", False) for m in (gate, up, down)):  # the CPU's whole (cpu/split.py)
        y = gate.ffn(h, up, down, act)
    else:
        g, u = linear_many(h, [gate, up])
        a = F.silu(g, inplace=True) if act is F.silu else act(g)  # in place where it can be: [T, F] fewer
        y = linear(a.mul_(u), down)
    if "post_ffw_norm.weight" in w:
        y = rms_norm(y, w["post_ffw_norm.weight"], hp.norm_eps)
    return x + y


def head_forward(hp: HParams, x: torch.Tensor, norm_w: torch.Tensor, out_w: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and output head: x [N, E] -> logits [N, V] in float32."""
    return linear(rms_norm(x, norm_w, hp.norm_eps), out_w).float()


def build_step_meta(hp: HParams, inv_freq: torch.Tensor, seqs: list["SeqStep"], device: torch.device,
                    dtype: torch.dtype, kv_len: int | None = None, rotate_k_at_read: bool = True,
                    inv_freq_swa: torch.Tensor | None = None, triton_attention: bool = False) -> StepMeta:
    """Pack the step's sequences; positions come from the KV ring of each sequence.

    kv_len pads the attended slots to a fixed length (masked), for captured CUDA graphs. With
    local layers (hp.swa_window), their mask also hides keys `swa_window` or more positions
    back, and their RoPE tables come from `inv_freq_swa`, unscaled. `triton_attention`: attention
    through attn_kernels.py (its decode kernel where every sequence adds one token and K is stored
    rotated).
    """
    B = len(seqs)
    S = max(len(s.slots) for s in seqs)
    L = max(kv_len or 0, max(len(s.kv_pos) for s in seqs))
    tok_row, tok_b, tok_slot, tok_pos = [], [], [], []
    q_index = torch.zeros(B, S, dtype=torch.long)
    q_valid = torch.zeros(B, S, dtype=torch.bool)
    q_pos = torch.full((B, S), -1, dtype=torch.long)
    kv_pos = torch.full((B, L), -1, dtype=torch.long)
    t = 0
    for b, s in enumerate(seqs):
        n = len(s.slots)
        tok_row += [s.row] * n
        tok_b += [b] * n
        tok_slot += s.slots
        tok_pos += s.positions
        q_index[b, :n] = torch.arange(t, t + n)
        q_valid[b, :n] = True
        q_pos[b, :n] = torch.tensor(s.positions)
        kv_pos[b, : len(s.kv_pos)] = torch.from_numpy(np.array(s.kv_pos, dtype=np.int64))  # (numpy converts a long list far faster)
        t += n
    out_index = q_valid.flatten().nonzero().flatten()  # on the host: no device sync
    mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])  # [B, S, L]
    mask |= ~q_valid[:, :, None]  # padded queries see everything (finite; dropped later)
    tok_pos_t = torch.tensor(tok_pos, dtype=torch.long)
    cos_q, sin_q = rope_tables(inv_freq, tok_pos_t, hp.rope_scale, dtype)
    cos_k = sin_k = None
    if rotate_k_at_read:
        cos_k, sin_k = rope_tables(inv_freq, kv_pos.clamp(min=0), hp.rope_scale, dtype)
    to = lambda a: a.to(device, non_blocking=True)  # noqa: E731
    swa = {}
    if hp.swa_window:
        near = (q_pos[:, :, None] - kv_pos[:, None, :]) < hp.swa_window
        cq, sq = rope_tables(inv_freq_swa, tok_pos_t, 1.0, dtype)
        swa = dict(cos_q_swa=to(cq), sin_q_swa=to(sq), mask_swa=to(((mask & near) | ~q_valid[:, :, None])[:, None]))
        if rotate_k_at_read:
            ck, sk = rope_tables(inv_freq_swa, kv_pos.clamp(min=0), 1.0, dtype)
            swa |= dict(cos_k_swa=to(ck), sin_k_swa=to(sk))
    return StepMeta(
        tok_row=to(torch.tensor(tok_row, dtype=torch.long)),
        tok_b=to(torch.tensor(tok_b, dtype=torch.long)),
        tok_slot=to(torch.tensor(tok_slot, dtype=torch.long)),
        q_index=to(q_index), q_valid=to(q_valid), out_index=to(out_index),
        rows=to(torch.tensor([s.row for s in seqs], dtype=torch.long)),
        kv_len=L,
        cos_q=to(cos_q), sin_q=to(sin_q),
        cos_k=None if cos_k is None else to(cos_k), sin_k=None if sin_k is None else to(sin_k),
        mask=to(mask[:, None]),
        **swa,
        rope_kernel=triton_attention,
        decode_kernel=triton_attention and all(len(s.tokens) == 1 for s in seqs) and not rotate_k_at_read,
    )


@dataclass
class SeqStep:
    """One sequence's part of a step: its cache row, new tokens' slots/positions, all slots' positions."""

    row: int
    tokens: list[int]
    slots: list[int]  # physical slot of each new token
    positions: list[int]  # RoPE position of each new token
    kv_pos: list[int]  # position held by each slot 0..n-1 after the writes (-1: empty)
