"""The dense transformer math: RMSNorm, RoPE, grouped-query attention over a KV ring, SwiGLU
(the mixture of experts: moe.py; one whole block: block.py; the step's packed batch: step_meta.py).

Free of I/O, sockets and globals. A layer's weights come in as a dict of tensors, so resident
and streamed layers run the same code. Tokens of a batch are packed: T is the total number of
new tokens over all B sequences of the step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerstream.compute.dequant import have_triton
from layerstream.compute.qlinear import QuantWeight, glu, linear, linear_many, takes_int8_x
from layerstream.compute.step_meta import StepMeta
from layerstream.loader.gguf_index import HParams

LayerWeights = dict[str, "torch.Tensor | QuantWeight"]  # short GGUF names: "attn_q.weight", ...
# attention's general path: the temporaries of one group of sequences / query rows at most
# (NOTE [ attention's temporaries ]; the plan counts them through attention_bytes)
ATTN_TEMP_BYTES = 64 << 20
BIAS_ALIGN = 16  # the memory-efficient kernel's alignment of the mask's rows (elements)


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


# Rows up to which a CUDA RMSNorm takes norm_kernels' kernel (one program a row, decode's few rows).
NORM_KERNEL_MAX_ROWS = 16


@functools.cache
def _norm_kernels():
    """compute.norm_kernels, imported on first use (it needs Triton)."""
    from layerstream.compute import norm_kernels

    return norm_kernels


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, then: list | None = None) -> torch.Tensor:
    """RMSNorm of x [..., E] by w [E]. `then`: the matrices the result goes to next; where they run on
    int8 x (qlinear.takes_int8_x: decode's Q4_K), the norm's kernel emits that form in its launch."""
    if x.is_cuda:  # one fused kernel (it computes in float32 inside)
        if x.dim() == 2 and x.shape[0] <= NORM_KERNEL_MAX_ROWS and w.dtype == x.dtype and have_triton():
            x8 = bool(then) and x.shape[1] % 256 == 0 and takes_int8_x(x, then)
            return _norm_kernels().rms_norm(x, w, eps, x8=x8)
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
    return "math" if hp.attn.head_dim % (4 if e == 4 else 8) or bf16_unsupported else "folded"


def attention_temps(hp: HParams, L: int, e: int, path: str, sliding: bool) -> tuple[int, int]:
    """(bytes per sequence, bytes per query row) attention's general path holds at once for a group
    of sequences over L slots (NOTE [ attention's temporaries ])."""
    H, Hkv, D = hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim
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
    H, Hkv, D = hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim
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
    (StreamingLLM); otherwise (meta.attn.cos_k None) it is stored rotated. A local layer (`swa`)
    takes the step's sliding-window tables (meta.swa: its mask and its own RoPE tables).
    """
    tab = meta.swa if swa else meta.attn
    cos_q, sin_q, cos_k_all, sin_k_all, mask_all = tab.cos_q, tab.sin_q, tab.cos_k, tab.sin_k, tab.mask
    T = x.shape[0]
    H, Hkv, D = hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim
    qkv = [w["attn_q.weight"], w["attn_k.weight"], w["attn_v.weight"]]
    h = rms_norm(x, w["attn_norm.weight"], hp.norm_eps, then=qkv)
    q, k, v = linear_many(h, qkv, [w.get("attn_q.bias"), w.get("attn_k.bias"), w.get("attn_v.bias")])
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    norms = None
    if "attn_q_norm.weight" in w:  # qwen3, gemma3: per-head RMSNorm before RoPE
        qn, kn = w["attn_q_norm.weight"], w["attn_k_norm.weight"]
        if meta.kernels.rope:  # (in RoPE's launch)
            norms = (qn, kn, hp.norm_eps)
        else:
            q, k = rms_norm(q, qn, hp.norm_eps), rms_norm(k, kn, hp.norm_eps)
    # positions never change without sliding (cos_k None): K is stored rotated, once
    if meta.kernels.rope:
        q = _attn_kernels().rope_and_store(q, k, v, cos_q, sin_q, k_cache, v_cache, meta.tok.row, meta.tok.slot,
                                           hp.rope.neox, rotate_k=cos_k_all is None, norms=norms)
    else:
        q = apply_rope(q, cos_q, sin_q, hp.rope.neox)
        if cos_k_all is None:
            k = apply_rope(k, cos_q, sin_q, hp.rope.neox)
        k_cache[meta.tok.row, meta.tok.slot] = k.to(k_cache.dtype)
        v_cache[meta.tok.row, meta.tok.slot] = v.to(v_cache.dtype)
    if meta.kernels.decode and cos_k_all is None:  # token t is sequence t's only one
        x8 = D % 32 == 0 and H * D % 256 == 0 and takes_int8_x(x, [w["attn_output.weight"]])
        o = _attn_kernels().decode_attention(q, k_cache, v_cache, mask_all[:, 0, 0], meta.q.rows, meta.q.kv_len,
                                             hp.attn.scale or 1 / math.sqrt(D), used=meta.q.used, x8=x8)
        return _attn_out(hp, w, x, o)

    B, S = meta.q.index.shape
    L = meta.q.kv_len
    if CPU_DECODE and not x.is_cuda and S == 1 and T == B and cos_k_all is None and \
            attention_groups(hp, B, 1, L, x.element_size(), "folded", False)[0] == B:  # (all in one group's cap)
        o = _cpu_decode_attention(q, k_cache, v_cache, meta.q.rows, mask_all, L, hp.attn.scale or None)
        return _attn_out(hp, w, x, o)
    e = x.element_size()
    path = attention_path(hp, e, x.is_cuda, x.dtype == torch.bfloat16 and x.is_cuda
                          and torch.cuda.get_device_capability(x.device)[0] < 8)
    bc, sc = attention_groups(hp, B, S, L, e, path, cos_k_all is not None)
    scale = hp.attn.scale or None
    o = torch.empty(B, S, H * D, dtype=x.dtype, device=x.device)  # every group's output, in padded order
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        rows = meta.q.rows[b0:b1]
        K = k_cache[rows, :L].to(x.dtype)  # [b, L, Hkv, D]
        V = v_cache[rows, :L].to(x.dtype)
        if cos_k_all is not None:
            K = apply_rope(K, cos_k_all[b0:b1], sin_k_all[b0:b1], hp.rope.neox)
        Kt, Vt = K.transpose(1, 2), V.transpose(1, 2)  # [b, Hkv, L, D]
        for s0 in range(0, S, sc):
            s1 = min(S, s0 + sc)
            Q = q[meta.q.index[b0:b1, s0:s1]]  # [b, s, H, D]
            mask = mask_all[b0:b1, :, s0:s1]  # [b, 1, s, L]
            _sdpa(Q, Kt, Vt, mask, scale, path, o[b0:b1, s0:s1])
    o = o.view(B * S, H * D)[meta.q.out_index]  # back to packed order (no host sync)
    return _attn_out(hp, w, x, o)


CPU_DECODE = True  # the CPU's decode steps take _cpu_decode_attention (False: the general path, for tests)


def _cpu_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                          mask: torch.Tensor, L: int, scale: float | None) -> torch.Tensor:
    """Attention of B sequences' one query each (q [B, H, D], sequence b's token b) over slots
    0..L-1 of their cache rows under mask [B, 1, 1, L] -> [B, H * D]. A KV head's query heads are
    adjacent in q, so q seen as [B, Hkv, G, D] is the general path's folded queries without a copy,
    and the mask broadcasts over them. On the CPU a decode step's attention is mostly each op's own
    overhead, not its arithmetic: the general path's gathers by index, its folding and its float bias
    made a small model's decode slower by a tenth (BENCHMARKS.md, V4)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    K = k_cache[:, :L].index_select(0, rows).to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    V = v_cache[:, :L].index_select(0, rows).to(q.dtype).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), K, V, attn_mask=mask, scale=scale)
    return o.reshape(B, H * D)


def _attn_out(hp: HParams, w: LayerWeights, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The residual stream after attention's output o [T, H * D] is projected (and normed)."""
    if "post_attention_norm.weight" not in w:  # the residual added in the matmul's epilogue where it can be
        return linear(o, w["attn_output.weight"], w.get("attn_output.bias"), residual=x)
    o = linear(o, w["attn_output.weight"], w.get("attn_output.bias"))
    o = rms_norm(o, w["post_attention_norm.weight"], hp.norm_eps)  # gemma3: normed before the residual
    return x + o


_ACTS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}  # HParams.ffn_act


def ffn_block(hp: HParams, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = w["ffn_gate.weight"], w["ffn_up.weight"], w["ffn_down.weight"]
    h = rms_norm(x, w["ffn_norm.weight"], hp.norm_eps, then=[gate, up])
    act = _ACTS.get(hp.ffn_act, F.silu)
    if all(getattr(m, "cpu_only", False) for m in (gate, up, down)):  # the CPU's whole (cpu/split.py)
        y = gate.ffn(h, up, down, act)
    else:
        a = glu(h, gate, up) if act is F.silu else None  # one launch for decode's rows
        if a is None:
            g, u = linear_many(h, [gate, up])
            a = F.silu(g, inplace=True) if act is F.silu else act(g)  # in place where it can be: [T, F] fewer
            a = a.mul_(u)
        if "post_ffw_norm.weight" not in w:
            return linear(a, down, residual=x)
        y = linear(a, down)
    if "post_ffw_norm.weight" in w:
        y = rms_norm(y, w["post_ffw_norm.weight"], hp.norm_eps)
    return x + y


def head_forward(hp: HParams, x: torch.Tensor, norm_w: torch.Tensor, out_w: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and output head: x [N, E] -> logits [N, V] in float32."""
    return linear(rms_norm(x, norm_w, hp.norm_eps, then=[out_w]), out_w).float()
