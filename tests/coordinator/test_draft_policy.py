"""The draft policy (draft_policy.py, NOTE [ draft policy ]): a sequence whose drafts are rejected
stops drafting and lets the next step ride ahead, probes again later, resumes where prompt lookup
matches; one whose drafts are taken drafts as far as it may. The text stays the text without drafts."""

from __future__ import annotations

import random

import pytest

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator import draft_policy as dp
from layerstream.coordinator.draft_policy import DraftPolicy, expected_tokens
from layerstream.coordinator.engine import LocalBackend
from layerstream.coordinator.lookup import PromptLookup
from layerstream.coordinator.speculation import RequestDrafts
from tests.coordinator.test_speculate import PROMPTS, cyclic_logits, run, text, tokenizer  # noqa: F401 - a fixture


@pytest.mark.parametrize("a", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_expected_tokens_a_pass_is_the_mean_of_a_simulated_verification(a):
    rng, k, n = random.Random(0), 6, 20000
    taken = 0
    for _ in range(n):
        j = 0
        while j < k and rng.random() < a:  # each draft taken with probability a, in order
            j += 1
        taken += j + 1  # and the target's own token after them
    assert expected_tokens(a, k) == pytest.approx(taken / n, abs=0.05)


def test_a_poor_acceptance_pauses_drafting_probes_later_and_backs_off():
    p = DraftPolicy(4)
    assert p.length() == 4  # no history: the most
    p.record(4, 0)
    assert p.length() == 1 and not p.wait  # (one verification: no pause yet)
    p.record(4, 1)  # 1 of 8: even 4 drafts would give 1.14 tokens a pass
    assert p.wait == dp.PAUSE and p.length() == 0 and p.pauses == 1
    p.tick(dp.PAUSE - 1)
    assert p.length() == 0
    p.tick()
    assert p.length() == 4  # the pause is over: a probe of the most, the history afresh
    p.record(4, 0)
    p.record(4, 0)
    assert p.wait == 2 * dp.PAUSE  # the probe failed: a longer pause
    p.tick(2 * dp.PAUSE)
    p.record(4, 4)
    p.record(4, 3)  # 7 of 8: it pays; the next pause would be the first length again
    assert not p.wait and p.pause == dp.PAUSE and p.length() == 4


@pytest.mark.parametrize("a,want", [(1.0, 16), (0.9, 16), (0.75, 10), (0.5, 4), (0.35, 2)])
def test_the_length_is_the_least_whose_next_draft_adds_under_a_twentieth(a, want):
    p = DraftPolicy(16)
    p.recent.extend([(100, round(100 * a))])
    assert p.length() == want
    k = p.length()
    assert k == 16 or (a ** (k + 1) <= dp.TAIL < a ** k)  # the rule itself, where most does not cap it


def test_a_proposal_of_nothing_counts_as_a_rejected_draft():
    p = DraftPolicy(4)
    p.missed()
    p.missed()
    assert p.wait == dp.PAUSE


def test_a_paused_lookup_resumes_when_the_text_starts_to_copy():
    d = RequestDrafts(PromptLookup([1, 2, 3, 4, 5, 6]), 4)
    d.policy.record(4, 0)
    d.policy.record(4, 0)
    assert d.policy.wait
    d.extend([9, 8])  # lookup would have drafted neither
    assert d.policy.wait == dp.PAUSE - 2
    d.extend([1, 2])  # after 8 comes 1: nothing to draft; after 1, lookup drafts 2, which came
    assert d.policy.wait == 0 and d.policy.length() == 4


def test_rejected_drafts_pause_and_the_steps_ride_ahead_again_with_the_same_text(tokenizer):  # noqa: F811
    """The position-dependent fake model: lookup's drafts are nearly all rejected."""
    G = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    base, _, _ = run(tokenizer, PROMPTS[:1], [G], ctx=96)
    ahead = []  # per step submitted: whether it carries a token the step before samples (-1)
    submit = LocalBackend.submit

    def spy(self, seqs, *a, **kw):
        ahead.append(any(t < 0 for s in seqs for t in s.tokens))
        return submit(self, seqs, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LocalBackend, "submit", spy)
        spec, c, model = run(tokenizer, PROMPTS[:1], [G], ctx=96, lookup=4, adaptive=True)
    assert {k: text(v) for k, v in spec.items()} == {k: text(v) for k, v in base.items()}
    assert c.spec.drafted <= 20 and c.spec.passes == 59  # drafting paused after two offers of nothing or rejections
    assert sum(ahead) > 30  # paused, its steps ride one ahead again (core.py NOTE [ one step behind ])


def test_accepted_drafts_never_pause(tokenizer):  # noqa: F811
    G = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec, c, _ = run(tokenizer, PROMPTS[:1], [G], cyclic_logits, ctx=96, lookup=4, adaptive=True)
    assert c.spec.accepted == c.spec.drafted > 0 and c.spec.passes < c.spec.tokens / 2


def test_the_python_api_turns_the_policy_off_for_the_requests_after(tmp_path):
    """`engine.core.speculation.adaptive = False`: each pass drafts as many as the request may, even
    where a poor draft model (another model of the vocabulary) has nearly every draft rejected;
    with the policy on, drafting pauses. The text is the same either way."""
    import ggufgen
    from layerstream.coordinator.engine import Engine

    target = ggufgen.write_model(tmp_path / "t.gguf", qtype="Q8_0", seed=1)
    draft = ggufgen.write_model(tmp_path / "d.gguf", qtype="Q8_0", seed=2, n_layer=1)
    G = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with Engine.load(str(target), device="cpu", dtype="float32", ctx=96, draft_model=str(draft), draft_tokens=4) as e:
        assert e.core.speculation.adaptive  # the default
        want = e.generate_batch([[5, 77, 200, 13]], G)
        on = e.core.spec.since(type(e.core.spec)())
        e.core.speculation.adaptive = False
        assert e.generate_batch([[5, 77, 200, 13]], G) == want
        off = e.core.spec.since(on)
    assert on.accepted < on.drafted / 4 and off.accepted < off.drafted / 4  # (a poor draft)
    # fixed: 4 drafts a pass but where max_tokens leaves room for fewer (its last 4 passes: 3, 2, 1, 0)
    assert off.drafted >= 4 * (off.passes - 3) and off.passes == off.tokens - off.accepted
    assert on.drafted < off.drafted / 3  # adaptive: paused after two poor verifications, probing later


def test_the_fixed_policy_of_the_engine_config_drafts_every_pass_and_a_bad_one_is_refused(tmp_path):
    """EngineConfig.draft_policy (the CLI's and the server's --draft-policy): "fixed" drafts as many as
    the request may every pass, however poor the drafts; a name other than adaptive or fixed is one line."""
    import ggufgen
    from layerstream.coordinator.engine import Engine
    from layerstream.errors import ConfigError

    target = ggufgen.write_model(tmp_path / "t.gguf", qtype="Q8_0", seed=1)
    draft = ggufgen.write_model(tmp_path / "d.gguf", qtype="Q8_0", seed=2, n_layer=1)
    G = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with Engine.load(str(target), device="cpu", dtype="float32", ctx=96, draft_model=str(draft), draft_tokens=4,
                     draft_policy="fixed") as e:
        assert not e.core.speculation.adaptive
        e.generate_batch([[5, 77, 200, 13]], G)
        s = e.core.spec
    assert s.accepted < s.drafted / 4  # (a poor draft: the adaptive policy would pause)
    assert s.drafted >= 4 * (s.passes - 3) and s.passes == s.tokens - s.accepted
    with pytest.raises(ConfigError, match="^draft_policy='sometimes': give adaptive or fixed$"):
        Engine.load(str(target), device="cpu", draft_policy="sometimes")
