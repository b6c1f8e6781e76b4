"""The flags the benches share (the model, the device, run-pipeline's budgets) and the pipeline's
options built from them once, for every stage that starts the pipeline (pipeline, serve, spec)."""

from __future__ import annotations

import argparse


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def model_args(p: argparse.ArgumentParser, reps: int = 5) -> None:
    """--model or a synthetic --shape (--layers, --quant), and --reps."""
    from layerstream.loader.synth import SHAPES

    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--shape", help=f"measure a synthetic model of this shape instead ({', '.join(SHAPES)}), written "
                                   "to a temporary directory")
    p.add_argument("--layers", type=int, default=None, help="layers of the --shape model (default: the shape's)")
    p.add_argument("--quant", default="Q4_K_M", help="quant mix of the --shape model (Q4_K_M, Q5_K_M, Q8_0, F16)")
    p.add_argument("--reps", type=int, default=reps, help=f"timed repetitions; the median is reported (default {reps})")


def device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default float16 on CUDA; on the CPU as the engine picks)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads torch uses (default: torch's)")


def pipeline_args(p: argparse.ArgumentParser) -> None:
    """run-pipeline's budget, reader, CPU-share and expert flags, as pipeline_config reads them."""
    p.add_argument("--vram-gb", type=float, default=None, help="device memory budget in GiB (as run-pipeline)")
    p.add_argument("--resident-layers", type=int, default=None, help="keep this many layers resident (0: stream all)")
    p.add_argument("--step-tokens", type=int, default=None, help="tokens of one forward step at most (as run-pipeline)")
    p.add_argument("--host-cache-gb", type=float, default=None, help="host RAM for layers kept between passes")
    p.add_argument("--prefetch", type=int, default=None, help="layers staged ahead of compute (default from the plan)")
    p.add_argument("--readers", type=int, default=1, help="reader processes (default 1)")
    p.add_argument("--cpu-share", default="0", help="the CPU's share of the streamed layers: auto, 0 or a fraction (default 0; as run-pipeline)")
    p.add_argument("--cpu-split", choices=("layers", "rows"), default="layers",
                   help="what --cpu-share splits: 4-bit FFN matrices of some layers, or rows of all (as run-pipeline)")
    p.add_argument("--vram-slots", type=int, default=None, help="the streamed layers' VRAM slots (as run-pipeline)")
    p.add_argument("--cpu-threads", type=int, default=None, help="CPU threads of the compute process")
    p.add_argument("--expert-cache-gb", type=float, default=None, help="device memory for streamed experts")
    p.add_argument("--moe-dense", choices=("resident", "stream"), default="resident",
                   help="streamed MoE layers' attention and routers: resident (when they fit) or streamed")
    p.add_argument("--expert-policy", choices=("lfu", "lru"), default="lfu", help="the expert cache's eviction")
    p.add_argument("--expert-prefetch", type=int, default=None, metavar="N",
                   help="experts predicted and copied ahead a streamed MoE layer (as run-pipeline; 0: off)")


def pipeline_config(args, direct: bool = False, trace: bool = False):
    """The pipeline's options from pipeline_args' flags (O_DIRECT reads and the trace where the
    stage offers them). The stages only generate, so they plan as run-pipeline does without
    --perplexity (NOTE [ rows of logits ] in coordinator/memory.py)."""
    from layerstream.coordinator import pipeline_config as pc

    return pc.PipelineConfig(
        budget=pc.Budget(vram_gb=args.vram_gb, host_cache_gb=args.host_cache_gb, resident_layers=args.resident_layers,
                         prefetch=args.prefetch, step_tokens=args.step_tokens, vram_slots=args.vram_slots,
                         evaluates=False),
        readers=pc.ReaderOptions(count=args.readers, direct=direct),
        cpu=pc.CpuOptions(share=args.cpu_share, split=args.cpu_split, threads=args.cpu_threads),
        experts=pc.ExpertOptions(args.expert_cache_gb, args.moe_dense, args.expert_policy, args.expert_prefetch),
        procs=pc.ProcessOptions(trace=trace),
    )
