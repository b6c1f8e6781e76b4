"""The generation API: tokenizer, sequences, KV rings and sampling around a step backend.

The backend runs forward steps: in one process a `ModelRunner` (the reference), or the
streaming pipeline's client, which sends the same steps to the compute process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from layerstream.compute.model import SeqStep
from layerstream.compute.device import resolve_device, resolve_dtype  # noqa: F401 - also the engine's API
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.chat import ChatTemplate
from layerstream.coordinator.core import EngineCore
from layerstream.coordinator.kv_ring import KVRing
from layerstream.coordinator.tokenizer import Tokenizer
from layerstream.errors import ConfigError, ContextFullError, LayerstreamError
from layerstream.loader.gguf_index import HParams, ModelIndex, open_model


class StepBackend(Protocol):
    hparams: HParams
    max_seqs: int
    ctx: int

    def step(self, seqs: list[SeqStep], want: str) -> torch.Tensor | None: ...
    def close(self) -> None: ...


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
    weights: str = "auto"  # auto (GGUF blocks on CUDA, dequantized on the CPU), quantized or dense


def local_backend(index: ModelIndex, cfg: EngineConfig, progress: bool = False):
    """A ModelRunner with every layer resident: the single-process engine."""
    from layerstream.compute.device import keeps_quantized
    from layerstream.compute.runner import ModelRunner
    from layerstream.compute.weights import GlobalWeights, ResidentLayers, check_model_quants

    check_model_quants(index)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, index.hparams.arch)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=index.hparams.n_layer, desc="loading layers", unit="layer", leave=False)
    try:
        quantized = keeps_quantized(device, cfg.weights)
        glob = GlobalWeights(index, device, dtype, embed_on_device=True, quantized=quantized)
        layers = ResidentLayers(index, device, dtype, progress=bar.update if bar else None, quantized=quantized)
    finally:
        if bar:
            bar.close()
    runner = ModelRunner(index.hparams, glob, layers, device, dtype, ctx=cfg.ctx, max_seqs=cfg.max_seqs,
                         sliding=cfg.on_context_full == "slide", triton_attention=quantized)
    return runner


@dataclass
class Sequence:
    """One sequence in flight: its cache row, ring, tokens and sampling state."""

    row: int
    ring: KVRing
    tokens: list[int] = field(default_factory=list)  # every token fed so far
    generated: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None


class Engine:
    """Tokenize, run steps, sample; usable in one process or over the streaming pipeline."""

    def __init__(self, index: ModelIndex, backend: StepBackend, cfg: EngineConfig):
        self.index, self.backend, self.cfg = index, backend, cfg
        self.hparams = index.hparams
        try:
            self.tokenizer = Tokenizer.from_metadata(index.metadata)
            self.chat_template = ChatTemplate.from_metadata(index.metadata, self.tokenizer)
        except BaseException:  # a bad tokenizer in the file: nothing left running
            backend.close()
            raise
        self.step_tokens = min(cfg.prefill_chunk, getattr(backend, "step_tokens", None) or cfg.prefill_chunk)
        self.core = EngineCore(backend, self.tokenizer, index.hparams.n_vocab, max_seqs=cfg.max_seqs, ctx=cfg.ctx,
                               step_tokens=self.step_tokens, on_context_full=cfg.on_context_full,
                               sink_tokens=cfg.sink_tokens)
        self._batches = 0

    @classmethod
    def load(cls, model: str | None = None, progress: bool = False, **kw) -> "Engine":
        """Open a GGUF file (the default model when None) and load it in this process."""
        return cls.open(EngineConfig(model=model, **kw), progress=progress)

    @classmethod
    def open(cls, cfg: EngineConfig, pipeline=None, index: ModelIndex | None = None, progress: bool = False) -> "Engine":
        """The one place an engine is assembled: the model index, then the backend (in this process,
        or the streaming pipeline when `pipeline` is a PipelineConfig), then the engine."""
        if index is None:
            from layerstream.loader.default_model import default_model_path

            index = open_model(cfg.model or default_model_path())
        if pipeline is None:
            backend = local_backend(index, cfg, progress=progress)
        else:
            from layerstream.coordinator.pipeline import pipeline_backend

            backend = pipeline_backend(index, cfg, pipeline)
        return cls(index, backend, cfg)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sequences ---------------------------------------------------------------------------

    def _new_seq(self) -> Sequence:
        ring = KVRing(self.cfg.ctx, self.cfg.sink_tokens, self.cfg.on_context_full)
        return Sequence(row=self.core.take_row(), ring=ring)

    def _free_seq(self, s: Sequence) -> None:
        self.core.give_row(s.row)

    def _feed(self, seqs: list[Sequence], chunks: list[list[int]], want: str) -> torch.Tensor | None:
        """One backend step feeding chunks[i] to seqs[i]; each chunk must fit its ring's max_chunk."""
        steps = []
        for s, toks in zip(seqs, chunks):
            slots, pos = s.ring.append(len(toks))
            s.tokens += toks
            steps.append(SeqStep(row=s.row, tokens=toks, slots=slots, positions=pos, kv_pos=s.ring.slot_positions()))
        return self.backend.step(steps, want)

    def _prefill(self, seqs: list[Sequence], prompts: list[list[int]], want: str = "last") -> torch.Tensor:
        """Feed whole prompts in chunks; returns logits of the last token of each (or all positions)."""
        pending = [list(p) for p in prompts]
        out_all: list[list[torch.Tensor]] = [[] for _ in seqs]
        last: list[torch.Tensor | None] = [None] * len(seqs)
        step_tokens = self.step_tokens
        while any(pending):
            idx, chunks, room = [], [], step_tokens  # the tokens of one step stay within the plan's budget
            for i, p in enumerate(pending):
                if not p or room <= 0:
                    continue
                n = min(len(p), room, max(seqs[i].ring.max_chunk(), 1))
                idx.append(i)
                chunks.append(p[:n])
                pending[i] = p[n:]
                room -= n
            logits = self._feed([seqs[i] for i in idx], chunks, "all" if want == "all" else "last")
            if want == "all":
                off = 0
                for i, c in zip(idx, chunks):
                    out_all[i].append(logits[off : off + len(c)])
                    off += len(c)
            else:
                for j, i in enumerate(idx):
                    last[i] = logits[j]
        if want == "all":
            return [torch.cat(o) for o in out_all]
        return torch.stack(last)

    # -- public API ----------------------------------------------------------------------------

    def encode(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            if self.chat_template is None:
                raise ConfigError("--chat: this model's GGUF has no tokenizer.chat_template; run without --chat")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return self.encode_chat(msgs)
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation through the model's chat template: the template's own text
        may make control tokens; message contents never do (no role injection)."""
        ids: list[int] = []
        for text, from_template in self.chat_template.render_segments(messages,
                                                                      add_generation_prompt=add_generation_prompt):
            ids += self.tokenizer.encode(text, add_special=False, parse_special=from_template)
        return ids

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits [T, V] (float32, CPU) of every position of a token sequence, for evaluation."""
        if not tokens:
            raise ValueError("logits() needs at least one token")
        s = self._new_seq()
        try:
            return self._prefill([s], [tokens], want="all")[0].float().cpu()
        finally:
            self._free_seq(s)

    def perplexity(self, text: str, window: int | None = None) -> tuple[float, int]:
        """Perplexity of a text over non-overlapping windows (as llama-perplexity): (ppl, tokens scored)."""
        ids = self.tokenizer.encode(text)
        window = min(window or self.cfg.ctx, self.cfg.ctx)
        if len(ids) < 2:
            raise ConfigError("--perplexity: the text has fewer than 2 tokens")
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            lg = self.logits(chunk)
            lp = torch.log_softmax(lg[:-1].double(), dim=-1)
            tgt = torch.tensor(chunk[1:])
            # score only the second half of each window, as llama-perplexity does, when it is long
            first = len(chunk) // 2 if len(chunk) >= 64 else 0
            nll -= lp[first:].gather(1, tgt[first:, None]).sum().item()
            n += len(chunk) - 1 - first
        return math.exp(nll / n), n

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = False,
                 system: str | None = None) -> Iterator[str]:
        """Stream the text of one generation, piece by piece."""
        ids = prompt if isinstance(prompt, list) else self.encode(prompt, chat=chat, system=system)
        for _, piece in self.generate_batch([ids], params, stream=True):
            yield piece

    def generate_batch(self, prompts: list[str | list[int]], params: SamplingParams | None = None,
                       stream: bool = False, chat: bool = False):
        """Generate for several prompts in one batch; yields (index, text piece) when streaming,
        else returns the list of completions."""
        it = self._generate_batch(prompts, params or SamplingParams(), chat)
        if stream:
            return it
        outs = [""] * len(prompts)
        for i, piece in it:
            outs[i] += piece
        return outs

    def _generate_batch(self, prompts, params: SamplingParams, chat: bool) -> Iterator[tuple[int, str]]:
        """Every prompt as a request of the engine core, run until all finish."""
        ids = [p if isinstance(p, list) else self.encode(p, chat=chat) for p in prompts]
        self._batches += 1
        names = [f"batch{self._batches}-{i}" for i in range(len(ids))]
        index = {n: i for i, n in enumerate(names)}
        reasons: list[str | None] = [None] * len(ids)
        try:
            for n, p in zip(names, ids):
                self.core.add_request(n, p, params)
            while self.core.has_unfinished():
                for out in self.core.step():
                    i = index[out.request_id]
                    if out.text:
                        yield i, out.text
                    if out.finished:
                        reasons[i] = out.finish_reason
                        if out.finish_reason == "error":  # this request's own failure (e.g. NaN logits)
                            raise LayerstreamError(out.error or "the request failed")
                        if out.finish_reason == "context_full" and self.cfg.on_context_full == "error":
                            raise ContextFullError(f"the sequence reached the context size ({self.cfg.ctx} tokens); "
                                                   "raise --ctx or pass --on-context-full slide")
            self.finish_reasons = reasons
        finally:
            for n in names:  # a consumer that stopped early, or an error: rows go back
                self.core.abort(n)
            self.core.aborted.clear()
