"""A step's batch, packed once for every layer: the sequences' new tokens, their KV slots,
positions, RoPE tables and attention masks (StepMeta), built from each sequence's SeqStep."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from layerstream.loader.gguf_index import HParams


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


@dataclass
class SeqStep:
    """One sequence's part of a step: its cache row, new tokens' slots/positions, all slots' positions."""

    row: int
    tokens: list[int]
    slots: list[int]  # physical slot of each new token
    positions: list[int]  # RoPE position of each new token
    kv_pos: list[int]  # position held by each slot 0..n-1 after the writes (-1: empty)


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
