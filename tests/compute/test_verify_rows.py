"""A step verifying drafts runs as one-token decode rows (runner.py, NOTE [ drafts verified as
decode rows ]): the logits of each row equal those of feeding the chunk one token a step, on every
KV store (device, host, split) and with a sliding ring's K rotated at read time."""

from __future__ import annotations

import pytest
import torch

import ggufgen
from layerstream.compute.runner import VERIFY_ROWS, ModelRunner
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.weights import GlobalWeights, ResidentLayers
from layerstream.loader.gguf_index import open_model

CTX = 32
KV = {"device": {}, "host": {"kv_on_host": True}, "split": {"kv_device_layers": 1}, "sliding": {"sliding": True},
      "kernels": {"triton_attention": True}}  # attn_kernels.py (Triton's interpreter on the CPU)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "m.gguf"
    ggufgen.write_model(path, n_layer=2, qtype="Q8_0", seed=3)
    return open_model(str(path))


def runner(index, **kw) -> ModelRunner:
    hp = index.hparams
    return ModelRunner(hp, GlobalWeights(index, "cpu", torch.float32), ResidentLayers(index, "cpu", torch.float32),
                       "cpu", torch.float32, ctx=CTX, max_seqs=3, **kw)


class Rows:
    """Slots 0.. of each KV row in order (no eviction), as KVRing hands them out."""

    def __init__(self):
        self.n: dict[int, int] = {}

    def seq(self, row: int, tokens: list[int]) -> SeqStep:
        p = self.n.get(row, 0)
        self.n[row] = p + len(tokens)
        pos = list(range(p, p + len(tokens)))
        return SeqStep(row, tokens, pos, pos, list(range(p + len(tokens))))


PROMPTS = {0: [5, 77, 200, 13, 77], 2: [9, 31, 8]}
CHUNK = [200, 42, 5, 7]  # row 0: its last token and three drafts
ONE = [11]  # row 2: a plain decode token beside it


def prefill(r: ModelRunner, rows: Rows) -> None:
    r.step([rows.seq(row, toks) for row, toks in PROMPTS.items()], "none")


def one_token_steps(r: ModelRunner) -> torch.Tensor:
    """The reference: the chunk fed one token a step (plain decode steps) beside row 2's token."""
    rows = Rows()
    prefill(r, rows)
    out = []
    for j, tok in enumerate(CHUNK):
        seqs = [rows.seq(0, [tok])] + ([rows.seq(2, ONE)] if j == 0 else [])
        out.append(r.step(seqs, "last")[:1] if j else r.step(seqs, "last"))
    return torch.cat([out[0][:1], *out[1:], out[0][1:]])  # row 0's four, then row 2's


def verified(r: ModelRunner) -> torch.Tensor:
    rows = Rows()
    prefill(r, rows)
    return r.step([rows.seq(0, CHUNK), rows.seq(2, ONE)], "last", tails=[len(CHUNK), 1])


@pytest.mark.parametrize("kv", list(KV))
def test_a_verified_chunk_runs_as_decode_rows_with_the_logits_of_one_token_steps(index, kv):
    want = one_token_steps(runner(index, **KV[kv]))
    r = runner(index, verify_rows=VERIFY_ROWS, **KV[kv])  # (by default only the kernels' path takes rows)
    got = verified(r)
    assert r.verify_paths == {"rows": 1}
    assert got.shape == want.shape == (len(CHUNK) + 1, index.hparams.n_vocab)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the rows wrote the chunk's KV where a chunk would: the next token's logits agree too
    c = runner(index, verify_rows=0, **KV[kv])
    torch.testing.assert_close(verified(c), want, rtol=1e-4, atol=1e-4)
    assert c.verify_paths == {"chunks": 1}
    nxt = [SeqStep(0, [3], [9], [9], list(range(10)))]
    torch.testing.assert_close(r.step(nxt, "last"), c.step(nxt, "last"), rtol=1e-4, atol=1e-4)


def test_a_step_over_the_bound_or_with_a_prompt_chunk_runs_as_chunks(index):
    r = runner(index, verify_rows=len(CHUNK))  # the chunk fits, with row 2's token it does not
    want = one_token_steps(runner(index))
    torch.testing.assert_close(verified(r), want, rtol=1e-4, atol=1e-4)
    assert r.verify_paths == {"chunks": 1}
    r = runner(index, verify_rows=VERIFY_ROWS)
    rows = Rows()
    prefill(r, rows)
    r.step([rows.seq(0, CHUNK), rows.seq(1, [4, 9, 2])], "last", tails=[len(CHUNK), 1])  # a prompt's last logits
    assert r.verify_paths == {"chunks": 1}


@pytest.mark.parametrize("kv", list(KV))
def test_by_default_only_the_decode_kernels_path_verifies_as_rows(index, kv):
    """Rows pay where the decode attention kernel reads the cache in place; the general path would
    gather a row's whole K and V once per row, so there a verifying step stays one chunk."""
    r = runner(index, **KV[kv])
    verified(r)
    assert r.verify_paths == ({"rows": 1} if kv == "kernels" else {"chunks": 1})


def test_a_row_whose_kv_positions_outrun_the_cache_is_refused_before_its_meta(index):
    """A step's KV positions may come as a count (ForwardSeq.kv_count, a range here): one beyond
    the cache is refused in one line before the step's meta is sized by it; a range within runs
    as the list it stands for."""
    r = runner(index)
    with pytest.raises(ValueError, match=rf"row 0, its slots or its {10 ** 9} KV positions beyond the KV cache"):
        r.step([SeqStep(0, [5], [0], [0], range(10 ** 9))], "last")
    a = runner(index).step([SeqStep(0, [5, 9], [0, 1], [0, 1], range(2))], "last")
    b = runner(index).step([SeqStep(0, [5, 9], [0, 1], [0, 1], [0, 1])], "last")
    assert torch.equal(a, b)


def test_a_decode_steps_meta_built_ahead_is_taken_for_those_very_sequences_only(index, monkeypatch):
    """NOTE [ a step's meta built ahead ] in runner.py: a decode step prepared ahead builds no meta
    of its own when stepped and gives the logits of one that was not prepared; sequences equal
    but not the ones prepared, and a prompt chunk, build their own."""
    import layerstream.compute.runner as runner_mod

    built = []
    build = runner_mod.build_step_meta
    monkeypatch.setattr(runner_mod, "build_step_meta", lambda *a, **k: built.append(a[2]) or build(*a, **k))
    want, got = runner(index), runner(index)
    for r in (want, got):
        prefill(r, Rows())

    def step():  # (the next decode step of both rows: a new list each call)
        return [SeqStep(0, [77], [5], [5], list(range(6))), SeqStep(2, [31], [3], [3], list(range(4)))]
    ref = want.step(step(), "last")
    seqs = step()
    got.prepare(seqs)
    assert built[-1] is seqs
    n = len(built)
    assert torch.equal(got.step(seqs, "last"), ref) and len(built) == n and not got._ahead
    again, other = step(), step()
    got.prepare(again)
    got.step(other, "none")  # (equal sequences, another list: its own meta)
    assert built[-1] is other and len(built) == n + 2
    chunk = [SeqStep(0, [1, 2], [7, 8], [7, 8], list(range(9)))]
    got.prepare(chunk)  # (a prompt chunk: nothing built ahead)
    assert built[-1] is other
