"""The generation API: tokenizer, sequences, KV rings and sampling around a step backend.

The backend runs forward steps: in one process a `ModelRunner` (the reference), or the
streaming pipeline's client, which sends the same steps to the compute process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import numbers
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import torch

from layerstream.bounds import DEVICES, is_device
from layerstream.compute.device import DTYPES, WEIGHTS, resolve_device, resolve_dtype  # noqa: F401 - also the engine's API
from layerstream.compute.sampling import SamplingParams
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.stepper import Launched, Stepper, StepResult
from layerstream.coordinator.api_names import python_names
from layerstream.coordinator.chat import ChatTemplate
from layerstream.coordinator.core import EngineCore
from layerstream.coordinator.perplexity import corrupt_logits, windows_perplexity
from layerstream.coordinator.pipeline_config import PipelineConfig, flag
from layerstream.coordinator.sigmask import stop_signals_blocked
from layerstream.coordinator.tokenizer import Tokenizer, token_ids
from layerstream.errors import ConfigError, ContextFullError, LayerstreamError, ModelError, shown
from layerstream.loader.gguf_index import HParams, ModelIndex, open_model
from layerstream.proto.messages import SamplerStart


class StepBackend(Protocol):
    """What the engine core steps (core.StepBackend), and what the engine asks of it besides."""

    hparams: HParams
    max_seqs: int
    ctx: int

    def submit(self, seqs: list[SeqStep], sample: list[int], starts: list[SamplerStart], want: str) -> None: ...
    def collect(self) -> StepResult: ...
    def step(self, seqs: list[SeqStep], want: str) -> torch.Tensor | None: ...
    def discard(self) -> None: ...
    def close(self) -> None: ...


class LocalBackend:
    """The single-process step backend: a ModelRunner (or anything with its `step`, `max_seqs`
    and `device`) whose steps sample on its device and are read back later (NOTE [ ids one step
    behind ] in compute/stepper.py): asynchronous on CUDA, synchronous on the CPU."""

    def __init__(self, runner, n_vocab: int):
        self.runner = runner
        self.max_seqs, self.device = runner.max_seqs, runner.device
        self.hparams, self.ctx = getattr(runner, "hp", None), getattr(runner, "ctx", None)
        self.dtype = getattr(runner, "dtype", None)
        # one row's sampling graphs in the runner's graph pool, where it captures decode graphs
        capture = getattr(runner, "capture", None) if getattr(runner, "use_graphs", False) else None
        kv = getattr(runner, "kv", None)  # (a runner's KV rows zeroed after non-finite logits: stepper.py)
        self.stepper = Stepper(runner.step, n_vocab, runner.max_seqs, runner.device, capture=capture,
                               clear_row=kv.clear_row if kv is not None else None)
        self.inflight: deque[Launched] = deque()

    def submit(self, seqs: list[SeqStep], sample: list[int], starts: list[SamplerStart], want: str = "none") -> None:
        self.inflight.append(self.stepper.launch(seqs, sample, starts, want))

    def collect(self) -> StepResult:
        if not self.inflight:
            raise RuntimeError("collect() with no step in flight")
        return self.stepper.result(self.inflight.popleft())

    def step(self, seqs: list[SeqStep], want: str = "last") -> torch.Tensor | None:
        """One step without sampling, its logits on the host (evaluation)."""
        if self.inflight:
            raise RuntimeError("step() while steps are in flight")
        self.submit(seqs, [False] * len(seqs), [], want)
        return self.collect().logits

    @property
    def warm_up_pays(self) -> bool:
        """Whether the engine runs its warm-up steps at start (NOTE [ warm-up ] in warm_up.py): on a GPU."""
        return self.device.type == "cuda"

    def discard(self) -> None:
        self.inflight.clear()

    def close(self) -> None:
        self.inflight.clear()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: device, precision, context and batch sizes, overflow policy."""

    model: str | None = None
    device: str = "auto"
    dtype: str | None = None  # float32, float16, bfloat16; default by device
    ctx: int = 4096
    max_seqs: int = 1
    on_context_full: str = "error"
    sink_tokens: int = 4
    prefill_chunk: int = 512
    weights: str = "auto"  # auto, quantized (Triton blocks), native (the CPU kernel's blocks) or dense: device.weights_form
    lookahead: bool = True  # submit steps (the backend's steps_ahead) before the last one's ids are read (core.py, NOTE [ one step behind ])
    lookup: int = 0  # tokens prompt lookup drafts a step, where a request does not say (NOTE in core.py)
    draft_model: str | None = None  # a GGUF with the model's vocabulary that drafts instead (draft.py)
    draft_tokens: int = 4  # tokens the draft model drafts a step where a request does not say
    draft_policy: str = "adaptive"  # "fixed": always draft_tokens/lookup (draft_policy.py, NOTE [ draft policy ])
    warm_up: bool | None = None  # a prompt chunk and a decode step at start (warm_up.py, NOTE [ warm-up ]); None: where the backend says it pays

    def __post_init__(self) -> None:
        """A bad value refused here, in one line naming it (the CLI's own checks run before: args.py)."""
        for name, none in (("model", "the default model"), ("draft_model", "no draft")):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (str, os.PathLike)) or not os.fspath(v)):
                raise ConfigError(f"{name}={v!r}: give a GGUF file's path, or None for {none}")
            object.__setattr__(self, name, None if v is None else os.fspath(v))
        for name in ("lookahead", "warm_up"):  # ("no" is true)
            if not isinstance(getattr(self, name), bool) and not (name == "warm_up" and self.warm_up is None):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be True or False")
        if not is_device(self.device):
            raise ConfigError(f"device={self.device!r}: use {DEVICES}")
        for name, low in (("ctx", 2), ("max_seqs", 1), ("sink_tokens", 0), ("prefill_chunk", 1), ("lookup", 0),
                          ("draft_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ConfigError(f"{name}={v!r}: must be a whole number, at least {low}")
        for name, ok in (("on_context_full", ("error", "slide")), ("draft_policy", ("adaptive", "fixed"))):
            if getattr(self, name) not in ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: give {' or '.join(ok)}")
        if self.dtype is not None and self.dtype not in DTYPES:  # (refused at load, unquoted)
            raise ConfigError(f"dtype={self.dtype!r}: use float32, float16 or bfloat16, or None for the device's default")
        if self.weights not in WEIGHTS:  # (a ValueError from deep in the load, where the README promises ConfigError)
            raise ConfigError(f"weights={self.weights!r}: use {', '.join(WEIGHTS[:-1])} or {WEIGHTS[-1]}")
        if self.on_context_full == "slide" and not self.sink_tokens < self.ctx - 1:
            raise ConfigError(f"sink_tokens={self.sink_tokens}: must be below ctx ({self.ctx}) minus one")


def local_backend(index: ModelIndex, cfg: EngineConfig, progress: bool = False) -> LocalBackend:
    """A ModelRunner with every layer resident: the single-process engine."""
    from layerstream.compute.device import computing_form
    from layerstream.compute.runner import ModelRunner
    from layerstream.compute.weights import GlobalWeights, ResidentLayers, check_model_quants

    check_model_quants(index)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        # Triton launches on the current device, not its tensors': cuda:1 must be the current one
        torch.cuda.set_device(device)
    dtype = resolve_dtype(cfg.dtype, device, index.hparams.arch, cfg.weights)
    if device.type == "cpu":  # refused before anything is allocated (plan.py, NOTE [ host memory ])
        from layerstream.coordinator.plan import check_local_host

        check_local_host(index, dtype_bytes=dtype.itemsize, ctx=cfg.ctx, max_seqs=cfg.max_seqs,
                         step_tokens=cfg.prefill_chunk)
    bar = None
    if progress:
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread (NOTE [ SIGINT and threads ] in sigmask.py)
        bar = tqdm(total=index.hparams.n_layer, desc="loading layers", unit="layer", leave=False)
    try:
        quantized = computing_form(device, cfg.weights)
        glob = GlobalWeights(index, device, dtype, embed_on_device=True, quantized=quantized)
        layers = ResidentLayers(index, device, dtype, progress=bar.update if bar else None, quantized=quantized)
    finally:
        if bar:
            bar.close()
    runner = ModelRunner(index.hparams, glob, layers, device, dtype, ctx=cfg.ctx, max_seqs=cfg.max_seqs,
                         sliding=cfg.on_context_full == "slide", triton_attention=quantized == "triton")
    return LocalBackend(runner, index.hparams.n_vocab)


def draft_model(index: ModelIndex, cfg: EngineConfig):
    """The draft model of `cfg.draft_model`, resident in this process on the engine's device, once
    its vocabulary is checked against the model's (draft.py, NOTE [ draft model ]). A pipeline's plan
    takes its memory off --vram-gb (plan.py, draft_memory)."""
    from layerstream.coordinator.draft import DraftModel, check_vocab

    if cfg.draft_tokens < 1:
        raise ConfigError(f"--draft-tokens {cfg.draft_tokens}: must be at least 1")
    draft = open_model(cfg.draft_model)
    check_vocab(index, draft)
    be = local_backend(draft, replace(cfg, model=cfg.draft_model, on_context_full="error"))
    return DraftModel(be.runner, cfg.ctx, cfg.max_seqs, cfg.prefill_chunk)


def text_side(index: ModelIndex) -> tuple[Tokenizer, ChatTemplate | None]:
    """The model's tokenizer and chat template, from its metadata."""
    try:
        tok = Tokenizer.from_metadata(index.metadata)
    except ModelError as e:  # (the tokenizer sees metadata, not the file: its errors get the file's name)
        raise ModelError(f"{index.path}: {e}") from None
    return tok, ChatTemplate.from_metadata(index.metadata, tok)


def _system_needs_chat(system: str | None, chat: bool) -> None:
    """system= is a chat's: without chat=True it was dropped (the CLI refuses --system without --chat)."""
    flag("chat", chat)
    if system is not None and not chat:
        raise ConfigError("system= is a chat's system message: give chat=True too, or put it in the text")


class Engine:
    """Tokenize, run steps, sample; usable in one process or over the streaming pipeline."""

    def __init__(self, index: ModelIndex, backend: StepBackend, cfg: EngineConfig, draft=None, text=None):
        """`text`: a Future of text_side(index), where Engine.open made it beside the backend's start."""
        self.index, self.backend, self.cfg = index, backend, cfg
        self.draft = draft  # a DraftModel (draft.py), or None
        self.hparams = index.hparams
        try:
            self.tokenizer, self.chat_template = text.result() if text is not None else text_side(index)
        except BaseException:  # a bad tokenizer in the file: nothing left running
            backend.close()
            raise
        self.step_tokens = min(cfg.prefill_chunk, getattr(backend, "step_tokens", None) or cfg.prefill_chunk)
        from layerstream.coordinator.draft_plan import draft_tokens_for  # (the rule the plan counts graphs by)

        self.core = EngineCore(backend, self.tokenizer, index.hparams.n_vocab, max_seqs=cfg.max_seqs, ctx=cfg.ctx,
                               step_tokens=self.step_tokens, on_context_full=cfg.on_context_full,
                               sink_tokens=cfg.sink_tokens,
                               lookahead=getattr(backend, "steps_ahead", 1) if cfg.lookahead else 0,
                               lookup=draft_tokens_for(cfg), draft=draft, adaptive=cfg.draft_policy == "adaptive")
        self._batches = 0
        self.finish_reasons: list[str | None] = []  # the last batch's, by prompt
        self._busy, self._closed = threading.Lock(), False
        self._pid = os.getpid()  # (a forked child holds a copy: _running refuses it)
        if cfg.warm_up if cfg.warm_up is not None else getattr(backend, "warm_up_pays", False):
            from layerstream.coordinator.warm_up import warm_up

            warm_up(self.core)

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", *, progress: bool = False, **kw) -> "Engine":
        """Open a GGUF file (the default model when None) and load it in this process; `kw`: the
        rest of EngineConfig's fields. (`device` second, as documented: `progress` was, and a device
        given there was taken for it and the device left to auto.)"""
        return cls.open(EngineConfig(model=model, device=device, **kw), progress=progress)

    @classmethod
    @python_names()  # (errors raised deep in name run-pipeline's flags: NOTE [ the caller's names ])
    def open(cls, cfg: EngineConfig, pipeline=None, index: ModelIndex | None = None, progress: bool = False) -> "Engine":
        """The one place an engine is assembled: the model index, then the backend (in this process,
        or the streaming pipeline when `pipeline` is a PipelineConfig), then the engine."""
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a script without a main guard, run again in each child of the pipeline as it starts:
            # one line each, where multiprocessing's own RuntimeError printed a page from every child.
            # The line goes in one write: the children say it at once, and SystemExit's text and its
            # newline are two writes where stderr is unbuffered (PYTHONUNBUFFERED), which interleaved
            with contextlib.suppress(OSError):
                os.write(2, b"layerstream: an engine was opened while a child process started (the script runs "
                            b"again in each child): put the code that opens it under if __name__ == \"__main__\":\n")
            raise SystemExit(1)
        if not isinstance(cfg, EngineConfig):  # (a dict or None: AttributeError, deep in)
            raise ConfigError(f"Engine.open's cfg={shown(cfg)}: give an EngineConfig(...)")
        if index is not None and not isinstance(index, ModelIndex):
            raise ConfigError(f"Engine.open's index={shown(index)}: give an open_model(path)'s index, or None to open "
                              "cfg.model")
        if pipeline is not None and not isinstance(pipeline, PipelineConfig):  # (a dict: AttributeError, deep in)
            raise ConfigError(f"Engine.open's pipeline={pipeline!r}: give a PipelineConfig(...), or None to load "
                              "the model in this process")
        if index is None:
            from layerstream.loader.default_model import default_model_path

            index = open_model(cfg.model or default_model_path())
        text = None
        if pipeline is None:
            backend = local_backend(index, cfg, progress=progress)
        else:
            from layerstream.coordinator.pipeline import pipeline_backend

            # the tokenizer is built while the pipeline's processes start (they wait on sockets)
            pool = ThreadPoolExecutor(1, thread_name_prefix="layerstream-tokenizer")
            with stop_signals_blocked():  # (NOTE [ SIGINT and threads ])
                text = pool.submit(text_side, index)
            pool.shutdown(wait=False)  # (the thread ends with its one task)
            try:
                backend = pipeline_backend(index, cfg, pipeline)
            except BaseException:
                text.cancel()
                raise
        draft = None
        try:
            if cfg.draft_model is not None:
                draft = draft_model(index, cfg)
            return cls(index, backend, cfg, draft, text)
        except BaseException:
            backend.close()
            raise

    def close(self) -> None:
        self._closed = self.core.closed = True
        if os.getpid() != self._pid:  # (a forked child's copy: the parent's pipeline and memory stay the parent's)
            return
        self.backend.close()
        if self.draft is not None:
            self.draft.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise LayerstreamError("this engine is closed; load another")

    @contextlib.contextmanager
    def _running(self):
        """One generation or evaluation at a time: the engine core runs one batch, and a second
        caller's requests and outputs mixed with the first's (KeyError, or another prompt's text)."""
        self._refuse_closed()
        if os.getpid() != self._pid:  # (the pipeline's sockets are the parent's: a forked child's call hung)
            raise LayerstreamError(f"this engine was opened by process {self._pid}; a forked process cannot use it: "
                                   "open an engine in the child, or fork before opening one")
        if not self._busy.acquire(blocking=False):
            raise LayerstreamError("this engine is already running a generation or an evaluation (another "
                                   "thread's, or a generator not yet run to its end or closed); finish it first, or "
                                   "give each thread its own engine")
        try:
            with python_names():
                yield
        finally:
            self._busy.release()

    # -- public API ----------------------------------------------------------------------------

    @python_names()
    def encode(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        self._refuse_closed()  # (README: a closed engine refuses every call; it tokenized on)
        if not isinstance(text, str) or not isinstance(system, (str, type(None))):
            bad = text if not isinstance(text, str) else system
            raise TypeError(f"{'text' if bad is text else 'system'} must be a str, not {type(bad).__name__}")
        _system_needs_chat(system, chat)
        if chat:
            if self.chat_template is None:
                raise ConfigError("--chat: this model's GGUF has no tokenizer.chat_template; run without --chat")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.encode_chat(msgs)
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False) -> list[int]:
        """Token ids of a conversation through the model's chat template: the template's own text
        may make control tokens; message contents never do (no role injection). continue_final: the
        last message, the assistant's, is continued (ChatTemplate.continued_segments)."""
        self._refuse_closed()
        flag("add_generation_prompt", add_generation_prompt)
        flag("continue_final", continue_final)
        if self.chat_template is None:
            raise ConfigError("this model's GGUF has no tokenizer.chat_template: give it text, not messages")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise TypeError(f"messages: give a list of dicts, each with a str 'role' and 'content', not {messages!r:.80}")
        try:
            segments = (self.chat_template.continued_segments(messages) if continue_final
                        else self.chat_template.render_segments(messages, add_generation_prompt=add_generation_prompt))
        except ModelError as e:  # (the model's template, not the caller's messages: the file named)
            raise ModelError(f"{os.path.basename(self.index.path)}: {e}") from None
        ids: list[int] = []
        for text, from_template in segments:
            ids += self.tokenizer.encode(text, add_special=False, parse_special=from_template)
        return ids

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits [T, V] (float32, CPU) of every position of a token sequence, for evaluation."""
        tokens = token_ids(tokens, self.hparams.n_vocab, "logits()")
        if self.cfg.on_context_full == "error" and len(tokens) > self.cfg.ctx:  # (found after the whole pass)
            raise ContextFullError(f"logits(): {len(tokens)} tokens do not fit the context size ({self.cfg.ctx} "
                                   "tokens); raise ctx, pass fewer tokens, or use on_context_full='slide'")
        out = torch.empty(len(tokens), self.hparams.n_vocab, dtype=torch.float32)

        def keep(at: int, lg: torch.Tensor) -> None:
            out[at : at + lg.shape[0]] = lg

        with self._running():  # (its errors in the API's names: NOTE [ the caller's names ])
            self.core.score(tokens, keep)
            nan = torch.isnan(out).any(-1)
            if nan.any():  # (as generate's and perplexity's: NaN logits returned without a word)
                raise corrupt_logits("NaN", int(nan.int().argmax()))
        return out

    def perplexity(self, text: str, window: int | None = None) -> tuple[float, int]:
        """Perplexity of a text over non-overlapping windows (as llama-perplexity): (ppl, tokens
        scored). Each step's logits are reduced to their tokens' negative log-likelihoods as they
        come (NOTE [ streamed perplexity ]); only those are kept."""
        if not isinstance(text, str):
            raise TypeError(f"perplexity() takes the text as a str, not {type(text).__name__}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 2):
            raise ConfigError(f"window={window!r}: must be a whole number of tokens, at least 2")
        ids = self.encode(text)  # (refused first where the engine is closed)
        window = min(window or self.cfg.ctx, self.cfg.ctx)
        if len(ids) < 2:
            raise ConfigError(f"the text is {len(ids)} token{'' if len(ids) == 1 else 's'}; a perplexity needs at least 2 "
                              "(give a longer text)")
        with self._running():  # (the whole text: another caller's requests between windows would stop it)
            return windows_perplexity(self.core, ids, window)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = False,
                 system: str | None = None) -> Iterator[str]:
        """Stream the text of one generation, piece by piece."""
        for _, piece in self.generate_batch([prompt], params, stream=True, chat=chat, system=system):
            yield piece

    def generate_batch(self, prompts: list[str | list[int]], params: SamplingParams | None = None,
                       stream: bool = False, chat: bool = False, system: str | None = None):
        """Generate for several prompts in one batch; yields (index, text piece) when streaming,
        else returns the list of completions. A prompt is text or a list of token ids."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"generate_batch() takes a list of prompts, not {type(prompts).__name__} (one prompt: "
                            "generate(), or a list of one)")
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, not {type(params).__name__}")
        flag("stream", stream)
        _system_needs_chat(system, chat)
        if chat and not all(isinstance(p, str) for p in prompts):  # (ids ran as they were, no template)
            raise ConfigError("chat=True renders text through the chat template: give text prompts, or token ids "
                              "without chat=True")
        ids = [self.encode(p, chat=chat, system=system) if isinstance(p, str)
               else token_ids(p, self.hparams.n_vocab, "a prompt", text_ok=True) for p in prompts]
        it = self._generate_batch(ids, params or SamplingParams())
        if stream:
            return it
        outs = [""] * len(prompts)
        for i, piece in it:
            outs[i] += piece
        return outs

    def _generate_batch(self, ids: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, str]]:
        """Every prompt as a request of the engine core, run until all finish."""
        with self._running():
            yield from self._run_batch(ids, params)

    def _run_batch(self, ids: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, str]]:
        own = len(self.core.waiting) + len(self.core.running)
        if own:  # (stepping them here took their outputs from their owner, and named no prompt of ours)
            raise ConfigError(f"the engine's core has {own} request{'s' if own > 1 else ''} of its own in flight "
                              "(added through engine.core): step them to their end or abort them first")
        self._batches += 1
        names = [f"batch{self._batches}-{i}" for i in range(len(ids))]
        index = {n: i for i, n in enumerate(names)}
        reasons: list[str | None] = [None] * len(ids)
        self.finish_reasons = reasons  # (filled as they end: None where a prompt did not)
        try:
            for n, p in zip(names, ids):
                self.core.add_request(n, p, params)
            while any(r is None for r in reasons) and self.core.has_unfinished():  # (NOTE in turn.py)
                if self._closed:  # (close() from another thread: one process generated on to the end)
                    raise LayerstreamError("this engine was closed during the generation")
                for out in self.core.step():
                    i = index.get(out.request_id)
                    if i is None:  # (the end of one the core's caller aborted: reported to no one here)
                        continue
                    if out.text:
                        yield i, out.text
                    if out.finished:
                        reasons[i] = out.finish_reason
                        try:
                            out.raise_for_failure(self.cfg.on_context_full, self.cfg.ctx)
                        except LayerstreamError as e:  # (of several prompts: which one, by its index)
                            if len(ids) > 1:
                                raise type(e)(f"prompts[{i}] (of {len(ids)}): {e}") from None
                            raise
        finally:
            for n in names:  # a consumer that stopped early, or an error: rows go back
                self.core.abort(n)
            self.core.aborted.clear()
