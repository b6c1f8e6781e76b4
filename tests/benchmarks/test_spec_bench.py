"""bin/bench spec on the CPU with tiny models: the target's passes by tokens verified, the draft's
time a token, and tokens/s at each acceptance worked out from them."""

import pytest

from benchmarks import bench, spec_bench
from layerstream.loader.synth import ModelShape, write_shaped_model

TARGET = ModelShape("tiny", n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_vocab=300, context_length=512)
DRAFT = ModelShape("tiny-draft", n_embd=128, n_ff=256, n_layer=1, n_head=2, n_head_kv=1, n_vocab=300, context_length=512)


@pytest.mark.timeout(180)
def test_spec_stage_prints_passes_draft_costs_and_the_rates_they_give(tmp_path, capsys):
    target = write_shaped_model(tmp_path / "t.gguf", TARGET)
    draft = write_shaped_model(tmp_path / "d.gguf", DRAFT)
    args = bench.build_parser().parse_args(["spec", "-m", target, "--draft-model", draft, "--device", "cpu",
                                            "--dtype", "float32", "--reps", "1", "--verify", "2,4",
                                            "--resident-layers", "0"])
    got = args.func(args)
    out = capsys.readouterr().out
    assert "the draft model d.gguf takes" in out  # the plan counted it
    assert set(got["passes"]) == {1, 2, 4} and all(s > 0 for s in got["passes"].values())
    assert set(got["draft"]) == {1, 3} and all(s > 0 for s in got["draft"].values())
    for row in got["rates"]:
        a = row["acceptance"]
        assert row["no drafts"] == pytest.approx(1 / got["passes"][1])
        for k in (1, 3):
            tokens = sum(a ** i for i in range(k + 1))  # the target's token and each draft taken in turn
            cost = got["passes"][k + 1] + k * got["draft"][k]
            assert row[f"k={k}"] == pytest.approx(tokens / cost)
        best = max([(row["no drafts"], 0)] + [(row[f"k={k}"], k) for k in (1, 3)])[1]
        assert row["best k"] == best
    assert "tokens a pass" in out and "s/token" in out and "acceptance" in out


@pytest.mark.timeout(180)
def test_in_process_the_bench_says_how_its_passes_verified(tmp_path, capsys):
    target = write_shaped_model(tmp_path / "t.gguf", TARGET)
    args = bench.build_parser().parse_args(["spec", "-m", target, "--in-process", "--device", "cpu", "--dtype",
                                            "float32", "--reps", "1", "--verify", "2,4,32"])
    got = args.func(args)
    assert set(got["passes"]) == {1, 2, 4, 32}
    # the CPU's attention has no decode kernel, so every pass (and its untimed first run) verifies as one
    # chunk (runner.py: rows only where the decode kernel reads the cache in place; on CUDA 2 and 4
    # tokens run as rows and 32, over runner.VERIFY_ROWS, as chunks)
    assert "verifying passes run as: chunks 6" in capsys.readouterr().out


def test_a_draft_of_another_vocabulary_is_an_error_line(tmp_path, capsys):
    target = write_shaped_model(tmp_path / "t.gguf", TARGET)
    other = write_shaped_model(tmp_path / "o.gguf", ModelShape("o", 128, 256, 1, 2, 1, 400, context_length=512))
    assert bench.main(["spec", "-m", target, "--draft-model", other, "--device", "cpu", "--reps", "1"]) == 1
    assert "the draft has 400 tokens, the target 300" in capsys.readouterr().err
    assert spec_bench.expected_tokens(0.5, 2) == 1.75


@pytest.mark.timeout(180)
def test_the_drafts_first_proposals_are_not_timed(tmp_path, monkeypatch):
    """The draft's first proposals prefill the prompt and, on CUDA, capture the decode graphs: the
    first timed proposal of one token once held that capture (seconds, against a millisecond after).
    Here the first two proposals are made slow; none of the draft's figures may show it."""
    import argparse
    import time

    from layerstream.coordinator import draft
    from layerstream.loader.gguf_index import open_model

    real, calls = draft.DraftProposer.propose, []

    def slow_at_first(self, k):
        calls.append(k)
        if len(calls) <= 2:
            time.sleep(0.5)
        return real(self, k)

    monkeypatch.setattr(draft.DraftProposer, "propose", slow_at_first)
    index = open_model(write_shaped_model(tmp_path / "d.gguf", DRAFT))
    args = argparse.Namespace(device="cpu", dtype="float32", reps=2)
    got = spec_bench.time_draft(index, args, 128, [1, 3])
    assert set(got) == {1, 3} and all(0 < s < 0.1 for s in got.values()), got


def test_warm_passes_run_untimed_before_each_sizes_timed_ones():
    """--warm-passes: that many untimed passes of each size come before its timed ones (a CPU
    share's balancer tries its shares on a batch size's first passes), and only the timed ones
    make the median."""
    import time

    class Backend:  # the calls time_passes makes of a step backend, each pass's tokens kept
        def __init__(self):
            self.passes: list[int] = []

        def step(self, seqs, mode):
            pass

        def submit(self, seqs, tokens, starts, mode):
            self.passes.append(tokens[0])
            if (len(self.passes) - 1) % 10 < 4:  # the first four passes of each size (warm, and the untimed first) slow
                time.sleep(0.05)

        def collect(self):
            pass

    be = Backend()
    got = spec_bench.time_passes(be, 0, 300, 128, [1, 4], reps=6, warm=3)
    assert be.passes == [1] * 10 + [4] * 10  # 3 warm, 1 untimed first, 6 timed a size
    assert all(s < 0.04 for s in got.values()), got
