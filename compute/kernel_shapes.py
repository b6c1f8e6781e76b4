"""Where the Triton kernels on GGUF blocks take a matmul, without Triton: qkernels' dispatch and the
plan's count of captured partial sums (coordinator/memory.py) read the same figures."""

from __future__ import annotations

# qsmall's tensor-core kernel: the rows of x and the matrices measured (BENCHMARKS.md, "Small
# batches on the tensor cores"), and its split of K
SMALL_ROWS, SMALL_N, SMALL_K = (2, 32), (1024, 16384), (4096, 16384)
SMALL_SPLITS = 4
# Enough programs to keep every multiprocessor's loads in flight: a decode matmul is a few MB
# read once, and one program walking a whole row at a time leaves the memory system idle (the
# split-K kernel splits K until about this many run).
TARGET_PROGRAMS = 4096


def small_shape(M: int, N: int, K: int) -> bool:
    """Whether x [M, K] by an [N, K] matrix is of the rows and shapes qsmall was measured on."""
    return (SMALL_ROWS[0] <= M <= SMALL_ROWS[1] and SMALL_N[0] <= N <= SMALL_N[1]
            and SMALL_K[0] <= K <= SMALL_K[1] and K % 256 == 0)
