"""The single-process engine on SmolLM2-135M-Instruct (Q4_1): against transformers, and its generation API."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine

GREEDY = SamplingParams(temperature=0, max_tokens=24)

PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city "
    "to the fall of Constantinople in 1453. Historians usually divide its long story into several",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nfor i in range(10):\n    print(",
    "Photosynthesis is the process by which green plants and algae use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. The light-dependent reactions take place in the",
    "Dear team, thank you all for your hard work this quarter! Our revenue grew by 12.5% and we hired "
    "7 new engineers in Paris, Berlin and Tokyo. Next week we will",
]

PARAGRAPH = (
    "The sun rose slowly over the quiet village. Farmers walked to their fields, children ran to school, "
    "and the baker opened his shop to sell fresh bread."
)


def _hf_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def hf_forced(hf_smollm):
    """transformers' logits [T, V] for each prompt, with the token ids it fed."""
    model, tok = hf_smollm
    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = _hf_ids(tok, text)
            out.append((ids, model(torch.tensor([ids])).logits[0].float()))
    return out


def test_tokenizer_matches_transformers(smollm_engine, hf_smollm):
    _, tok = hf_smollm
    for text in PROMPTS + [PARAGRAPH]:
        assert smollm_engine.tokenizer.encode(text, add_special=False) == _hf_ids(tok, text)


def test_teacher_forced_top1_agrees_with_transformers(smollm_engine, hf_forced):
    for ids, ref in hf_forced:
        assert len(ids) >= 32
        got = smollm_engine.logits(ids)
        assert got.shape == ref.shape
        top2 = ref.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        differ = got.argmax(-1) != ref.argmax(-1)
        assert (margin[differ] < 0.1).all(), f"top-1 differs where transformers is sure: {margin[differ]}"
        assert differ.sum() <= 1


def test_logits_close_to_transformers(smollm_engine, hf_forced):
    for ids, ref in hf_forced:
        got = smollm_engine.logits(ids)
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        assert err < 1e-3 * scale, f"max abs diff {err} (logit scale {scale})"  # measured 4.6e-5 at scale 31


def test_chunked_prefill_gives_same_logits(smollm_alone, hf_forced):
    e = smollm_alone
    chunked = Engine(e.index, e.backend, dataclasses.replace(e.cfg, prefill_chunk=5))
    ids = hf_forced[0][0]
    torch.testing.assert_close(chunked.logits(ids), e.logits(ids), atol=1e-4, rtol=1e-4)


def test_greedy_generation_follows_argmax_of_logits(smollm_engine):
    e = smollm_engine
    ids = e.tokenizer.encode("The three primary colours are")
    toks = list(ids)
    for _ in range(6):
        toks.append(int(e.logits(toks)[-1].argmax()))
    out = e.generate_batch([ids], dataclasses.replace(GREEDY, max_tokens=6))[0]
    assert out == e.tokenizer.decode(toks[len(ids):])
    assert e.finish_reasons == ["length"]  # max_tokens respected


def test_batched_generation_equals_alone(smollm_engine):
    e = smollm_engine
    prompts = ["Hi", "Water boils at a temperature of", "List three fruits that are red and explain why each one is"]
    alone = [e.generate_batch([p], GREEDY)[0] for p in prompts]
    batched = e.generate_batch(prompts, GREEDY)
    assert batched == alone
    assert all(alone)


def test_chat_capital_of_france(smollm_engine):
    out = "".join(smollm_engine.generate("What is the capital of France?", SamplingParams(temperature=0, max_tokens=40),
                                         chat=True))
    assert "Paris" in out
    assert smollm_engine.finish_reasons == ["eos"]  # <|im_end|> ends the reply before 40 tokens


def test_seeded_sampling_is_reproducible(smollm_engine):
    e = smollm_engine
    p = lambda seed: SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=16)  # noqa: E731
    a = e.generate_batch(["Once upon a time"], p(7))
    assert e.generate_batch(["Once upon a time"], p(7)) == a
    others = {e.generate_batch(["Once upon a time"], p(s))[0] for s in (8, 9, 10)}
    assert others - {a[0]}, "different seeds all gave the same text"


def test_stop_string_stops(smollm_engine):
    e = smollm_engine
    prompt = "The days of the week are Monday, Tuesday,"
    full = e.generate_batch([prompt], GREEDY)[0]
    assert "day" in full[4:], full
    cut = full.index("day", 4)
    out = e.generate_batch([prompt], dataclasses.replace(GREEDY, stop=("day", "never-seen")))[0]
    assert out == full[:cut]
    assert e.finish_reasons == ["stop"]


def test_perplexity_is_exp_mean_nll(smollm_engine):
    e = smollm_engine
    ppl, n = e.perplexity(PARAGRAPH)
    ids = e.tokenizer.encode(PARAGRAPH)
    assert n == len(ids) - 1  # a window shorter than 64 tokens is scored whole
    lp = torch.log_softmax(e.logits(ids)[:-1].double(), dim=-1)
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert math.isfinite(ppl) and 1 < ppl < 100
    assert ppl == pytest.approx(math.exp(nll), rel=1e-6)
