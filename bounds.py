"""Bounds that more than one layer checks: sampling's values (SamplingParams in compute/sampling.py,
run-pipeline's options in coordinator/args.py, the server's fields in coordinator/openai_api.py) and
the pipeline's counts (args and coordinator/pipeline_config.py); torch-free, since the options are
checked before torch is imported."""

import re

MAX_WINDOW = 1 << 22  # tokens: a context, max_tokens, the repeat penalty's window at most
MAX_TEMPERATURE = 100.0
# The repeat penalty divides a seen token's positive logit by it (float32): a penalty of 1e-39 made
# every such logit infinite, which reads as a broken model. Within [0.01, 100] it scales a logit by
# at most 100 either way, finite for any logit a working model makes (a float32 overflow would need
# one above 3e36); below 0.01 it only makes a seen token certain, which 0.01 already does.
REPEAT_PENALTY_RANGE = (0.01, 100.0)
# a seed as torch's generators take it (negative seeds wrap): SamplingParams, --seed and the server's
# field; -1 asks for a fresh one on the command line and the server, as llama.cpp's (None in Python)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
# GiB, a size at most (--vram-gb and the other sizes; Budget's, ExpertOptions'): far above any machine,
# low enough that the arithmetic stays exact
MAX_GB = 1 << 20
DEVICES = "auto, cpu, cuda or cuda:N"  # the compute devices a run may name (is_device)


def is_device(name) -> bool:
    """Whether `name` is one of DEVICES: run-pipeline's --device, bin/bench's, EngineConfig's device."""
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


MAX_READERS = 64  # reader processes: each is a process of its own (a thousand ran a machine out of memory)
# the pipeline's counts and their bounds: run-pipeline's and bin/bench's options (coordinator/args.py)
# and the Python API's (pipeline_config.Budget, ReaderOptions)
PIPELINE_COUNTS = {"readers": (1, MAX_READERS), "prefetch": (1, 1 << 16), "resident_layers": (0, 1 << 31),
                   "step_tokens": (1, MAX_WINDOW), "cpu_threads": (1, 4096), "vram_slots": (2, 16),
                   "expert_prefetch": (0, 1 << 16)}
