"""The single-process engine on tiny synthetic GGUFs against the float64 reference forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ggufgen
import reference
from layerstream.compute.sampling import SamplingParams
from layerstream.compute.step_meta import SeqStep
from layerstream.coordinator.engine import Engine
from layerstream.coordinator.kv_ring import KVRing
from layerstream.errors import ContextFullError

ARCHS = {  # name -> write_model arguments
    "llama": dict(arch="llama"),
    "llama-rope_freqs-tied": dict(arch="llama", rope_freqs=True, tied=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    # local layers 0, 1 (a 4-token window, their own RoPE base), global layer 2; tied head
    "gemma3": dict(arch="gemma3", n_layer=3, tied=True),
    # mixture of experts: 4 experts, 2 a token: qwen3moe, and Mixtral's layout (llama with experts)
    "qwen3moe": dict(arch="qwen3moe"),
    "mixtral": dict(arch="llama", n_expert=4, n_expert_used=2),
}
MIXED = ["Q4_K", "Q6_K", "Q8_0", "F16", "Q5_0", "Q2_K", "Q3_K", "Q5_K", "Q4_1", "Q5_1", "Q4_0", "F32"]
QTYPES = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K": "Q4_K", "Q6_K": "Q6_K", "mixed": MIXED}
K_TYPES = {"Q4_K", "Q6_K", "mixed"}  # rows of 256 values

TOKENS = [5, 77, 200, 13, 13, 42, 250, 1, 99, 128, 64, 7, 31, 180, 3, 222, 17]


def _write(tmp_path, arch: str, qtype: str, **kw) -> str:
    size = dict(n_embd=256, n_ff=256) if qtype in K_TYPES else {}
    return ggufgen.write_model(tmp_path / f"{arch}-{qtype}.gguf", qtype=QTYPES[qtype], **ARCHS[arch], **size, **kw)


class _Seq:
    """A sequence fed by hand through the backend: its KV row and ring (the core lends the row)."""

    def __init__(self, e: Engine):
        self.row = e.core.take_row()
        self.ring = KVRing(e.cfg.ctx, e.cfg.sink_tokens, e.cfg.on_context_full)


def _feed(e: Engine, seqs: list[_Seq], chunks: list[list[int]], want: str):
    """One backend step feeding chunks[i] to seqs[i] (each within its ring's max_chunk)."""
    steps = []
    for s, toks in zip(seqs, chunks):
        slots, pos = s.ring.append(len(toks))
        steps.append(SeqStep(row=s.row, tokens=toks, slots=slots, positions=pos, kv_pos=s.ring.slot_positions()))
    return e.backend.step(steps, want)


def _load(path, **kw) -> Engine:
    kw = dict(device="cpu", dtype="float32", ctx=64, max_seqs=2) | kw
    return Engine.load(str(path), **kw)


def _assert_close(got: torch.Tensor, ref: np.ndarray, what: str) -> None:
    ref_t = torch.from_numpy(ref)
    scale = ref_t.abs().max().item()
    err = (got.double() - ref_t).abs().max().item()
    assert err < 1e-3 * scale, f"{what}: max abs diff {err:.3g} at logit scale {scale:.3g}"


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_reference(tmp_path, arch, qtype):
    path = _write(tmp_path, arch, qtype)
    ref = reference.reference_logits(path, TOKENS)
    with _load(path) as e:
        _assert_close(e.logits(TOKENS), ref, f"{arch}/{qtype} whole sequence")
        # token by token through the KV cache, two sequences interleaved in one batch
        a, b = _Seq(e), _Seq(e)
        steps = []
        for t in TOKENS:
            steps.append(_feed(e, [a, b], [[t], [TOKENS[0]]], "last")[0])
        _assert_close(torch.stack(steps), ref, f"{arch}/{qtype} incremental")


def test_greedy_generation_follows_reference(tmp_path):
    path = _write(tmp_path, "qwen3", "Q8_0")
    with _load(path) as e:
        toks = list(TOKENS[:5])
        eos = e.tokenizer.eos_ids
        for _ in range(8):
            nxt = int(reference.reference_logits(path, toks)[-1].argmax())
            if nxt in eos:
                break
            toks.append(nxt)
        out = e.generate_batch([TOKENS[:5]], SamplingParams(temperature=0, max_tokens=8))[0]
        assert out == e.tokenizer.decode(toks[5:])


def test_split_model_equals_unsplit(tmp_path):
    path = _write(tmp_path, "llama", "Q8_0", n_layer=3)
    parts = ggufgen.split_model(path, 3)
    assert len(parts) == 3
    with _load(path) as whole, _load(parts[0]) as split:
        assert torch.equal(split.logits(TOKENS), whole.logits(TOKENS))


def test_slide_keeps_sinks_and_recent_window(tmp_path):
    """One layer: K/V depend on the token alone, so after sliding the logits equal a fresh pass over
    the tokens the ring holds (sinks, then the newest), at positions 0..ctx-1."""
    path = _write(tmp_path, "llama", "F32", n_layer=1)
    seq = (TOKENS * 3)[:40]
    with _load(path, ctx=16, on_context_full="slide", sink_tokens=4) as e:
        s = _Seq(e)
        for n, t in enumerate(seq, 1):
            got = _feed(e, [s], [[t]], "last")[0]
            held = seq[:n] if n <= 16 else seq[:4] + seq[n - 12 : n]
            ref = reference.reference_logits(path, held)[-1]
            _assert_close(got[None], ref[None], f"after {n} tokens")
        assert s.ring.total == 40 and max(s.ring.slot_positions()) == 15


def test_slide_generation_runs_past_ctx(tmp_path):
    path = _write(tmp_path, "qwen2", "Q8_0")
    with _load(path, ctx=16, on_context_full="slide", sink_tokens=4) as e:
        out = e.generate_batch([TOKENS[:10]], SamplingParams(temperature=0.8, seed=1, max_tokens=40))[0]
        assert e.finish_reasons == ["length"], "this seed draws no eos in 40 tokens"  # 50 tokens through ctx 16
        assert out


def test_one_step_behind_gives_the_text_of_stepping_in_turn(tmp_path):
    """The runner feeds a decode token -1 from the id its step before sampled, on its device:
    seeded and greedy batches over a sliding ring, and a stop string, end as when the core reads
    each step's ids before it builds the next (core.py, NOTE [ one step behind ])."""
    path = _write(tmp_path, "qwen2", "Q8_0")
    prompts = [TOKENS[:10], TOKENS[3:9]]
    params = [SamplingParams(temperature=0.8, seed=1, max_tokens=30, repeat_penalty=1.2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    got = {}
    for lookahead in (False, True):
        with _load(path, ctx=16, on_context_full="slide", sink_tokens=4, lookahead=lookahead) as e:
            fed = []
            step = e.backend.stepper.step_fn
            e.backend.stepper.step_fn = lambda seqs, want, last: fed.extend(t for s in seqs for t in s.tokens) or \
                step(seqs, want, last)
            texts = [e.generate_batch(prompts, p) for p in params]
            stop = texts[0][0][5:7]
            stopped = e.generate_batch(prompts, SamplingParams(**{**params[0].__dict__, "stop": (stop,)}))
            got[lookahead] = texts, stopped, e.finish_reasons
            assert (-1 in fed) == lookahead
    assert got[True] == got[False]
    assert got[True][1][0] == got[True][0][0][0][: got[True][0][0][0].find(stop)] and got[True][2][0] == "stop"


def test_context_full_error(tmp_path):
    path = _write(tmp_path, "llama", "Q8_0")
    with _load(path, ctx=16, on_context_full="error") as e:
        with pytest.raises(ContextFullError, match=r"^logits\(\): 17 tokens do not fit the context size \(16 tokens\)"):
            e.logits(TOKENS)  # (refused before its pass)
        with pytest.raises(ContextFullError, match=r"context size \(16 tokens\); raise --ctx or pass --on-context-full"):
            e.core.score(TOKENS, lambda at, lg: None)  # the engine core's own check, past the API's (its names)
        assert e.logits(TOKENS[:16]).shape == (16, 256)  # the failed sequence gave its row back
        with pytest.raises(ContextFullError):
            list(e.generate(TOKENS[:14], SamplingParams(temperature=0, max_tokens=40)))
        # of several prompts, the error names the one that outgrew the context, by its index
        with pytest.raises(ContextFullError, match=r"^prompts\[1\] \(of 2\): the sequence reached the context size \(16"):
            e.generate_batch([TOKENS[:2], TOKENS[:14]], SamplingParams(temperature=0, max_tokens=40))


@pytest.mark.parametrize("arch", ["llama-rope_freqs-tied"])
def test_quantized_weights_match_reference(tmp_path, arch, monkeypatch):
    """Weights kept as GGUF blocks (the CUDA default), run here by Triton's interpreter: the
    fused decode kernels, the prompt path's scratch, the quantized tied head and embedding, and
    decode attention read from the KV cache in place, for one sequence and for two at different
    positions in one step."""
    pytest.importorskip("triton")
    from layerstream.compute import attn_kernels

    calls = []
    decode = attn_kernels.decode_attention
    monkeypatch.setattr(attn_kernels, "decode_attention", lambda q, *a, **kw: calls.append(q.shape[0]) or decode(q, *a, **kw))
    path = _write(tmp_path, arch, "mixed", n_layer=2)
    ref = reference.reference_logits(path, TOKENS)
    with _load(path, weights="quantized", max_seqs=2) as e:
        assert any(type(w).__name__ == "QuantWeight" for w in e.backend.runner.source.weights[0].values())
        _assert_close(e.logits(TOKENS), ref, f"{arch} quantized, whole sequence (prompt path)")
        assert not calls  # prompts take scaled_dot_product_attention
        s = _Seq(e)
        steps = [_feed(e, [s], [[t]], "last")[0] for t in TOKENS[:4]]
        _assert_close(torch.stack(steps), ref[:4], f"{arch} quantized, token by token (fused kernels)")
        assert calls == [1] * 2 * 4  # 2 layers, 4 steps
        s2 = _Seq(e)  # joins at position 0 while s goes on at 4
        both = [_feed(e, [s, s2], [[TOKENS[4 + j]], [TOKENS[j]]], "last") for j in range(2)]
        _assert_close(torch.cat(both), ref[[4, 0, 5, 1]], f"{arch} quantized, two sequences at different positions")
        assert calls[-4:] == [2] * 4


def test_quantized_experts_match_reference(tmp_path, monkeypatch):
    """Experts kept as blocks: each expert's matrix is a byte range of its 3-D tensor (Triton's
    interpreter here, small Q8_0 model to keep it quick). Steps of up to GROUPED_MAX_TOKENS run
    every chosen expert in grouped launches; larger ones, and these when the limit is lowered,
    one expert at a time."""
    pytest.importorskip("triton")
    from layerstream.compute import moe, qgemv_grouped

    calls = []
    grouped = qgemv_grouped.experts
    monkeypatch.setattr(qgemv_grouped, "experts", lambda *a, **kw: calls.append(a[3].shape[-1]) or grouped(*a, **kw))
    path = _write(tmp_path, "qwen3moe", "Q8_0", n_layer=1)
    ref = reference.reference_logits(path, TOKENS[:12])
    with _load(path, weights="quantized", max_seqs=1) as e:
        assert type(e.backend.runner.source.weights[0]["ffn_up_exps.weight"]).__name__ == "QuantWeight"
        _assert_close(e.logits(TOKENS[:12]), ref, "qwen3moe quantized, prompt path (one expert at a time)")
        assert not calls
        _assert_close(e.logits(TOKENS[:8]), ref[:8], "qwen3moe quantized, 8 tokens (grouped)")
        assert calls == [8 * 2]  # the 8 tokens' 2 choices each: gate and up in one launch, then down
        s = _Seq(e)
        steps = [_feed(e, [s], [[t]], "last")[0] for t in TOKENS[:2]]
        monkeypatch.setattr(moe, "GROUPED_MAX_TOKENS", 0)
        steps += [_feed(e, [s], [[t]], "last")[0] for t in TOKENS[2:4]]
        _assert_close(torch.stack(steps), ref[:4], "qwen3moe quantized, decode grouped then one by one")
        assert len(calls) == 1 + 2


def test_attention_in_groups_matches_reference(tmp_path, monkeypatch):
    """Attention split into groups of sequences and of query rows (bounded temporaries) computes
    the same logits, prompt and batched decode alike."""
    from layerstream.compute import model

    path = _write(tmp_path, "qwen2", "Q8_0", n_layer=2)
    ref = reference.reference_logits(path, TOKENS)
    with _load(path, max_seqs=3) as e:
        monkeypatch.setattr(model, "ATTN_TEMP_BYTES", 3000)  # a few query rows, one sequence a group
        _assert_close(e.logits(TOKENS), ref, "query rows in groups")
        a, b, c = _Seq(e), _Seq(e), _Seq(e)
        got = _feed(e, [a, b, c], [TOKENS[:5], TOKENS[:3], TOKENS[:7]], "last")
        for row, n in zip(got, (5, 3, 7)):
            _assert_close(row[None], reference.reference_logits(path, TOKENS[:n])[-1:], f"{n} tokens in a batch")


def test_gemma3_defaults_to_bfloat16_where_the_default_is_float16(tmp_path):
    """Gemma 3's activations exceed float16's range (the real 270M's logits are NaN in float16):
    CUDA's float16 default becomes bfloat16 for it, and an explicit float16 is refused in one line."""
    from layerstream.compute.device import resolve_dtype
    from layerstream.errors import ConfigError

    cuda = torch.device("cuda")
    assert resolve_dtype(None, cuda, "gemma3") == torch.bfloat16
    assert resolve_dtype(None, cuda, "llama") == torch.float16
    assert resolve_dtype(None, torch.device("cpu"), "gemma3") == resolve_dtype(None, torch.device("cpu"), "llama")
    path = _write(tmp_path, "gemma3", "Q8_0")
    with pytest.raises(ConfigError, match=r"^dtype=float16: gemma3's activations exceed float16's range .* "
                                          r"use bfloat16 \(its default\) or float32$"):
        _load(path, dtype="float16")


def test_the_cpus_default_dtype_is_float32_where_the_native_kernel_reads_the_blocks(monkeypatch):
    """Blocks read by the native kernel: float32 activations cost no weight bytes, and keep the
    residual stream exact (bfloat16's sent SmolLM2's greedy replies astray); dequantized weights
    keep bfloat16 where the CPU has bf16 instructions, for half the bytes a token reads."""
    from layerstream.compute import device as dev
    from layerstream.compute.cpu import native

    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "_cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(native, "available", lambda: True)
    assert dev.resolve_dtype(None, cpu, "llama") == torch.float32
    assert dev.resolve_dtype(None, cpu, "llama", "dense") == torch.bfloat16
    assert dev.resolve_dtype("bfloat16", cpu, "llama") == torch.bfloat16
    monkeypatch.setattr(native, "available", lambda: False)  # no C compiler: weights dequantized
    assert dev.resolve_dtype(None, cpu, "llama") == torch.bfloat16
    monkeypatch.setattr(dev, "_cpu_has_fast_bf16", lambda: False)
    assert dev.resolve_dtype(None, cpu, "llama", "dense") == torch.float32
