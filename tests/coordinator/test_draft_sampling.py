"""Seeded sampling with a draft model keeps the target's distribution (sampling.py, NOTE [
speculative sampling ]): over many seeds, the first token a verification gives, with the one
sampled from the prompt before it, follows the target's own distribution (a chi-square test of
the pair against the target's logits, scored without drafts)."""

from __future__ import annotations

import torch

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine

PROMPT = [5, 77, 200, 13]
K = 4  # top-k: the target's likely tokens keep probabilities near 0.5, so both outcomes of a verification are common
SEEDS = 300  # enough that always taking the draft, or redrawing a rejected draft from p itself, fails (see below)


def top_k(logits: torch.Tensor) -> torch.Tensor:
    """[V] probabilities at temperature 1 over the K largest logits (the sampler's top-k)."""
    v, i = logits.double().topk(K)
    return torch.zeros(logits.shape[-1], dtype=torch.float64).scatter(0, i, torch.softmax(v, -1))


def pvalue(counts: dict, expected: dict) -> float:
    """Pearson's chi-square p-value of observed pair counts against expected ones; cells expected
    under 5 times are pooled into one."""
    seen, want, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, e in expected.items():
        if e >= 5:
            seen.append(counts.get(cell, 0)), want.append(e)
        else:
            pool_o, pool_e = pool_o + counts.get(cell, 0), pool_e + e
    if pool_e > 0:
        seen.append(pool_o), want.append(pool_e)
    obs, exp = torch.tensor(seen, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2, dtype=torch.float64), stat / 2))


def test_seeded_sampling_with_a_draft_model_keeps_the_targets_distribution(tmp_path):
    target = ggufgen.write_model(tmp_path / "t.gguf", qtype="Q8_0", seed=1)
    # the target's weights, coarser: its greedy drafts are often, not always, the target's likely tokens
    draft = ggufgen.write_model(tmp_path / "d.gguf", qtype="Q4_0", seed=1)
    params = dict(temperature=1.0, top_k=K, top_p=1.0, min_p=0.0, max_tokens=3, ignore_eos=True)
    with Engine.load(str(target), device="cpu", dtype="float32", ctx=64, max_seqs=32, draft_model=str(draft),
                     draft_tokens=2) as e:
        for seed in range(SEEDS):  # max_tokens 3: one draft after the prompt's token
            e.core.add_request(f"s{seed}", PROMPT, SamplingParams(seed=seed, **params))
        ids: dict[str, list[int]] = {}
        for o in e.core.run_to_completion():
            ids.setdefault(o.request_id, []).extend(o.token_ids)
        s = e.core.spec
        assert s.drafted == SEEDS and 0.2 * SEEDS < s.accepted < 0.8 * SEEDS  # drafts taken and drafts redrawn
        again = e.generate_batch([PROMPT], SamplingParams(seed=7, **params))[0]
        assert again == e.tokenizer.decode(ids["s7"])  # seeded: the same tokens again
    pairs = [tuple(ids[f"s{seed}"][:2]) for seed in range(SEEDS)]
    with Engine.load(str(target), device="cpu", dtype="float32", ctx=64) as ref, \
            Engine.load(str(draft), device="cpu", dtype="float32", ctx=64) as d:
        p0 = top_k(ref.logits(PROMPT)[-1])
        firsts = p0.nonzero().flatten().tolist()
        expected = {}
        for a in firsts:
            p1 = top_k(ref.logits(PROMPT + [a])[-1])
            for b in p1.nonzero().flatten().tolist():
                expected[a, b] = SEEDS * float(p0[a] * p1[b])
        greedy_draft = {a: int(d.logits(PROMPT + [a])[-1].argmax()) for a in firsts}
    counts: dict[tuple[int, int], int] = {}
    for pair in pairs:
        assert pair in expected, pair  # within the target's top-k at both positions
        counts[pair] = counts.get(pair, 0) + 1
    assert pvalue(counts, expected) > 1e-3, counts
    # the test's power: had every draft been taken, the same first tokens would fail it
    taken: dict[tuple[int, int], int] = {}
    for a, _ in pairs:
        taken[a, greedy_draft[a]] = taken.get((a, greedy_draft[a]), 0) + 1
    assert pvalue(taken, expected) < 1e-6
