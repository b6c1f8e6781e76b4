"""Profile one prompt step through the engine core: wall time, device kernels and host time.

    python3 benchmarks/profile_prompt.py MODEL.gguf [DEVICE] [TOKENS]

Loads MODEL resident (the single-process engine), runs three prompts of TOKENS random ids
(default 512; the first compiles and warms up), then one more under torch.profiler, and prints
the kernels by device time and the operators by host time. A step whose wall time exceeds its
device time is bound by the host's launches.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine


def main(argv: list[str]) -> None:
    model = argv[0]
    device = argv[1] if len(argv) > 1 else "cuda"
    n = int(argv[2]) if len(argv) > 2 else 512
    engine = Engine.load(model, device=device, ctx=2 * n, max_seqs=1, prefill_chunk=n)
    gen = torch.Generator().manual_seed(0)
    cuda = torch.device(device).type == "cuda"

    def prompt(i: int) -> float:
        ids = torch.randint(0, engine.hparams.n_vocab, (n,), generator=gen).tolist()
        t0 = time.perf_counter()
        engine.core.add_request(f"p{i}", ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        engine.core.run_to_completion()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(3):
        print(f"prompt {i}: {1e3 * prompt(i):.1f} ms", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        print(f"profiled: {1e3 * prompt(3):.1f} ms")
    table = prof.key_averages()
    if cuda:
        print(table.table(sort_by="device_time_total", row_limit=14, max_name_column_width=60))
    print(table.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1:])
