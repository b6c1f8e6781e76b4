"""The flags the benches share (the model, the device, run-pipeline's budgets) and the pipeline's
options built from them once, for every stage that starts the pipeline (pipeline, serve, spec)."""

from __future__ import annotations

import argparse
import os

from layerstream.coordinator.spelling import decimal


def listed(s: str, kind, what: str, example: str = "1,8") -> list:
    """A comma-separated list of `kind`s (kind raises ValueError on an item that is not one) as a
    flag's type=: argparse's one-line usage error, exit 2, naming the flag, the value and `what` is
    accepted, where an item is empty or not one (an empty item had been dropped by some stages and
    refused by others as 'invalid <lambda>'). Lists of names (names()) and of --configs' entries
    are read here too: a stage's own check of them had been its exit 1, once it ran."""
    try:
        return [kind(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give {what}, comma separated (e.g. {example})") from None


def ints(s: str) -> list[int]:
    return listed(s, int, "whole numbers")


def floats(s: str) -> list[float]:
    return listed(s, float, "numbers")


def names(*known: str, what: str):
    """The type= of a flag whose value is `known` names, comma separated (reader's --modes)."""
    def name(x: str) -> str:
        if x not in known:
            raise ValueError(x)
        return x

    return lambda s: listed(s, name, f"{what} of {', '.join(known)}", ",".join(known[:2]))


def shapes(s: str) -> list[tuple[int, ...]]:
    """--shapes: matrices N x K, comma separated."""
    try:
        return [tuple(int(v) for v in nk.split("x")) for nk in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give matrices as N x K, comma separated (e.g. 4096x4096)") from None


# flags whose values are counts of at least one, of at least zero, and of more than zero, wherever a
# stage has them (a zero or negative count divided by zero or made meaningless rows)
AT_LEAST_ONE = ("reps", "passes", "decode_tokens", "prompt_tokens", "experts", "clients", "batch", "threads", "rounds",
                "layers", "readers", "sample_layers", "steps", "buffers", "slots", "verify", "top", "context",
                "step_tokens", "prefetch", "vram_slots", "cpu_threads", "draft_layers")
AT_LEAST_ZERO = ("generate_tokens", "warm_passes", "decode_prompt", "gap_ms", "decode_context", "resident_layers",
                 "expert_prefetch", "expert_cache_gb", "host_cache_gb", "map_threads")
POSITIVE = ("floor_gbs", "size_mb", "vram_gb")  # (--vram-gb 0 went on to the plan's refusal, status 1; run-pipeline's is 2)
FINITE = ("gap_ms", "size_mb", "floor_gbs", "expert_cache_gb", "host_cache_gb", "vram_gb")  # (inf overflowed a sleep or a buffer's size)


def problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a stage's parsed flags, in one line (None: nothing): counts out of range,
    a port outside 1..65535, a --lib that is not a file, shares outside (0, 1], a skew not finite."""
    import math
    from pathlib import Path

    def each(name):
        v = getattr(args, name, None)
        return [] if v is None else v if isinstance(v, list) else [v]

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in FINITE:
        bad = [v for v in each(name) if not math.isfinite(v)]
        if bad:
            return f"{flag(name)} {bad[0]:g}: give a finite number"
    for name in AT_LEAST_ONE:
        bad = [v for v in each(name) if not v >= 1]
        if bad:
            return f"{flag(name)} {bad[0]:g}: give at least 1"
    if getattr(args, "cmd", None) == "engine" and args.decode_prompt < 1:  # (its decode runs after a prompt)
        return f"--decode-prompt {args.decode_prompt}: give at least 1"
    for name in AT_LEAST_ZERO:
        bad = [v for v in each(name) if not v >= 0]
        if bad:
            return f"{flag(name)} {bad[0]:g}: give 0 or more"
    for name in POSITIVE:
        bad = [v for v in each(name) if not v > 0]
        if bad:
            return f"{flag(name)} {bad[0]:g}: give more than 0"
    from layerstream.coordinator.args import MAX_BATCH, MAX_GB, MAX_READ_THREADS, PIPELINE_COUNTS
    from layerstream.cpus import too_many_threads

    # run-pipeline's bounds (a thousand --readers, each a process, ran the machine out of memory)
    for name, (low, high) in PIPELINE_COUNTS.items():
        v = getattr(args, name, None)
        if v is not None and not low <= v <= high:
            return f"{flag(name)} {v}: give {low} to {high} (as run-pipeline)"
    # threads: a reader's as run-pipeline's --read-threads; else the CPU's, at most the cores this
    # process may use, as --cpu-threads (100000 of them crashed the process, a hostile-user probe found)
    if getattr(args, "cmd", None) == "reader":  # (and --map-threads' too: 10**11 of them, a MemoryError's traceback)
        for name in ("threads", "map_threads"):
            if bad := [t for t in each(name) if t > MAX_READ_THREADS]:
                return f"{flag(name)} {bad[0]}: give {'1' if name == 'threads' else '0'} to {MAX_READ_THREADS}"
    elif bad := [t for t in each("threads") if too_many_threads(t)]:
        return f"--threads {bad[0]}: {too_many_threads(bad[0])}"
    if why := too_many_threads(getattr(args, "cpu_threads", None)):  # (before a synthetic model is written)
        return f"--cpu-threads {args.cpu_threads}: {why}"
    device = getattr(args, "device", None)
    if device is not None:  # (before a --shape model is written: `--device gpu` wrote the whole 8B first)
        from layerstream.bounds import DEVICES, is_device
        from layerstream.compute.device import resolve_device
        from layerstream.errors import ConfigError

        if not is_device(device):  # (as run-pipeline's; cpu:1 ran, then the engine refused it)
            return f"--device {device}: use {DEVICES}"
        try:
            resolve_device(device)
        except ConfigError as e:
            return str(e)
    trace = getattr(args, "trace", None)
    if trace is not None:  # (checked before the run, not after it: arg_files.check_trace)
        from layerstream.coordinator.arg_files import check_trace
        from layerstream.coordinator.spelling import UsageError

        if not trace:
            return "--trace: give a file name"
        try:
            check_trace(trace, {"-m": getattr(args, "model", None)})
        except UsageError as e:
            return str(e)
    share = getattr(args, "cpu_share", None)
    if share is not None:  # (a usage error, as run-pipeline's: refused before the bench starts anything)
        from layerstream.compute.cpu.config import cpu_share_on_cpu, parse_cpu_share
        from layerstream.compute.device import resolve_device
        from layerstream.errors import ConfigError

        try:
            asked = parse_cpu_share(share, getattr(args, "cpu_split", "layers")).asked
        except ConfigError as e:
            return str(e)
        device = getattr(args, "device", "auto")  # (a share asked for where the device is the CPU: as run-pipeline)
        try:
            on_cpu = asked and resolve_device(device).type == "cpu"
        except ConfigError:  # (a device that cannot run: the stage's own start says so)
            on_cpu = False
        if on_cpu:
            return cpu_share_on_cpu(share, "no CUDA device is visible" if device == "auto" else f"--device {device}")
    bad = [b for b in each("batch") if b > MAX_BATCH]  # (-b 100000 grew for minutes past any stop signal)
    if bad:
        return f"-b {bad[0]}: give 1 to {MAX_BATCH} (run-pipeline's bound)"
    for name in ("vram_gb", "host_cache_gb", "expert_cache_gb"):
        v = getattr(args, name, None)
        if v is not None and v > MAX_GB:
            return f"{flag(name)} {v:g}: give at most {MAX_GB} (as run-pipeline)"
    if getattr(args, "shape", None) and getattr(args, "model", None):
        return f"-m {args.model} and --shape {args.shape}: give one of them (a --shape model is written and measured)"
    for layers, shape in SHAPED:  # (a probe's: --draft-layers without --draft-shape was ignored, as --layers was)
        if getattr(args, layers, None) is not None and hasattr(args, shape) and not getattr(args, shape):
            return f"{flag(layers)} {getattr(args, layers)}: it sets a {flag(shape)} model's layers; give {flag(shape)} too"
    if getattr(args, "quant", None) is not None and hasattr(args, "shape") and not args.shape \
            and not getattr(args, "draft_shape", None):  # (a probe's: ignored, measuring the given model)
        return f"--quant {args.quant}: it sets a --shape model's quant mix; give --shape too"
    types = getattr(args, "types", None)
    if isinstance(types, str):
        from gguf import GGMLQuantizationType as QT

        if getattr(args, "cmd", None) == "cpu-kernel":  # (the native kernel's types)
            from layerstream.compute.cpu.native import NATIVE_TYPES

            known = sorted(QT(t).name for t in NATIVE_TYPES)
        else:  # (qmatmul: the Triton kernels')
            from layerstream.compute.dequant import FUSED_TYPES

            known = sorted(QT(t).name for t in FUSED_TYPES)
        bad = [t for t in types.split(",") if t.strip() not in known]
        if bad or not types.strip(","):
            return f"--types {types}: give block types of {', '.join(known)}, comma separated"
    shapes = getattr(args, "shapes", None) or []
    bad = [s for s in shapes if len(s) != 2 or min(s) < 1]
    if bad:
        return f"--shapes: give each as N x K, both at least 1 (e.g. 4096x4096), not {'x'.join(map(str, bad[0]))}"
    if shapes and getattr(args, "cmd", None) == "cpu-kernel":  # whole blocks a row (a traceback, else)
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

        experts = bool(getattr(args, "experts", None))  # (n_ff x n_embd: both are a K, Q4_K's and Q6_K's)
        names = ["Q4_K", "Q6_K"] if experts else [t.strip() for t in args.types.split(",")]
        block = max(GGML_QUANT_SIZES[QT[n]][0] for n in names)
        bad = [s for s in shapes if (s[0] if experts else 0) % block or s[1] % block]
        if bad:
            what = "n_ff and n_embd" if experts else "K"
            return (f"--shapes {'x'.join(map(str, bad[0]))}: {what} must be a multiple of {block} (the block of "
                    f"{'Q4_K and Q6_K experts' if experts else '--types ' + args.types})")
    # (rows of x, compute's prompt, serve's tokens a client: at least 1; pipeline's prompt, 0: none)
    least = 1 if isinstance(getattr(args, "tokens", None), list) or getattr(args, "cmd", None) in ("compute", "serve") \
        else 0
    bad = [t for t in each("tokens") if not t >= least]
    if bad:
        return f"--tokens {bad[0]}: give at least {least}"
    port = getattr(args, "port", None)
    if port is not None and not 1 <= port <= 65535:
        return f"--port {port}: give a port from 1 to 65535"
    lib = getattr(args, "lib", None)
    if lib is not None and not Path(lib).is_file():
        return f"--lib {lib}: no such file (give a build of compute/cpu/qdot.c)"
    bad = [v for v in each("shares") if not 0 < v <= 1]
    if bad:
        return f"--shares {bad[0]:g}: give shares above 0 and at most 1"
    if any(not (math.isfinite(v) and v >= 0) for v in each("skew")):
        return "--skew: give finite values of 0 or more"
    from layerstream.loader.synth_shapes import MAX_LAYERS

    for layers, shape in SHAPED:  # (a probe's: n_layer=, status 1)
        if getattr(args, shape, None) and (getattr(args, layers, None) or 0) > MAX_LAYERS:
            return f"{flag(layers)} {getattr(args, layers)}: give 1 to {MAX_LAYERS}"
    from layerstream.coordinator.arg_files import path_problem

    # as run-pipeline's -m and --draft-model: a folder was the stage's status 1, 'd: is a directory'; a
    # --draft-model not there, status 1 naming --model; an empty one, no draft at all
    for name, shown in (("model", "-m"), ("draft_model", "--draft-model")):
        path = getattr(args, name, None)
        if path is not None and (why := "an empty path; give a file" if path == "" else path_problem(path, name)):
            return f"{shown} {path}: {why}"
    return None


# the flags that set a synthetic model's layers, and the flag of that model
SHAPED = (("layers", "shape"), ("draft_layers", "draft_shape"))


def model_args(p: argparse.ArgumentParser, reps: int = 5) -> None:
    """--model or a synthetic --shape (--layers, --quant), and --reps."""
    from layerstream.loader.synth import QUANT_MIXES, SHAPES

    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--shape", choices=sorted(SHAPES), metavar="SHAPE",
                   help=f"measure a synthetic model of this shape instead ({', '.join(SHAPES)}), written to a "
                        "temporary directory")
    p.add_argument("--layers", type=int, default=None, help="layers of the --shape model (default: the shape's)")
    p.add_argument("--quant", default=None, choices=QUANT_MIXES,
                   help="quant mix of the --shape model (default Q4_K_M)")
    p.add_argument("--reps", type=int, default=reps, help=f"timed repetitions; the median is reported (default {reps})")


def device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default float16 on CUDA; on the CPU as the engine picks)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads torch uses (default: torch's)")


def pipeline_args(p: argparse.ArgumentParser) -> None:
    """run-pipeline's budget, reader, CPU-share and expert flags, as pipeline_config reads them."""
    p.add_argument("--vram-gb", type=decimal, default=None, help="device memory budget in GiB (as run-pipeline)")
    p.add_argument("--resident-layers", type=int, default=None, help="keep this many layers resident (0: stream all)")
    p.add_argument("--step-tokens", type=int, default=None, help="tokens of one forward step at most (as run-pipeline)")
    p.add_argument("--host-cache-gb", type=decimal, default=None, help="host RAM for layers kept between passes")
    p.add_argument("--prefetch", type=int, default=None, help="layers staged ahead of compute (default from the plan)")
    p.add_argument("--readers", type=int, default=1, help="reader processes (default 1)")
    p.add_argument("--cpu-share", default="default", help="the CPU's share of the streamed layers: default, auto, 0, a fraction or "
                   "fractions by batch size, B:F,... (as run-pipeline, whose default it takes)")
    p.add_argument("--cpu-split", choices=("layers", "rows"), default="layers",
                   help="what --cpu-share splits: 4-bit FFN matrices of some layers, or rows of all (as run-pipeline)")
    p.add_argument("--vram-slots", type=int, default=None, help="the streamed layers' VRAM slots (as run-pipeline)")
    p.add_argument("--cpu-threads", type=int, default=None, help="CPU threads of the compute process")
    d = EXPERT_DEFAULTS
    p.add_argument("--expert-cache-gb", type=decimal, default=d["expert_cache_gb"], help="device memory for streamed experts")
    p.add_argument("--moe-dense", choices=("resident", "stream"), default=d["moe_dense"],
                   help="streamed MoE layers' attention and routers: resident (when they fit) or streamed")
    p.add_argument("--expert-policy", choices=("lfu", "lru"), default=d["expert_policy"], help="the expert cache's eviction")
    p.add_argument("--expert-prefetch", type=int, default=d["expert_prefetch"], metavar="N",
                   help="experts predicted and copied ahead a streamed MoE layer (as run-pipeline; 0: off)")


# the expert flags' defaults: one given otherwise with a dense model is refused (model_problem)
EXPERT_DEFAULTS = {"expert_cache_gb": None, "moe_dense": "resident", "expert_policy": "lfu", "expert_prefetch": None}


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


def _lengths(args: argparse.Namespace) -> list[tuple[str, int]]:
    """A stage's sequences as (its flags as typed, tokens): each must fit the model's context."""
    a, cmd = args, getattr(args, "cmd", None)
    if cmd == "engine":
        return [(f"-p {a.prompt_tokens}", a.prompt_tokens),
                (f"--decode-prompt {a.decode_prompt} + --decode-tokens {a.decode_tokens}", a.decode_prompt + a.decode_tokens)]
    if cmd == "compute":
        return [(f"--tokens {a.tokens}", a.tokens), (f"--decode-context {a.decode_context} + 1", a.decode_context + 1)]
    if cmd == "kernels":
        return [(f"--context {a.context} + --steps {a.steps}", a.context + a.steps)]
    if cmd == "pipeline":
        from .stage_bench import GENERATE_PROMPT, decode_sequence

        B = max(a.batch)
        passes = ("--reps", a.reps) if a.reps >= a.warm_passes else ("--warm-passes", a.warm_passes)
        return [(f"--tokens {a.tokens}", a.tokens),
                (f"its {GENERATE_PROMPT}-token prompt + --generate-tokens {a.generate_tokens}",
                 GENERATE_PROMPT + a.generate_tokens),
                (f"a decode sequence's 4-token prompt + 4 x -b {B} + {passes[0]} {passes[1]}", decode_sequence(B, passes[1]))]
    if cmd == "serve":
        return [(f"-p {a.prompt_tokens} + --tokens {a.tokens}", a.prompt_tokens + a.tokens)]
    if cmd == "spec":  # (the draft proposes as many tokens again, after the same prompt)
        from .spec_bench import PROMPT

        m = max(a.verify)
        return [(f"its {PROMPT}-token prompt + twice --verify {m}", PROMPT + 2 * m)]
    return []


def model_problem(args: argparse.Namespace) -> str | None:
    """What the stage's model makes wrong in its flags, in one line (None: nothing): an expert flag
    given with a dense model (run-pipeline refuses it; here it did nothing), a sequence longer than
    its context (such a length ran for minutes with no output, past the positions the model was
    trained for). Reads the model's header where a check needs it."""
    lengths = _lengths(args)
    experts = [f"--{n.replace('_', '-')}" for n, d in EXPERT_DEFAULTS.items() if getattr(args, n, d) != d]
    if not (lengths or experts):
        return None
    if getattr(args, "shape", None):
        from layerstream.loader.synth_shapes import resolve_shape

        shape = resolve_shape(args.shape, args.layers)
        name, n_ctx, arch, n_expert = f"--shape {shape.name}", shape.context_length, shape.arch, shape.n_expert
    else:
        from layerstream.loader.default_model import default_model_path
        from layerstream.loader.gguf_index import open_model

        path = args.model or default_model_path()
        hp = open_model(path).hparams
        name, n_ctx, arch, n_expert = os.path.basename(path), hp.context_length, hp.arch, hp.moe.n_expert
    if experts and not n_expert:  # (as run-pipeline refuses them)
        from layerstream.coordinator.spelling import no_experts

        return no_experts(experts, arch)
    for what, n in lengths:
        if n > n_ctx:
            total = f" = {n} tokens" if "+" in what else ""
            return f"{what}{total}: past the context of {name} ({n_ctx} tokens); give fewer"
    return None
