"""Speculative decoding with prompt lookup in the engine core (NOTE [ speculative decoding ] in
core.py), over fake models whose logits are known: greedy output equal to decoding one token
at a time, rejected drafts rolled back, rings that cannot roll back left undrafted, and the
sampled distribution kept."""

from __future__ import annotations

import pytest
import torch

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.core import EngineCore
from layerstream.coordinator.engine import LocalBackend
from layerstream.coordinator.tokenizer import Tokenizer
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import open_model

V = 256


def fake_logits(token: int, position: int) -> torch.Tensor:
    """[V]: logits of a sequence's own last token and position only."""
    g = torch.Generator().manual_seed(token * 7919 + position)
    return torch.randn(V, generator=g) * 3


class FakeModel:
    """A runner of `logits(token, position)` that records every step's tokens and positions; a -1
    token is its row's last sampled id; `tails` asks for each sequence's last tails[b] rows."""

    device = torch.device("cpu")

    def __init__(self, logits=fake_logits, max_seqs: int = 8):
        self.logits, self.max_seqs = logits, max_seqs
        self.steps: list[list] = []

    def step(self, seqs, want, last_ids=None, tails=None):
        toks = [[int(last_ids[s.row]) if t < 0 else t for t in s.tokens] for s in seqs]
        self.steps.append([(s.row, t, list(s.positions)) for s, t in zip(seqs, toks)])
        if want == "none":
            return None
        tails = tails or [1] * len(seqs)
        return torch.stack([self.logits(t[j], s.positions[j]) for s, t, n in zip(seqs, toks, tails)
                            for j in range(len(t) - n, len(t))])


def cyclic_logits(token: int, position: int) -> torch.Tensor:
    """Logits of the token alone (mod 16): greedy text falls into a cycle that lookup predicts."""
    return fake_logits(token % 16, 0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = ggufgen.write_model(tmp_path_factory.mktemp("spec") / "m.gguf", n_vocab=V)
    return Tokenizer.from_metadata(open_model(path).metadata)


def run(tokenizer, prompts, params, logits=fake_logits, **kw):
    """Every prompt to the end: (per request its outputs, the core, the model)."""
    model = FakeModel(logits)
    adaptive = kw.pop("adaptive", False)  # (the mechanics here: drafts as asked; test_draft_policy.py for the policy)
    c = EngineCore(LocalBackend(model, V), tokenizer, V, **(dict(max_seqs=2, ctx=64, step_tokens=16) | kw))
    c.speculation.adaptive = adaptive
    for i, (p, sp) in enumerate(zip(prompts, params)):
        c.add_request(f"r{i}", p, sp)
    got: dict[str, list] = {}
    while c.has_unfinished():
        for o in c.step():
            got.setdefault(o.request_id, []).append(o)
    return got, c, model


def text(outs) -> tuple[list[int], str, str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason


G = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[3, 5, 7, 9, 3, 5, 11, 2], [17, 4, 4, 17, 4, 8, 17], [40, 41, 42, 43]]


@pytest.mark.parametrize("logits", [fake_logits, cyclic_logits], ids=["position-dependent", "cyclic"])
@pytest.mark.parametrize("lookahead", [True, False])
def test_greedy_output_with_lookup_is_the_output_without(tokenizer, logits, lookahead):
    base, _, _ = run(tokenizer, PROMPTS[:2], [G, G], logits, lookahead=lookahead)
    spec, c, model = run(tokenizer, PROMPTS[:2], [G, G], logits, lookahead=lookahead, lookup=4)
    assert {k: text(v) for k, v in spec.items()} == {k: text(v) for k, v in base.items()}
    assert c.spec.drafted > 0 and max(len(t) for st in model.steps for _, t, _ in st if len(st) == 2) > 1
    if logits is cyclic_logits:  # (the first token of each comes with its prompt) fewer passes than tokens
        assert c.spec.accepted > 0 and c.spec.tokens == 2 * 23 and c.spec.passes < c.spec.tokens
    else:
        assert c.spec.accepted < c.spec.drafted  # drafts rejected and rolled back
    # each row's positions after the prompt run on without a gap or a repeat: the rejected ones
    # were rolled back and written again
    for row in (0, 1):
        fed = [(t, p) for st in model.steps for r, ts, ps in st if r == row for t, p in zip(ts, ps)]
        last = {}
        for t, p in fed:
            last[p] = t
        assert sorted(last) == list(range(len(last)))


def test_a_request_may_turn_lookup_off_and_another_on(tokenizer):
    off = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, lookup=0)
    on = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, lookup=3)
    base, _, _ = run(tokenizer, PROMPTS[:2], [G, G], cyclic_logits)
    got, c, model = run(tokenizer, PROMPTS[:2], [off, on], cyclic_logits, lookup=6)
    assert [text(got[k])[0] for k in ("r0", "r1")] == [text(base[k])[0][:20] for k in ("r0", "r1")]
    for st in model.steps:
        for row, t, pos in st:
            if pos[0] >= len(PROMPTS[0]) and row == 0:
                assert len(t) == 1  # r0 never drafts
            assert len(t) <= 4 or pos[0] == 0
    with pytest.raises(ConfigError, match="lookup=-1"):
        SamplingParams(lookup=-1)
    with pytest.raises(ConfigError, match="--lookup -2"):
        run(tokenizer, [], [], lookup=-2)


def test_drafts_stop_short_of_max_tokens_a_stop_string_and_a_full_context(tokenizer):
    """Drafting never makes a request overrun: the same tokens and finish reason as without."""
    def logits(token, position):  # the cycle, but at position 20 the token "A" (65), a stop string
        x = cyclic_logits(token, position)
        return x + 100 * (torch.arange(V) == 65) if position == 19 else x

    stop = tokenizer.decode([65])
    for sp, kw in ((SamplingParams(temperature=0, max_tokens=11, ignore_eos=True), {}),
                   (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,)), {}),
                   (SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), {"ctx": 21})):
        want, _, _ = run(tokenizer, [PROMPTS[0]], [sp], logits, **kw)
        got, c, _ = run(tokenizer, [PROMPTS[0]], [sp], logits, lookup=5, **kw)
        assert text(got["r0"]) == text(want["r0"]) and c.spec.accepted > 0
        if sp.stop:
            assert text(got["r0"])[2] == "stop" and len(text(got["r0"])[0]) == 20 - len(PROMPTS[0]) + 1
    assert text(got["r0"])[2] == "context_full" and len(text(got["r0"])[0]) == 21 - len(PROMPTS[0]) + 1


def test_a_sliding_ring_drafts_until_it_would_evict_then_decodes_one_token_a_step(tokenizer):
    """NOTE [ rollback ] in kv_ring.py: once appending would evict, no drafts (a rollback could not
    restore the evicted slots); the text is the text without lookup all along."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(ctx=24, on_context_full="slide", sink_tokens=2)
    want, _, _ = run(tokenizer, [PROMPTS[0]], [sp], cyclic_logits, **kw)
    got, c, model = run(tokenizer, [PROMPTS[0]], [sp], cyclic_logits, lookup=4, **kw)
    assert text(got["r0"]) == text(want["r0"]) and c.spec.accepted > 0
    slots = 0
    for st in model.steps:
        (_, t, _), = st
        if slots + len(t) > 24:
            assert len(t) == 1  # no draft once the ring is full
        slots += len(t)


def test_seeded_sampling_with_lookup_repeats_and_keeps_the_targets_distribution(tokenizer):
    """The token after a drafted position, over many seeds, follows the target's distribution
    (chi-square); the draft is the prompt's continuation of that token."""
    peak = torch.full((V,), -30.0)
    peak[9] = 30.0  # after 7 always 9
    mid = torch.full((V,), -30.0)
    mid[:8] = torch.tensor([1.2, 2.0, 0.4, 1.5, -0.3, 0.9, -1.0, 0.1])  # after 9: p(3) about 0.2

    def logits(token, position):
        return peak if token == 7 else mid if token == 9 else fake_logits(token, position)

    P = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3, ignore_eos=True)
    counts = torch.zeros(8, dtype=torch.float64)
    n = 1500
    for seed in range(n):
        got, c, _ = run(tokenizer, [[9, 3, 5, 7]], [SamplingParams(seed=seed, **P)], logits, lookup=3)
        ids = text(got["r0"])[0]
        assert ids[0] == 9 and c.spec.drafted == 1  # 3, which followed 9 in the prompt (max_tokens leaves room for one)
        counts[ids[1]] += 1
    p = torch.softmax(mid[:8].double(), -1)
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    pvalue = float(torch.special.gammaincc(torch.tensor(3.5, dtype=torch.float64), torch.tensor(stat / 2)))  # 7 dof
    assert pvalue > 1e-4, counts / n
    again, _, _ = run(tokenizer, [[9, 3, 5, 7]], [SamplingParams(seed=5, **(P | {"max_tokens": 12}))], logits, lookup=3)
    twice, _, _ = run(tokenizer, [[9, 3, 5, 7]], [SamplingParams(seed=5, **(P | {"max_tokens": 12}))], logits, lookup=3)
    assert text(again["r0"]) == text(twice["r0"])
