"""bin/run-pipeline: generate text from a GGUF model, chat with it, serve it, or measure a text's perplexity."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

from layerstream.coordinator.api_names import cli_names
from layerstream.coordinator.arg_files import read_prompt_text
from layerstream.coordinator.args import (
    PROG,
    UsageError,
    build_parser,
    check_args,
    given,
    read_api_key,
    served_sampling,
    shown,
)
from layerstream.coordinator.flag_notes import warn_flags, warn_past_context
from layerstream.coordinator.sigmask import start_thread_pools
from layerstream.coordinator.spelling import no_experts, one_line
from layerstream.coordinator.stdio import LoadProgress, closed_output, flush_stdout, open_standard_fds, print_stream
from layerstream.errors import ConfigError, LayerstreamError, ModelError
from layerstream.proto.signals import HOW, STOP_SIGNALS, Stopped, raise_on_stop

SERVE_BATCH = 8  # the rows --serve holds by default where they fit
SERVE_BATCH_MAX = 64  # and at most, where the budget holds more
PPL_FEW_TOKENS = 64  # tokens scored below which a perplexity comes with a warning


def _die(msg: str, code: int = 1) -> None:
    print(f"{PROG}: error: {one_line(msg)}", file=sys.stderr)
    sys.exit(code)


def _sampling(args):
    from layerstream.compute.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
        max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def check_model(args):
    """The model's header, read (through the header cache) before anything loads or starts:
    architecture and hyperparameters, tensor types, and a chat template where --chat needs one."""
    index = check_header(args)
    check_quants(index)
    return index


def check_header(args):
    """The model's header: architecture and hyperparameters, and a chat template where --chat
    needs one (torch is not imported)."""
    from layerstream.loader.default_model import default_model_path
    from layerstream.loader.gguf_index import open_model
    from layerstream.loader.header_cache import header_cached
    from layerstream.loader.header_scan import find_string

    path = args.model or default_model_path()
    if args.chat and os.path.isfile(path) and not header_cached(path):
        # the one key, before gguf-py parses the whole header (seconds for a large vocabulary)
        try:
            source = find_string(path, "tokenizer.chat_template")
        except (OSError, ModelError):
            pass  # open_model says what is wrong with the file
        else:
            _require_template(source, path)
    index = open_model(path)
    if args.chat:
        _require_template(index.metadata.get("tokenizer.chat_template"), path)
    check_with_header(args, index.hparams)
    hp = index.hparams
    logging.getLogger("layerstream.model").info(
        "%s: %s, %d layers, width %d, %d tokens of context%s", path, hp.arch, hp.n_layer, hp.n_embd,
        hp.context_length, f", {hp.moe.n_expert} experts ({hp.moe.n_expert_used} a token)" if hp.moe.n_expert else "")
    return index


EXPERTS = ("expert_cache_gb", "expert_policy", "expert_prefetch", "moe_dense")


def default_ctx(args, hp) -> int:
    """The KV ring's capacity: --ctx, else the model's context up to 4096, and no more than a run that
    answers one prompt can fill (NOTE [ a job's context ] in pipeline_config.py)."""
    from layerstream.coordinator.pipeline_config import job_ctx

    return args.ctx or min(hp.context_length, 4096, job_ctx(args) or 4096)


def check_with_header(args, hp) -> None:
    """The checks that need the model's hyperparameters `hp` (its header, read before any process
    starts): UsageError with one line."""
    ctx = default_ctx(args, hp)
    if ctx < 2 and hp.context_length < 2:  # (--ctx not given: the engine named ctx=1 as if the user had typed it)
        raise UsageError(f"the model's context is {hp.context_length} token (metadata {hp.arch}.context_length), too "
                         "few to run; give --ctx N (2 or more)")
    if args.on_context_full == "slide" and not args.sink_tokens < ctx - 1:
        where = "" if args.ctx else f" (the model's {hp.context_length} tokens, at most 4096)"
        if args.sink_tokens == build_parser().get_default("sink_tokens"):  # not typed: name the context
            raise UsageError(f"a context of {ctx} tokens{where} leaves a sliding window no room beside its "
                             f"{args.sink_tokens} sink tokens (--sink-tokens' default); give --ctx {args.sink_tokens + 2} "
                             "or more, or fewer --sink-tokens")
        raise UsageError(f"{shown(args, 'sink_tokens', args.sink_tokens)}: must be at most {max(ctx - 2, 0)}, two "
                         f"below the context size {ctx}{where}, so that the window can slide; give fewer sink tokens "
                         "or a larger --ctx")
    if args.prefetch is not None and args.prefetch > hp.n_layer:  # (the plan's own check exited 1)
        raise UsageError(f"{shown(args, 'prefetch', args.prefetch)}: at most {hp.n_layer} (the model's layer count)")
    if hp.moe.n_expert and (why := hp.moe.prefetch_problem(args.expert_prefetch)):  # (exit 2, as the others)
        raise UsageError(f"{shown(args, 'expert_prefetch', args.expert_prefetch)}: {why}")
    if not hp.moe.n_expert:
        refuse = given(build_parser(), args, EXPERTS)
        if refuse:
            raise UsageError(no_experts(refuse, hp.arch))


def check_quants(index) -> None:
    """Every tensor's type is one the engine computes with (imports torch)."""
    from layerstream.compute.weights import check_model_quants

    check_model_quants(index)


def check_device(args) -> None:
    """What needs the device resolved (imports torch), as a command line that cannot run here (exit
    2): --device cuda where no CUDA device is visible; a CPU share where --device auto took the CPU
    (--device cpu is refused with the other options)."""
    from layerstream.compute.cpu.config import cpu_share_on_cpu, parse_cpu_share
    from layerstream.compute.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as e:  # (it exited 1, as a failed run)
        raise UsageError(str(e)) from None
    if args.single_process or not parse_cpu_share(args.cpu_share, args.cpu_split).asked:
        return
    if device.type == "cpu":
        raise UsageError(cpu_share_on_cpu(args.cpu_share, "no CUDA device is visible"))


def _require_template(source, path: str) -> None:
    """--chat needs the model's chat template as text."""
    if isinstance(source, str) and source.strip():
        return
    why = ("has no chat template" if source is None else "has an empty chat template" if isinstance(source, str)
           else "has a chat template that is not text")
    raise ConfigError(f"--chat: {os.path.basename(path)} {why} (tokenizer.chat_template; a base model, not "
                      "an instruct one?); run without --chat")


def serve_batch(args, index, ctx: int) -> tuple[int, str]:
    """--serve's default --batch: a pass costs about the same for one row as for many, so as many
    rows as the budgets hold, up to SERVE_BATCH_MAX, and at least SERVE_BATCH where they fit
    (beyond it only while every layer's KV stays on the device); host memory bounds them too, and a
    --draft-model's memory at each row count (its KV grows with the rows). Returns (rows, why)."""
    import torch

    from layerstream.compute.device import keeps_quantized, resolve_device, resolve_dtype
    from layerstream.coordinator import draft_plan, plan

    hp = index.hparams
    device = resolve_device(args.device)
    dtype_bytes = torch.finfo(resolve_dtype(args.dtype, device, hp.arch)).bits // 8
    draft = None
    if args.draft_model:
        from layerstream.loader.gguf_index import open_model

        draft = open_model(args.draft_model)
    if args.single_process:
        rows = SERVE_BATCH
        while rows > 1:  # everything in this process: its KV must fit the host's or the device's memory
            try:
                if device.type == "cpu":
                    plan.check_local_host(index, dtype_bytes=dtype_bytes, ctx=ctx, max_seqs=rows,
                                          step_tokens=args.prefill_chunk)
                elif sum(2 * h.n_layer * ctx * h.attn.n_head_kv * h.attn.head_dim * dtype_bytes * rows
                         for h in (hp, *([draft.hparams] if draft else []))) > torch.cuda.mem_get_info(device)[0] // 2:
                    raise ConfigError("too many rows")
                break
            except ConfigError:
                rows //= 2
        return rows, "the --serve default" + ("" if rows == SERVE_BATCH else ", bounded by free memory")
    from layerstream.loader.layout import layer_layouts

    def gib(v: float | None) -> int | None:
        return None if v is None else int(v * plan.GiB)

    vram = gib(args.vram_gb)
    if vram is None and device.type == "cuda":
        vram = plan.fit_budget(device)  # as the pipeline takes it
    quantized = keeps_quantized(device)

    def draft_for(rows: int) -> draft_plan.DraftMemory:  # as pipeline_backend counts it (draft_plan.draft_memory_for)
        return draft_plan.draft_memory(draft, dtype_bytes=dtype_bytes, ctx=ctx, max_seqs=rows,
                                       step_tokens=args.prefill_chunk, quantized=quantized, cuda=device.type == "cuda")
    rows = plan.largest_batch(
        index, layer_layouts(index), most=SERVE_BATCH if vram is None else SERVE_BATCH_MAX,
        kv_on_device_above=SERVE_BATCH, vram_bytes=vram, host_cache_bytes=gib(args.host_cache_gb),
        dtype_bytes=dtype_bytes, ctx=ctx, prefetch=args.prefetch, kv_on_host=args.kv_on_host,
        resident_layers=args.resident_layers, quantized=quantized, device_type=device.type,
        step_tokens=args.step_tokens, draft_for=draft_for if draft is not None else None,
        draft_tokens=draft_plan.draft_tokens_for(args),
        max_prefetch=hp.n_layer, expert_cache_bytes=gib(args.expert_cache_gb), moe_dense=args.moe_dense,
        vram_slots=args.vram_slots, expert_prefetch=args.expert_prefetch)
    if vram is None:
        return rows, "the --serve default" + ("" if rows == SERVE_BATCH else ", bounded by host memory")
    return rows, "the --serve default: the rows the plan's budget holds"


def coordinator_threads(args) -> int | None:
    """torch's CPU threads in this process (None: its default). With --single-process, -t's. In the
    pipeline a draft model on the CPU runs here beside the compute process's threads on the same
    cores, and OpenMP's threads of the two processes, spinning after each parallel region, took the
    cores from each other (BENCHMARKS.md, "A draft model on the CPU"): one thread here."""
    if args.single_process:
        return args.cpu_threads
    if args.draft_model:
        from layerstream.compute.device import resolve_device

        if resolve_device(args.device).type == "cpu":
            return 1
    return None


def open_engine(args, index, progress: bool, warm=None):
    """The engine the options ask for: the streaming pipeline (its children taken from `warm`
    where given), or everything in this process."""
    start_thread_pools(coordinator_threads(args))  # torch's and tokenizers'
    from layerstream.coordinator.engine import Engine, EngineConfig

    ctx = default_ctx(args, index.hparams)
    if args.batch is None:
        args.batch = 1
        if args.serve:
            args.batch, why = serve_batch(args, index, ctx)
            print(f"layerstream: --batch {args.batch} ({why}; give --batch to choose)", file=sys.stderr, flush=True)
    cfg = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=args.batch,
        on_context_full=args.on_context_full, sink_tokens=args.sink_tokens, prefill_chunk=args.prefill_chunk,
        lookup=args.lookup, draft_model=args.draft_model, draft_tokens=args.draft_tokens, draft_policy=args.draft_policy,
    )
    pcfg = None
    if not args.single_process:
        from layerstream.coordinator import pipeline_config as pc

        # a server's first pass comes with its first request, among the server's own lines
        stages = ("processes",) if args.serve else ("processes", "layers")
        pcfg = pc.PipelineConfig(
            budget=pc.Budget(vram_gb=args.vram_gb, host_cache_gb=args.host_cache_gb, resident_layers=args.resident_layers,
                             kv_on_host=args.kv_on_host, prefetch=args.prefetch, step_tokens=args.step_tokens,
                             vram_slots=args.vram_slots, **pc.budget_use(args)),
            readers=pc.ReaderOptions(args.readers, tuple(args.reader_dir), args.read_threads, args.direct_io),
            cpu=pc.CpuOptions(args.cpu_share, args.cpu_split, args.cpu_threads),
            experts=pc.ExpertOptions(args.expert_cache_gb, args.moe_dense, args.expert_policy, args.expert_prefetch),
            procs=pc.ProcessOptions(args.transport, trace=bool(args.trace), stall_timeout_s=args.stall_timeout),
            on_progress=LoadProgress(sys.stderr, stages=stages) if progress else None, warm=warm,
        )
    # the single-process engine draws a bar of its own, layer by layer
    return Engine.open(cfg, pcfg, index=index, progress=progress and pcfg is None)


def _report(engine, args) -> None:
    """--stats and --trace, from every process's timeline."""
    if not (args.stats or args.trace) or not hasattr(engine.backend, "collect_stats"):
        return
    snaps = engine.backend.collect_stats()
    if args.stats:
        print(engine.backend.stats_table(snaps), file=sys.stderr)
    if args.trace:  # (a failure to write it: a ConfigError naming --trace, timeline.trace_report)
        print(engine.backend.write_trace(args.trace, snaps), file=sys.stderr)


def run(args) -> int:
    # bytes that are not UTF-8 (argv keeps them as surrogates, stdin would raise) become U+FFFD
    args.prompt = [a.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for a in args.prompt]
    for name in ("prompt_opt", "system"):
        if getattr(args, name):
            setattr(args, name, getattr(args, name).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    sys.stdin.reconfigure(errors="replace")
    check_args(args)
    if not args.serve and (closed := closed_output()) is not None:  # (before the model loads)
        raise closed
    api_key = read_api_key(args, os.environ) if args.serve else None
    sock = contextlib.nullcontext()
    if args.serve:  # the port taken before anything loads or starts: one in use is one line at once
        from layerstream.coordinator.listen import bound_socket

        sock = bound_socket(args.host, args.port)
    warm = None
    from layerstream.proto.child import Settling

    try:
        with sock, Settling() as gcs:
            if not args.single_process:  # the children import while this process reads the header and plans
                from layerstream.coordinator.supervisor import WarmStarts, warm_starts_pay  # (NOTE [ warm starts ])

                if warm_starts_pay():
                    warm = WarmStarts({"staging": 1, "reader": args.readers, "compute": 1}, device=args.device)
            start_thread_pools(torch=False)  # numpy's, before anything else starts threads (NOTE [ SIGINT and threads ])
            return _run_bound(args, api_key, sock if args.serve else None, warm, gcs)
    finally:
        if warm is not None:
            warm.close()


def _run_bound(args, api_key, sock, warm, gcs) -> int:
    """`warm`: the children spawned ahead (run() lets go of those the run did not take); `gcs`: proto.child.Settling."""
    terminal = sys.stderr.isatty()
    index = check_header(args)
    check_quants(index)
    check_device(args)
    read_prompt_text(args)  # (last: a pipe can wait on its writer)
    for what, text in (("the prompt", " ".join(args.prompt)), ("--system", args.system or "")):
        _warn_replaced(what, text, "the model reads the replacements")
    params = _sampling(args)
    from layerstream.coordinator.turn import Rates
    rates = Rates()
    t0 = time.monotonic()
    with open_engine(args, index, progress=terminal, warm=warm) as engine:
        gcs.ready()
        load_s = time.monotonic() - t0
        warn_flags(args, engine)  # (flags that do nothing here, a --ctx past the model's)
        if warm is not None:
            warm.close()  # (those the run did not take)
        try:
            return _run_engine(engine, args, params, api_key, rates, sock)
        finally:
            _report(engine, args)
            if (args.stats or terminal) and rates.sampled:
                print(rates.line(load_s), file=sys.stderr)


def _warn_replaced(what: str, text: str, consequence: str) -> None:
    """A warning where `text` holds U+FFFD: bytes that were not UTF-8, replaced as it was read."""
    if n := text.count("\ufffd"):
        print(f"{PROG}: warning: {what}: not UTF-8 text ({n} character{'s' if n > 1 else ''} replaced); {consequence}",
              file=sys.stderr)


def _run_engine(engine, args, params, api_key, rates, sock=None) -> int:
    if args.serve:
        from layerstream.coordinator.openai_api import DEFAULTS
        from layerstream.coordinator.server import serve
        from layerstream.loader.default_model import default_model_path

        return serve(engine, args.model or default_model_path(), args.host, args.port, api_key, args.max_queue,
                     sock=sock, defaults=DEFAULTS | served_sampling(args))
    if args.perplexity:
        text = args.perplexity_text  # (read_prompt_text's)
        _warn_replaced(f"--perplexity {one_line(args.perplexity)}", text, "the figure scores the replacements too")
        from layerstream.coordinator.turn import counted

        try:
            ppl, n = engine.perplexity(text)
        except ConfigError as e:
            raise ConfigError(f"--perplexity {args.perplexity}: {e}") from None
        if n < PPL_FEW_TOKENS:
            print(f"{PROG}: warning: a perplexity over {counted(n, 'token')} says little about a model "
                  f"(llama-perplexity asks for two contexts' worth); give a longer text", file=sys.stderr)
        print_stream([f"perplexity: {ppl:.4f} over {counted(n, 'token')}"], sys.stdout)  # (a full disk: one line)
        return 0
    prompt = " ".join(args.prompt)
    if args.chat and not prompt:
        from layerstream.coordinator.repl import chat

        return chat(engine, params, args.system, rates_each=args.stats, total=rates)
    from layerstream.coordinator.repl import prompt_within_context
    from layerstream.coordinator.turn import Turn
    ids = engine.encode(prompt_within_context(engine, prompt, args.chat), chat=args.chat, system=args.system)
    warn_past_context(engine, ids, params.max_tokens)
    turn = Turn(engine, ids, params)
    try:
        print_stream(turn.pieces(), sys.stdout)
    finally:
        rates.add(turn.rates)
    return 0


def _interrupts_sent_again(hook):
    """sys.unraisablehook: an interrupt raised where Python cannot pass it on (a weakref callback or a
    __del__, where a signal's handler may run) was printed as 'Exception ignored' and lost, and a server
    terminated as it started served on. It is sent again from a thread a moment later (from here its
    handler ran in this hook, lost again), to be raised where it can be."""
    import threading

    def unraisable(u) -> None:
        if isinstance(u.exc_value, KeyboardInterrupt):
            sig = u.exc_value.signum if isinstance(u.exc_value, Stopped) else signal.SIGINT
            again = threading.Timer(0.01, os.kill, (os.getpid(), sig))
            again.daemon = True
            again.start()
            return
        hook(u)
    unraisable.resends_interrupts = True
    return unraisable


def _stopped(e: KeyboardInterrupt) -> int:
    """The one line of a run stopped by a signal, and its status (128 + its number): later signals are
    ignored (one that lands first is absorbed, the first one's kind kept), the line on a line of its
    own on a terminal (^C or the reply may end the cursor's line), none before it into a file."""
    while True:
        try:
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            break
        except KeyboardInterrupt:
            pass
    while isinstance(e.__context__, KeyboardInterrupt):  # (one raised in run's cleanup of the first: the first's)
        e = e.__context__
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
    from layerstream.coordinator.repl import is_terminal

    lead = "\n" if is_terminal(sys.stderr) else ""
    print(f"{lead}{PROG}: {HOW[signum]}", file=sys.stderr)
    return 128 + signum


@cli_names()  # (its errors name the flags: NOTE [ the caller's names ] in api_names.py)
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        _die(f"{e} (see {PROG} --help)", 2)
    # SIGTERM, SIGHUP and SIGQUIT stop the pipeline the same way as Ctrl-C, exit 143, 129, 131 (at their
    # defaults a closed terminal ended the launcher at once, a Ctrl-\ left the run's shared memory)
    raise_on_stop()
    if not getattr(sys.unraisablehook, "resends_interrupts", False):
        sys.unraisablehook = _interrupts_sent_again(sys.unraisablehook)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        try:
            return run(args)
        except UsageError as e:
            _die(str(e), 2)
        except LayerstreamError as e:
            _die(str(e))
        except BrokenPipeError:
            return 0
    except KeyboardInterrupt as e:  # (the outer try: also one raised while a handler above or run's cleanup ran)
        return _stopped(e)
    return 0


def entry() -> None:
    """The command: main(), then an exit without the interpreter's teardown (NOTE [ quick exits ])."""
    from layerstream.proctitle import set_process_name

    open_standard_fds()
    set_process_name("layerstream", " ".join(sys.argv[1:]))  # (ps showed "python -c ..."; its options kept)
    try:
        code = main()
    except SystemExit as e:  # (argparse's --help, an argument error, _die)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        if code == 0 and (closed := closed_output()) is not None:  # (--help, --version: written to nowhere)
            print(f"{PROG}: error: {closed}", file=sys.stderr)
            code = 1
    unwritten = flush_stdout()  # (what the buffer held: --version, the perplexity, into a full disk)
    if unwritten:
        print(f"{PROG}: error: {unwritten}", file=sys.stderr)
        code = code or 1
    from layerstream.coordinator.supervisor import quick_exit

    quick_exit(code)


if __name__ == "__main__":
    entry()
