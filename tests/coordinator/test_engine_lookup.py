"""Prompt lookup through the single-process engine on the CPU: greedy text with lookup equal to
the text without, on the real SmolLM2 and on tiny synthetic models (a sliding ring included)."""

from __future__ import annotations

import dataclasses

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.coordinator.turn import Turn
from verify_paths import verify_path

EDIT = ("Rewrite the sentence with 'quick' replaced by 'slow'.\nSentence: The quick brown fox jumps over the lazy "
        "dog near the quick river bank.\nRewritten: The slow brown fox jumps over the")
CODE = ("def area(width, height):\n    return width * height\n\n\ndef volume(width, height, depth):\n"
        "    return width * height * depth\n\n\ndef perimeter(width, height):\n    return")
SUMMARY = ("Text: The museum opens at nine in the morning and closes at six in the evening. Tickets cost "
           "twelve euros for adults and six euros for children.\nSummary: The museum opens at nine")


def greedy(n: int, lookup: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, lookup=lookup)


def test_smollm_greedy_text_with_lookup_is_the_text_without(smollm_engine):
    e = smollm_engine
    prompts = [EDIT, CODE, SUMMARY]
    want = e.generate_batch(prompts, greedy(40, 0))
    before = dataclasses.replace(e.core.spec)
    got = e.generate_batch(prompts, greedy(40, 5))
    spec = e.core.spec.since(before)
    assert got == want
    assert spec.accepted > 0 and spec.tokens > spec.passes  # drafts were taken: fewer passes than tokens
    assert spec.accepted < spec.drafted  # and some were rejected and rolled back
    paths = e.backend.runner.verify_paths
    before = paths.copy()
    one = [e.generate_batch([p], greedy(40, 5))[0] for p in prompts]  # one at a time (batch 1)
    assert one == want
    # batch 1 verified every chunk one way: as decode rows where the runner takes them (runner.py,
    # NOTE [ drafts verified as decode rows ]), else as chunks
    took = verify_path(e.backend.runner)
    other = "chunks" if took == "rows" else "rows"
    assert paths[took] > before[took] and paths[other] == before[other], (before, paths)


def test_a_turn_reports_the_lookup_rates(smollm_engine):
    t = Turn(smollm_engine, smollm_engine.encode(CODE), greedy(30, 4))
    text = "".join(t.pieces())
    assert text and t.rates.sampled == 30
    line = t.rates.line()
    assert "drafts:" in line and "drafted tokens accepted" in line and "tokens a pass" in line, line
    assert t.rates.lookup.tokens == 29  # (the first token comes with the prompt's pass)


@pytest.mark.parametrize("ring", [dict(ctx=64), dict(ctx=16, on_context_full="slide", sink_tokens=4)],
                         ids=["error", "slide"])
def test_synthetic_greedy_text_with_lookup_is_the_text_without(tmp_path, ring):
    path = ggufgen.write_model(tmp_path / "m.gguf", qtype="Q8_0")
    prompts = [[5, 77, 200, 13, 77, 200, 42, 5, 77], [9, 9, 31, 9, 9, 31, 9]]
    with Engine.load(str(path), device="cpu", dtype="float32", max_seqs=2, lookup=4, **ring) as e:
        # the draft policy off: random weights continue no n-gram, so it would pause drafting before
        # the 16-slot ring slides (NOTE [ draft policy ]); this checks the rollback, not the policy
        e.core.speculation.adaptive = False
        got = e.generate_batch(prompts, greedy(30))  # the engine's default: 4 drafts a step
        drafted = e.core.spec.drafted
        # every verifying step ran as decode rows, none as a prompt-like chunk (runner.py, NOTE
        # [ drafts verified as decode rows ])
        paths, took = e.backend.runner.verify_paths, verify_path(e.backend.runner)
        assert paths[took] > 0 and sum(paths.values()) == paths[took], paths
        off = e.generate_batch(prompts, greedy(30, 0))  # a request turns it off
        assert e.core.spec.drafted == drafted > 0
    penalized = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repeat_penalty=1.3, repeat_last_n=8)
    with Engine.load(str(path), device="cpu", dtype="float32", max_seqs=2, lookup=4, **ring) as e:
        e.core.speculation.adaptive = False
        with_penalty = e.generate_batch(prompts, penalized)  # the penalty's window along the drafts
        assert e.core.spec.drafted > 0 or "slide" in ring.values()  # (16 slots fill before a match)
    with Engine.load(str(path), device="cpu", dtype="float32", max_seqs=2, **ring) as e:
        assert e.generate_batch(prompts, greedy(30)) == got == off
        assert e.generate_batch(prompts, penalized) == with_penalty


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_lookup_text_is_the_models_greedy_text_but_for_near_ties(smollm_path, dtype):
    """On CUDA a verified chunk runs other kernels than a one-token step (GGUF blocks, fused GEMV
    or dequantized matmuls), so the text with lookup is checked against the model's own logits,
    teacher forced: every token is their argmax, but where the top two are within rounding."""
    import torch

    with Engine.load(smollm_path, device="cuda", dtype=dtype, ctx=512, lookup=4) as e:
        for text in (EDIT, CODE):
            ids = e.encode(text)
            e.core.add_request("r", ids, greedy(40))
            got = [t for o in e.core.run_to_completion() for t in o.token_ids]
            logits = e.logits(ids + got)[len(ids) - 1 : -1]  # [40, V]: the logits each token follows
            top = logits.topk(2, dim=-1)
            tie = (top.values[:, 0] - top.values[:, 1]) < (1e-3 if dtype == "float32" else 0.1)
            assert bool(((top.indices[:, 0] == torch.tensor(got)) | tie).all())
        assert e.core.spec.accepted > 0
