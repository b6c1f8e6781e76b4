"""The CPU experts' sum added on the device once the CPU posts it (NOTE [ the CPU's sum posted to
the device ] in cpu/qdot.c): a kernel polls a flag in pinned host memory, then adds the sum it
reads from there. On CUDA it is one Triton launch, captured in a layer's graph B; elsewhere the
host waits for the flag and adds (the stand-in of the CPU tests). Like qkernels.py, the kernel
runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests it.

Flag values: 0 the sum is not there yet, 1 it is, 2 nothing to add (the CPU took no experts),
3 the CPU's call failed (nothing added: the host raises its error when it takes the call's end).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from layerstream.compute.qkernels import INTERPRET

PENDING, POSTED, NOTHING, FAILED = 0, 1, 2, 3
BLOCK = 1024
# polls before the kernel gives up (each a read across PCIe): the CPU's call always posts, failed or
# not, so only a host that stopped mid-call leaves it waiting, and then the device's stream moves on
# after seconds rather than never
MAX_POLLS = 1 << 24
HOST_WAIT_S = 60.0  # the host's stand-in gives up after this long


@triton.jit
def _add_posted_kernel(flag, src, out, n, max_polls, BLOCK: tl.constexpr):
    """out[i] += src[i] for this program's block of n, once flag[0] is POSTED (1)."""
    f = tl.load(flag, volatile=True)
    polls = 0
    while (f == 0) & (polls < max_polls):
        f = tl.load(flag, volatile=True)
        polls += 1
    if f == 1:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        s = tl.load(src + i, mask=ok, other=0, volatile=True)  # (after the flag: never an earlier read)
        o = tl.load(out + i, mask=ok, other=0)
        tl.store(out + i, (o.to(tl.float32) + s).to(out.dtype.element_ty), mask=ok)


class Mailbox:
    """Where a layer's CPU experts post their sum ([T, n_embd] float32) and its end (an int32 flag),
    in pinned host memory where the device is CUDA (both read by the device there)."""

    def __init__(self, T: int, n_embd: int, device: torch.device):
        pin = device.type == "cuda"
        self.sum = torch.zeros(T, n_embd, dtype=torch.float32, pin_memory=pin)
        self.flag = torch.full((1,), NOTHING, dtype=torch.int32, pin_memory=pin)
        self._flag = self.flag.numpy()  # (the host's writes: no tensor op a layer)

    @property
    def post(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, flag) for the CPU's call (cpu/native.experts_routed_start's `post`)."""
        return self.sum, self.flag

    def expect(self) -> None:
        """A call is about to start: the device waits for its post. Set before the call starts and
        before the device's next read (the layer's graph B is launched after this)."""
        self._flag[0] = PENDING

    def nothing(self) -> None:
        """The CPU takes no experts this time: the device adds nothing."""
        self._flag[0] = NOTHING

    def posted(self, out: torch.Tensor) -> None:
        """A sum computed by the host itself (no native call): put it here and post it."""
        self.sum.copy_(out)
        self._flag[0] = POSTED

    def add_to(self, out: torch.Tensor) -> None:
        """out ([T, n_embd], the device's) += the posted sum, once posted: enqueued on the device
        (capturable), or waited for here where `out` is on the CPU."""
        if out.device.type == "cuda":
            add_posted(self.flag, self.sum, out)
            return
        until = time.monotonic() + HOST_WAIT_S
        while self._flag[0] == PENDING:
            if time.monotonic() > until:
                raise RuntimeError(f"the CPU's experts posted no sum within {HOST_WAIT_S:.0f} s")
            time.sleep(0)
        if self._flag[0] == POSTED:
            out.add_(self.sum.view(out.shape))


def add_posted(flag: torch.Tensor, src: torch.Tensor, out: torch.Tensor, max_polls: int = MAX_POLLS) -> None:
    """The kernel: out += src once flag[0] is POSTED; nothing where it is NOTHING or FAILED, or still
    PENDING after `max_polls` polls (src float32, out of any float dtype, both contiguous)."""
    n = out.numel()
    kw = {} if INTERPRET else {"num_warps": 4}
    _add_posted_kernel[(triton.cdiv(n, BLOCK),)](flag, src, out, n, max_polls, BLOCK=BLOCK, **kw)
