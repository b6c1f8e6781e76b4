"""Every stage of bin/bench runs on the CPU on a tiny model and prints its table."""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import bench, stage_bench
from layerstream.loader.synth import ModelShape, write_shaped_model
from layerstream.proto.signals import HOW

TINY = ModelShape("tiny", n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_vocab=300, context_length=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_shaped_model(tmp_path_factory.mktemp("sb") / "tiny.gguf", TINY)


def run(capsys, *argv) -> str:
    assert bench.main(list(argv)) == 0
    return capsys.readouterr().out


def test_reader(tiny, capsys):
    out = run(capsys, "reader", "-m", tiny, "--reps", "1", "--readers", "2", "--threads", "3")
    assert "cold" in out and "warm" in out and "GB/s" in out and "posix_fadvise" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["cold"], ["warm"], ["fill"], ["populated"]) and line.split()[1].isdigit()}
    assert set(rows) == {"cold", "warm", "fill", "populated"}
    assert all(r[1:4] == ["2", "3", "0"] for r in rows.values())  # readers, threads, map threads
    assert "populated = the same after the arena's pages were made" in out
    out = run(capsys, "reader", "-m", tiny, "--reps", "1", "--modes", "fill", "--map-threads", "2")
    fill = [line.split() for line in out.splitlines() if line.split()[:1] == ["fill"]]
    assert fill and fill[0][1] == "1" and fill[0][2].isdigit() and fill[0][3] == "2"  # readers, threads, map threads
    assert float(fill[0][fill[0].index("buffered") + 3]) > 0  # GB/s


def test_transfer_is_a_cpu_memcpy(capsys):
    out = run(capsys, "transfer", "--device", "cpu", "--reps", "1", "--slots", "2", "--size-mb", "4")
    assert "CPU memcpy" in out and "GB/s" in out


def test_transfer_slot_size_from_model(tiny, capsys):
    out = run(capsys, "transfer", "-m", tiny, "--device", "cpu", "--reps", "1", "--slots", "1")
    assert "512.0 MiB" not in out


def test_dequant(tiny, capsys):
    out = run(capsys, "dequant", "-m", tiny, "--device", "cpu", "--reps", "1")
    assert "Q4_K" in out and "whole layer" in out and "ms" in out


def test_engine_at_a_batch_whose_prompts_take_several_steps(tiny, capsys):
    """A probe's: `engine -b 4 -p 8` ran out of context, since the sequence whose prompt is read
    first decodes while the others' are (time_decode), and the bench sized --ctx without those tokens."""
    out = run(capsys, "engine", "-m", tiny, "--device", "cpu", "-p", "8", "--decode-tokens", "4", "--reps", "1",
              "-b", "4")
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("decode")] == [["decode", "1"],
                                                                                           ["decode", "4"]]


def test_compute(tiny, capsys):
    out = run(capsys, "compute", "-m", tiny, "--device", "cpu", "--reps", "1", "--tokens", "16",
              "-b", "1,2", "--decode-context", "8")
    assert "prompt" in out and out.count("decode") >= 2 and "tokens/s" in out


def test_kernels_lists_the_decode_steps_operators(tiny, capfd):
    assert bench.main(["kernels", "-m", tiny, "--device", "cpu", "--context", "8", "--steps", "24", "--top", "5"]) == 0
    out, err = capfd.readouterr()
    assert "profiler_st" not in err, err  # (torch's profiler logged its start and stop on fd 2)
    assert "decode batch 1 after 8 tokens" in out and "back to back" in out and "reading each token back" in out
    assert re.search(r"\d+\.\d\d ms \(\d+\.\d tokens/s\) through the engine core .*the CLI's path.*the host "
                     r"waited \d+\.\d\d ms of it for the ids, so its own work took -?\d+\.\d\d ms\), "
                     r"\d+\.\d\d ms \(\d+\.\d tokens/s\) with each step's ids read before the next", out)
    rows = out.split("name\n", 1)[1].splitlines()
    assert len(rows) == 5 and any("aten::" in r for r in rows)  # the heaviest operators, with their times


def test_compute_on_a_shape(capsys):
    out = run(capsys, "compute", "--shape", "smollm2-135m", "--layers", "1", "--device", "cpu", "--reps", "1",
              "--tokens", "8", "-b", "1", "--decode-context", "4")
    assert "smollm2-135m.gguf" in out


@pytest.mark.timeout(120)
def test_pipeline(tiny, capsys, tmp_path):
    trace = tmp_path / "t.json"
    out = run(capsys, "pipeline", "-m", tiny, "--device", "cpu", "--reps", "1", "--tokens", "8",
              "--resident-layers", "0", "-b", "1,2", "--trace", str(trace), "--generate-tokens", "6")
    assert "x floor" in out and "streamed" in out and "wall time" in out and trace.exists()
    assert f"events written to {trace}\ndevice stream, medians over " in out  # (where the stream waited)
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("generate"))  # run-pipeline's path
    assert row[1:3] == ["1", "1"] and float(row[4]) > 0, row
    assert "run-pipeline's path, 5 intervals: mean" in out  # (6 tokens: 5 intervals between them)


@pytest.mark.timeout(120)
def test_pipeline_decodes_every_sequence_of_a_batch_in_one_step(tiny, capsys):
    """Without a prompt (--tokens 0) the step budget still holds the batch: before, it was one
    token, and a "batch 4" row timed steps of one sequence (time_decode now refuses those)."""
    out = run(capsys, "pipeline", "-m", tiny, "--device", "cpu", "--reps", "2", "--tokens", "0", "-b", "4")
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("decode"))
    assert row[1:3] == ["4", "4"], row


def test_experts_compares_the_cache_policies(capsys):
    """A cache of a tenth of the experts under uniform routing at batch 8: LRU keeps nothing
    (each pass's experts outnumber it), LFU about its share."""
    out = run(capsys, "experts", "--layers", "8", "--passes", "40", "-b", "8", "--shares", "0.1", "--skew", "0")
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("uniform"))
    lfu, lru = (float(v.rstrip("%")) for v in row[-2:])
    assert lru < 1 and 6 < lfu < 14, row


def test_the_experts_routing_trace_comes_a_pass_at_a_time():
    """The routing trace is drawn a pass at a time: --passes 10**11 ended in a MemoryError's
    traceback where the trace was drawn whole (a probe's). The passes are the trace drawn whole,
    written out here as the Gumbel top-k over the same generator, each token's k experts distinct."""
    import numpy as np

    from benchmarks.stage_bench import _routes

    L, E, k, b, skew = 3, 16, 4, 5, 1.0
    rng = np.random.default_rng(0)
    logp = np.stack([-skew * np.log1p(rng.permutation(E)) for _ in range(L)])
    keys = logp[None, :, None, :] + rng.gumbel(size=(6, L, b, E))
    whole = np.argpartition(-keys, k - 1, axis=-1)[..., :k]
    passes = list(_routes(0, 6, L, E, k, b, skew))
    assert len(passes) == 6 and all(np.array_equal(p, w) for p, w in zip(passes, whole))
    assert all(len(set(tok)) == k for p in passes for layer in p for tok in layer.tolist())
    first = next(_routes(0, 10**11, 48, 128, 8, 512, 0.0))  # (a pass's memory, not 10**11 passes')
    assert first.shape == (48, 512, 8)


def test_serve_warms_both_paths_then_alternates_them_and_reports_the_median_round(tiny, capsys, monkeypatch):
    """bin/bench serve: per client count, an untimed round through the engine and one through the
    server (the first round of a batch size captures its graphs), then --reps rounds of each,
    alternated; each row is the round of median wall time."""
    import socket

    order = []
    bare, clients = stage_bench._bare_engine, stage_bench._server_clients

    def engine_round(*a):
        order.append("engine")
        return bare(*a)

    def server_round(*a):
        order.append("server")
        return clients(*a)

    monkeypatch.setattr(stage_bench, "_bare_engine", engine_round)
    monkeypatch.setattr(stage_bench, "_server_clients", server_round)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run(capsys, "serve", "-m", tiny, "--device", "cpu", "-c", "1", "-p", "4", "--tokens", "2", "--reps", "3",
              "--port", str(port))
    assert order == ["engine", "server"] * 4  # the untimed pair, then three timed
    rows = [line.split() for line in out.splitlines() if line.split()[1:2] in (["engine"], ["server"])]
    assert [r[:3] for r in rows] == [["1", "engine", "2"], ["1", "server", "2"]]
    assert "the round of median wall time of 3, the two paths alternated" in out
    runs = [(0.3, [0.1], 4), (0.1, [0.2], 4), (0.2, [0.3], 4)]
    assert stage_bench._median_run(runs) == (0.2, [0.3], 4) and stage_bench._median_run(runs[:2]) == (0.1, [0.2], 4)


@pytest.mark.parametrize("argv, message", [
    (["cpu-kernel", "--experts", "0"], "--experts 0: give at least 1"),
    (["cpu-kernel", "--threads", "2,0"], "--threads 0: give at least 1"),
    (["cpu-kernel", "-t", "0"], "--tokens 0: give at least 1"),
    (["cpu-kernel", "--lib", "/nonexistent.so"], "--lib /nonexistent.so: no such file"),
    (["engine", "--decode-tokens", "0"], "--decode-tokens 0: give at least 1"),
    (["pipeline", "--floor-gbs", "0"], "--floor-gbs 0: give more than 0"),
    (["pipeline", "--reps", "0"], "--reps 0: give at least 1"),
    (["pipeline", "--tokens", "-5"], "--tokens -5: give at least 0"),
    (["serve", "-c", "0"], "--clients 0: give at least 1"),
    (["serve", "--port", "99999"], "--port 99999: give a port from 1 to 65535"),
    (["experts", "--shares", "0.5,2"], "--shares 2: give shares above 0 and at most 1"),
    (["experts", "--skew", "nan"], "--skew: give finite values of 0 or more"),
    # the second probe's: 100000 threads crashed the process; an odd K raised a traceback; --trace
    # failed after the whole run
    (["cpu-kernel", "--threads", "1,100000"], "--threads 100000: this machine has "),
    (["transfer", "--threads", "100000"], "--threads 100000: this machine has "),
    (["reader", "--threads", "100"], "--threads 100: give 1 to 64"),
    # run-pipeline's -t, refused before the synthetic model is written (it reached CpuOptions, which refuses it too)
    (["pipeline", "--cpu-threads", "4000"], "--cpu-threads 4000: this machine has "),
    (["reader", "--map-threads", "-1"], "--map-threads -1: give 0 or more"),
    (["cpu-kernel", "--shapes", "64x63", "--types", "Q8_0"], "--shapes 64x63: K must be a multiple of 32"),
    (["cpu-kernel", "--experts", "1", "--shapes", "700x2048"], "--shapes 700x2048: n_ff and n_embd must be a multiple of 256"),
    (["pipeline", "--trace", "/nonexistent/dir/t.json"], "--trace /nonexistent/dir/t.json: cannot write there"),
    (["pipeline", "--trace", "."], "--trace .: is a directory"),
    (["pipeline", "--trace", ""], "--trace: give a file name"),
    (["pipeline", "--warm-passes", "100000"],
     "a decode sequence's 4-token prompt + 4 x -b 1 + --warm-passes 100000 = 100008 tokens: past the context of"),
    (["compute", "--tokens", "0"], "--tokens 0: give at least 1"),
    (["serve", "--tokens", "0"], "--tokens 0: give at least 1"),
    (["engine", "--decode-prompt", "0"], "--decode-prompt 0: give at least 1"),
])
def test_a_stage_refuses_counts_out_of_range_in_one_line_before_it_starts(argv, message, capsys):
    """A hostile probe's: zero or negative counts divided by zero, hung (`serve -c 0`) or made
    meaningless rows; now each is one line and exit 2, as argparse's own errors, before any work."""
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bin/bench {argv[0]}: error: {message}") and err.count("\n") == 1, err


def test_cpu_kernel_lib_takes_a_relative_path_and_refuses_another_library_in_one_line(tmp_path, monkeypatch, capsys):
    """The second probe's: `--lib ./build.so` searched the loader's path ('cannot open'), and a
    library without qdot's functions raised a traceback."""
    from benchmarks import cpu_kernel_bench
    from layerstream.compute.cpu import native

    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    (tmp_path / "copy.so").write_bytes(Path(native.library()._name).read_bytes())
    (tmp_path / "other.c").write_text("int other(void) { return 0; }\n")
    subprocess.run([native.compiler(), "-shared", "-fPIC", "-o", str(tmp_path / "other.so"), str(tmp_path / "other.c")],
                   check=True)
    monkeypatch.chdir(tmp_path)
    for name in ("./copy.so", "copy.so"):
        assert cpu_kernel_bench._lib(name).qdot_isa() >= 0
    with pytest.raises(ValueError, match=r"^--lib other.so: not a build of compute/cpu/qdot.c \(.*qdot_run"):
        cpu_kernel_bench._lib("other.so")


def test_serve_stops_where_its_server_cannot_bind(tiny, capsys):
    """A probe's: with the port held by another server, the bench timed that one. It stops instead."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert bench.main(["serve", "-m", str(tiny), "--device", "cpu", "-c", "1", "-p", "4", "--tokens", "2",
                           "--reps", "1", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == f"bin/bench: error: 127.0.0.1:{port} cannot be bound for the bench's server (Address already in use); "\
                  "give another --port\n", err


def test_add_stage_parsers_registers_every_stage():
    p = argparse.ArgumentParser()
    stage_bench.add_stage_parsers(p.add_subparsers(dest="cmd"))
    for stage in ("reader", "transfer", "dequant", "compute", "kernels", "pipeline", "serve", "experts"):
        assert p.parse_args([stage]).func.__name__ == f"bench_{stage.replace('-', '_')}"


def test_bin_bench_runs_from_anywhere_and_fails_in_one_line(tmp_path):
    """The launcher puts the repository on the path (benchmarks/ is not installed); a bad value
    is one line on stderr and exit 2, a usage error (a dense --shape was the stage's exit 1)."""
    import pathlib
    import subprocess

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    r = subprocess.run([str(launcher), "experts", "--shape", "llama-3.1-8b"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == ("bin/bench experts: error: argument --shape: invalid choice: "
                                              "'llama-3.1-8b' (choose from 'qwen3-30b-a3b') (see bin/bench experts "
                                              "--help)\n"), r


def test_time_decode_times_each_step_of_the_whole_batch_and_leaves_the_core_empty(tiny):
    """One time a step, every step holding every sequence; afterwards no request is left, so the
    core is ready for the next measurement (or for a server)."""
    from layerstream.coordinator.engine import Engine

    with Engine.load(str(tiny), device="cpu", ctx=64, max_seqs=3) as e:
        times = stage_bench.time_decode(e.core, [[1, 2, 3], [4, 5], [6]], 4)
        assert len(times) == 4 and all(t > 0 for t in times)
        assert not e.core.has_unfinished()
    with Engine.load(str(tiny), device="cpu", ctx=64, max_seqs=3, prefill_chunk=1) as e:
        with pytest.raises(ValueError, match="ran 1 of 3 sequences"):  # a step of 1 token holds 1 sequence
            stage_bench.time_decode(e.core, [[1], [2], [3]], 2)


def test_time_decode_stops_on_the_engines_error_where_a_request_fails(tmp_path):
    """A model of NaN weights: its requests end with the engine's error in their first step, and the
    prefill loop waited for their first tokens for ever (a hostile-user probe's finding)."""
    import ggufgen
    from layerstream.coordinator.engine import Engine
    from layerstream.errors import LayerstreamError

    nan = ggufgen.poison(ggufgen.write_model(tmp_path / "nan.gguf"))
    with Engine.load(nan, device="cpu", ctx=64, max_seqs=2) as e:
        with pytest.raises(LayerstreamError, match=r"NaN logits at token \d+: its weights may be corrupt"):
            stage_bench.time_decode(e.core, [[1, 2, 3], [4, 5]], 3)
        assert not e.core.has_unfinished()


def test_the_generate_row_times_run_pipelines_turn_as_its_stats_count(tiny, monkeypatch):
    """time_generate runs run-pipeline's own Turn and returns the seconds a token its --stats decode
    rate counts (from the first sampled token to the last), leaving the core empty."""
    from layerstream.coordinator import turn as turn_mod
    from layerstream.coordinator.engine import Engine

    seen = []
    pieces = turn_mod.Turn.pieces

    def spied(self, *a, **k):
        yield from pieces(self, *a, **k)
        seen.append(self.rates)

    monkeypatch.setattr(turn_mod.Turn, "pieces", spied)
    with Engine.load(str(tiny), device="cpu", ctx=64, max_seqs=1) as e:
        s, gaps = stage_bench.time_generate(e, [1, 2, 3], 6)
        assert not e.core.has_unfinished()
    (r,) = seen
    assert r.sampled == 6 and s == r.decode_s / 5 > 0
    assert len(gaps) == 5 and min(gaps) > 0 and sum(gaps) == pytest.approx(r.decode_s)  # one output a token


def test_a_warmed_prompt_row_runs_one_untimed_prefill_first_and_every_prefill_whole(tiny, monkeypatch):
    """The prompt row had no warm pass: a machine's first prompt compiled its kernels inside the
    timed passes (BENCHMARKS.md AH4). With --warm-passes, one untimed prefill comes first; each
    prefill samples its first token and leaves the core empty. Each pass prefills its whole
    prompt: one prompt repeated found its prefix in the row the pass before freed (NOTE [ prefix
    reuse ]), so every pass after the first prefilled one token."""
    from layerstream.coordinator.engine import Engine

    with Engine.load(str(tiny), device="cpu", ctx=64, max_seqs=1) as e:
        added, reused = [], []
        add, row_for = e.core.add_request, e.core._row_for
        monkeypatch.setattr(e.core, "add_request", lambda rid, p, params: (added.append((rid, list(p), params.max_tokens)),
                                                                           add(rid, p, params)))
        monkeypatch.setattr(e.core, "_row_for", lambda p: (got := row_for(p), reused.append(got[1]))[0])
        for warm, runs in ((False, 2), (True, 3)):
            added.clear()
            times = stage_bench.time_prompt(e.core, lambda k: [k, 2, 3, 4], 2, warm)
            assert len(times) == 2 and min(times) > 0 and not e.core.has_unfinished()
            assert added == [("bench-prompt", [k, 2, 3, 4], 1) for k in range(runs)]
        assert reused == [0] * 5  # no pass found a prefix of its prompt held
        stage_bench.time_prompt(e.core, lambda k: [1, 2, 3, 4], 1, True)
        assert reused[-1] == 3  # (what a repeated prompt meets: all but its last token held)


def test_the_generate_line_tells_a_slow_start_from_the_steady_rate():
    gaps = [0.1] * 2 + [0.01] * 6  # two slow intervals first, then 100 tokens/s
    line = stage_bench.generate_line(sum(gaps) / len(gaps), gaps, head=2)
    assert line == ("run-pipeline's path, 8 intervals: mean 30.8 tokens/s (--stats' rate), median 100.0, "
                    "first 2 10.0, the rest 100.0; slowest 100.0 ms, fastest 10.0 ms")
    assert stage_bench.generate_line(0.5, []) == "run-pipeline's path: fewer than two outputs timed"


@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "bin/bench: error: argument STAGE: invalid choice: 'nosuch'"),
    (["pipeline", "--reps", "x"], "bin/bench pipeline: error: argument --reps: invalid int value: 'x'"),
    # the bench probe's: lists with an empty item were dropped by some stages and refused by others as
    # 'invalid <lambda> value'; every list flag refuses them alike now
    (["engine", "-b", "1,,2"], "bin/bench engine: error: argument -b/--batch: '1,,2': give whole numbers, comma"),
    (["compute", "-b", "1,,2"], "bin/bench compute: error: argument -b/--batch: '1,,2': give whole numbers, comma"),
    (["experts", "-b", "1,"], "bin/bench experts: error: argument -b/--batch: '1,': give whole numbers, comma"),
    (["experts", "--shares", "0.5,x"], "bin/bench experts: error: argument --shares: '0.5,x': give numbers, comma"),
    (["cpu-kernel", "--shapes", "abc"], "bin/bench cpu-kernel: error: argument --shapes: 'abc': give matrices as N x K"),
    # an unknown shape was refused by synth once the stage ran (status 1)
    (["pipeline", "--shape", "foo"], "bin/bench pipeline: error: argument --shape: invalid choice: 'foo' (choose from"),
    # names and --configs entries the stage refused itself once it ran, status 1 (a probe's); experts
    # --shape of a dense model too ("has no experts")
    (["experts", "--shape", "bogus"], "bin/bench experts: error: argument --shape: invalid choice: 'bogus' (choose "
                                      "from 'qwen3-30b-a3b') (see bin/bench experts --help)\n"),
    (["experts", "--shape", "llama-3.1-8b"], "bin/bench experts: error: argument --shape: invalid choice: "
                                             "'llama-3.1-8b' (choose from 'qwen3-30b-a3b')"),
    (["reader", "--modes", "bogus"], "bin/bench reader: error: argument --modes: 'bogus': give passes of cold, warm, "
                                     "fill, populated, comma separated (e.g. cold,warm) (see bin/bench reader --help)\n"),
    (["reader", "--modes", ""], "bin/bench reader: error: argument --modes: '': give passes of cold, warm, fill,"),
    (["reader", "--modes", "warm,"], "bin/bench reader: error: argument --modes: 'warm,': give passes of cold, warm,"),
    (["qmatmul", "--configs", "gemv:1x1x8"], "bin/bench qmatmul: error: argument --configs: 'gemv:1x1x8': give "
                                             "BMxBNxWARPSxSPLITS, gemv:MRxBNxKBxWARPS, rows:MRxBNxKBxWARPS or "
                                             "small:MPxBNxWARPSxSTAGESxSPLITS, of whole numbers from 1, the block sizes "
                                             "and warps powers of two, comma separated (e.g. 16x32x4x1,gemv:1x1x8x1) (see "
                                             "bin/bench qmatmul --help)\n"),
    # a block size or warps not a power of two went to Triton, which refused it once the stage ran
    (["qmatmul", "--configs", "16x24x4x1"], "bin/bench qmatmul: error: argument --configs: '16x24x4x1': give"),
    (["qmatmul", "--configs", "1x4x1x3,0x4x1x3"], "bin/bench qmatmul: error: argument --configs: '1x4x1x3,0x4x1x3': give"),
])
def test_argument_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err


def test_the_list_flags_of_names_and_configs_are_read_as_lists():
    """(--modes and --configs, read by type= functions: their defaults as well as a value given)"""
    reader = bench.build_parser().parse_args(["reader"])
    assert reader.modes == ["cold", "warm", "fill", "populated"]
    assert bench.build_parser().parse_args(["reader", "--modes", "fill,warm"]).modes == ["fill", "warm"]
    assert bench.build_parser().parse_args(["qmatmul"]).configs == []
    assert bench.build_parser().parse_args(["qmatmul", "--configs", "1x4x1x3,gemv:2x1x8x1"]).configs == [
        (1, 4, 1, 3), ("gemv", 2, 1, 8, 1)]


@pytest.mark.parametrize("lookahead, per_step", [(True, 3.0), (False, 4.0)])
def test_time_decode_times_the_cores_steps_as_the_device_queue_runs_them(tiny, monkeypatch, lookahead, per_step):
    """On a virtual device (1 s of host work and 3 s of device work a step), a decode step through
    the engine core one step behind takes the device's 3 s: the host's second hides behind the
    step in flight. The sync the caller gives is never called between steps (it drained the queue,
    and the figure read 4 s, host and device in series, as stepping in turn does)."""
    from layerstream.coordinator.engine import Engine
    from virtual_device import VirtualClock, VirtualDevice

    clock = VirtualClock()
    monkeypatch.setattr(stage_bench, "time", clock)
    with Engine.load(str(tiny), device="cpu", ctx=64, max_seqs=1, lookahead=lookahead) as e:
        dev = e.core.backend = VirtualDevice(e.core.backend, clock, host_s=1.0, device_s=3.0)
        times = stage_bench.time_decode(e.core, [[1, 2, 3]], 6, dev.synchronize)
    assert times == [per_step] * 6


def test_the_host_waits_time_decode_reports_are_its_decode_steps_only(tiny, monkeypatch):
    """bin/bench kernels' "host waited" figure: on a virtual device where a step costs the host 1 s
    and the device 3 s a decode step but 30 s a prefill, each timed decode step's ids come 2 s
    after its launch's return (the host's second hidden behind the step in flight); the prefill's
    29 s wait and the drain's are not among them."""
    from layerstream.coordinator.engine import Engine
    from virtual_device import VirtualClock, VirtualDevice

    class PrefillCosts(VirtualDevice):
        def submit(self, seqs, sample, starts, want="none"):
            self.device_s = 30.0 if any(len(s.tokens) > 1 for s in seqs) else 3.0
            super().submit(seqs, sample, starts, want)

    clock = VirtualClock()
    monkeypatch.setattr(stage_bench, "time", clock)
    with Engine.load(str(tiny), device="cpu", ctx=64, max_seqs=1) as e:
        dev = e.core.backend = PrefillCosts(e.core.backend, clock, host_s=1.0, device_s=3.0)
        waits = []
        times = stage_bench.time_decode(e.core, [[1, 2, 3, 4]], 5, dev.synchronize, waits)
        assert "collect" not in vars(dev)  # the backend's own collect again
    assert times == [3.0] * 5 and waits == [2.0] * 5


def test_qmatmul_configs_are_read_by_kind_and_refused_with_one_line():
    """--configs entries: the split-K kernel's four numbers, or KIND:.. with that kind's numbers,
    spelled back as given; a wrong kind or count, or a number below 1, is a ValueError naming the entry."""
    for text, cfg in (("1x4x1x3", (1, 4, 1, 3)), ("gemv:2x1x8x1", ("gemv", 2, 1, 8, 1)),
                      (" small:16x64x4x2x4", ("small", 16, 64, 4, 2, 4))):
        assert stage_bench._kernel_config(text) == cfg and stage_bench._config_name(cfg) == text.strip()
    assert stage_bench._config_name(None) == "auto"
    assert stage_bench._kernel_config("16x32x4x3") == (16, 32, 4, 3)  # (splits and stages: any count)
    assert stage_bench._kernel_config("small:16x64x4x3x5") == ("small", 16, 64, 4, 3, 5)
    for bad in ("gmev:1x1x8x1", "gemv:1x1x8", "rows:1x2", "1x4", "1x4x0x3", "small:16x64x4x2x-4", "16x24x4x1",
                "gemv:3x1x8x1", "rows:1x2x4x3", "small:16x64x6x2x4"):
        with pytest.raises(ValueError, match=f"--configs '{bad}'"):
            stage_bench._kernel_config(bad)


def test_cpu_kernel_times_a_layers_experts_on_the_runs_path_and_alone(capsys, monkeypatch):
    from layerstream.compute.cpu import native

    if not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    out = run(capsys, "cpu-kernel", "--experts", "1,2", "-t", "1,2", "--shapes", "256x512", "--reps", "1",
              "--gap-ms", "0")
    assert "experts 256x512" in out and "calls 0 ms apart" in out
    rows = [line.split() for line in out.splitlines() if line.split()[2:3] in (["run"], ["native"])]
    assert [(r[0], r[1], r[2]) for r in rows] == [(t, n, p) for t in "12" for n in "12" for p in ("run", "native")]
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)
    # --phases: each row's nine phases, whose sum is about the call's time, and its dispatches' claimers
    out = run(capsys, "cpu-kernel", "--experts", "2", "-t", "1", "--shapes", "256x512", "--reps", "3", "--gap-ms", "0",
              "--phases", "--threads", "1")
    assert "before | gather | quantize | gate+up | SiLU | quantize | down | sum | after; the run's start() " in out
    rows = [line for line in out.splitlines() if line.split()[2:3] in (["run"], ["native"])]
    assert len(rows) == 2
    for r in rows:
        cells = [float(v) for v in r.split("(claimers")[0].split()[6:] if v != "|"]
        assert len(cells) == 9 and all(c >= 0 for c in cells), r
        assert re.search(r"\(claimers 0, 0\)", r), r  # (one thread: no worker claims)
    # the run's path also says when its start() returned: within the call, the native call's has none
    (run_row,), (native_row,) = ([r for r in rows if r.split()[2] == p] for p in ("run", "native"))
    returned = float(re.search(r"\(claimers 0, 0\); (\d+)$", run_row)[1])
    assert 0 < returned <= float(run_row.split()[3]) and native_row.endswith("(claimers 0, 0)")
    # --threads gives a table a count; --lib times another build of the native kernel (here the
    # run's own, loaded from its path)
    libs, experts = [], native.experts
    monkeypatch.setattr(native, "experts", lambda *a, lib=None, **k: libs.append(lib) or experts(*a, lib=lib, **k))
    out = run(capsys, "cpu-kernel", "--experts", "1", "-t", "1", "--shapes", "256x512", "--reps", "1", "--gap-ms", "0",
              "--threads", "1,2", "--lib", str(native.library_path(native.compiler())))
    heads = [line for line in out.splitlines() if line.startswith("experts 256x512")]
    assert [re.search(r"(\d+) threads", h)[1] for h in heads] == ["1", "2"] and all("; native: " in h for h in heads)
    assert libs and all(lib is not None and lib is not native.library() for lib in libs)


def test_links(capsys):
    out = run(capsys, "links", "--rounds", "20")
    rows = [line for line in out.splitlines() if re.match(r"(loop entry|answer queued|answer comes)", line)]
    assert [r[:34].strip() for r in rows] == ["loop entry alone"] + [
        f"answer {when}, {how}" for how in ("run_task", "loop entered") for when in ("queued", "comes")]
    assert all(float(r.split()[-2]) > 0 for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_a_bench_stopped_by_a_stop_signal_removes_its_folders_and_its_processes(tmp_path, sig):
    """At the signals' defaults the bench died at once and left its run's folders under $TMPDIR (the
    synthetic model, the sockets' folder) and, as a pipeline, its processes to the supervisor's
    last-resort kill; now it stops as on Ctrl-C, with one line and 128 + the signal."""
    import pathlib
    import subprocess

    from procs import descendants, leaked, segments

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    before = segments()
    # (--reps within the shape's context: a decode sequence of 8,008 of its 8,192 tokens, minutes of passes)
    p = subprocess.Popen([str(launcher), "pipeline", "--shape", "smollm2-135m", "--layers", "2", "--device", "cpu",
                          "--resident-layers", "0", "--reps", "8000"], env=os.environ | {"TMPDIR": str(tmp_path)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(descendants(p.pid)) < 3:  # (its pipeline starts)
            time.sleep(0.2)
        time.sleep(3)  # (and runs: its children past their start, as the launcher's signal test waits)
        kids = descendants(p.pid)
        assert len(kids) >= 3 and list(tmp_path.glob("layerstream-*")), p.stderr
        p.send_signal(sig)
        p.wait(timeout=30)
        assert p.returncode == 128 + sig and p.stderr.read().splitlines()[-1] == \
            f"bin/bench: {HOW[sig]}"
        def alive():  # (with their commands; the resource tracker ends once the bench's end closes its pipe)
            return [(k, open(f"/proc/{k}/cmdline").read().replace("\0", " ")[:120]) for k in kids
                    if os.path.exists(f"/proc/{k}") and "zombie" not in open(f"/proc/{k}/status").read().lower()]

        deadline = time.monotonic() + 5
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(tmp_path.iterdir()) and not alive() and not leaked(before, run=p.pid), alive()
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.default_threads
def test_a_groups_ctrl_c_while_the_readers_start_is_the_benchs_one_line(tmp_path, tiny):
    """A probe's: a terminal's Ctrl-C reaches the whole group, and each reader process, still
    importing its stage in multiprocessing's bootstrap, printed its own KeyboardInterrupt traceback.
    The readers are spawned with the stop signals blocked and ignore them; the bench stops them."""
    import pathlib
    import subprocess

    from procs import descendants, ends_with_the_test

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    p = subprocess.Popen([str(launcher), "reader", "-m", tiny, "--readers", "4", "--reps", "100000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=ends_with_the_test)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(descendants(p.pid)) < 3:  # (its readers are being spawned)
            time.sleep(0.02)
        kids = descendants(p.pid)
        os.killpg(p.pid, signal.SIGINT)  # (as a terminal sends it: to the bench and its readers)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and err.strip().splitlines() == ["bin/bench: interrupted"], err
        deadline = time.monotonic() + 15  # (readers finish their read, then end)
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{k}") for k in kids):
            time.sleep(0.1)
        assert not [k for k in kids if os.path.exists(f"/proc/{k}")]
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.default_threads
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_the_benchs_threads_before_its_first_spawn_never_take_sigint():
    """The test above, one run in CI: numpy's OpenBLAS thread took the group's Ctrl-C, the main thread
    was interrupted inside a reader's spawn (its own mask blocked it), and that reader printed
    spawn_main's EOFError. bin/bench's own program, its entry() in place of a dump of each thread's mask,
    after a stage's --threads raised torch's count (the review's: those threads came from the main thread)."""
    import pathlib
    import re
    import subprocess

    from procs import THREAD_MASKS, sigint_takers

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    program = re.search(r"exec \"\$py\" -P -c '(.*?)' \"\$here\"", launcher.read_text(), re.S).group(1)
    assert program.endswith("entry()")
    dump = ("import argparse, os, time, numpy, torch\nfrom benchmarks.stage_bench import _device\n"
            "_device(argparse.Namespace(threads=6, device='cpu'))  # (--threads above torch's default: more threads)\n"
            "torch.ones(1 << 20).sum(); numpy.ones((256, 256)) @ numpy.ones((256, 256))\n"
            "time.sleep(0.5)  # (a thread still starting shows every signal blocked: glibc sets its mask once it runs)\n")
    code = program[:-len("entry()")] + dump + THREAD_MASKS
    out = subprocess.run([sys.executable, "-P", "-c", code, str(launcher.parents[1])], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    threads, taking = sigint_takers(out)
    assert threads >= 2 and taking == 0, out  # the pools run, and none of their threads takes it


def _stop_handlers_in_place(pid: int) -> bool:
    """Whether bin/bench's Python (`pid`) has run early_signals.install: SIGTERM caught. What lands before
    it, as `site` imports, meets CPython's defaults (early_signals' NOTE); that took more than 0.3 s on CI's
    2 loaded cores (a Ctrl-C there: a KeyboardInterrupt traceback and status -2)."""
    from procs import signal_state

    caught = signal_state(pid).get("SigCgt", 0)
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    return exe.startswith("python") and bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.default_threads
def test_a_ctrl_c_while_the_bench_starts_is_its_one_line_and_130():
    """(a Ctrl-C in its first second, while torch was imported, printed a KeyboardInterrupt traceback
    and the bench died by the signal, status -2)"""
    import pathlib
    import subprocess

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    p = subprocess.Popen([str(launcher), "links", "--rounds", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    if os.path.isdir("/proc/self/task"):  # (once its handlers are in place: torch is imported next)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None and not _stop_handlers_in_place(p.pid):
            time.sleep(0.005)
    else:
        time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "bin/bench: interrupted" and "Traceback" not in err, err


def test_a_bench_into_a_closed_stdout_or_a_full_disk_says_so_in_one_line():
    """(`>&-`: libuv aborted, status 134, as its loop's socket took the closed stdout's number, then
    the bench ran with its tables lost and status 0, where run-pipeline refuses a closed stdout;
    `>/dev/full`: an OSError traceback from the table's print)"""
    import pathlib
    import subprocess

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    r = subprocess.run([str(launcher), "links", "--rounds", "20"], stderr=subprocess.PIPE, text=True, timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and r.stderr == ("bin/bench: error: cannot write the output (standard output is "
                                              "closed); redirect it to a file, or to /dev/null to discard it\n"), r.stderr
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            r = subprocess.run([str(launcher), "links", "--rounds", "20"], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        assert r.returncode == 1 and r.stderr == ("bin/bench: error: cannot write the output (No space left on "
                                                  "device); check the disk or the file stdout goes to\n"), r.stderr


def test_a_reader_worker_killed_ends_the_reader_stage_at_once_in_one_line(tmp_path):
    """(a killed reader answered nothing: the stage waited 600 s, then gave a queue.Empty traceback)"""
    import pathlib
    import subprocess

    from procs import descendants

    launcher = pathlib.Path(__file__).resolve().parents[2] / "bin" / "bench"
    p = subprocess.Popen([str(launcher), "reader", "--reps", "1000000", "--modes", "warm"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, worker = time.monotonic() + 90, None
        while worker is None and time.monotonic() < deadline:
            time.sleep(0.2)
            worker = next((k for k in descendants(p.pid) if "spawn_main" in open(f"/proc/{k}/cmdline").read()), None)
        assert worker is not None
        time.sleep(1)  # (its reads under way)
        os.kill(worker, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 1 and err.strip().splitlines()[-1] == \
            "bin/bench: error: reader 0 died (exit code -9) during its reads", err
    finally:
        if p.poll() is None:
            p.kill()


def test_cpu_kernel_takes_block_types_in_either_case(capsys):
    """(q4_k was refused as unknown: llama.cpp's tools take types in lower case)"""
    out = run(capsys, "cpu-kernel", "--types", "q4_k,Q6_k", "-t", "1", "--threads", "1", "--shapes", "256x512",
              "--reps", "1")
    paths = [" ".join(line.split()[1:3]) for line in out.splitlines() if line.split()[1:2] in (["native"], ["aten"])]
    assert "native Q4_K" in paths and "native Q6_K" in paths, out
