"""bin/bench: measure each stage on its own (stage_bench.py); `engine` times the whole model in one process."""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import time

import torch

from layerstream.coordinator.api_names import cli_names
from layerstream.coordinator.stdio import guarded
from layerstream.errors import LayerstreamError
from layerstream.proto.signals import HOW, Stopped, raise_on_stop

from .cpu_kernel_bench import add_parser as add_cpu_kernel_parser
from .flags import ints, model_problem, problem
from .links_bench import add_parser as add_links_parser
from .spec_bench import add_spec_parser
from .stage_bench import add_stage_parsers, device_name, time_decode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, reps: int, device: torch.device) -> float:
    """Median wall seconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_engine(args) -> list[tuple[str, int, float, float]]:
    """Rows (phase, batch, tokens per second, milliseconds per step) of the single-process engine."""
    from layerstream.compute.sampling import SamplingParams
    from layerstream.coordinator.engine import Engine

    batches = sorted({1, *args.batch})
    # a sequence whose prompt is read first decodes while the others' are (time_decode): a token a step
    # at most, and each of those steps reads at least one prompt token (a probe's: -b 4 -p 8 ran out of context)
    early = max(batches) * args.decode_prompt
    ctx = max(args.prompt_tokens, args.decode_prompt + args.decode_tokens + early) + 1
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, ctx=ctx, max_seqs=max(batches),
                         prefill_chunk=args.prompt_tokens)
    dev = engine.backend.device
    gen = torch.Generator().manual_seed(0)
    V = engine.hparams.n_vocab

    def ids(n: int) -> list[int]:
        return torch.randint(0, V, (n,), generator=gen).tolist()

    def prefill() -> None:
        # a fresh prompt each run: a repeated one would reuse the KV the last run left in its row
        # (core.py, NOTE [ prefix reuse ]) and prefill one token
        engine.core.add_request("bench-prefill", prompts.pop(), SamplingParams(temperature=0, max_tokens=1,
                                                                               ignore_eos=True))
        engine.core.run_to_completion()

    rows = []
    with engine:
        prompts = [ids(args.prompt_tokens) for _ in range(args.reps + 1)]
        t = _median_time(prefill, args.reps, dev)
        rows.append(("prefill", 1, args.prompt_tokens / t, 1e3 * t))
        for B in batches:
            runs = [sum(time_decode(engine.core, [ids(args.decode_prompt) for _ in range(B)], args.decode_tokens,
                                    lambda: _sync(dev)))
                    for _ in range(args.reps + 1)]
            t = statistics.median(runs[1:])  # the first run warms up
            rows.append(("decode", B, B * args.decode_tokens / t, 1e3 * t / args.decode_tokens))
        print(f"model: {engine.index.metadata.get('general.name', args.model or 'default')} "
              f"({engine.hparams.n_layer} layers), device: {device_name(dev)}, dtype: {engine.backend.dtype}, "
              f"torch {torch.__version__}")
    return rows


def print_table(rows: list[tuple[str, int, float, float]], args) -> None:
    print(f"{'phase':<8} {'batch':>5} {'tokens/s':>10} {'ms/step':>9}")
    for phase, B, tps, ms in rows:
        print(f"{phase:<8} {B:>5} {tps:>10.1f} {ms:>9.2f}")
    print(f"(prefill of {args.prompt_tokens} tokens; decode of {args.decode_tokens} tokens after "
          f"{args.decode_prompt}; median of {args.reps} runs)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bin/bench", description="Measure layerstream's stages.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="STAGE")
    e = sub.add_parser("engine", help="the whole model resident in one process: prompt and decode tokens/s")
    e.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    e.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    e.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default float16 on CUDA; on the CPU bfloat16 where it has bf16 instructions, else float32)")
    e.add_argument("-p", "--prompt-tokens", type=int, default=256, help="prefill length (default 256)")
    e.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per run (default 32)")
    e.add_argument("--decode-prompt", type=int, default=16, help="prompt tokens before decoding (default 16)")
    e.add_argument("-b", "--batch", type=ints, default=[1, 4, 8],
                   help="decode batch sizes, comma separated (default 1,4,8)")
    e.add_argument("--reps", type=int, default=3, help="timed runs per figure; the median is reported (default 3)")
    e.set_defaults(func=lambda a: print_table(bench_engine(a), a))
    add_stage_parsers(sub)
    add_spec_parser(sub)
    add_cpu_kernel_parser(sub)
    add_links_parser(sub)
    return p


# what sets the context and the rows of the stages that open the engine, whose errors (the plan's)
# name run-pipeline's --ctx and --batch, flags those stages size for themselves
SIZED = {"pipeline": ("--tokens, --generate-tokens, -b and the passes", "the largest -b"),
         "engine": ("-p, --decode-prompt and --decode-tokens", "the largest -b"),
         "serve": ("-p and --tokens", "the largest -c"), "spec": ("its prompt and --verify", "1")}


def sized(cmd: str | None, text: str) -> str:
    """An error of stage `cmd`, with what sets the --ctx and --batch it names (SIZED)."""
    got = SIZED.get(cmd or "")
    if got is None or not re.search(r"--(ctx|batch)\b", text):
        return text
    return f"{text} (bin/bench {cmd} sizes --ctx from {got[0]}; --batch is {got[1]})"


@cli_names()  # (its flags are run-pipeline's: NOTE [ the caller's names ] in coordinator/api_names.py)
def main(argv: list[str] | None = None) -> int:
    cmd = None
    try:  # (a stop signal while the flags are read and checked, too)
        args = build_parser().parse_args(argv)
        cmd = args.cmd
        wrong = problem(args) or model_problem(args)  # (the second reads the model's header)
        if wrong:  # (as argparse's own errors: one line, exit 2)
            print(f"bin/bench {args.cmd}: error: {wrong} (see bin/bench {args.cmd} --help)", file=sys.stderr)
            return 2
        args.func(args)
    except (LayerstreamError, ValueError) as e:
        print(f"bin/bench: error: {sized(cmd, str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # (Ctrl-C, or SIGTERM, SIGHUP and SIGQUIT as Stopped: its finallys ran)
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"bin/bench: {HOW[signum]}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # (`| head`: what was wanted was read)
        return 0
    except OSError as e:  # (a file the stage writes or reads; stdout's own failures are _Output's)
        print(f"bin/bench: error: {e}", file=sys.stderr)
        return 1
    return 0


class _Output:
    """bin/bench's sys.stdout: a failure to write its tables (a full disk) raised as the command's
    one-line output error, told apart from the OSErrors of the files a stage writes."""

    def __init__(self, out):
        self._out = out

    def write(self, text: str) -> int:
        return guarded(self._out.write, text)

    def flush(self) -> None:
        guarded(self._out.flush)

    def __getattr__(self, name):
        return getattr(self._out, name)


def entry() -> None:
    """bin/bench: closed standard streams reopened on the null device, the stop signals handled as the
    bench stops (SIGTERM, SIGHUP and SIGQUIT as early_signals.Stopped, SIGINT as KeyboardInterrupt, in place of the launcher's early handlers,
    which exit at once), then main(), what its output could not write said in one line, and an exit
    without the interpreter's teardown (whose last flush of a closed pipe printed 'Exception ignored')."""
    from layerstream.coordinator.stdio import closed_output, flush_stdout, open_standard_fds
    from layerstream.coordinator.supervisor import quick_exit

    open_standard_fds()  # (`>&-`: libuv aborted on its loop's socket, which took the closed stdout's number)
    if (closed := closed_output()) is not None:  # (as run-pipeline: the tables would be lost with status 0)
        print(f"bin/bench: error: {closed}", file=sys.stderr)
        quick_exit(1)
    out = sys.stdout
    sys.stdout = _Output(out)
    raise_on_stop()
    try:
        code = main()
    except SystemExit as e:  # (argparse's --help and usage errors)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    sys.stdout = out
    unwritten = flush_stdout()  # (what the buffer still held, into a full disk)
    if unwritten:
        print(f"bin/bench: error: {unwritten}", file=sys.stderr)
        code = code or 1
    quick_exit(code)


if __name__ == "__main__":
    entry()
