"""Speculative decoding's costs: the target's pass against the tokens it verifies, the draft's time
a proposed token, and the tokens/s they give at each acceptance rate.

    bin/bench spec --shape llama-3.1-8b --vram-gb 4 --draft-shape llama-3.2-1b
    bin/bench spec --shape llama-3.1-70b --vram-gb 8 --draft-shape llama-3.2-1b
    bin/bench spec --shape llama-3.1-8b --in-process --verify 1,2,3,4,5,8,16


The target runs as run-pipeline runs it (the streaming pipeline under --vram-gb, whose plan takes
the draft's memory off the budget), or with --in-process as the single-process engine runs it
(every layer resident, decode graphs of any batch); each timed pass verifies T - 1 random drafts after one token
(T = 1: a plain decode pass) on a row holding a short prompt, and the row is rolled back after it.
The draft runs as --draft-model runs it (coordinator/draft.py: resident, greedy, on the device).
Random weights accept nothing worth measuring, so acceptance is an input: a pass verifying k drafts
gives (1 - a^(k+1)) / (1 - a) tokens on average at acceptance a, and costs the target's pass of
k + 1 tokens plus k of the draft's tokens."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import numpy as np

from layerstream.compute.device import resolve_device

from .flags import device_args, ints, model_args, pipeline_args, pipeline_config
from .stage_bench import device_name, model_for, print_table

RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
PROMPT = 32  # tokens a row holds before the timed passes


def expected_tokens(a: float, k: int) -> float:
    """Tokens a pass verifying k drafts gives on average at acceptance a."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


@contextlib.contextmanager
def draft_index(args):
    """The draft: --draft-model, a --draft-shape written to a temporary directory, or None."""
    from layerstream.loader.gguf_index import open_model

    if args.draft_shape:
        from layerstream.loader.synth import write_shaped_model

        with tempfile.TemporaryDirectory(prefix="layerstream-bench-") as d:
            path = write_shaped_model(os.path.join(d, f"{args.draft_shape}.gguf"), args.draft_shape,
                                      args.draft_layers, args.quant, progress=True)
            yield open_model(path)
    else:
        yield open_model(args.draft_model) if args.draft_model else None


def time_passes(backend, row: int, V: int, ctx: int, sizes: list[int], reps: int, warm: int = 0) -> dict[int, float]:
    """Median seconds of a target pass of T tokens verifying T - 1 drafts, for each T of `sizes`,
    after `warm` untimed passes of each T (a CPU share's balancer times its choices on the first
    passes of each batch size: timed then, its trials are in the figures)."""
    from layerstream.compute.step_meta import SeqStep
    from layerstream.coordinator.kv_ring import KVRing
    from layerstream.proto.messages import SamplerStart

    rng = np.random.default_rng(0)
    ring = KVRing(ctx)
    slots, pos = ring.append(PROMPT)
    backend.step([SeqStep(row, rng.integers(0, V, PROMPT).tolist(), slots, pos, ring.slot_positions())], "last")
    starts = [SamplerStart(row, 0.0, 1, 1.0, 0.0, 1.0, 0, 0, [])]  # greedy
    out = {}
    for T in sizes:
        times = []
        for i in range(-warm, reps + 1):  # the first of each size untimed (a new shape), the warm ones too
            slots, pos = ring.append(T)
            seq = SeqStep(row, rng.integers(0, V, T).tolist(), slots, pos, ring.slot_positions())
            t0 = time.perf_counter()
            backend.submit([seq], [T], starts, "none")
            backend.collect()
            if i > 0:
                times.append(time.perf_counter() - t0)
            starts = []
            ring.rollback(T)
        out[T] = statistics.median(times)
    return out


def time_draft(index, args, ctx: int, lengths: list[int]) -> dict[int, float]:
    """Median seconds a proposed token of the draft, proposing k tokens at once, for each k."""
    from layerstream.coordinator.draft import DraftModel
    from layerstream.coordinator.engine import EngineConfig, local_backend

    be = local_backend(index, EngineConfig(device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=1))
    try:
        model = DraftModel(be.runner, ctx, 1, 512)
        p = model.proposer(np.random.default_rng(1).integers(0, index.hparams.n_vocab, PROMPT).tolist())
        for k in lengths:  # untimed: the prompt's prefill, then the decode steps' first shapes (graphs captured)
            p.propose(k)
        out = {}
        for k in lengths:
            times = []
            for i in range(args.reps + 1):  # each proposal re-drafts from the same text (its drafts rolled back)
                t0 = time.perf_counter()
                got = p.propose(k)
                if i:
                    times.append((time.perf_counter() - t0) / max(len(got), 1))
            out[k] = statistics.median(times)
        return out
    finally:
        be.close()


def bench_spec(args) -> dict:
    from layerstream.coordinator.engine import EngineConfig, local_backend
    from layerstream.coordinator.pipeline import pipeline_backend

    sizes = sorted(set(args.verify) | {1})
    ctx = PROMPT + max(sizes) + 8
    with model_for(args) as index, draft_index(args) as dindex:
        V = index.hparams.n_vocab
        if dindex is not None and dindex.hparams.n_vocab != V:
            raise ValueError(f"the draft has {dindex.hparams.n_vocab} tokens, the target {V}: give a draft of its vocabulary")
        # drafting as many tokens as the largest pass verifies, so that the plan counts (and the compute
        # process captures) the decode graphs of its rows, as run-pipeline's plan does for --draft-tokens
        drafts = max(sizes) - 1
        cfg = EngineConfig(model=index.path, device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=1,
                           draft_model=dindex.path if dindex is not None else None, draft_tokens=max(1, drafts),
                           lookup=0 if dindex is not None else drafts)
        pcfg = pipeline_config(args)
        # the target alone, the draft not loaded beside it: the plan counts the draft's memory all the same
        backend = local_backend(index, cfg) if args.in_process else pipeline_backend(index, cfg, pcfg)
        try:
            if args.in_process:
                print("the single-process engine: every layer resident", flush=True)
            else:
                print(f"plan: {backend.plan.describe()}", flush=True)
            row = 0
            passes = time_passes(backend, row, V, ctx, sizes, args.reps, args.warm_passes)
            if args.in_process:  # how its verifying passes ran (runner.py, NOTE [ drafts verified as decode rows ])
                print("verifying passes run as: " + ", ".join(f"{k} {v}" for k, v in
                                                              sorted(backend.runner.verify_paths.items())), flush=True)
        finally:
            backend.close()
        where = device_name(resolve_device(args.device))
        print_table(f"spec: {os.path.basename(index.path)} target passes on {where}",
                    [{"tokens a pass": T, "s/pass": s, "x one token": s / passes[1]} for T, s in passes.items()],
                    "each pass verifies its tokens but the first as drafts (sampling on the device); median of --reps")
        lengths = [T - 1 for T in sizes if T > 1]
        draft = {}
        if dindex is not None:
            draft = time_draft(dindex, args, ctx + max(lengths), lengths)
            print_table(f"spec: draft {os.path.basename(dindex.path)}",
                        [{"drafts a proposal": k, "s/token": s} for k, s in draft.items()],
                        "a proposal: the last accepted token fed, then k - 1 greedy decode steps, one read-back")
        rows = []
        for a in RATES:
            r = {"acceptance": a, "no drafts": 1 / passes[1]}
            best = (1 / passes[1], 0)
            for k in lengths:
                t = passes[k + 1] + k * draft.get(k, 0.0)
                r[f"k={k}"] = expected_tokens(a, k) / t
                best = max(best, (r[f"k={k}"], k))
            r["best k"] = best[1]
            rows.append(r)
        print_table("spec: tokens/s at each acceptance (columns: drafts a pass k)", rows,
                    "tokens/s = (1 - a^(k+1)) / (1 - a) / (pass of k + 1 tokens + k draft tokens)"
                    + ("" if draft else "; no draft model: drafts cost nothing (prompt lookup)"))
        return {"passes": passes, "draft": draft, "rates": rows}


def add_spec_parser(sub) -> None:
    """Register the `spec` stage on bin/bench's subparsers."""
    p = sub.add_parser("spec", help="speculative decoding: target pass against tokens verified, the draft's cost, "
                                    "tokens/s at each acceptance")
    model_args(p, reps=3)
    device_args(p)
    pipeline_args(p)
    p.add_argument("--in-process", action="store_true",
                   help="the target as the single-process engine (every layer resident) instead of the pipeline")
    p.add_argument("--verify", type=ints, default=[1, 2, 4, 8, 16, 32], help="tokens a pass (default 1,2,4,8,16,32)")
    p.add_argument("--warm-passes", type=int, default=0,
                   help="untimed target passes at each --verify size before the timed ones (default 0; "
                        "with --cpu-share auto, enough for its balancer to choose: about 12)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--draft-model", default=None, help="the draft's GGUF (the target's vocabulary)")
    from layerstream.loader.synth import SHAPES

    g.add_argument("--draft-shape", default=None, choices=sorted(SHAPES), help="a synthetic draft of this shape")
    p.add_argument("--draft-layers", type=int, default=None, help="layers of the --draft-shape model (default: its own)")
    p.set_defaults(func=bench_spec)


__all__ = ["add_spec_parser", "bench_spec", "expected_tokens"]
