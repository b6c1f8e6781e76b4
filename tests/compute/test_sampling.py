"""Sampler: greedy, top-k, top-p, min-p, repetition penalty, seeding, softmax frequencies."""

import math
import re

import pytest
import torch

from layerstream.compute.sampling import Sampler, SamplingParams, seeded
from layerstream.errors import ConfigError, ModelError

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)  # no truncation


def support(sampler: Sampler, logits: torch.Tensor, n: int = 2000) -> set[int]:
    """Every token drawn in n draws (one batch of n identical rows)."""
    rows = logits.expand(n, -1).contiguous()
    return set(sampler.sample(rows, [[] for _ in range(n)]).tolist())


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    s = Sampler(SamplingParams(temperature=0.0), 100)
    assert torch.equal(s.sample(logits, [[]] * 8), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(16, 50)
    s = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=3), 50)
    for _ in range(5):
        assert torch.equal(s.sample(logits, [[]] * 16), logits.argmax(-1))


def test_output_shape_and_dtype_half_logits():
    s = Sampler(SamplingParams(seed=0), 32)
    out = s.sample(torch.randn(3, 32, dtype=torch.float16), [[1, 2], [], [5]])
    assert out.shape == (3,) and out.dtype == torch.long
    assert ((out >= 0) & (out < 32)).all()


def test_top_p_keeps_smallest_set_reaching_p():
    # probabilities 0.4, 0.3, 0.2, 0.1: p=0.65 needs the first two (0.4 < 0.65 <= 0.7)
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.65, min_p=0.0, seed=0), 4)
    assert support(s, logits) == {1, 3}
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7 + 1e-3, min_p=0.0, seed=0), 4)
    assert support(s, logits) == {1, 3, 2}
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.3, min_p=0.0, seed=0), 4)
    assert support(s, logits) == {1}


def test_top_p_applies_after_top_k():
    # top_k=2 leaves 0.4, 0.3 -> renormalised 0.571, 0.429: p=0.5 keeps only the first
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=0.5, min_p=0.0, seed=0), 4)
    assert support(s, logits) == {1}


def test_min_p_removes_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0), 5)
    assert support(s, torch.log(probs)) == {0, 1, 2}  # >= 0.1
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.7, seed=0), 5)
    assert support(s, torch.log(probs)) == {0}


def test_temperature_does_not_change_truncation():
    # llama.cpp order: truncation on the untempered distribution, then temperature
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]]))
    s = Sampler(SamplingParams(temperature=50.0, top_k=0, top_p=1.0, min_p=0.2, seed=0), 5)
    assert support(s, logits) == {0, 1, 2}


def test_repeat_penalty_changes_argmax():
    logits = torch.tensor([[3.0, 2.5, 1.0, -1.0, -1.2]])
    greedy = dict(temperature=0.0, repeat_penalty=1.5)
    s = Sampler(SamplingParams(**greedy), 5)
    assert s.sample(logits, [[]]).item() == 0
    assert s.sample(logits, [[0]]).item() == 1  # 3.0 / 1.5 = 2.0 < 2.5
    assert s.sample(logits, [[0, 0, 0, 1]]).item() == 0  # once per distinct token: 2.0 vs 1.67
    # negative logits are multiplied: -1.0 * 1.5 = -1.5 < -1.2
    neg = torch.tensor([[-1.0, -1.2]])
    assert s.sample(neg, [[0]]).item() == 1
    # only the last repeat_last_n tokens count
    s = Sampler(SamplingParams(repeat_last_n=2, **greedy), 5)
    assert s.sample(logits, [[0, 3, 4]]).item() == 0
    assert s.sample(logits, [[3, 0, 4]]).item() == 1


def test_repeat_penalty_is_per_row():
    logits = torch.tensor([[3.0, 2.5, 1.0]] * 2)
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5), 3)
    assert s.sample(logits, [[0], []]).tolist() == [1, 0]


def run(seed, steps=30, B=4, V=64):
    torch.manual_seed(123)  # same logits for every run
    logits = [torch.randn(B, V) for _ in range(steps)]
    s = Sampler(SamplingParams(temperature=1.0, **OFF, seed=seed), V)
    return [s.sample(x, [[]] * B).tolist() for x in logits]


def test_same_seed_same_sequence_different_seed_differs():
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_seeds_that_share_their_low_32_bits_sample_apart_on_the_cpu():
    # torch's CPU generator keeps a seed's low 32 bits: -2, 2^32 - 2 and 2^64 - 2 would draw alike
    runs = [run(s) for s in (-2, (1 << 32) - 2, (1 << 63) + (1 << 32) - 2)]
    assert runs[0] != runs[1] != runs[2] != runs[0]
    assert run(-2) == run((1 << 64) - 2) == runs[0]  # (a negative seed wraps as the generator takes it)
    for seed in (0, 5, (1 << 32) - 1):  # below 2^32, torch's own stream, as before
        assert torch.equal(torch.rand(8, generator=seeded(torch.device("cpu"), seed)),
                           torch.rand(8, generator=torch.Generator().manual_seed(seed)))


def test_no_seed_draws_fresh_seeds():
    assert Sampler(SamplingParams(), 8).seed != Sampler(SamplingParams(), 8).seed


def test_temperature_1_matches_softmax_frequencies():
    V, n = 6, 6000
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3, -2.0]])
    s = Sampler(SamplingParams(temperature=1.0, **OFF, seed=11), V)
    draws = s.sample(logits.expand(n, V).contiguous(), [[]] * n)
    freq = torch.bincount(draws, minlength=V).double() / n
    p = torch.softmax(logits[0].double(), -1)
    tol = 4.5 * torch.sqrt(p * (1 - p) / n)  # 4.5 sigma per token
    assert (freq - p).abs().le(tol).all(), (freq, p)


def test_temperature_2_flattens():
    V, n = 4, 6000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = Sampler(SamplingParams(temperature=2.0, **OFF, seed=5), V)
    freq = torch.bincount(s.sample(logits.expand(n, V).contiguous(), [[]] * n), minlength=V).double() / n
    p = torch.softmax(logits[0].double() / 2.0, -1)
    assert (freq - p).abs().le(4.5 * torch.sqrt(p * (1 - p) / n)).all()


def test_tiny_temperature_is_finite():
    logits = torch.tensor([[10.0, 9.0, -5.0]] * 4)
    s = Sampler(SamplingParams(temperature=1e-30, **OFF, seed=0), 3)
    assert s.sample(logits, [[]] * 4).tolist() == [0] * 4


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1.0), dict(top_p=1.5), dict(min_p=-0.1), dict(repeat_penalty=0.0), dict(max_tokens=-1)]
)
def test_bad_params_raise(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


def test_params_frozen_and_stop_tuple():
    p = SamplingParams(stop=["\n", "</s>"])
    assert p.stop == ("\n", "</s>")
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_rules_and_reproduces():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).cuda()
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.65, min_p=0.0, seed=0), 4)
    assert support(s, logits) == {1, 3}
    x = torch.randn(8, 1000, device="cuda")
    hist = [[1, 2, 3]] * 8
    a = Sampler(SamplingParams(seed=9, repeat_penalty=1.3), 1000).sample(x, hist)
    b = Sampler(SamplingParams(seed=9, repeat_penalty=1.3), 1000).sample(x, hist)
    assert a.device.type == "cpu" and torch.equal(a, b)  # tokens come to the host with the logits' check
    g = Sampler(SamplingParams(temperature=0.0), 1000).sample(x, [[]] * 8)
    assert torch.equal(g, x.argmax(-1).cpu())
    assert math.isfinite(float(x.sum()))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(seed=1),
                                    SamplingParams(seed=1, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.2)])
@pytest.mark.parametrize("bad,what", [(float("nan"), "NaN"), (float("inf"), "infinite"), (None, "no finite")])
def test_non_finite_logits_are_one_line_naming_the_token(params, bad, what):
    """NaN weights gave NUL characters at temperature 0 (argmax of NaN) and a traceback when sampling."""
    logits = torch.randn(3, 50)
    if bad is None:
        logits[1] = float("-inf")
    else:
        logits[1, 7] = bad
    with pytest.raises(ModelError, match=rf"^the model produced {what} logits at token 4: its weights may be corrupt"):
        Sampler(params, 50).sample(logits, [[1], [1, 2, 3, 4], []])
    good = Sampler(params, 50).sample(logits[[0, 2]], [[1], []])
    assert good.device.type == "cpu" and good.dtype == torch.long and good.shape == (2,)
    assert not torch.isfinite(logits[1]).all() and torch.isfinite(logits[[0, 2]]).all()


@pytest.mark.parametrize("t", [1e-46, 5e-324])
def test_a_temperature_that_float32_rounds_to_zero_is_greedy(t):
    """Below float32's smallest normal the division by T was 0 / 0: NaN probabilities, then a
    'NaN logits' error that blamed the weights."""
    logits = torch.tensor([[10.0, 9.0, -5.0]] * 4)
    s = Sampler(SamplingParams(temperature=t, **OFF, seed=0), 3)
    assert s.sample(logits, [[]] * 4).tolist() == [0] * 4


# -- RowSamplers: each KV row's sampler where the logits are, against the host path ---------------

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repeat_penalty=1.4, repeat_last_n=4),
    SamplingParams(seed=11),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0, seed=2**64 - 1, repeat_penalty=1.2),
    SamplingParams(temperature=0.6, top_k=5, top_p=1.0, min_p=0.1, seed=-7, repeat_penalty=0.8, repeat_last_n=-1),
    SamplingParams(temperature=2.0, top_k=1, seed=3),
]


def test_row_samplers_give_the_host_samplers_ids_step_after_step():
    """Every row of a mixed batch, sampled where the logits are with its own generator and its
    penalty window kept there (filled from the prompt's tail, then each sampled id), draws the
    ids the host sampler draws for that row alone over its history, step after step."""
    from layerstream.compute.sampling import RowSamplers, fresh_seed

    V, steps = 40, 25
    g = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(0, V, (3 + 2 * b,), generator=g)] for b in range(len(PARAMS))]
    rows = [5, 0, 3, 1, 4, 2]  # KV rows in another order than the batch's
    dev = RowSamplers(V, torch.device("cpu"))
    host = [Sampler(p, V) for p in PARAMS]
    for b, p in enumerate(PARAMS):
        dev.start(rows[b], p, fresh_seed(p), list(prompts[b]) if p.penalized else [])
    hist = [list(p) for p in prompts]
    for _ in range(steps):
        logits = torch.randn(len(PARAMS), V, generator=g) * 3
        ids, bad = dev.sample(logits, rows)
        want = [int(host[b].sample(logits[b : b + 1], [hist[b]])[0]) for b in range(len(PARAMS))]
        assert ids.tolist() == want and bad.tolist() == [0] * len(PARAMS)
        for b, t in enumerate(want):
            hist[b].append(t)


def test_row_samplers_flag_rows_that_are_not_finite_and_sample_the_rest():
    from layerstream.compute.sampling import INF, NAN, NO_FINITE, RowSamplers

    dev = RowSamplers(6, torch.device("cpu"))
    for r, p in enumerate([SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(temperature=0),
                           SamplingParams(seed=2, repeat_penalty=1.1)]):
        dev.start(r, p, 1, [1, 2])
    x = torch.randn(4, 6)
    x[0, 2], x[1, 3], x[3] = float("nan"), float("inf"), float("-inf")
    ids, bad = dev.sample(x, [0, 1, 2, 3])
    assert bad.tolist() == [NAN, INF, 0, NO_FINITE] and ids[2] == x[2].argmax()
    with pytest.raises(ValueError, match="KV row 9 samples before its request started"):
        dev.sample(x[:1], [9])


def reference_probs(logits: list[float], p: SamplingParams, seen: set[int] = frozenset()) -> list[float]:
    """llama.cpp's chain in float64, written from its definition: penalty on the tokens seen,
    top-k, top-p (the smallest prefix whose mass reaches p), min-p (p >= min_p * p_max), then the
    temperature over what is left."""
    x = [(v / p.repeat_penalty if v > 0 else v * p.repeat_penalty) if i in seen else v for i, v in enumerate(logits)]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if p.top_k > 0:
        order = order[: p.top_k]

    def softmax(ids, t=1.0):
        m = max(x[i] for i in ids)
        e = {i: math.exp((x[i] - m) / t) for i in ids}
        z = sum(e.values())
        return {i: v / z for i, v in e.items()}

    if p.top_p < 1:
        q, kept, mass = softmax(order), [], 0.0
        for i in order:
            kept.append(i)
            mass += q[i]
            if mass >= p.top_p:
                break
        order = kept
    if p.min_p > 0:
        q = softmax(order)
        top = max(q.values())
        order = [i for i in order if q[i] >= p.min_p * top]
    q = softmax(order, p.temperature)
    return [q.get(i, 0.0) for i in range(len(x))]


@pytest.mark.parametrize("params, seen", [
    (SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1), set()),
    (SamplingParams(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0, seed=2), set()),
    (SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=3), set()),
    (SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=4), set()),
    (SamplingParams(temperature=1.8, top_k=6, top_p=0.9, min_p=0.05, seed=5), set()),
    (SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=6, repeat_penalty=1.6), {0, 3, 5}),
], ids=["temperature", "top-k", "top-p", "min-p", "all-filters", "repetition-penalty"])
def test_each_filter_draws_from_the_float64_reference_distribution(params, seen):
    """The sampler's draws (one shared implementation: draw) follow llama.cpp's distribution
    computed in float64 from its definition: the same support, frequencies within 4.5 sigma."""
    from layerstream.compute.sampling import RowSamplers, draw, penalize

    logits = [2.0, 1.6, 1.1, 0.9, 0.4, -0.3, -1.0, -2.5]
    V, n = len(logits), 8000
    want = torch.tensor(reference_probs(logits, params, seen), dtype=torch.float64)
    x = torch.tensor([logits], dtype=torch.float32).expand(n, V).contiguous()
    if seen:
        mask = torch.zeros(n, V, dtype=torch.bool)
        mask[:, sorted(seen)] = True
        x = penalize(x, mask, params.repeat_penalty)
    ids, _ = draw(x, params, torch.Generator().manual_seed(params.seed))
    freq = torch.bincount(ids, minlength=V).double() / n
    assert set(ids.tolist()) == {i for i in range(V) if want[i] > 0}
    assert (freq - want).abs().le(4.5 * torch.sqrt(want * (1 - want) / n) + 1e-12).all(), (freq, want)
    # a row's own sampler (its penalty from the history it was started with) draws the same way
    dev = RowSamplers(V, torch.device("cpu"))
    dev.start(0, params, params.seed, sorted(seen))
    row = [dev.sample(torch.tensor([logits]), [0])[0].item() for _ in range(400)]
    assert set(row) <= {i for i in range(V) if want[i] > 0}


def test_a_seed_beyond_64_bits_is_refused_with_its_range():
    with pytest.raises(ConfigError, match=r"seed=18446744073709551616: must be in -9223372036854775808\.\.18446744073709551615"):
        SamplingParams(seed=2**64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_row_samplers_and_the_stepper_give_the_host_samplers_ids():
    """On CUDA, each row's generator and penalty window live on the device and draw what the host
    sampler draws over the same CUDA logits (its generator on that device); the stepper's ids come
    back through the pinned buffer once its event completes."""
    from layerstream.compute.sampling import RowSamplers, fresh_seed
    from layerstream.compute.step_meta import SeqStep
    from layerstream.compute.stepper import Stepper
    from layerstream.proto.messages import SamplerStart

    V, dev = 300, torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = list(range(len(PARAMS)))
    samplers = RowSamplers(V, dev)
    host = [Sampler(p, V) for p in PARAMS]
    for b, p in enumerate(PARAMS):
        samplers.start(b, p, fresh_seed(p), [1, 2, 3] if p.penalized else [])
    hist = [[1, 2, 3] for _ in PARAMS]
    for _ in range(10):
        logits = torch.randn(len(PARAMS), V, generator=g, device=dev) * 3
        ids, _ = samplers.sample(logits, rows)
        want = [int(host[b].sample(logits[b : b + 1], [hist[b]])[0]) for b in rows]
        assert ids.tolist() == want
        for b, t in enumerate(want):
            hist[b].append(t)

    table = torch.randn(V, V, generator=g, device=dev)  # logits of the next token: a row of the last one's

    def step(seqs, want, last_ids):
        toks = torch.tensor([s.tokens[-1] for s in seqs], device=dev)
        toks = torch.where(toks < 0, last_ids[torch.tensor([s.row for s in seqs], device=dev)], toks)
        return table[toks]

    st = Stepper(step, V, 4, dev)
    ids, tok = [], 5
    l0 = st.launch([SeqStep(0, [tok], [0], [0], [0])], [True], [SamplerStart(0, 0.0, 40, 0.95, 0.05, 1.0, 64, 1, [])],
                   "none")
    launched = [l0] + [st.launch([SeqStep(0, [-1], [k], [k], list(range(k + 1)))], [True], [], "none")
                       for k in range(1, 6)]
    for lch in launched:
        ids += Stepper.result(lch).ids
    for got in ids:
        tok = int(table[tok].argmax())
        assert got == tok


def old_host_sample(x: torch.Tensor, P: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """The host path's draw as it was before sampling moved where the logits are (torch.multinomial
    over the filtered, tempered candidates): the reference for draw()."""
    V = x.shape[-1]
    vals, idx = torch.topk(x, P.top_k, dim=-1) if 0 < P.top_k < V else torch.sort(x, dim=-1, descending=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[:, 1:] = vals[:, 1:] > float("-inf")
    if P.top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        keep &= torch.cumsum(probs, dim=-1) - probs < P.top_p
    if P.min_p > 0.0:
        keep &= vals >= vals[:, :1] + math.log(P.min_p)
    keep[:, 0] = True
    probs = torch.softmax(torch.where(keep, (vals - vals[:, :1]) / P.temperature, float("-inf")), dim=-1)
    return idx.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)


@pytest.mark.parametrize("params", PARAMS[2:5], ids=["defaults", "top-p", "top-k-min-p"])
def test_the_draw_gives_the_old_host_paths_ids_from_the_same_generator_state(params):
    """draw() takes torch.multinomial's ids (argmax of probs over Exp(1) noise) without its checks'
    two host syncs: the same ids from the same generator, left in the same state, step after step."""
    from layerstream.compute.sampling import draw

    g = torch.Generator().manual_seed(0)
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(40):
        x = torch.randn(3, 64, generator=g) * 2
        assert torch.equal(draw(x, params, a)[0], old_host_sample(x, params, b))
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def chi2_pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's chi-square test of counts [K] against probabilities p [K] (all > 0): its p-value,
    the regularized upper incomplete gamma function of the statistic."""
    n = counts.sum()
    stat = ((counts - n * p) ** 2 / (n * p)).sum()
    df = len(p) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
], ids=["plain", "filtered"])
def test_verifying_a_draft_keeps_the_targets_distribution(params):
    """NOTE [ speculative sampling ]: over many seeds, the first token a verification gives (the
    draft where accepted, else the token drawn in its place) follows the target's distribution
    (float64 reference, chi-square), and so does the token after an accepted draft."""
    from layerstream.compute.sampling import RowSamplers

    l0 = [1.2, 2.0, 0.4, 1.5, -0.3, 0.9, -1.0, 0.1]  # after the chunk's first token
    l1 = [0.2, -0.5, 1.7, 0.3, 1.1, -2.0, 0.8, 1.4]  # after the draft d1
    d1, d2 = 3, 4  # d1: neither the best nor unlikely; d2 the second best of l1
    V, n = len(l0), 3000
    x = torch.tensor([l0, l1, [0.0] * V])
    drafts = torch.tensor([d1, d2])
    first, second = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for seed in range(n):
        rs = RowSamplers(V, torch.device("cpu"))
        rs.start(0, params, seed, [])
        last, k, bad = rs.verify(x, 0, drafts)
        got = drafts[: int(k)].tolist() + last.tolist()
        first[got[0]] += 1
        if got[0] == d1:
            second[got[1]] += 1
        assert int(bad) == 0 and (int(k) == 0 or got[0] == d1)
    for counts, logits in ((first, l0), (second, l1)):
        want = torch.tensor(reference_probs(logits, params, set()), dtype=torch.float64)
        on = want > 0
        assert counts[~on].sum() == 0  # never a token the filters drop
        assert chi2_pvalue(counts[on], want[on]) > 1e-4, (counts / counts.sum(), want)
    assert 0.1 < second.sum() / n < 0.9  # both branches were taken


@pytest.mark.parametrize("last_n", [3, -1, 0], ids=["window", "whole-history", "no-penalty"])
@pytest.mark.parametrize("drafts", [[5, 2, 7], [9, 9, 9], [5, 2, 9]], ids=["all", "none", "two"])
def test_greedy_verification_is_the_step_by_step_argmax_with_the_penalty_on_the_way(last_n, drafts):
    """A greedy chunk verifying drafts gives what sampling one token at a time gives along the
    accepted drafts: the same accepted count, the same next id, and the same penalty state after."""
    from layerstream.compute.sampling import RowSamplers

    V = 12
    P = SamplingParams(temperature=0, repeat_penalty=1.5 if last_n else 1.0, repeat_last_n=last_n)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, V, generator=g)
    x[0, 5] = x[1, 2] = x[2, 7] = 6.0  # the argmax along the drafts [5, 2, 7] before any penalty
    x[1, 5] = x[2, 5] = 5.5  # the runner-up where 5 is not penalized: the penalty decides
    spec, step = RowSamplers(V, "cpu"), RowSamplers(V, "cpu")
    for rs in (spec, step):
        rs.start(0, P, 1, [1, 2, 3])  # 2 is penalized from the start (window of 3: [1, 2, 3])
    last, k, _ = spec.verify(x, 0, torch.tensor(drafts))
    ids = []
    for i in range(4):
        t = int(step.sample(x[i : i + 1], [0])[0][0])
        ids.append(t)
        if i == 3 or t != drafts[i]:
            break
    assert int(k) == len(ids) - 1 and int(last) == ids[-1]
    after = torch.randn(1, V, generator=g)
    after[0, [1, 2, 3, 5, 7]] = 4.0  # the next id tells which of these the penalty still holds
    assert spec.sample(after, [0])[0].tolist() == step.sample(after, [0])[0].tolist()
    if last_n:
        assert torch.equal(spec.rows[0].mask(), step.rows[0].mask())


@pytest.mark.gpu
@pytest.mark.parametrize("last_n", [3, -1, 0])
def test_cuda_verification_gives_the_host_verifications_ids_greedy_and_keeps_drafts_in_the_support(last_n):
    """RowSamplers.verify on CUDA: greedy, the CPU's ids and accepted count (the penalty's window
    along the drafts included); sampling, an accepted draft is in the filters' support."""
    from layerstream.compute.sampling import RowSamplers

    g = torch.Generator().manual_seed(5)
    x, drafts = torch.randn(5, 50, generator=g), torch.tensor([3, 7, 7, 1])
    x[0, 3] = x[1, 7] = 9.0  # the first two drafts are the argmax
    P = SamplingParams(temperature=0, repeat_penalty=1.4 if last_n else 1.0, repeat_last_n=last_n)
    got = []
    for dev in ("cpu", "cuda"):
        rs = RowSamplers(50, dev)
        rs.start(2, P, 1, [3, 4])
        got.append([t.item() for t in rs.verify(x.to(dev), 2, drafts.to(dev))])
    assert got[0] == got[1] and got[0][1] >= 1
    rs = RowSamplers(50, "cuda")
    rs.start(0, SamplingParams(temperature=1.0, top_k=5, seed=3), 3, [])
    for _ in range(50):
        last, k, bad = rs.verify(x.cuda(), 0, drafts.cuda())
        assert int(bad) == 0 and last.item() in x[int(k)].topk(5).indices.tolist()


def test_an_all_greedy_step_gives_the_general_paths_ids_codes_and_rows_next_ids():
    """Stepper's greedy path (argmax and the largest logit to the host, the codes made there)
    gives the ids and not-finite codes of RowSamplers.sample, feeds each row's next step the same
    id (rows out of order too), and lends its pinned buffer to one step at a time."""
    from layerstream.compute.sampling import FINITE, INF, NAN, NO_FINITE, RowSamplers, bad_codes
    from layerstream.compute.step_meta import SeqStep
    from layerstream.compute.stepper import Stepper
    from layerstream.proto.messages import SamplerStart

    V, g = 50, torch.Generator().manual_seed(4)
    logits = torch.randn(4, V, generator=g)
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    logits[3, 9] = float("inf")
    seen = []

    def step(seqs, want, last_ids):
        seen.append(last_ids.clone())
        return logits[: len(seqs)].clone()

    rows = [3, 0, 2, 1]
    st = Stepper(step, V, 4, "cpu")
    starts = [SamplerStart(r, 0.0, 40, 0.95, 0.05, 1.0, 64, 1, []) for r in rows]  # greedy, no penalty
    seqs = [SeqStep(r, [5], [0], [0], [0]) for r in rows]
    first = st.launch(seqs, [1] * 4, starts, "none")
    assert first.best is not None  # the greedy path ran
    ref = RowSamplers(V, "cpu")
    for s in starts:
        ref.start(s.row, SamplingParams(temperature=0.0), 1, [])
    want_ids, want_codes = ref.sample(logits, rows)
    res = Stepper.result(first)
    assert res.ids == want_ids.tolist() and res.bad == bad_codes(logits.max(-1).values).tolist()
    assert res.bad == [FINITE, NAN, NO_FINITE, INF] and res.accepted is None
    assert len(st.pool) == 1  # given back once read
    second = st.launch([SeqStep(r, [-1], [1], [1], [0, 1]) for r in rows], [1] * 4, [], "none")
    assert seen[-1][rows].tolist() == res.ids and second.buf is first.buf and not st.pool


@pytest.mark.parametrize("params", [SamplingParams(seed=3), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                                    SamplingParams(top_k=500, top_p=0.5)], ids=["cli", "server", "k-above-V"])
def test_a_draw_given_its_noise_in_noise_shape_gives_the_generators_ids(params):
    """A row's graph (NOTE [ a row's sampling in a graph ]) makes the draw's Exp(1) noise ahead, in
    noise_shape, from the row's generator: draw() then gives the ids it draws from that generator
    itself, step after step, and leaves the generator where it would be."""
    from layerstream.compute.sampling import draw, noise_shape

    g = torch.Generator().manual_seed(1)
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(30):
        x = torch.randn(1, 300, generator=g) * 3
        noise = torch.empty(noise_shape(1, 300, params)).exponential_(1, generator=b)
        assert torch.equal(draw(x, params, a)[0], draw(x, params, None, noise=noise)[0])
    assert torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params", [SamplingParams(seed=11), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=12),
                                    SamplingParams(repeat_penalty=1.3, seed=13)], ids=["cli", "server", "penalty"])
def test_a_rows_sampling_graph_gives_the_host_samplers_ids_and_feeds_the_next_step(params):
    """One sequence sampling with a generator, no penalty and top-k on replays a graph of its draw
    (NOTE [ a row's sampling in a graph ]); its ids are the host sampler's over the same CUDA logits,
    the eager path's, and reach the next step through last_ids; a penalized row and top-k off keep
    the eager path."""
    from layerstream.compute.graphs import GraphCapture
    from layerstream.compute.step_meta import SeqStep
    from layerstream.compute.stepper import Stepper
    from layerstream.proto.messages import SamplerStart

    V, dev = 1000, torch.device("cuda")
    table = torch.randn(V, V, generator=torch.Generator(device=dev).manual_seed(0), device=dev) * 4

    def step(seqs, want, last_ids):
        toks = torch.tensor([s.tokens[-1] for s in seqs], device=dev)
        toks = torch.where(toks < 0, last_ids[torch.tensor([s.row for s in seqs], device=dev)], toks)
        return table[toks]

    def run(graphs: bool) -> tuple[list[int], Stepper]:
        st = Stepper(step, V, 3, dev, capture=GraphCapture(dev) if graphs else None)
        p = params
        start = SamplerStart(2, p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n, p.seed, [5])
        out = [st.launch([SeqStep(2, [5], [0], [0], [0])], [1], [start], "none")]
        out += [st.launch([SeqStep(2, [-1], [k], [k], list(range(k + 1)))], [1], [], "none") for k in range(1, 12)]
        return [Stepper.result(x).ids[0] for x in out], st

    got, st = run(True)
    assert len(st.graphs.graphs) == (0 if params.penalized or params.top_k == 0 else 1)
    assert got == run(False)[0]
    host, hist, tok = Sampler(params, V), [5], 5
    for want in got:
        tok = int(host.sample(table[tok][None], [hist])[0])
        hist.append(tok)
        assert want == tok


@pytest.mark.parametrize("kw, words", [
    (dict(repeat_last_n=2**63, repeat_penalty=1.1), "repeat_last_n=9223372036854775808: must be from -1 to 4194304"),
    (dict(repeat_last_n=10**30), "repeat_last_n=1000000000000000000000000000000: must be from -1 to"),
    (dict(repeat_penalty=1e-40), "repeat_penalty=1e-40: must be from 0.01 to 100"),
    (dict(temperature=float("inf")), "temperature=inf: must be from 0 to 100"),
    (dict(max_tokens=10**30), "max_tokens=1000000000000000000000000000000: must be from 1 to 4194304"),
    (dict(ignore_eos="false"), "ignore_eos='false': must be True or False"),  # (it generated past EOS: "false" is true)
    (dict(ignore_eos=1), "ignore_eos=1: must be True or False"),
])
def test_the_apis_sampling_params_take_run_pipelines_bounds(kw, words):
    """A probe's: repeat_last_n=2**63 raised MemoryError building its window (2**25 already cost
    0.4 GB), 10**30 an OverflowError; a repeat penalty of 1e-40 blamed the model's weights for the
    infinite logits it made; temperature=inf was taken. The CLI refused each; the API now does too."""
    with pytest.raises(ConfigError, match="^" + re.escape(words)):
        SamplingParams(**kw)
