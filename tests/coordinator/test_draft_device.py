"""The draft on its device (draft.py, NOTE [ the draft on the device ]): a proposal's decode steps
feed the row's last drafted id on the device (token -1) and are all launched before the host reads
any id; the drafts are the draft model's own greedy continuation."""

from __future__ import annotations

import ggufgen
from layerstream.compute.stepper import Stepper
from layerstream.coordinator.draft import DraftModel
from layerstream.coordinator.engine import EngineConfig, local_backend
from layerstream.loader.gguf_index import open_model


def draft_model(tmp_path, ctx=64, step_tokens=512):
    path = ggufgen.write_model(tmp_path / "d.gguf", qtype="Q8_0", seed=2, n_layer=1)
    be = local_backend(open_model(str(path)), EngineConfig(device="cpu", dtype="float32", ctx=ctx, max_seqs=2))
    return DraftModel(be.runner, ctx, 2, step_tokens), be.runner


def greedy_reference(runner, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens after `tokens` by full forward passes of the runner's model (row 1, no reuse)."""
    from layerstream.compute.step_meta import SeqStep

    out, seq = [], list(tokens)
    for _ in range(n):
        L = len(seq)
        logits = runner.step([SeqStep(1, seq, list(range(L)), list(range(L)), list(range(L)))], "last")
        out.append(int(logits[0].argmax()))
        seq.append(out[-1])
    return out


def test_a_proposal_launches_every_step_before_reading_an_id_and_feeds_ids_on_the_device(tmp_path, monkeypatch):
    model, runner = draft_model(tmp_path)
    events, fed = [], []
    launch, result, step = model.stepper.launch, Stepper.result, runner.step

    def spy_launch(seqs, *a, **kw):
        events.append("launch")
        return launch(seqs, *a, **kw)

    def spy_result(launched):
        events.append("read")
        return result(launched)

    def spy_step(seqs, *a, **kw):
        fed.append(list(seqs[0].tokens))
        return step(seqs, *a, **kw)

    monkeypatch.setattr(model.stepper, "launch", spy_launch)
    monkeypatch.setattr(Stepper, "result", staticmethod(spy_result))
    model.stepper.step_fn = spy_step
    p = model.proposer([5, 77, 200, 13])
    drafts = p.propose(4)
    assert len(drafts) == 4
    assert events == ["launch"] * 4 + ["read"] * 4  # no read between launches: one wait a proposal
    assert fed == [[5, 77, 200, 13], [-1], [-1], [-1]]  # drafted ids never came to the host to be fed
    monkeypatch.undo()
    assert drafts == greedy_reference(runner, [5, 77, 200, 13], 4)


def test_later_proposals_roll_back_the_rejected_drafts_and_stay_the_greedy_continuation(tmp_path):
    model, runner = draft_model(tmp_path, step_tokens=3)  # a long chunk goes in parts of 3 tokens
    prompt = [5, 77, 200, 13, 9, 31, 8]
    p = model.proposer(prompt)
    first = p.propose(3)
    accepted = first[:1] + [(first[1] + 1) % 256]  # one draft taken, then another token than the second
    p.extend(accepted)
    again = p.propose(5)
    assert again == greedy_reference(runner, prompt + accepted, 5)
    assert p.fed == prompt + accepted + again[:-1] and p.ring.count == len(p.fed)
    assert (model.proposals, model.proposed) == (2, 8) and model.seconds > 0


def test_a_proposal_stops_at_the_drafts_ring_and_a_full_ring_drafts_nothing(tmp_path):
    model, runner = draft_model(tmp_path, ctx=8)
    p = model.proposer([5, 77, 200, 13, 9, 31])
    assert len(p.propose(4)) == 3  # 6 tokens and 2 drafts fed fill the 8 slots; the third is not fed
    p.extend([1, 2, 3])
    assert p.propose(4) == [] and p.row is not None
    p.close()
    assert sorted(model.free_rows) == [0, 1]
