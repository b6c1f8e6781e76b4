"""bin/run-pipeline: generate text from a GGUF model, chat with it, serve it, or measure a text's perplexity."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from layerstream.coordinator.args import PROG, UsageError, build_parser, check_args, read_api_key
from layerstream.errors import ConfigError, LayerstreamError

SERVE_BATCH = 8  # the rows --serve holds by default where they fit
SERVE_BATCH_MAX = 64  # and at most, where the budget holds more


def _die(msg: str, code: int = 1) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _sampling(args):
    from layerstream.compute.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
        max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )


def check_model(args):
    """The model's header, read (through the header cache) before anything loads or starts:
    architecture and hyperparameters, tensor types, and a chat template where --chat needs one."""
    from layerstream.loader.default_model import default_model_path
    from layerstream.loader.gguf_index import open_model

    path = args.model or default_model_path()
    index = open_model(path)
    if args.chat:
        source = index.metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            why = "has no chat template" if source is None else "has a chat template that is not text"
            raise ConfigError(f"--chat: {os.path.basename(path)} {why} (tokenizer.chat_template; a base model, not "
                              "an instruct one?); run without --chat")
    from layerstream.compute.weights import check_model_quants

    check_model_quants(index)
    return index


def _mem_available() -> int:
    """Host memory available for new allocations (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def serve_batch(args, index, ctx: int) -> tuple[int, str]:
    """--serve's default --batch: a pass costs about the same for one row as for many, so as many
    rows as the budget holds, up to SERVE_BATCH_MAX, and SERVE_BATCH where they fit; never more
    rows than half the host's available memory holds KV for. Returns (rows, why)."""
    import torch

    from layerstream.compute.device import keeps_quantized, resolve_device, resolve_dtype

    hp = index.hparams
    device = resolve_device(args.device)
    dtype_bytes = torch.finfo(resolve_dtype(args.dtype, device, hp.arch)).bits // 8
    kv_row = 2 * hp.n_layer * ctx * hp.n_head_kv * hp.head_dim * dtype_bytes
    host_rows = max(1, _mem_available() // 2 // kv_row)
    if args.single_process or args.vram_gb is None and device.type == "cpu":
        rows = min(SERVE_BATCH, host_rows)
        if device.type == "cuda":
            rows = max(1, min(rows, torch.cuda.mem_get_info(device)[0] // 2 // kv_row))
        return rows, "the --serve default" + ("" if rows == SERVE_BATCH else ", bounded by free memory")
    from layerstream.coordinator.plan import GiB, fit_budget, make_plan
    from layerstream.loader.layout import layer_layouts

    vram = int(args.vram_gb * GiB) if args.vram_gb is not None else fit_budget(device)
    layouts = layer_layouts(index)
    for rows in (64, 32, 16, 8, 4, 2, 1):
        if rows > min(SERVE_BATCH_MAX, host_rows) and rows > 1:
            continue
        try:
            plan = make_plan(index, layouts, vram_bytes=vram, host_cache_bytes=0, dtype_bytes=dtype_bytes, ctx=ctx,
                             max_seqs=rows, quantized=keeps_quantized(device), step_tokens=args.step_tokens,
                             kv_on_host=args.kv_on_host, resident_layers=args.resident_layers,
                             max_prefetch=hp.n_layer, vram_slots=args.vram_slots,
                             expert_cache_bytes=None if args.expert_cache_gb is None else int(args.expert_cache_gb * GiB),
                             moe_dense=args.moe_dense, expert_prefetch=args.expert_prefetch)
        except ConfigError:
            continue
        # beyond SERVE_BATCH only while every layer's KV stays on the device (no pass moves KV)
        if rows <= SERVE_BATCH or plan.kv_device_layers == hp.n_layer:
            return rows, "the --serve default: the rows the plan's budget holds"
    return 1, "the --serve default: the plan's budget holds one row"


def open_engine(args, index, progress: bool):
    """The engine the options ask for: the streaming pipeline, or everything in this process."""
    from layerstream.coordinator.engine import Engine, EngineConfig

    ctx = args.ctx or min(index.hparams.context_length, 4096)
    if args.batch is None:
        args.batch = 1
        if args.serve:
            args.batch, why = serve_batch(args, index, ctx)
            print(f"layerstream: --batch {args.batch} ({why}; give --batch to choose)", file=sys.stderr, flush=True)
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
    elif args.cpu_threads:
        import torch

        torch.set_num_threads(args.cpu_threads)
    if pcfg is None:  # the single-process engine has a bar of its own, layer by layer
        return Engine.open(cfg, None, index=index, progress=progress)
    # NOTE: the pipeline reports no progress while its processes load; an elapsed line until it can
    with Elapsed(f"loading {os.path.basename(index.path)}", sys.stderr if progress else None):
        return Engine.open(cfg, pcfg, index=index)


class Elapsed:
    """A line that counts seconds on a terminal while something that reports no progress runs;
    gone when it ends. Nothing at all without a terminal (stream None)."""

    FRAMES = "|/-\\"

    def __init__(self, what: str, stream, interval: float = 0.2):
        self.what, self.stream, self.interval = what, stream, interval
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self):
        if self.stream is not None:
            self.t0 = time.monotonic()
            self.thread = threading.Thread(target=self._run, name="elapsed", daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self.done.wait(self.interval if i else 0):
            self.stream.write(f"\r{self.what} {self.FRAMES[i % 4]} {time.monotonic() - self.t0:.1f} s")
            self.stream.flush()
            i += 1

    def __exit__(self, *exc):
        if self.thread is not None:
            self.done.set()
            self.thread.join()
            self.stream.write("\r\x1b[K")  # the line is erased: what follows starts clean
            self.stream.flush()


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


def _print_stream(pieces, out) -> None:
    """The reply on stdout, ended by a newline; an error after partial text leaves the line ended
    first, so that the error line starts on a line of its own."""
    last = ""
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
            last = piece
    except BaseException:
        if last and not last.endswith("\n"):
            try:
                out.write("\n")
                out.flush()
            except OSError:
                pass
        raise
    out.write("\n")
    out.flush()


def run(args) -> int:
    # bytes that are not UTF-8 (argv keeps them as surrogates, stdin would raise) become U+FFFD
    args.prompt = [a.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for a in args.prompt]
    for name in ("prompt_opt", "system"):
        if getattr(args, name):
            setattr(args, name, getattr(args, name).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    sys.stdin.reconfigure(errors="replace")
    check_args(args)
    api_key = read_api_key(args, os.environ) if args.serve else None
    terminal = sys.stderr.isatty()
    index = check_model(args)
    params = _sampling(args)
    from layerstream.coordinator.turn import Rates

    rates = Rates()
    t0 = time.monotonic()
    with open_engine(args, index, progress=terminal) as engine:
        load_s = time.monotonic() - t0
        try:
            return _run_engine(engine, args, params, api_key, rates)
        finally:
            _report(engine, args)
            if (args.stats or terminal) and rates.sampled:
                print(rates.line(load_s), file=sys.stderr)


def _run_engine(engine, args, params, api_key, rates) -> int:
    if args.serve:
        from layerstream.coordinator.server import serve
        from layerstream.loader.default_model import default_model_path

        return serve(engine, args.model or default_model_path(), args.host, args.port, api_key, args.max_queue)
    if args.perplexity:
        with open(args.perplexity, encoding="utf-8", errors="replace") as f:
            text = f.read()
        ppl, n = engine.perplexity(text)
        print(f"perplexity: {ppl:.4f} over {n} tokens")
        return 0
    prompt = " ".join(args.prompt)
    if args.chat and not prompt:
        from layerstream.coordinator.repl import chat

        return chat(engine, params, args.system, rates_each=args.stats, total=rates)
    from layerstream.coordinator.turn import Turn

    turn = Turn(engine, engine.encode(prompt, chat=args.chat, system=args.system), params)
    try:
        _print_stream(turn.pieces(), sys.stdout)
    finally:
        rates.add(turn.rates)
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C, exit 143 (128 + SIGTERM)."""


def _sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        _die(f"{e} (see {PROG} --help)", 2)
    signal.signal(signal.SIGTERM, _sigterm)  # stop the pipeline the same way as Ctrl-C
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except UsageError as e:
        _die(str(e), 2)
    except LayerstreamError as e:
        _die(str(e))
    except _Terminated:
        print(f"\n{PROG}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
