"""The engine core's scheduling with a fake step backend: admission, chunking, abort, rows, seeds."""

from __future__ import annotations

import pickle

import pytest
import torch

import ggufgen
from layerstream.compute.sampling import Sampler, SamplingParams
from layerstream.coordinator.core import EngineCore
from layerstream.coordinator.engine import LocalBackend
from layerstream.coordinator.tokenizer import Tokenizer
from layerstream.coordinator.warm_up import warm_up
from layerstream.errors import ContextFullError, PromptTooLongError
from layerstream.loader.gguf_index import open_model

V = 256


def fake_logits(token: int, position: int) -> torch.Tensor:
    """[V]: logits that depend only on a sequence's own last token and position (as a real
    model's depend only on its own tokens)."""
    g = torch.Generator().manual_seed(token * 7919 + position)
    return torch.randn(V, generator=g) * 3


class FakeModel:
    """A runner of fake_logits, recording every step with its tokens as fed (a -1 resolved from
    the ids the step before sampled, as the runner does on its device)."""

    device = torch.device("cpu")

    def __init__(self, max_seqs: int = 64):
        self.max_seqs = max_seqs
        self.steps: list[list] = []

    def step(self, seqs, want, last_ids=None):
        assert want in ("last", "none")
        toks = [[int(last_ids[s.row]) if t < 0 else t for t in s.tokens] for s in seqs]
        self.steps.append([(s.row, t, list(s.positions)) for s, t in zip(seqs, toks)])
        if want == "none":
            return None
        return torch.stack([self.logits(t[-1], s.positions[-1]) for s, t in zip(seqs, toks)])

    def logits(self, token: int, position: int) -> torch.Tensor:
        return fake_logits(token, position)


def FakeBackend(model=None) -> LocalBackend:
    return LocalBackend(model or FakeModel(), V)


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


@pytest.mark.parametrize("lookahead", [True, False])
def test_admission_waits_for_a_free_row_and_takes_it_once_freed(tokenizer, lookahead):
    c = core(tokenizer, lookahead=lookahead)
    for i, n in enumerate((3, 4, 5)):
        c.add_request(f"r{i}", list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=2 + i, ignore_eos=True))
    c.step()
    assert [r.id for r in c.running] == ["r0", "r1"] and [r.id for r in c.waiting] == ["r2"]
    got = run(c)
    assert all(got[k][-1].finished and got[k][-1].finish_reason == "length" for k in ("r0", "r1", "r2"))
    steps = c.backend.runner.steps
    # r2's prompt starts with r0's [1, 2, 3], whose KV r0's row still holds: only [4, 5] is fed
    first_r2, row_r2 = next((i, row) for i, st in enumerate(steps) for row, t, pos in st if t == [4, 5] and pos == [3, 4])
    last_r0 = max(i for i, st in enumerate(steps) if any(row == 0 for row, _, _ in st) and i < first_r2)
    # r0's row, in the first step submitted after the one where r0 finished was collected: with
    # the lookahead, the step after r0's last was built before r0's last id came back
    assert row_r2 == 0 and first_r2 == last_r0 + (2 if lookahead else 1)
    assert c.reused_tokens == 3
    assert sorted(c.free_rows) == [0, 1]


def test_prompts_are_chunked_to_the_token_budget_after_decode_tokens(tokenizer):
    c = core(tokenizer, step_tokens=8)
    c.add_request("long", list(range(1, 21)), GREEDY)
    for _ in range(3):  # 8 + 8 + 4 prompt tokens: now it decodes
        c.step()
    c.add_request("short", [9, 9, 9], GREEDY)
    run(c)
    for st in c.backend.runner.steps:
        assert sum(len(t) for _, t, _ in st) <= 8
    chunks = [t for st in c.backend.runner.steps for _, t, _ in st if len(t) > 1 or t[0] != 9]
    assert [len(t) for t in chunks[:3]] == [8, 8, 4]  # 20 prompt tokens in chunks of the budget
    # a decode token of the running request shares the step with the new prompt's chunk
    mixed = [st for st in c.backend.runner.steps if len(st) == 2]
    assert mixed and any(len(t) == 1 for _, t, _ in mixed[0]) and any(t == [9, 9, 9] for _, t, _ in mixed[0])


@pytest.mark.parametrize("lookahead", [True, False])
def test_a_short_request_joins_the_steps_of_a_long_prompt_and_answers_before_its_prefill_ends(tokenizer, lookahead):
    """NOTE [ step size ]: with a row free, a request whose prompt is at most half a step, arriving
    while long prompts are being fed, goes into the next step before their chunks, which make room
    (B * S within the budget), rather than waiting for a whole prefill; long prompts still take
    their turns first come, first served (a second long one waits for the first, as before)."""
    c = core(tokenizer, max_seqs=3, step_tokens=8, lookahead=lookahead)
    c.add_request("long", list(range(1, 41)), GREEDY)  # 40 prompt tokens: 5 steps of 8 alone
    c.add_request("long2", list(range(41, 61)), GREEDY)
    c.step()
    c.add_request("short", [9, 9, 9], GREEDY)
    got = run(c)
    steps = c.backend.runner.steps

    def first(prompt):  # the first step that feeds this prompt's first tokens
        return next(i for i, st in enumerate(steps) for _, t, pos in st if pos[0] == 0 and t == prompt[: len(t)])

    def fed_all(n):  # the step that feeds position n - 1 of a prompt of n tokens
        return max(i for i, st in enumerate(steps) for _, t, pos in st if pos[-1] == n - 1 and len(t) > 1)

    # the next step submitted (one step behind: the one after the step already in flight), its
    # chunk first and the long prompt's after it, halved
    short_fed = first([9, 9, 9])
    assert short_fed == (2 if lookahead else 1) and fed_all(40) > short_fed
    assert [len(t) for _, t, _ in steps[short_fed]] == [3, 4]
    assert first(list(range(41, 61))) >= fed_all(40)  # the second long prompt not before the first one's last chunk
    for st in steps:
        assert sum(len(t) for _, t, _ in st) <= 8 and len(st) * max(len(t) for _, t, _ in st) <= 8
    assert {k: v[-1].finish_reason for k, v in got.items()} == dict(long="length", long2="length", short="length")
    for name, prompt in (("long", list(range(1, 41))), ("short", [9, 9, 9])):  # the same ids as each alone
        alone = core(tokenizer, max_seqs=3, step_tokens=8, lookahead=lookahead)
        alone.add_request(name, prompt, GREEDY)
        assert [t for o in run(alone)[name] for t in o.token_ids] == [t for o in got[name] for t in o.token_ids]


@pytest.mark.parametrize("lookahead", [True, False])
def test_abort_frees_the_row_once_no_step_in_flight_carries_it(tokenizer, lookahead):
    """Stepping in turn, an aborted request's row goes to the next request in the next step; one
    step behind, a step in flight still writes it: the row is free once that step is collected,
    and the next request's prompt is fed only in a step after the last one carrying the aborted
    request (NOTE [ one step behind ])."""
    c = core(tokenizer, max_seqs=1, lookahead=lookahead)
    c.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    c.add_request("b", [4, 5], GREEDY)
    c.step()
    assert c.abort("a") and not c.abort("nobody")
    assert c.free_rows == ([] if lookahead else [0])
    outs = c.step()
    assert any(o.request_id == "a" and o.finish_reason == "abort" for o in outs)
    assert not any(o.request_id == "a" and o.token_ids for o in outs)  # its id in flight is discarded
    if lookahead:
        assert [r.id for r in c.running] == [] and c.free_rows == [0]  # freed by the collect
        c.step()
    assert [r.id for r in c.running] == ["b"]  # b took a's row
    got = run(c)
    assert got["b"][-1].finish_reason == "length"
    steps = c.backend.runner.steps  # a's prompt, then its decode token (in flight when aborted) first
    first_b = next(i for i, st in enumerate(steps) if any(t == [4, 5] for _, t, _ in st))
    assert first_b == (2 if lookahead else 1) and len(steps[first_b]) == 1 and c.free_rows == [0]


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

    class EosModel(FakeModel):
        def logits(self, token, position):
            out = super().logits(token, position)
            out[eos] = 1e4  # every request's first pick is end-of-sequence
            return out

    c = core(tokenizer)
    c.backend = FakeBackend(EosModel())
    c.add_request("e", [3], SamplingParams(temperature=0, max_tokens=9))
    assert run(c)["e"][-1].finish_reason == "eos"


def test_limits_are_refused_before_any_step(tokenizer):
    c = core(tokenizer, ctx=16)
    with pytest.raises(PromptTooLongError, match="prompt is 16 tokens") as e:
        c.add_request("big", list(range(1, 17)), GREEDY)
    assert isinstance(e.value, ContextFullError) and (e.value.tokens, e.value.ctx) == (16, 16)
    again = pickle.loads(pickle.dumps(e.value))  # (an error that crosses a process boundary)
    assert str(again) == str(e.value) and (again.tokens, again.ctx) == (16, 16)
    c.add_request("a", [1], GREEDY)
    with pytest.raises(Exception, match="already in use"):
        c.add_request("a", [1], GREEDY)
    assert c.backend.runner.steps == []


def test_a_prompt_reuses_the_kv_a_freed_row_holds(tokenizer):
    """The next turn of a conversation prefills only what follows the previous turn's tokens,
    in the row that holds them; rows holding no prefix are taken first, so a prefix outlasts
    unrelated requests; a row whose ring slid holds nothing reusable (NOTE [ prefix reuse ])."""
    c = core(tokenizer, max_seqs=3, step_tokens=64)
    turn1 = list(range(10, 30))
    c.add_request("t1", turn1, GREEDY)
    got = run(c)["t1"]
    reply = [t for o in got for t in o.token_ids]
    row1 = c.backend.runner.steps[0][0][0]
    for i in range(2):  # unrelated requests meanwhile take the rows that hold nothing
        c.add_request(f"other{i}", [200 + i, 3], GREEDY)
        run(c)
    assert c.row_tokens[row1] == turn1 + reply[:-1]  # the last sampled token was never fed
    turn2 = turn1 + reply + [40, 41]
    c.backend.runner.steps.clear()
    c.add_request("t2", turn2, GREEDY)
    fresh = core(tokenizer, max_seqs=3, step_tokens=64)
    fresh.add_request("t2", turn2, GREEDY)
    assert [o.token_ids for o in run(c)["t2"]] == [o.token_ids for o in run(fresh)["t2"]]
    row, toks, pos = c.backend.runner.steps[0][0]
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
    for st in c.backend.runner.steps:
        assert len(st) <= 32 and sum(len(t) for _, t, _ in st) <= 512
        assert len(st) * max(len(t) for _, t, _ in st) <= 512, [len(t) for _, t, _ in st]
    for i in (0, 17, 31):
        alone = core(tokenizer, max_seqs=1, ctx=256, step_tokens=512)
        alone.add_request("x", prompts[i], params)
        assert [o.token_ids for o in got[f"r{i}"]] == [o.token_ids for o in run(alone)["x"]]


@pytest.mark.parametrize("lookahead", [True, False])
def test_a_request_takes_a_row_only_in_a_step_that_carries_its_prompt(tokenizer, lookahead):
    c = core(tokenizer, max_seqs=4, step_tokens=8, lookahead=lookahead)
    for i in range(4):
        c.add_request(f"r{i}", [i + 1] * 8, GREEDY)
    c.step()  # one step submitted, and the next one too with the lookahead: one prompt each
    n = 2 if lookahead else 1
    assert [r.id for r in c.running] == ["r0", "r1"][:n] and len(c.waiting) == 4 - n and len(c.free_rows) == 4 - n
    run(c)
    assert sorted(c.free_rows) == [0, 1, 2, 3]


@pytest.mark.parametrize("lookahead", [True, False, 2])
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, seed=3, max_tokens=5, repeat_penalty=1.2)])
def test_a_request_whose_logits_are_not_finite_ends_alone(tokenizer, lookahead, params):
    """A row of NaN logits (the device sampler flags it beside the ids) ends its request with the
    error the host sampler gave, naming the token; the one beside it finishes normally, and the
    core serves the next."""

    class NanModel(FakeModel):
        def logits(self, token, position):
            out = super().logits(token, position)
            if position == 4:  # after "bad"'s second generated token ("good" samples from 5 on)
                out[7] = float("nan")
            return out

    c = core(tokenizer, lookahead=lookahead)
    c.backend = FakeBackend(NanModel())
    c.add_request("bad", [1, 2, 3], params)
    c.add_request("good", [4, 5, 6, 7, 8, 9], GREEDY)
    got = run(c)
    assert got["bad"][-1].finish_reason == "error" and got["bad"][-1].error == (
        "sampling failed: the model produced NaN logits at token 5: its weights may be corrupt (re-download or "
        "re-convert the model file), or its activations overflow the --dtype")
    assert sum(len(o.token_ids) for o in got["bad"]) == 2  # two tokens were shown, then it failed
    assert got["good"][-1].finish_reason == "length" and sum(len(o.token_ids) for o in got["good"]) == 5
    c.add_request("next", [6] * 6, GREEDY)
    assert run(c)["next"][-1].finish_reason == "length"
    assert sorted(c.free_rows) == [0, 1]


def test_a_finished_requests_discarded_step_of_nan_logits_leaves_no_prefix_record(tokenizer):
    """A request that ends (here aborted, as a client that goes) while its next step is in flight (the
    lookahead): where that step's logits were not finite its row's KV may hold NaN past the record,
    so the row keeps none and its next sequence starts fresh (stepper.py, NOTE [ a row left
    non-finite ]). A review's."""

    class NanAfter(FakeModel):
        def logits(self, token, position):
            out = super().logits(token, position)
            if position >= 4:  # the step after the second token shown
                out[7] = float("nan")
            return out

    for nan, kept in ((False, True), (True, False)):
        c = core(tokenizer, lookahead=True)
        c.backend = FakeBackend(NanAfter() if nan else FakeModel())
        c.add_request("a", [1, 2, 3], GREEDY)
        shown = []
        while len(shown) < 2:
            shown += [t for o in c.step() for t in o.token_ids]
        assert len(shown) == 2 and c.inflight  # (the third token's step in flight)
        c.abort("a")
        run(c)
        assert not c.inflight and bool(c.row_tokens) == kept, c.row_tokens


@pytest.mark.parametrize("lookahead", [True, False])
def test_a_failed_backend_step_fails_its_requests_and_the_core_goes_on(tokenizer, lookahead):
    class Flaky(FakeModel):
        fail_at = 3 if lookahead else 2  # the third step() call submits it

        def step(self, seqs, want, last_ids=None):
            if len(self.steps) == self.fail_at:
                self.steps.append(None)
                raise RuntimeError("out of memory")
            return super().step(seqs, want, last_ids)

    c = core(tokenizer, lookahead=lookahead)
    c.backend = FakeBackend(Flaky())
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


def reference_ids(prompt: list[int], params: SamplingParams, eos: int) -> list[int]:
    """The ids of one request as the core sampled them before it sampled on the device: the
    host sampler over each step's logits, the history every token fed, one step at a time."""
    s, hist, out = Sampler(params, V), list(prompt), []
    while True:
        t = int(s.sample(fake_logits(hist[-1], len(hist) - 1)[None], [hist])[0])
        out.append(t)
        if (t == eos and not params.ignore_eos) or len(out) >= params.max_tokens:
            return out
        hist.append(t)


MIXED = {  # prompt, parameters: greedy, seeded, every filter, the penalty over windows and the whole history
    "greedy": ([1, 2, 3], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
    "penalized": ([4, 5], SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=3, max_tokens=11,
                                         ignore_eos=True)),
    "seeded": ([9] * 5, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=12,
                                       ignore_eos=True)),
    "filters": ([7, 8, 9, 10], SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=-3,
                                              repeat_penalty=1.3, repeat_last_n=-1, max_tokens=10, ignore_eos=True)),
    "one": ([11, 12], SamplingParams(temperature=1.5, seed=2**64 - 1, max_tokens=1, ignore_eos=True)),
    "eos": ([13, 14], SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, max_tokens=40)),
}


@pytest.mark.parametrize("lookahead", [True, False, 2])
def test_ids_are_the_host_samplers_for_greedy_seeded_and_filtered_requests(tokenizer, lookahead):
    """Sampling where the logits are gives every request of a mixed batch the ids the host
    sampler gave it alone (its own generator, its own history), stepping in turn, one step
    behind or two."""
    eos = next(iter(tokenizer.eos_ids))
    c = core(tokenizer, max_seqs=4, step_tokens=6, lookahead=lookahead)
    for name, (prompt, params) in MIXED.items():
        c.add_request(name, prompt, params)
    got = run(c)
    for name, (prompt, params) in MIXED.items():
        ids = [t for o in got[name] for t in o.token_ids]
        want = reference_ids(prompt, params, eos)
        if got[name][-1].finish_reason == "eos":
            want = want[:-1]  # an EOS is not shown
        assert ids == want, name
    assert len(got["one"][0].token_ids) == 1 and got["one"][-1].finish_reason == "length"


def outputs(c: EngineCore) -> dict[str, list]:
    return {k: [(o.text, o.token_ids, o.finished, o.finish_reason, o.completion_tokens) for o in v]
            for k, v in run(c).items()}


def test_stops_eos_and_lengths_end_on_the_same_token_one_step_behind(tokenizer):
    """Stop strings, EOS, max_tokens and a full context end each request on the same token, with the
    same text, counts and prefix-reuse records, whether the core steps in turn, one step behind or
    two; a request that ended had one more token computed (two, two steps behind), never shown."""
    eos = next(iter(tokenizer.eos_ids))

    class EosAt7(FakeModel):
        def logits(self, token, position):
            out = super().logits(token, position)
            out[eos] += 1e4 * (position == 7)  # the 6th id of "eos"; requests that ignore it take it as text
            return out

    probe = core(tokenizer, lookahead=False)
    probe.backend = FakeBackend(EosAt7())
    probe.add_request("p", [30, 31, 32], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = "".join(o.text for o in run(probe)["p"])
    k = len(text) // 2
    stop = text[k : k + 2]
    assert text.find(stop) == k and len(stop) == 2  # (the fake model's text holds it once)
    reqs = {
        "stop": ([30, 31, 32], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=(stop, "\uffff"))),
        "length": ([40, 41], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
        "eos": ([13, 14, 15], MIXED["eos"][1]),
        "full": (list(range(50, 66)), SamplingParams(temperature=0.8, seed=1, max_tokens=40, ignore_eos=True)),
    }
    runs = {}
    for lookahead in (0, 1, 2):
        c = core(tokenizer, max_seqs=4, ctx=24, lookahead=lookahead)
        c.backend = FakeBackend(EosAt7())
        for name, (prompt, params) in reqs.items():
            c.add_request(name, prompt, params)
        runs[lookahead] = (outputs(c), dict(c.row_tokens), c.backend.runner.steps)
    (old, rows_old, steps_old), (new, rows_new, steps_new), (two, rows_two, steps_two) = runs[0], runs[1], runs[2]
    assert new == old and rows_new == rows_old
    assert two == old and rows_two == rows_old
    assert "".join(t for t, *_ in old["stop"]) == text[:k] and old["stop"][-1][3] == "stop"
    assert [o[3] for o in (old["length"][-1], old["eos"][-1], old["full"][-1])] == ["length", "eos", "context_full"]
    assert old["full"][-1][4] == 24 - 16 + 1  # 8 tokens fed after its prompt, and the one sampled last
    assert [len(o[1]) for o in old["eos"]] == [1] * 5 + [0]  # its 6th id, the EOS, is not shown
    fed = lambda steps: sum(len(t) for st in steps for _, t, _ in st)  # noqa: E731
    assert fed(steps_new) == fed(steps_old) + 2  # the stop's and the EOS's discarded tokens
    assert fed(steps_two) == fed(steps_old) + 4


def test_a_decode_token_is_fed_as_the_rows_last_sampled_id(tokenizer):
    """One step behind, decode tokens travel as -1: the backend feeds each row's last sampled id;
    stepping in turn, the core sends the ids it collected."""
    seen = []

    class Spy(FakeModel):
        def step(self, seqs, want, last_ids=None):
            seen.append([list(s.tokens) for s in seqs])
            return super().step(seqs, want, last_ids)

    got = {}
    for lookahead in (1, 0, 2):
        seen.clear()
        c = core(tokenizer, lookahead=lookahead)
        c.backend = FakeBackend(Spy())
        c.add_request("a", [1, 2, 3], GREEDY)
        ids = got[lookahead] = [t for o in run(c)["a"] for t in o.token_ids]
        decode = [toks for st in seen[1:] for toks in st]
        assert decode == ([[-1]] * 4 if lookahead else [[t] for t in ids[:-1]])
    assert got[2] == got[1] == got[0]


@pytest.mark.parametrize("behind_a_long_one", [False, True])
def test_the_next_turn_finds_its_prefix_in_a_row_a_step_in_flight_still_holds(tokenizer, behind_a_long_one):
    """A reply ends (EOS) while its discarded token is in flight and another row is free: the next
    turn, queued at once, waits for that step to be collected and takes the ended reply's row with
    its conversation's KV, instead of the free row that holds nothing (NOTE [ prefix reuse ]). So
    too behind a long prompt queued first, which the short turn is admitted ahead of (NOTE [ step
    size ]): only the head of the queue was asked, and the turn took the free row."""
    eos = next(iter(tokenizer.eos_ids))

    class EosAt24(FakeModel):
        def logits(self, token, position):
            out = super().logits(token, position)
            out[eos] += 1e4 * (position == 24)
            return out

    c = core(tokenizer, max_seqs=2, step_tokens=64)
    c.backend = FakeBackend(EosAt24())
    turn1 = list(range(10, 30))
    c.add_request("t1", turn1, SamplingParams(temperature=0, max_tokens=50))
    reply = []
    while True:
        outs = c.step()
        reply += [t for o in outs for t in o.token_ids]
        if any(o.finished for o in outs):
            break
    assert outs[-1].finish_reason == "eos" and c.inflight  # its token after the EOS is still in flight
    turn2 = turn1 + reply + [40, 41]
    if behind_a_long_one:
        c.add_request("long", list(range(100, 160)), GREEDY)
    c.add_request("t2", turn2, GREEDY)
    run(c)
    row1, n = c.backend.runner.steps[0][0][0], len(turn1) + len(reply)
    fed = [(row, pos[0]) for st in c.backend.runner.steps for row, t, pos in st if t == turn2[n:]]
    assert fed == [(row1, n)] and c.reused_tokens == n


class ScriptedModel(FakeModel):
    """Greedy picks script[position] (the last one past its end)."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.script = script

    def logits(self, token: int, position: int) -> torch.Tensor:
        out = torch.zeros(V)
        out[self.script[min(position, len(self.script) - 1)]] = 10.0
        return out


def test_control_tokens_generated_past_eos_are_not_shown(tokenizer):
    """Probe of issue 25: with ignore_eos the text showed `<|im_end|>` and the next turn's
    `<|im_start|>user`; llama.cpp renders no control token by default. Here the end-of-text and the
    begin-of-text tokens come between letters: the text is the letters alone, their ids all returned."""
    control = [i for i in range(V) if tokenizer.is_control(i)]
    assert set(control) >= set(tokenizer.eos_ids) and len(control) >= 2
    letters = tokenizer.encode("ab", add_special=False)
    ids = [letters[0], control[0], control[1], letters[1]]
    prompt = [1, 2]
    c = EngineCore(FakeBackend(ScriptedModel([0] * (len(prompt) - 1) + ids)), tokenizer, V, max_seqs=1, ctx=64,
                   step_tokens=8)
    c.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=len(ids), ignore_eos=True))
    outs = run(c)["r"]
    assert [t for o in outs for t in o.token_ids] == ids
    assert "".join(o.text for o in outs) == tokenizer.decode(ids, skip_special=True) == "ab"


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_the_warm_up_runs_a_chunk_and_a_decode_step_and_changes_no_output(tokenizer, lookahead):
    """The warm-up (warm_up.py, NOTE [ warm-up ]) runs two steps on the first free row before any
    request (a two-token prompt chunk, then its sampled id fed as a decode token) and every
    request's ids and finish reasons are as without it (this fake model's logits ignore the KV:
    test_pipeline's warm-up test has a real one); once a request is queued, or rows hold prefix
    records, it is refused."""
    got = {}
    for warm in (False, True):
        c = core(tokenizer, max_seqs=4, step_tokens=6, lookahead=lookahead)
        if warm:
            fed = []  # each step's tokens as sent (a -1: the row's last sampled id)
            step = c.backend.stepper.step_fn
            c.backend.stepper.step_fn = lambda seqs, *a, **k: fed.append([list(s.tokens) for s in seqs]) or step(seqs, *a, **k)
            warm_up(c)
            assert fed == [[[0, 0]], [[-1]]]  # a chunk of two, then its sampled id fed on the device
            assert [[(row, pos) for row, _, pos in st] for st in c.backend.runner.steps] == [[(0, [0, 1])], [(0, [2])]]
        for name, (prompt, params) in MIXED.items():
            c.add_request(name, prompt, params)
        got[warm] = {k: [(o.token_ids, o.finish_reason) for o in v] for k, v in run(c).items()}
        if warm:
            c.add_request("late", [1, 2], GREEDY)
            with pytest.raises(RuntimeError, match="before any request"):
                warm_up(c)
            run(c)
            with pytest.raises(RuntimeError, match="before any request"):  # (rows hold prefix records now)
                warm_up(c)
    assert got[True] == got[False]
