"""bin/run-pipeline: generate text from a GGUF model, or measure a text's perplexity."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from layerstream.errors import LayerstreamError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-pipeline",
        description="Generate text from a GGUF model, streaming its layers through a small GPU budget.",
    )
    p.add_argument("prompt", nargs="*", help="prompt text (with --chat and no prompt: an interactive chat)")
    p.add_argument("-m", "--model", help="GGUF file, or the first part of a split model (default: SmolLM2-135M-Instruct)")
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 keeps all (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold; 1 disables (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p times the top probability (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for recent tokens; 1 disables (default 1.0)")
    g.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back over (default 64)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this string is generated (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g = p.add_argument_group("prompting")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template; interactive without a prompt")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--perplexity", metavar="FILE", help="report the perplexity of a text file instead of generating")
    g = p.add_argument_group("engine")
    g.add_argument("--ctx", type=int, default=None, help="KV ring capacity in tokens per sequence (default min(model's, 4096))")
    g.add_argument("--on-context-full", choices=["error", "slide"], default="error",
                   help="when a sequence outgrows --ctx: stop with an error, or slide a window keeping sink tokens")
    g.add_argument("--sink-tokens", type=int, default=4, help="tokens kept at the start when sliding (default 4)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default float16 on CUDA; on the CPU bfloat16 where it has bf16 instructions, else float32)")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward step (default 512)")
    g.add_argument("--single-process", action="store_true",
                   help="run the whole model in this process (the reference engine) instead of the pipeline")
    g.add_argument("--batch", type=int, default=1, help="sequences the engine holds at once (default 1)")
    g.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    g = p.add_argument_group("server (OpenAI-compatible HTTP API)")
    g.add_argument("--serve", action="store_true", help="serve /v1/completions, /v1/chat/completions, /v1/models, "
                                                        "/health and /metrics instead of generating once")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 429 (default 256)")
    g = p.add_argument_group("streaming pipeline")
    g.add_argument("--vram-gb", type=float, default=None,
                   help="compute-device memory budget in GiB; layers that do not fit stream through it (default on "
                        "CUDA: the GPU's free memory less 1 GiB; on the CPU: no limit)")
    g.add_argument("--step-tokens", type=int, default=None,
                   help="tokens of one forward step at most: prompts are chunked to it (default: from the budget, at most 512)")
    g.add_argument("--cpu-share", default="0", metavar="F|auto|0",
                   help="share of the streamed layers the CPU computes from host RAM while the rest crosses PCIe "
                        "(see --cpu-split; of a mixture-of-experts decode step: of the chosen experts not in the "
                        "device cache); auto times shares per batch size and keeps the fastest (CUDA only). "
                        "Default 0 (BENCHMARKS.md: auto made a 70B at 8 GiB 1.25x faster, using host RAM and "
                        "packing time in the first passes)")
    g.add_argument("--cpu-split", choices=("layers", "rows"), default="layers",
                   help="what --cpu-share splits: whole 4-bit FFN matrices of a share of the streamed layers "
                        "(layers, default) or the last rows of every 4-bit matrix (rows)")
    g.add_argument("--vram-slots", type=int, default=None,
                   help="VRAM slots the streamed layers cross through under a budget (default 2; a CPU share may "
                        "gain from 3: the copies run further ahead while the CPU computes)")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU threads of the compute process (default with a CPU share: all cores but 4 from 8 cores up)")
    g.add_argument("--expert-cache-gb", type=float, default=None,
                   help="device memory for a mixture-of-experts model's streamed experts: decode steps copy only the "
                        "experts the router chose (default: one layer's slot)")
    g.add_argument("--expert-policy", choices=("lfu", "lru"), default="lfu",
                   help="which streamed experts the device cache keeps: the most often used (lfu, default) or the "
                        "most recently used (lru)")
    g.add_argument("--expert-prefetch", type=int, default=None, metavar="N",
                   help="a mixture-of-experts decode step predicts each streamed layer's experts from the layer before "
                        "and copies up to N of them ahead (default: twice the experts a token uses; 0: off)")
    g.add_argument("--moe-dense", choices=("resident", "stream"), default="resident",
                   help="a mixture-of-experts model's attention, router and norms of streamed layers: kept on the "
                        "device when they fit, so decode copies only the chosen experts (default, as llama.cpp's "
                        "-ot exps=CPU), or streamed with their layer")
    g.add_argument("--host-cache-gb", type=float, default=None,
                   help="host RAM for layers kept between passes (default: the streamed layers, up to half the free RAM)")
    g.add_argument("--readers", type=int, default=1, help="reader processes (default 1)")
    g.add_argument("--reader-dir", action="append", default=[], metavar="DIR",
                   help="the directory (drive) each reader serves, once per reader, for split models across drives")
    g.add_argument("--direct-io", action="store_true", help="read with O_DIRECT, bypassing the page cache")
    g.add_argument("--prefetch", type=int, default=None, help="layers staged ahead of compute (default from the plan)")
    g.add_argument("--kv-on-host", action="store_true", default=None,
                   help="keep the KV cache in host memory and stream it with its layer")
    g.add_argument("--resident-layers", type=int, default=None, help="override the plan: keep this many layers resident")
    g.add_argument("--transport", choices=["ipc", "tcp"], default="ipc", help="ZeroMQ transport between processes")
    g.add_argument("--stall-timeout", type=float, default=120.0,
                   help="seconds a step may wait on the compute process without a message before the run ends (120)")
    g.add_argument("--stats", action="store_true", help="print a per-stage table at exit")
    g.add_argument("--trace", metavar="FILE", help="write a Chrome trace / Perfetto JSON timeline of the run")
    return p


def _die(msg: str, code: int = 1) -> None:
    print(f"run-pipeline: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _sampling(args):
    from layerstream.compute.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
        max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )


MAX_BATCH = 4096
MAX_READERS = 64
MAX_CTX = 1 << 22


def _check_args(args) -> None:
    """Every option checked before a model is opened or a process started: one line each."""
    import math

    def finite(name: str, v: float | None, low: float, high: float, low_open: bool = False) -> None:
        if v is not None and not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
            _die(f"--{name} {v}: must be a finite number {'above' if low_open else 'from'} {low:g}"
                 f"{' and at most' if low_open else ' to'} {high:g}")

    def ints(name: str, v: int | None, low: int, high: int) -> None:
        if v is not None and not low <= v <= high:
            _die(f"--{name} {v}: must be from {low} to {high}")

    ints("max-tokens", args.max_tokens, 1, MAX_CTX)
    finite("temperature", args.temperature, 0.0, 100.0)
    if 0 < args.temperature < 1e-4:
        _die(f"--temperature {args.temperature}: too small to sample with; use 0 for greedy decoding")
    finite("top-p", args.top_p, 0.0, 1.0)  # as SamplingParams: 0 keeps the best token only
    finite("min-p", args.min_p, 0.0, 1.0)
    finite("repeat-penalty", args.repeat_penalty, 0.0, 100.0, low_open=True)
    ints("top-k", args.top_k, 0, 1 << 31)
    ints("repeat-last-n", args.repeat_last_n, 0, MAX_CTX)
    ints("ctx", args.ctx, 2, MAX_CTX)
    ints("batch", args.batch, 1, MAX_BATCH)
    ints("prefill-chunk", args.prefill_chunk, 1, MAX_CTX)
    ints("sink-tokens", args.sink_tokens, 0, MAX_CTX)
    ints("readers", args.readers, 1, MAX_READERS)
    ints("prefetch", args.prefetch, 1, 1 << 16)
    ints("resident-layers", args.resident_layers, 0, 1 << 16)
    ints("step-tokens", args.step_tokens, 1, MAX_CTX)
    ints("cpu-threads", args.cpu_threads, 1, 4096)
    ints("vram-slots", args.vram_slots, 2, 16)
    from layerstream.coordinator.pipeline import parse_cpu_share
    from layerstream.errors import ConfigError

    try:
        parse_cpu_share(args.cpu_share)
    except ConfigError as e:
        _die(str(e))
    finite("vram-gb", args.vram_gb, 0.0, 1 << 20, low_open=True)
    finite("host-cache-gb", args.host_cache_gb, 0.0, 1 << 20)
    finite("expert-cache-gb", args.expert_cache_gb, 0.0, 1 << 20)
    finite("stall-timeout", args.stall_timeout, 0.0, 1e6, low_open=True)
    if args.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", args.device):
        _die(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    for name in ("model", "perplexity"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            _die(f"--{name} {path}: no such file")
        if path and not os.access(path, os.R_OK):
            _die(f"--{name} {path}: not readable (check its permissions)")
    if args.perplexity and os.path.getsize(args.perplexity) == 0:
        _die(f"--perplexity {args.perplexity}: the file is empty")
    if args.trace:
        d = os.path.dirname(os.path.abspath(args.trace))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            _die(f"--trace {args.trace}: cannot write there (no such directory, or not writable)")
    ints("port", args.port, 0, 65535)
    ints("max-queue", args.max_queue, 1, 1 << 20)
    if not args.serve and not args.perplexity and not args.chat and not " ".join(args.prompt).strip():
        _die("no prompt given; pass the prompt text, or --chat for an interactive chat")


def open_engine(args):
    """The engine the options ask for: the streaming pipeline, or everything in this process."""
    from layerstream.coordinator.engine import Engine, EngineConfig
    from layerstream.loader.default_model import default_model_path
    from layerstream.loader.gguf_index import open_model

    index = open_model(args.model or default_model_path())
    ctx = args.ctx or min(index.hparams.context_length, 4096)
    cfg = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=args.batch,
        on_context_full=args.on_context_full, sink_tokens=args.sink_tokens, prefill_chunk=args.prefill_chunk,
    )
    pcfg = None
    if not args.single_process:
        from layerstream.coordinator.pipeline import PipelineConfig

        pcfg = PipelineConfig(
            readers=args.readers, reader_dirs=tuple(args.reader_dir), direct=args.direct_io,
            vram_gb=args.vram_gb, host_cache_gb=args.host_cache_gb, prefetch=args.prefetch,
            kv_on_host=args.kv_on_host, resident_layers=args.resident_layers, transport=args.transport,
            step_tokens=args.step_tokens, stall_timeout_s=args.stall_timeout,
            cpu_share=args.cpu_share, cpu_split=args.cpu_split, cpu_threads=args.cpu_threads,
            vram_slots=args.vram_slots,
            expert_cache_gb=args.expert_cache_gb,
            moe_dense=args.moe_dense, expert_policy=args.expert_policy, expert_prefetch=args.expert_prefetch,
            trace=bool(args.trace),
        )
    return Engine.open(cfg, pcfg, index=index, progress=sys.stderr.isatty())


def _report(engine, args) -> None:
    """--stats and --trace, from every process's timeline."""
    if not (args.stats or args.trace) or not hasattr(engine.backend, "collect_stats"):
        return
    snaps = engine.backend.collect_stats()
    if args.stats:
        print(engine.backend.stats_table(snaps), file=sys.stderr)
    if args.trace:
        n = engine.backend.write_trace(args.trace, snaps)
        print(f"trace: {n} events written to {args.trace}", file=sys.stderr)


def _print_stream(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _interactive_chat(engine, params, system) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = engine.encode_chat(messages)
        reply = ""
        for piece in engine.generate(ids, params):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def run(args) -> int:
    # bytes that are not UTF-8 (argv keeps them as surrogates, stdin would raise) become U+FFFD
    args.prompt = [a.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for a in args.prompt]
    if args.system:
        args.system = args.system.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    sys.stdin.reconfigure(errors="replace")
    _check_args(args)
    params = _sampling(args)
    with open_engine(args) as engine:
        try:
            return _run_engine(engine, args, params)
        finally:
            _report(engine, args)


def _run_engine(engine, args, params) -> int:
    if args.serve:
        from layerstream.coordinator.server import serve
        from layerstream.loader.default_model import default_model_path

        return serve(engine, args.model or default_model_path(), args.host, args.port, args.api_key, args.max_queue)
    if args.perplexity:
        with open(args.perplexity, encoding="utf-8", errors="replace") as f:
            text = f.read()
        ppl, n = engine.perplexity(text)
        print(f"perplexity: {ppl:.4f} over {n} tokens")
        return 0
    prompt = " ".join(args.prompt)
    if args.chat and not prompt:
        if engine.chat_template is None:
            _die("--chat: this model's GGUF has no tokenizer.chat_template; run without --chat")
        _interactive_chat(engine, params, args.system)
        return 0
    if not prompt:
        _die("no prompt given; pass the prompt text, or --chat for an interactive chat")
    _print_stream(engine.generate(prompt, params, chat=args.chat, system=args.system))
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C, exit 143 (128 + SIGTERM)."""


def _sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)  # stop the pipeline the same way as Ctrl-C
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except LayerstreamError as e:
        _die(str(e))
    except _Terminated:
        print("\nrun-pipeline: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\nrun-pipeline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
