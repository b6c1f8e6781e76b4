"""The replay of prompt-lookup drafts (benchmarks/lookup_tree.py) against the engine's own lookup:
the same reply in the same number of passes, and trees that hold the chain and keep their budget."""

import sys

import pytest

sys.path.insert(0, "tests")  # (ggufgen, when run alone)

from benchmarks.lookup_tree import accepted, chain, passes, tree_draft  # noqa: E402
from layerstream.compute.sampling import SamplingParams  # noqa: E402
from layerstream.coordinator.lookup import PromptLookup  # noqa: E402


def test_a_tree_holds_the_chain_first_within_its_budget():
    tokens = [5, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2, 3, 8, 1, 2]  # "1 2" followed by 3 (latest), 4, then 3 again
    want = PromptLookup(tokens).propose(3)
    assert want == [3, 8, 1]
    tree = tree_draft(tokens, depth=3, budget=5)
    assert len(tree) == 5 and all(p[:k] in tree for p in tree for k in range(1, len(p)))  # prefix-closed
    assert {(3,), (3, 8), (3, 8, 1)} <= tree  # the chain's path, taken first
    assert accepted(tree, [4, 7, 1, 0]) == len(max((p for p in tree if p[0] == 4), key=len))
    assert accepted(chain(3)(tokens), [4, 7]) == 0 and accepted(chain(3)(tokens), [3, 8, 0]) == 2
    assert tree_draft(tokens, depth=3, budget=64) >= tree


@pytest.mark.timeout(300)
def test_the_replayed_chain_takes_the_passes_the_engine_takes(tmp_path):
    """A model that repeats itself (random weights, a repeating prompt): the engine's --lookup run
    (its fixed draft policy: the adaptive one pauses and shortens drafts) and the replay over its
    greedy reply count the same decode passes."""
    import ggufgen
    from layerstream.coordinator.engine import Engine

    path = ggufgen.write_model(tmp_path / "m.gguf", n_layer=2, seed=3)
    prompt = [1, 2, 3, 4, 5, 6] * 6
    with Engine.load(path, device="cpu", dtype="float32", ctx=256, draft_policy="fixed") as e:
        core = e.core
        core.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        reply = []
        while core.has_unfinished():
            for o in core.step():
                reply += o.token_ids
        before = core.spec.passes if core.spec is not None else 0
        core.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, lookup=4))
        again, steps = [], 0
        while core.has_unfinished():
            steps += 1
            for o in core.step():
                again += o.token_ids
    assert again == reply
    assert passes(prompt, reply, chain(4)) < len(reply)  # (the replay finds drafts to accept)
    assert passes(prompt, reply, chain(4)) == core.spec.passes - before, (steps, core.spec)
