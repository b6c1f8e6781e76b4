"""The engine core's scheduling with a fake step backend: admission, chunking, abort, rows, seeds."""

from __future__ import annotations

import pytest
import torch

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.core import EngineCore
from layerstream.coordinator.tokenizer import Tokenizer
from layerstream.errors import ContextFullError
from layerstream.loader.gguf_index import open_model

V = 256


class FakeBackend:
    """Logits that depend only on a sequence's own last token and position (as a real model's
    depend only on its own tokens), recording every step."""

    def __init__(self):
        self.steps: list[list] = []

    def step(self, seqs, want):
        assert want == "last"
        self.steps.append([(s.row, list(s.tokens), list(s.positions)) for s in seqs])
        rows = []
        for s in seqs:
            g = torch.Generator().manual_seed(s.tokens[-1] * 7919 + s.positions[-1])
            rows.append(torch.randn(V, generator=g) * 3)
        return torch.stack(rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = ggufgen.write_model(tmp_path_factory.mktemp("core") / "m.gguf", n_vocab=V)
    return Tokenizer.from_metadata(open_model(path).metadata)


def core(tokenizer, **kw):
    kw = dict(max_seqs=2, ctx=64, step_tokens=8) | kw
    return EngineCore(FakeBackend(), tokenizer, V, **kw)


def run(c: EngineCore) -> dict[str, list]:
    got: dict[str, list] = {}
    while c.has_unfinished():
        for o in c.step():
            got.setdefault(o.request_id, []).append(o)
    return got


GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def test_admission_waits_for_a_free_row_and_takes_it_once_freed(tokenizer):
    c = core(tokenizer)
    for i, n in enumerate((3, 4, 5)):
        c.add_request(f"r{i}", list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=2 + i, ignore_eos=True))
    c.step()
    assert [r.id for r in c.running] == ["r0", "r1"] and [r.id for r in c.waiting] == ["r2"]
    got = run(c)
    assert all(got[k][-1].finished and got[k][-1].finish_reason == "length" for k in ("r0", "r1", "r2"))
    steps = c.backend.steps
    # r2's prompt starts with r0's [1, 2, 3], whose KV r0's row still holds: only [4, 5] is fed
    first_r2, row_r2 = next((i, row) for i, st in enumerate(steps) for row, t, pos in st if t == [4, 5] and pos == [3, 4])
    last_r0 = max(i for i, st in enumerate(steps) if any(row == 0 for row, _, _ in st) and i < first_r2)
    assert row_r2 == 0 and first_r2 == last_r0 + 1  # r0's row, in the step after r0 finished
    assert c.reused_tokens == 3
    assert sorted(c.free_rows) == [0, 1]


def test_prompts_are_chunked_to_the_token_budget_after_decode_tokens(tokenizer):
    c = core(tokenizer, step_tokens=8)
    c.add_request("long", list(range(1, 21)), GREEDY)
    for _ in range(3):  # 8 + 8 + 4 prompt tokens: now it decodes
        c.step()
    c.add_request("short", [9, 9, 9], GREEDY)
    run(c)
    for st in c.backend.steps:
        assert sum(len(t) for _, t, _ in st) <= 8
    chunks = [t for st in c.backend.steps for _, t, _ in st if len(t) > 1 or t[0] != 9]
    assert [len(t) for t in chunks[:3]] == [8, 8, 4]  # 20 prompt tokens in chunks of the budget
    # a decode token of the running request shares the step with the new prompt's chunk
    mixed = [st for st in c.backend.steps if len(st) == 2]
    assert mixed and any(len(t) == 1 for _, t, _ in mixed[0]) and any(t == [9, 9, 9] for _, t, _ in mixed[0])


def test_abort_frees_the_row_at_once(tokenizer):
    c = core(tokenizer, max_seqs=1)
    c.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    c.add_request("b", [4, 5], GREEDY)
    c.step()
    assert c.abort("a") and not c.abort("nobody")
    outs = c.step()
    assert any(o.request_id == "a" and o.finish_reason == "abort" for o in outs)
    assert [r.id for r in c.running] == ["b"]  # b took a's row in the same step
    got = run(c)
    assert got["b"][-1].finish_reason == "length"


def test_seeded_sampling_reproduces_whatever_shares_the_batch(tokenizer):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42, max_tokens=12, ignore_eos=True)

    def tokens(others: int) -> list[int]:
        c = core(tokenizer, max_seqs=4)
        c.add_request("me", [7, 8, 9], params)
        for i in range(others):
            c.add_request(f"o{i}", [i + 1] * (i + 2), SamplingParams(temperature=1.0, seed=i, max_tokens=9))
        return [t for o in run(c)["me"] for t in o.token_ids]

    alone = tokens(0)
    assert len(alone) == 12 and tokens(3) == alone
    other = core(tokenizer)
    other.add_request("me", [7, 8, 9], SamplingParams(**{**params.__dict__, "seed": 43}))
    assert [t for o in run(other)["me"] for t in o.token_ids] != alone


def test_stop_strings_eos_and_lengths_per_request(tokenizer):
    c = core(tokenizer, max_seqs=3)
    eos = next(iter(tokenizer.eos_ids))
    c.backend = FakeBackend()
    c.add_request("short", [1, 2], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    c.add_request("long", [1, 2], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    got = run(c)
    assert sum(len(o.token_ids) for o in got["short"]) == 1 and got["short"][-1].completion_tokens == 1
    assert sum(len(o.token_ids) for o in got["long"]) == 7 and got["long"][-1].prompt_tokens == 2

    class EosBackend(FakeBackend):
        def step(self, seqs, want):
            out = super().step(seqs, want)
            out[:, eos] = 1e4  # every request's first pick is end-of-sequence
            return out

    c = core(tokenizer)
    c.backend = EosBackend()
    c.add_request("e", [3], SamplingParams(temperature=0, max_tokens=9))
    assert run(c)["e"][-1].finish_reason == "eos"


def test_limits_are_refused_before_any_step(tokenizer):
    c = core(tokenizer, ctx=16)
    with pytest.raises(ContextFullError, match="prompt is 16 tokens"):
        c.add_request("big", list(range(1, 17)), GREEDY)
    c.add_request("a", [1], GREEDY)
    with pytest.raises(Exception, match="already in use"):
        c.add_request("a", [1], GREEDY)
    assert c.backend.steps == []


def test_a_prompt_reuses_the_kv_a_freed_row_holds(tokenizer):
    """The next turn of a conversation prefills only what follows the previous turn's tokens,
    in the row that holds them; rows holding no prefix are taken first, so a prefix outlasts
    unrelated requests; a row whose ring slid holds nothing reusable (NOTE [ prefix reuse ])."""
    c = core(tokenizer, max_seqs=3, step_tokens=64)
    turn1 = list(range(10, 30))
    c.add_request("t1", turn1, GREEDY)
    got = run(c)["t1"]
    reply = [t for o in got for t in o.token_ids]
    row1 = c.backend.steps[0][0][0]
    for i in range(2):  # unrelated requests meanwhile take the rows that hold nothing
        c.add_request(f"other{i}", [200 + i, 3], GREEDY)
        run(c)
    assert c.row_tokens[row1] == turn1 + reply[:-1]  # the last sampled token was never fed
    turn2 = turn1 + reply + [40, 41]
    c.backend.steps.clear()
    c.add_request("t2", turn2, GREEDY)
    fresh = core(tokenizer, max_seqs=3, step_tokens=64)
    fresh.add_request("t2", turn2, GREEDY)
    assert [o.token_ids for o in run(c)["t2"]] == [o.token_ids for o in run(fresh)["t2"]]
    row, toks, pos = c.backend.steps[0][0]
    n = len(turn1) + len(reply) - 1
    assert row == row1 and toks == turn2[n:] and pos == list(range(n, len(turn2)))
    assert c.reused_tokens == n
    # a sequence that outgrew a sliding ring leaves nothing to reuse
    s = core(tokenizer, max_seqs=1, ctx=16, step_tokens=64, on_context_full="slide")
    s.add_request("long", list(range(1, 15)), GREEDY)
    run(s)
    assert not s.row_tokens


def test_steps_stay_within_the_planned_size_under_many_clients(tokenizer):
    """32 requests of 128-token prompts at 32 rows and a 512-token step: no step carries more
    than max(step_tokens, max_seqs) tokens or rows, nor pads to more than that (sequences times
    the longest chunk, as the backend pads it); every answer is the one it gets alone."""
    prompts = [[(7 * i + j) % (V - 1) + 1 for j in range(128)] for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    c = core(tokenizer, max_seqs=32, ctx=256, step_tokens=512)
    for i, p in enumerate(prompts):
        c.add_request(f"r{i}", p, params)
    got = run(c)
    for st in c.backend.steps:
        assert len(st) <= 32 and sum(len(t) for _, t, _ in st) <= 512
        assert len(st) * max(len(t) for _, t, _ in st) <= 512, [len(t) for _, t, _ in st]
    for i in (0, 17, 31):
        alone = core(tokenizer, max_seqs=1, ctx=256, step_tokens=512)
        alone.add_request("x", prompts[i], params)
        assert [o.token_ids for o in got[f"r{i}"]] == [o.token_ids for o in run(alone)["x"]]


def test_a_request_takes_a_row_only_in_a_step_that_carries_its_prompt(tokenizer):
    c = core(tokenizer, max_seqs=4, step_tokens=8)
    for i in range(4):
        c.add_request(f"r{i}", [i + 1] * 8, GREEDY)
    c.step()
    assert [r.id for r in c.running] == ["r0"] and len(c.waiting) == 3 and len(c.free_rows) == 3
    run(c)
    assert sorted(c.free_rows) == [0, 1, 2, 3]


def test_a_request_whose_sampling_fails_ends_alone(tokenizer):
    """A seed beyond 64 bits fails in the sampler's generator: that request ends with an
    error naming why, the one beside it finishes normally, and the core serves the next."""
    c = core(tokenizer)
    c.add_request("bad", [1, 2, 3], SamplingParams(temperature=1.0, seed=2**64, max_tokens=4))
    c.add_request("good", [4, 5], GREEDY)
    got = run(c)
    assert got["bad"][-1].finish_reason == "error" and "sampling failed" in got["bad"][-1].error
    assert got["good"][-1].finish_reason == "length" and sum(len(o.token_ids) for o in got["good"]) == 5
    c.add_request("next", [6], GREEDY)
    assert run(c)["next"][-1].finish_reason == "length"
    assert sorted(c.free_rows) == [0, 1]


def test_a_failed_backend_step_fails_its_requests_and_the_core_goes_on(tokenizer):
    class Flaky(FakeBackend):
        fail_at = 2

        def step(self, seqs, want):
            if len(self.steps) == self.fail_at:
                self.steps.append(None)
                raise RuntimeError("out of memory")
            return super().step(seqs, want)

    c = core(tokenizer)
    c.backend = Flaky()
    c.add_request("a", [1, 2, 3], GREEDY)
    c.add_request("b", [4, 5], GREEDY)
    c.step(), c.step()
    with pytest.raises(RuntimeError, match="out of memory"):
        c.step()
    outs = {o.request_id: o for o in c.step()}
    assert {k: (o.finish_reason, o.error) for k, o in outs.items()} == {
        "a": ("error", "RuntimeError: out of memory"), "b": ("error", "RuntimeError: out of memory")}
    assert not c.has_unfinished() and sorted(c.free_rows) == [0, 1] and not c.row_tokens
    c.add_request("next", [6], GREEDY)
    assert run(c)["next"][-1].finish_reason == "length"
