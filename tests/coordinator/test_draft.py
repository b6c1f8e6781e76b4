"""A draft model (draft.py, NOTE [ draft model ]): greedy text equal to decoding without it, the
target as its own draft accepting its proposals, and a draft of another vocabulary refused."""

from __future__ import annotations

import pytest

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.errors import ConfigError
from verify_paths import verify_path

G = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def test_smollm_as_its_own_draft_accepts_its_proposals_and_gives_the_same_text(smollm_path, smollm_engine):
    prompts = ["The capital of France is", "def add(a, b):\n    return"]
    want = smollm_engine.generate_batch(prompts, G)
    with Engine.load(smollm_path, device="cpu", dtype="float32", ctx=512, max_seqs=2, draft_model=smollm_path,
                     draft_tokens=4) as e:
        assert e.generate_batch(prompts, G) == want
        s = e.core.spec
        assert s.drafted > 40 and s.accepted == s.drafted  # the same model: every proposal is its argmax
        assert s.tokens > 3 * s.passes  # 4 drafts and the next token a pass, but for the ends
        paths, took = e.backend.runner.verify_paths, verify_path(e.backend.runner)  # every pass one way
        assert paths[took] > 0 and sum(paths.values()) == paths[took], paths
        assert sorted(e.draft.free_rows) == [0, 1]  # each request gave its draft row back


@pytest.mark.parametrize("ring", [dict(ctx=64), dict(ctx=24, on_context_full="slide", sink_tokens=4)],
                         ids=["error", "slide"])
def test_another_model_with_the_same_vocabulary_drafts_and_the_text_stays(tmp_path, ring):
    target = ggufgen.write_model(tmp_path / "t.gguf", qtype="Q8_0", seed=1)
    draft = ggufgen.write_model(tmp_path / "d.gguf", qtype="Q8_0", seed=2, n_layer=1)
    prompts = [[5, 77, 200, 13, 77, 200, 42], [9, 31, 8]]
    sampled = SamplingParams(temperature=0.9, seed=4, max_tokens=30, ignore_eos=True)
    with Engine.load(str(target), device="cpu", dtype="float32", max_seqs=2, **ring) as e:
        want = e.generate_batch(prompts, G)
    with Engine.load(str(target), device="cpu", dtype="float32", max_seqs=2, draft_model=str(draft), **ring) as e:
        assert e.generate_batch(prompts, G) == want
        assert e.core.spec.drafted > 0 and e.core.spec.accepted < e.core.spec.drafted
        paths, took = e.backend.runner.verify_paths, verify_path(e.backend.runner)
        assert paths[took] > 0 and sum(paths.values()) == paths[took], paths
        first = e.generate_batch(prompts, sampled)
        assert e.generate_batch(prompts, sampled) == first  # seeded: the same text again


def test_a_draft_of_another_vocabulary_is_refused_naming_both_files(tmp_path):
    target = ggufgen.write_model(tmp_path / "t.gguf", qtype="Q8_0")
    other = ggufgen.write_model(tmp_path / "other.gguf", qtype="Q8_0", n_vocab=300)
    with pytest.raises(ConfigError) as e:
        Engine.load(str(target), device="cpu", dtype="float32", draft_model=str(other))
    msg = str(e.value)
    assert "\n" not in msg and "other.gguf" in msg and "t.gguf" in msg and "vocabulary" in msg
