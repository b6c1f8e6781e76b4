"""Sampler: greedy, top-k, top-p, min-p, repetition penalty, seeding, softmax frequencies."""

import math

import pytest
import torch

from layerstream.compute.sampling import Sampler, SamplingParams
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
