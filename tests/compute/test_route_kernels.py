"""A router's choice in one launch (route_kernels.py, NOTE [ routing in one launch ]) against
torch's softmax and topk, under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from layerstream.compute import route_kernels  # noqa: E402


def distinct_logits(T: int, E: int, seed: int) -> torch.Tensor:
    """[T, E] float64 logits, each row a shuffle of E values 0.05 apart (distinct in float16 and
    bfloat16 too: torch leaves the order of ties open)."""
    g = torch.Generator().manual_seed(seed)
    steps = (torch.arange(E, dtype=torch.float64) - E / 2) * 0.05
    return torch.stack([steps[torch.randperm(E, generator=g)] for _ in range(T)])


def torch_route(logits: torch.Tensor, k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.route's ops on the CPU: the reference."""
    weight, chosen = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return (weight / weight.sum(-1, keepdim=True) if norm else weight), chosen


@pytest.mark.parametrize("T, E, k, norm, dtype", [(1, 128, 8, True, torch.float16), (3, 128, 8, False, torch.float32),
                                                  (2, 8, 2, True, torch.bfloat16), (5, 60, 4, True, torch.float16),
                                                  (1, 1000, 3, False, torch.float32)])
def test_route_picks_torchs_experts_and_weights(T, E, k, norm, dtype):
    """Qwen3-MoE's 8 of 128, Mixtral's 2 of 8, a count of experts that is not a power of two (its
    block padded), float16 to float32 logits: the same experts in the same order as softmax and
    topk, the weights within float32's rounding of theirs."""
    logits = distinct_logits(T, E, 100 * T + E).to(dtype)
    weight, chosen = route_kernels.route(logits, k, norm)
    ref_w, ref_c = torch_route(logits, k, norm)
    assert chosen.dtype == torch.int64 and weight.dtype == torch.float32 and weight.shape == (T, k)
    assert torch.equal(chosen, ref_c)
    torch.testing.assert_close(weight, ref_w, rtol=2e-6, atol=1e-7)


def test_ties_go_to_the_lower_expert_and_a_strided_row_is_read_whole():
    """Equal logits: the lower index first (torch leaves the order of ties open); a view whose rows
    are strided (the router's output sliced) gives its own row's choice."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    weight, chosen = route_kernels.route(logits, 3, True)
    assert chosen.tolist() == [[1, 3, 4]]
    torch.testing.assert_close(weight, torch.full((1, 3), 1 / 3))
    wide = distinct_logits(4, 16, 0).float()
    got = route_kernels.route(wide[:, :8], 2, False)
    ref = torch_route(wide[:, :8].contiguous(), 2, False)
    assert torch.equal(got[1], ref[1]) and torch.allclose(got[0], ref[0])


def test_route_refuses_more_picks_than_experts():
    with pytest.raises(ValueError, match="k=9, 8 experts"):
        route_kernels.route(torch.zeros(1, 8), 9, True)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 512])
def test_moe_route_on_cuda_picks_what_torchs_ops_pick_on_the_cpu(T):
    """Compiled, through moe.route (which takes the kernel on CUDA): Qwen3-MoE's 8 of 128 for decode
    steps and a prompt's 512 rows, float16 logits, against moe.route's torch ops on the CPU."""
    from types import SimpleNamespace

    from layerstream.compute import moe
    from layerstream.loader.gguf_index import MoeParams

    hp = SimpleNamespace(moe=MoeParams(128, 8, 768, True))
    logits = distinct_logits(T, 128, T).half()
    weight, chosen = moe.route(hp, logits.cuda())
    ref_w, ref_c = moe.route(hp, logits)
    assert torch.equal(chosen.cpu(), ref_c)
    torch.testing.assert_close(weight.cpu(), ref_w, rtol=2e-6, atol=1e-7)
