"""A kernel Triton's interpreter runs and its compiler refuses: the control of tests/compute/sm90.py
(a loop-carried sum that starts as an int and becomes a float, which the compiler cannot unify)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _int_then_float(x, out, n, BLOCK: tl.constexpr):
    acc = 0
    for i in range(0, n, BLOCK):
        acc += tl.sum(tl.load(x + i + tl.arange(0, BLOCK)), axis=0)
    tl.store(out, acc)


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of x (its length a multiple of 16), one program."""
    out = torch.zeros(1, dtype=torch.float32, device=x.device)
    _int_then_float[(1,)](x, out, x.numel(), BLOCK=16)
    return out
