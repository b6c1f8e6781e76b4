"""Run a hostile input's risky part in a child process under an address-space limit and a timeout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

_PRELUDE = """\
import resource
{imports}
with open("/proc/self/status") as fh:
    _vm = int(next(line for line in fh if line.startswith("VmSize:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (_vm + {headroom}, _vm + {headroom}))
"""


@dataclass
class Bounded:
    """What the child did: its exit status, its output and how long it ran."""

    rc: int
    out: str
    err: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return (self.out + self.err).strip().splitlines()


def run_bounded(code: str, *, imports: str = "", headroom: int = 1 << 30, timeout: float = 60.0) -> Bounded:
    """Run `code` in a fresh Python after `imports`, with at most `headroom` bytes of address space
    above what the imports took (their baseline is measured in the child: torch's is large)."""
    src = _PRELUDE.format(imports=textwrap.dedent(imports), headroom=int(headroom)) + textwrap.dedent(code)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout)
    return Bounded(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
