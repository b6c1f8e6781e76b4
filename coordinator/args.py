"""run-pipeline's options: the parser, and every check that needs no model and no torch."""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import sys

from layerstream import bounds
from layerstream.bounds import MAX_GB, MAX_READERS, MAX_TEMPERATURE, MAX_WINDOW, PIPELINE_COUNTS, REPEAT_PENALTY_RANGE  # noqa: F401 - MAX_READERS
from layerstream.coordinator.arg_files import (
    NO_PROMPT,
    check_trace,
    path_problem,
    perplexity_problem,
    prompt_file_problem,
    stdin_readable,
)
from layerstream.coordinator.spelling import (
    UsageError,
    dashed_numbers_joined,
    decimal,
    reader_dirs_problem,
    refuse_foreign_options,
    refuse_glued_words,
    typed_options,
    unescape,
    whole,
)
from layerstream.cpus import too_many_threads

PROG = "run-pipeline"
MAX_BATCH = 4096
MAX_READ_THREADS = 64  # loader/reader.py's MAX_THREADS (that module is not imported to check options)
MAX_CTX = MAX_WINDOW
MAX_KEY_FILE = 4096  # bytes of an --api-key-file: a key, not a document


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layerstream")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """--version, its package metadata read only when asked (importlib.metadata took 12 ms of every start)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.emit(f"{PROG} (layerstream) {_version()}\n")
        parser.exit()


class _Once(argparse.Action):
    """A prompt option given a second time is refused: argparse kept the last and dropped the first unsaid."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            text = values if len(values) <= 40 else values[:40] + "..."
            raise UsageError(f"{option_string} {text}: the prompt is given twice ({'/'.join(self.option_strings)} "
                             "more than once); give it once")
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is for --help, not for a typo."""

    def error(self, message: str):
        m = re.match(r"argument (\S+?): expected one argument$", message)
        if m:  # (argparse takes a value that starts with a dash for an option: `--stop -b`)
            name = m.group(1).split("/")[-1]
            message += f" (a value that starts with a dash is given with '=', as {name}=-x)"
        m = re.match(r"argument (\S+?): invalid (int|float|choice)(?: value)?: ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")",
                     message)
        action = m and self._option_string_actions.get(m.group(1).split("/")[0])
        if action:  # as the other options' errors: the option and its value as typed, and what it takes
            name = getattr(self, "typed", {}).get(action.dest, (m.group(1).split("/")[-1],))[0]
            *rest, last = map(str, action.choices or ("",))
            expected = {"int": "must be a whole number, in decimal digits", "float": "must be a number",
                        "choice": f"use {', '.join(rest)}{' or ' if rest else ''}{last}"}[m.group(2)]
            v = ast.literal_eval(m.group(3))  # (quoted where spaces or nothing would not show: -n ' 5')
            message = f"{name} {v if v and v == v.strip() else repr(v)}: {expected}"
        raise UsageError(message)

    def print_help(self, file=None):
        self.emit(self.format_help(), file)  # (argparse's own write drops an OSError: --help > /dev/full exited 0)

    def emit(self, text: str, file=None) -> None:  # --help's and --version's text: a failed write, one line
        out = file or sys.stdout
        if out is None:  # (`>&-`: nothing to write to, as argparse's own)
            return
        try:
            out.write(text)
            out.flush()
        except OSError as e:
            self.exit(1, f"{PROG}: error: cannot write the output ({e.strerror or e})\n")

    def parse_args(self, args=None, namespace=None):
        typed = sys.argv[1:] if args is None else list(args)
        argv = dashed_numbers_joined(self, typed)  # (`--temperature -inf`)
        refuse_foreign_options(self, argv)
        refuse_glued_words(self, argv)
        self.typed = typed_options(self, typed)
        ns = super().parse_args(argv, namespace)
        ns.typed = self.typed
        return ns


def shown(args, dest: str, value=None) -> str:
    """An option and its value for a message, as the user typed them where known: `-ngl -1`."""
    name, raw = getattr(args, "typed", {}).get(dest, (None, None))
    if name is None:
        name, raw = "--" + dest.replace("_", "-"), None
    if raw is None:
        raw = value if not isinstance(value, float) else _num(value)
    return name if raw is None else f"{name} {raw}"


def build_parser() -> Parser:
    p = Parser(
        prog=PROG, allow_abbrev=False,
        description="Generate text from a GGUF model, streaming its layers through a small GPU budget.",
        epilog="Exit status: 0 done, 1 an error in the model or the run, 2 a command line that cannot run, "
               "130 interrupted (Ctrl-C), 143 terminated (SIGTERM).",
    )
    p.add_argument("prompt", nargs="*", help="prompt text (with --chat and no prompt: an interactive chat; without --chat and no "
                   "prompt: the text piped in on standard input)")
    p.add_argument("-p", "--prompt", dest="prompt_opt", metavar="TEXT", action=_Once,
                   help="prompt text, as an option (instead of the words above)")
    p.add_argument("-f", "--file", dest="prompt_file", metavar="FILE", action=_Once,
                   help="read the prompt text from FILE")
    p.add_argument("-m", "--model", help="GGUF file, or the first part of a split model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    g = p.add_argument_group("sampling", "with --serve: what a request that does not set the field gets "
                             "(else OpenAI's defaults)")
    g.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=whole, default=256,
                   help="tokens to generate at most; -1: until the end of sequence or a full context, as "
                        "llama.cpp's (default 256)")
    g.add_argument("--temperature", "--temp", type=decimal, default=0.8, help="0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=whole, default=40, help="keep the k most likely tokens; 0 or -1 keeps all (default 40)")
    g.add_argument("--top-p", type=decimal, default=0.95, help="nucleus sampling threshold; 1 disables (default 0.95)")
    g.add_argument("--min-p", type=decimal, default=0.05, help="drop tokens below min-p times the top probability (default 0.05)")
    g.add_argument("--repeat-penalty", type=decimal, default=1.0, help="penalty for recent tokens, 0.01 to 100; 1 disables (default 1.0)")
    g.add_argument("--repeat-last-n", type=whole, default=64, help="tokens the repeat penalty looks back over (default 64)")
    g.add_argument("-s", "--seed", type=whole, default=None,
                   help="random seed for reproducible sampling, -2^63 to 2^64-1 (-1: a fresh one, the default)")
    g.add_argument("--stop", action="append", default=[],
                   help=r"stop when this string is generated (repeatable; \n, \t, \r, \\ and \xHH read as llama.cpp's -r reads them)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g = p.add_argument_group("prompting")
    g.add_argument("--chat", action="store_true",
                   help="apply the model's chat template; interactive without a prompt (/help lists its commands)")
    g.add_argument("-sys", "--system", default=None, help="system message for --chat")
    g.add_argument("--perplexity", metavar="FILE", help="report the perplexity of a text file (-: standard input) instead of generating")
    g = p.add_argument_group("engine")
    g.add_argument("-c", "--ctx", "--ctx-size", dest="ctx", type=whole, default=None,
                   help="KV ring capacity in tokens per sequence (default min(model's, 4096), less for one prompt with -n N)")
    g.add_argument("--on-context-full", choices=["error", "slide"], default="error",
                   help="when a sequence outgrows --ctx: stop with an error, or slide a window keeping sink tokens")
    g.add_argument("--sink-tokens", type=whole, default=4, help="tokens kept at the start when sliding (default 4)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute precision (default float16 on CUDA; on the CPU bfloat16 where it has bf16 instructions, else float32)")
    g.add_argument("--prefill-chunk", type=whole, default=512, help="prompt tokens per forward step (default 512)")
    g.add_argument("--lookup", type=whole, default=0, metavar="N",
                   help="speculative decoding by prompt lookup: up to N tokens a step drafted from n-gram matches in "
                        "the prompt and the reply, verified in one pass; the same output in float32 (in half precision a "
                        "near-tie may go the other way, as batching may) (default 0: off)")
    g.add_argument("--draft-model", metavar="FILE", default=None,
                   help="speculative decoding by a small GGUF with the model's vocabulary, resident beside it, "
                        "drafting --draft-tokens tokens a step (instead of --lookup)")
    g.add_argument("--draft-tokens", type=whole, default=None, metavar="N", help="tokens --draft-model drafts a step (4)")
    g.add_argument("--draft-policy", choices=["adaptive", "fixed"], default=None,
                   help="how many tokens a sequence drafts: adaptive (from its recent acceptance: fewer, or a "
                        "pause, where drafts are rejected; the default) or fixed (always --lookup/--draft-tokens)")
    g.add_argument("--single-process", action="store_true",
                   help="run the whole model in this process (the reference engine) instead of the pipeline")
    g.add_argument("--batch", type=whole, default=None,
                   help="sequences the engine holds at once (default 1; with --serve, as many as the plan's budget "
                        "holds, 8 where they fit)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="log to stderr the model's header, the plan, each process's start and stop, and each "
                        "request's start and end with its rates (with --serve: a line per HTTP request)")
    g.add_argument("--stats", action="store_true",
                   help="print the prompt and decode rates (tokens/s), and the pipeline's per-stage table, at exit "
                        "(the rates are printed on a terminal anyway)")
    g = p.add_argument_group("server (OpenAI-compatible HTTP API)")
    g.add_argument("--serve", action="store_true", help="serve /v1/completions, /v1/chat/completions, /v1/models, "
                                                        "/health and /metrics instead of generating once")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=whole, default=8080, help="port to listen on (default 8080)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 request (ps shows it: prefer "
                        "--api-key-file or LAYERSTREAM_API_KEY)")
    g.add_argument("--api-key-file", metavar="FILE", default=None,
                   help="read the API key from the first line of FILE (4 KiB at most)")
    g.add_argument("--max-queue", type=whole, default=256, help="requests waiting at most; more get 429 (default 256)")
    g = p.add_argument_group("streaming pipeline")
    g.add_argument("--vram-gb", type=decimal, default=None,
                   help="compute-device memory budget in GiB; layers that do not fit stream through it (default on "
                        "CUDA: the GPU's free memory less 1 GiB; on the CPU: no limit)")
    g.add_argument("--step-tokens", type=whole, default=None,
                   help="tokens of one forward step at most: prompts are chunked to it (default: from the budget, at most 512)")
    g.add_argument("--cpu-share", default="default", metavar="F|B:F,...|auto|0|default",
                   help="share of the streamed layers the CPU computes from host RAM while the rest crosses PCIe "
                        "(see --cpu-split; of a mixture-of-experts decode step: of the chosen experts not in the "
                        "device cache); B:F,... gives share F from batch size B (1, 2, 4 or 8; a step of n tokens counts "
                        "as the next of these up, so 8:0.5 is steps of 5 to 8) to the next B named; auto times shares "
                        "per batch size and keeps the fastest (CUDA only); 0 (or off): none. Default 'default': 8:0.5 "
                        "of a MoE model's experts on CUDA where the CPU reads them in place (no host RAM, no other "
                        "layer's share) with 8 threads or more for it, else none (BENCHMARKS.md: MoE batch 8 faster)")
    g.add_argument("--cpu-split", choices=("layers", "rows"), default="layers",
                   help="what --cpu-share splits: whole 4-bit FFN matrices of a share of the streamed layers "
                        "(layers, default) or the last rows of every 4-bit matrix (rows)")
    g.add_argument("--vram-slots", type=whole, default=None,
                   help="VRAM slots the streamed layers cross through under a budget (default 2; a CPU share may "
                        "gain from 3: the copies run further ahead while the CPU computes)")
    g.add_argument("-t", "--cpu-threads", "--threads", dest="cpu_threads", type=whole, default=None,
                   help="CPU threads of the compute process (default with a CPU share: all cores but 4 from 8 cores up; "
                        "with --single-process: torch's default)")
    g.add_argument("--expert-cache-gb", type=decimal, default=None,
                   help="device memory for a mixture-of-experts model's streamed experts: decode steps copy only the "
                        "experts the router chose (default: one layer's slot and what --vram-gb leaves beside it)")
    g.add_argument("--expert-policy", choices=("lfu", "lru"), default="lfu",
                   help="which streamed experts the device cache keeps: the most often used (lfu, default) or the "
                        "most recently used (lru)")
    g.add_argument("--expert-prefetch", type=whole, default=None, metavar="N",
                   help="a mixture-of-experts decode step predicts each streamed layer's experts from the layer before "
                        "and copies up to N of them ahead (default: twice the experts a token uses; 0: off)")
    g.add_argument("--moe-dense", choices=("resident", "stream"), default="resident",
                   help="a mixture-of-experts model's attention, router and norms of streamed layers: kept on the "
                        "device when they fit, so decode copies only the chosen experts (default, as llama.cpp's "
                        "-ot exps=CPU), or streamed with their layer")
    g.add_argument("--host-cache-gb", type=decimal, default=None,
                   help="host RAM for layers kept between passes (default: the streamed layers, up to half the free RAM)")
    g.add_argument("--readers", type=whole, default=1, help="reader processes (default 1)")
    g.add_argument("--read-threads", type=whole, default=None, metavar="N",
                   help="threads each reader reads a layer's pieces with (default: half the cores, 2 to 8, shared among the readers)")
    g.add_argument("--reader-dir", action="append", default=[], metavar="DIR",
                   help="the directory (drive) each reader serves, once per reader, for split models across drives")
    g.add_argument("--direct-io", action="store_true", help="read with O_DIRECT, bypassing the page cache")
    g.add_argument("--prefetch", type=whole, default=None, help="layers staged ahead of compute (default from the plan)")
    g.add_argument("--kv-on-host", action="store_true", default=None,
                   help="keep the KV cache in host memory and stream it with its layer")
    g.add_argument("-ngl", "--n-gpu-layers", "--resident-layers", dest="resident_layers", type=whole, default=None,
                   metavar="N", help="override the plan: keep N layers resident (as llama.cpp's -ngl; more than the "
                                     "model has keeps them all), stream the rest")
    g.add_argument("--transport", choices=["ipc", "tcp"], default="ipc", help="ZeroMQ transport between processes")
    g.add_argument("--stall-timeout", type=decimal, default=120.0,
                   help="seconds a step may wait on the compute process without a message, or a child starting "
                        "use no CPU, before the run ends (120)")
    g.add_argument("--trace", metavar="FILE", help="write a Chrome trace / Perfetto JSON timeline of the run")
    return p


def _num(v: float) -> str:
    """A number as the user would write it: 4, 0.5, 1048576 (never 1.04858e+06)."""
    return str(int(v)) if math.isfinite(v) and v == int(v) and abs(v) < 1 << 53 else repr(v)


def check_args(args) -> None:
    """Every option checked before a model is opened, torch imported or a process started: raises
    UsageError with one line. Fills in what follows from the options (the prompt, the seed)."""
    def fail(msg: str):
        raise UsageError(msg)

    def opt(name: str, v=None) -> str:  # the option and its value as typed
        return shown(args, name.replace("-", "_"), v)

    def finite(name: str, v: float | None, low: float, high: float, low_open: bool = False) -> None:
        if v is not None and not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
            fail(f"{opt(name, v)}: must be a finite number {'above' if low_open else 'from'} {_num(low)}"
                 f"{' and at most' if low_open else ' to'} {_num(high)}")

    def ints(name: str, v: int | None, low: int, high: int) -> None:
        if v is not None and not low <= v <= high:
            fail(f"{opt(name, v)}: must be from {low} to {high}")

    if args.model is None and args.prompt and args.prompt[0].lower().endswith(".gguf") and " " not in args.prompt[0]:
        why = "is a model file" if os.path.isfile(args.prompt[0]) else "names a model file (there is no such file)"
        fail(f"{args.prompt[0]} {why} given as the prompt; give the model with -m FILE")
    stdin_word = args.prompt == ["-"] and args.prompt_file is None and args.prompt_opt is None  # (as cat's `-`)
    if stdin_word:
        args.prompt, args.prompt_file = [], "-"
    if args.prompt_file is not None:
        if args.prompt or args.prompt_opt is not None:
            fail(f"{opt('prompt_file')}: the prompt is given twice (a file and as text); give it once")
        why = prompt_file_problem(args.prompt_file)
        if why:
            fail(f"{opt('prompt_file')}: {why}")

    if args.prompt_opt is not None:
        if args.prompt:
            fail("the prompt is given twice (-p and as words); give it once")
        args.prompt = [args.prompt_opt]
    modes = [m for m, on in (("--serve", args.serve), ("--perplexity", args.perplexity)) if on]
    if len(modes) > 1:
        fail(f"{' and '.join(modes)} do not go together; give one")
    if args.perplexity and args.chat:
        fail("--chat and --perplexity do not go together: perplexity scores plain text; drop --chat")
    if args.perplexity and (args.draft_model or args.lookup):
        fail(f"--perplexity and {'--draft-model' if args.draft_model else '--lookup'} do not go together: "
             "perplexity scores the file's text and generates nothing to draft; drop "
             f"{'--draft-model' if args.draft_model else '--lookup'}")
    if args.serve and args.chat:
        fail("--chat and --serve do not go together: the server applies the chat template to each "
             "/v1/chat/completions request; drop --chat")
    if (args.serve or args.perplexity) and (" ".join(args.prompt).strip() or args.prompt_file is not None):
        fail(f"{modes[0]} takes no prompt text; drop the prompt")
    if args.system is not None and not args.chat:
        fail("--system needs --chat (the system message goes through the chat template)")
    if args.max_tokens == -1:  # llama.cpp's "until the end": the context bounds it (turn.Turn)
        if args.serve:
            fail(f"{opt('max-tokens', -1)}: the server's requests say how many tokens they want; give a number")
        args.max_tokens = MAX_CTX
    if args.max_tokens is not None and not 1 <= args.max_tokens <= MAX_CTX:
        fail(f"{opt('max-tokens', args.max_tokens)}: must be from 1 to {MAX_CTX}, or -1 (until the end of "
             "sequence or a full context)")
    finite("temperature", args.temperature, 0.0, MAX_TEMPERATURE)
    if 0 < args.temperature < 1e-4:
        fail(f"{opt('temperature', args.temperature)}: too small to sample with; use 0 for greedy decoding")
    finite("top-p", args.top_p, 0.0, 1.0)  # as SamplingParams: 0 keeps the best token only
    finite("min-p", args.min_p, 0.0, 1.0)
    finite("repeat-penalty", args.repeat_penalty, *REPEAT_PENALTY_RANGE)
    ints("top-k", args.top_k, -1, 1 << 31)
    args.top_k = max(0, args.top_k)  # (-1: all, as the server's top_k and llama.cpp's)
    args.stop = [unescape(s) for s in args.stop]
    if "" in args.stop:
        fail("--stop '': an empty stop string would stop nothing; drop it")
    ints("repeat-last-n", args.repeat_last_n, 0, MAX_CTX)
    if args.seed == -1:
        args.seed = None  # as llama.cpp: -1 asks for a fresh seed
    if args.seed is not None and not bounds.SEED_RANGE[0] <= args.seed <= bounds.SEED_RANGE[1]:  # (the server's, the API's)
        fail(f"{opt('seed')}: must be from {bounds.SEED_RANGE[0]} to {bounds.SEED_RANGE[1]} (-1: a fresh one)")
    ints("ctx", args.ctx, 2, MAX_CTX)
    ints("batch", args.batch, 1, MAX_BATCH)
    ints("prefill-chunk", args.prefill_chunk, 1, MAX_CTX)
    ints("lookup", args.lookup, 0, MAX_CTX)
    ints("draft-tokens", args.draft_tokens, 1, MAX_CTX)
    if args.draft_model and args.lookup:
        fail("--draft-model and --lookup both draft; give one")
    # options of drafting given where nothing drafts would do nothing: refused (a server's requests may
    # ask for prompt lookup themselves, so --serve takes --draft-policy alone)
    if args.draft_tokens is not None and not args.draft_model:
        fail("--draft-tokens sets how many tokens --draft-model drafts; give --draft-model FILE too "
             "(--lookup N gives its own count)")
    if args.draft_policy is not None and not (args.draft_model or args.lookup or args.serve):
        fail("--draft-policy needs drafting: give --draft-model FILE or --lookup N")
    args.draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
    args.draft_policy = args.draft_policy or "adaptive"
    ints("sink-tokens", args.sink_tokens, 0, MAX_CTX)
    for name, (low, high) in PIPELINE_COUNTS.items():
        ints(name, getattr(args, name), low, high)
    ints("read-threads", args.read_threads, 1, MAX_READ_THREADS)
    if why := too_many_threads(args.cpu_threads):
        fail(f"{opt('cpu-threads', args.cpu_threads)}: {why}")
    if args.vram_gb is not None and math.isfinite(args.vram_gb) and args.vram_gb * 2**30 < 1:  # (1e-300: '0')
        fail(f"{opt('vram-gb', args.vram_gb)}: give the device memory budget in GiB, above 0 (for example "
             "--vram-gb 4); leave it out for the whole free memory")
    finite("vram-gb", args.vram_gb, 0.0, MAX_GB, low_open=True)
    finite("host-cache-gb", args.host_cache_gb, 0.0, MAX_GB)
    finite("expert-cache-gb", args.expert_cache_gb, 0.0, MAX_GB)
    finite("stall-timeout", args.stall_timeout, 0.0, 1e6, low_open=True)
    if not bounds.is_device(args.device):
        fail(f"{opt('device')}: use {bounds.DEVICES}")
    for name in ("model", "api_key_file", "draft_model"):  # (--perplexity's: perplexity_problem, which takes -)
        path = getattr(args, name)
        why = "an empty path; give a file" if path == "" else path and path_problem(path, name)
        if why:
            fail(f"{opt(name, path)}: {why}")
    why = args.perplexity is not None and perplexity_problem(args.perplexity)
    if why:
        fail(f"--perplexity {args.perplexity}: {why}")
    for d in args.reader_dir:
        why = ("an empty path; give a directory" if d == "" else None if os.path.isdir(d)
               else "is not a directory" if os.path.exists(d) else "no such directory")
        if why:
            fail(f"--reader-dir {d}: {why}")
    if not args.single_process and (why := reader_dirs_problem(len(args.reader_dir), args.readers)):
        fail(why)  # (ReaderOptions refused it only once the model was open, exit 1)
    if args.trace == "":
        fail("--trace : an empty path; give a file")
    if args.trace:
        check_trace(args.trace, {"-m": args.model, "-f": args.prompt_file, "--perplexity": args.perplexity,
                                 "--draft-model": args.draft_model, "--api-key-file": args.api_key_file})
        if args.single_process:
            fail("--trace records the pipeline's processes, and --single-process starts none; drop one")
    if args.transport != "ipc" and args.single_process:
        fail(f"--transport {args.transport} links the pipeline's processes, and --single-process starts none; "
             "drop one")
    ints("port", args.port, 0, 65535)
    ints("max-queue", args.max_queue, 1, 1 << 20)
    if args.api_key is not None and args.api_key_file is not None:
        fail("--api-key and --api-key-file both given; give one")
    if (args.api_key is not None or args.api_key_file is not None) and not args.serve:
        fail("--api-key and --api-key-file are options of --serve")
    if args.prompt and not " ".join(args.prompt).strip() and not (args.serve or args.perplexity):  # (given, blank)
        fail("the prompt is blank; pass the prompt text, or leave it out for an interactive chat" if args.chat else
             "the prompt is blank; pass the prompt text (or leave it out and pipe it in)")
    share_off = args.cpu_share in ("0", "default")  # (the default splits no layer, and is none on the CPU)
    if not share_off:  # (its parser's package imports torch)
        from layerstream.compute.cpu.config import cpu_share_on_cpu, parse_cpu_share
        from layerstream.errors import ConfigError

        try:
            share_off = not parse_cpu_share(args.cpu_share, args.cpu_split).asked
        except ConfigError as e:
            fail(str(e))
        if not share_off and args.device == "cpu":
            fail(cpu_share_on_cpu(args.cpu_share, "--device cpu"))
    refuse_unused(args, share_off)
    # the prompt's text is read later, after the model's header is checked (arg_files.read_prompt_text)
    args.prompt_source = "standard input" if stdin_word else opt("prompt_file")
    wanted = not (args.serve or args.perplexity or args.chat)
    if wanted and args.prompt_file is None and not " ".join(args.prompt).strip() and not stdin_readable():
        fail(NO_PROMPT)


# Options of one mode that others drop (compared with their defaults: given at the default they change nothing)
SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed",
            "stop", "ignore_eos")
PIPELINE = ("vram_gb", "host_cache_gb", "resident_layers", "kv_on_host", "prefetch", "step_tokens", "vram_slots",
            "readers", "read_threads", "reader_dir", "direct_io", "cpu_share", "cpu_split", "expert_cache_gb",
            "expert_policy", "expert_prefetch", "moe_dense", "stall_timeout")
SERVER = ("host", "port", "max_queue")


def given(p: argparse.ArgumentParser, args, names: tuple[str, ...]) -> list[str]:
    """The options of `names` set to something other than p's default, as the user typed them (else
    the longest spelling)."""
    typed = getattr(args, "typed", {})
    flag = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    return [typed.get(n, (flag[n],))[0] for n in names if getattr(args, n) != p.get_default(n)]


def served_sampling(args) -> dict:
    """The sampling options given with --serve (typed on the command line, even at the CLI's own
    default, or set to other than it), by openai_api.DEFAULTS' keys: what requests that do not set
    them get (as llama-server's options)."""
    p, typed = build_parser(), getattr(args, "typed", {})
    return {n: tuple(getattr(args, n)) if n == "stop" else getattr(args, n)
            for n in SAMPLING if n in typed or getattr(args, n) != p.get_default(n)}


def refuse_unused(args, share_off: bool) -> None:
    """Options that the mode the command line asks for would take and drop, refused by name
    (`share_off`: --cpu-share, parsed, is off)."""
    parser = build_parser()

    def fail(names: tuple[str, ...], why: str) -> None:
        named = given(parser, args, names)
        if named:
            many = len(named) > 1
            raise UsageError(f"{', '.join(named)}: {why.format(does='do' if many else 'does')}; "
                             f"drop {'them' if many else 'it'}")

    if args.perplexity:
        fail(SAMPLING + ("on_context_full",), "{does} nothing with --perplexity, which scores text and samples no token")
    if share_off:
        fail(("cpu_split",), "{does} nothing without a --cpu-share that splits layers (0 and the default split none)")
    if args.single_process:  # (a share turned off, or the default in any spelling, is not one given)
        fail(tuple(n for n in PIPELINE if not (share_off and n == "cpu_share")),
             "{does} nothing with --single-process, which runs the model in this process without the streaming pipeline")
    if args.on_context_full != "slide":
        fail(("sink_tokens",), "{does} nothing unless the window slides (--on-context-full slide)")
    if not args.serve:
        fail(SERVER, "{does} nothing without --serve")


def read_api_key(args, environ) -> str | None:
    """The server's key: --api-key, else the first line of --api-key-file, else LAYERSTREAM_API_KEY."""
    if args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        try:
            with open(args.api_key_file, "rb") as f:
                raw = f.read(MAX_KEY_FILE + 1)  # (a 3 GB line was read whole: 6.3 GB, then a MemoryError)
            if len(raw) > MAX_KEY_FILE:
                raise UsageError(f"--api-key-file {args.api_key_file}: larger than {MAX_KEY_FILE} bytes; the file "
                                 "should hold the key alone")
            key = raw.decode("utf-8").split("\n", 1)[0].strip()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise UsageError(f"--api-key-file {args.api_key_file}: cannot read it ({why})") from None
        where = f"--api-key-file {args.api_key_file}"
    elif environ.get("LAYERSTREAM_API_KEY") is not None:
        key, where = environ["LAYERSTREAM_API_KEY"], "LAYERSTREAM_API_KEY"
    else:
        return None
    if not key.strip():
        raise UsageError(f"{where}: the key is empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in key):
        raise UsageError(f"{where}: the key holds spaces, control characters or characters outside ASCII (which "
                         "clients send in other encodings); use printable ASCII characters only")
    return key
