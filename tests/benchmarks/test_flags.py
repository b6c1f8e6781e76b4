"""The stages that start the pipeline (pipeline, serve, spec) hand it the options their flags say:
each flag of run-pipeline's budgets, readers, CPU share and experts reaches the config."""

import tempfile

import pytest

from benchmarks import bench
from layerstream.coordinator import pipeline as pipeline_mod, pipeline_config as pc
from layerstream.coordinator.engine import Engine
from layerstream.loader.synth import ModelShape, write_shaped_model

TINY = ModelShape("tiny", n_embd=128, n_ff=256, n_layer=2, n_head=2, n_head_kv=1, n_vocab=300, context_length=512)
FLAGS = ["--vram-gb", "3.5", "--host-cache-gb", "2", "--resident-layers", "1", "--prefetch", "3",
         "--step-tokens", "64", "--vram-slots", "3", "--readers", "2", "--cpu-share", "0.25", "--cpu-split", "rows",
         "--cpu-threads", "1", "--expert-cache-gb", "1.5", "--moe-dense", "stream", "--expert-policy", "lru",
         "--expert-prefetch", "4"]


def said(direct: bool = False, trace: bool = False) -> pc.PipelineConfig:
    """The config FLAGS ask for, written out field by field."""
    return pc.PipelineConfig(
        budget=pc.Budget(vram_gb=3.5, host_cache_gb=2.0, resident_layers=1, kv_on_host=None, prefetch=3, step_tokens=64,
                      vram_slots=3, evaluates=False),
        readers=pc.ReaderOptions(count=2, dirs=(), threads=None, direct=direct),
        cpu=pc.CpuOptions(share="0.25", split="rows", threads=1),
        experts=pc.ExpertOptions(cache_gb=1.5, moe_dense="stream", policy="lru", prefetch=4),
        procs=pc.ProcessOptions(trace=trace))


class Opened(Exception):
    """Raised in place of starting the pipeline, with the config it was given."""


@pytest.fixture
def tiny(tmp_path):
    return write_shaped_model(tmp_path / "tiny.gguf", TINY)


def _started_with(monkeypatch, argv) -> pc.PipelineConfig:
    def engine_open(cfg, pcfg=None, **kw):
        raise Opened(pcfg)

    def backend(index, cfg, pcfg):
        raise Opened(pcfg)

    monkeypatch.setattr(Engine, "open", staticmethod(engine_open))
    monkeypatch.setattr(pipeline_mod, "pipeline_backend", backend)
    args = bench.build_parser().parse_args(argv)
    with pytest.raises(Opened) as e:
        args.func(args)
    return e.value.args[0]


def test_the_pipeline_stage_starts_the_pipeline_its_flags_say(tiny, monkeypatch, tmp_path):
    got = _started_with(monkeypatch, ["pipeline", "-m", tiny, "--device", "cpu", "--direct", "--trace",
                                      str(tmp_path / "t.json"), *FLAGS])
    assert got == said(direct=True, trace=True)


def test_the_serve_stage_starts_the_pipeline_its_flags_say(tiny, monkeypatch):
    assert _started_with(monkeypatch, ["serve", "-m", tiny, "--device", "cpu", *FLAGS]) == said()


def test_the_spec_stage_starts_the_pipeline_its_flags_say(tiny, monkeypatch):
    assert _started_with(monkeypatch, ["spec", "-m", tiny, "--device", "cpu", *FLAGS]) == said()


def test_without_flags_the_stages_take_the_pipelines_defaults(tiny, monkeypatch):
    """(but for the rows of logits: the stages only generate, as run-pipeline without --perplexity)"""
    for stage in ("pipeline", "serve", "spec"):
        got = _started_with(monkeypatch, [stage, "-m", tiny, "--device", "cpu"])
        assert got == pc.PipelineConfig(budget=pc.Budget(evaluates=False)), stage


@pytest.mark.parametrize("argv, line", [
    (["reader", "--readers", "1000"], "--readers 1000: give 1 to 64 (as run-pipeline)"),  # (a thousand processes ran the machine out of memory)
    (["reader", "--readers", "0"], "--readers 0: give at least 1"),  # (ZeroDivisionError)
    (["compute", "--sample-layers", "0"], "--sample-layers 0: give at least 1"),
    (["kernels", "--steps", "0"], "--steps 0: give at least 1"),
    (["qmatmul", "--buffers", "-1"], "--buffers -1: give at least 1"),
    (["qmatmul", "--types", "Q4_K,bogus"], "--types Q4_K,BOGUS: give block types of Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, "
                                           "Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, comma separated"),  # (KeyError)
    (["cpu-kernel", "--types", "F32"], "--types F32: give block types of Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, "
                                       "comma separated"),  # (KeyError: 0)
    (["cpu-kernel", "--shapes", "0x0"], "--shapes: give each as N x K, both at least 1 (e.g. 4096x4096), not 0x0"),
    (["cpu-kernel", "--shapes", "64"], "--shapes: give each as N x K, both at least 1 (e.g. 4096x4096), not 64"),
    (["cpu-kernel", "--experts", "1", "--gap-ms", "inf"], "--gap-ms inf: give a finite number"),  # (OverflowError)
    (["transfer", "--size-mb", "inf"], "--size-mb inf: give a finite number"),
    (["spec", "--verify", "0"], "--verify 0: give at least 1"),
    # run-pipeline's flags, which run-pipeline refuses: the bench ran -1 as 0, and NaN failed deep in the plan
    (["pipeline", "--resident-layers", "-1"], "--resident-layers -1: give 0 or more"),
    (["pipeline", "--vram-gb", "0"], "--vram-gb 0: give more than 0"),  # (the plan's refusal, exit 1)
    (["pipeline", "--shape", "smollm2-135m", "--layers", "99999"], "--layers 99999: give 1 to 1024"),  # (n_layer=, 1)
    (["pipeline", "-m", "/"], "-m /: is a directory; give the .gguf file inside it"),  # (exit 1, '/: is a directory')
    (["pipeline", "-m", ""], "-m : an empty path; give a file"),
    (["serve", "--expert-cache-gb", "nan"], "--expert-cache-gb nan: give a finite number"),
    (["spec", "--step-tokens", "0"], "--step-tokens 0: give at least 1"),
    (["experts", "-b", "100000"], "-b 100000: give 1 to 4096 (run-pipeline's bound)"),  # (minutes, deaf to signals)
    (["pipeline", "--vram-slots", "1"], "--vram-slots 1: give 2 to 16 (as run-pipeline)"),  # (refused by the plan, exit 1)
    (["serve", "--prefetch", "100000"], "--prefetch 100000: give 1 to 65536 (as run-pipeline)"),
    (["spec", "--host-cache-gb", "1e300"], "--host-cache-gb 1e+300: give at most 1048576 (as run-pipeline)"),
    (["reader", "-m", "m.gguf", "--shape", "smollm2-135m"],  # (-m was ignored)
     "-m m.gguf and --shape smollm2-135m: give one of them (a --shape model is written and measured)"),
    (["reader", "--layers", "3"], "--layers 3: it sets a --shape model's layers; give --shape too"),  # (ignored)
    # the draft's flags as the model's (a probe's): --draft-layers 0 and 99999 were synth's n_layer= refusals, exit 1,
    # and without --draft-shape ignored; a --draft-model not there was exit 1 naming --model, an empty one no draft
    (["spec", "--draft-shape", "smollm2-135m", "--draft-layers", "0"], "--draft-layers 0: give at least 1"),
    (["spec", "--draft-shape", "smollm2-135m", "--draft-layers", "99999"], "--draft-layers 99999: give 1 to 1024"),
    (["spec", "--draft-layers", "3"], "--draft-layers 3: it sets a --draft-shape model's layers; give --draft-shape too"),
    (["spec", "--draft-model", "/nonexistent/d.gguf"], "--draft-model /nonexistent/d.gguf: no such file"),
    (["spec", "--draft-model", ""], "--draft-model : an empty path; give a file"),
    (["reader", "--map-threads", "100000"], "--map-threads 100000: give 0 to 64"),  # (a MemoryError's traceback)
    (["pipeline", "--quant", "Q8_0"], "--quant Q8_0: it sets a --shape model's quant mix; give --shape too"),  # (ignored)
    (["pipeline", "--cpu-share", "8:0.5,"], "--cpu-share '8:0.5,': '' is not BATCH:FRACTION with a batch size of 1, 2, "
                                            "4, 8 and a fraction from 0 to 1 (such as 8:0.5)"),  # (exit 1, as a failure)
    # a share asked for where the device is the CPU, which run-pipeline refuses (the bench ran it: a probe's)
    (["pipeline", "--device", "cpu", "--cpu-share", "0.5"], "--cpu-share '0.5': the compute device is the CPU "
                                                            "(--device cpu), so no share of the layers crosses a link "
                                                            "beside it; drop --cpu-share"),
])
def test_a_stages_bad_counts_and_names_are_one_line_and_exit_2(argv, line, capsys):
    """(each of these was a traceback, a hang of the machine, or a deep error: a probe's)"""
    assert bench.main(argv) == 2
    assert capsys.readouterr().err == f"bin/bench {argv[0]}: error: {line} (see bin/bench {argv[0]} --help)\n"


def test_a_reader_count_past_the_bound_is_refused_by_the_pipelines_config_too():
    """(the pipeline, serve and spec stages hand --readers to ReaderOptions, which took any count)"""
    with pytest.raises(pc.ConfigError, match=r"^ReaderOptions\.count=65: give 1 to 64$"):
        pc.ReaderOptions(count=65)


def test_qmatmul_without_a_cuda_device_says_so(capsys):
    """(Triton's traceback, "0 active drivers", on any machine without CUDA)"""
    assert bench.main(["qmatmul", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == ("bin/bench: error: qmatmul times the Triton kernels on a CUDA device; there is "
                                       "none here (--device cpu)\n")


@pytest.mark.parametrize("argv", [["dequant", "--device", "meta"], ["transfer", "--device", "mps"],
                                  ["pipeline", "--device", "cpu:1"],
                                  ["pipeline", "--shape", "llama-3.1-8b", "--device", "gpu"]])
def test_a_device_this_engine_does_not_run_on_is_refused_before_anything_runs(argv, capsys, tmp_path, monkeypatch):
    """(dequant on meta printed made-up figures; transfer on mps timed a CPU copy and reported it;
    pipeline --device gpu wrote its whole --shape model, 4.9 GB, before it said so, exit 1): a usage
    error, as run-pipeline's, with nothing written"""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (where a --shape model is written)
    assert bench.main(argv) == 2
    assert capsys.readouterr().err == (f"bin/bench {argv[0]}: error: --device {argv[-1]}: use auto, cpu, cuda or "
                                       f"cuda:N (see bin/bench {argv[0]} --help)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, line", [
    (["engine", "--decode-tokens", "100000"], "--decode-prompt 16 + --decode-tokens 100000 = 100016 tokens"),
    (["engine", "-p", "8193"], "-p 8193"),
    (["compute", "--tokens", "9000"], "--tokens 9000"),
    (["compute", "--decode-context", "8192"], "--decode-context 8192 + 1 = 8193 tokens"),
    (["kernels", "--context", "8150", "--steps", "50"], "--context 8150 + --steps 50 = 8200 tokens"),
    (["pipeline", "--generate-tokens", "9000"], "its 39-token prompt + --generate-tokens 9000 = 9039 tokens"),
    (["serve", "-p", "8000", "--tokens", "500"], "-p 8000 + --tokens 500 = 8500 tokens"),
    (["spec", "--verify", "1,5000"], "its 32-token prompt + twice --verify 5000 = 10032 tokens"),
])
def test_a_sequence_past_the_models_context_is_one_line_and_exit_2(argv, line, capsys, tmp_path, monkeypatch):
    """A probe's: `engine --decode-tokens 100000` ran for minutes with no output, and -p 100000 was
    refused by host memory with a hint at flags the stage does not have (--ctx, --batch). A
    --shape's context is its own (SmolLM2's 8192 tokens), and nothing is written for it."""
    import os

    from layerstream.loader.default_model import default_model_path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (where the bench writes)
    shape = argv[0] != "engine"  # (the engine stage runs a file: the default model, of the same context)
    assert bench.main([*argv, *(["--shape", "smollm2-135m"] if shape else []), "--device", "cpu"]) == 2
    name = "--shape smollm2-135m" if shape else os.path.basename(default_model_path())
    assert capsys.readouterr().err == (f"bin/bench {argv[0]}: error: {line}: past the context of {name} "
                                       f"(8192 tokens); give fewer (see bin/bench {argv[0]} --help)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_sequence_that_fits_the_context_is_not_refused(tiny):
    """(the bound is the model's own context, read from its header: the tiny model's)"""
    import argparse

    from benchmarks.flags import model_problem
    from layerstream.loader.gguf_index import open_model

    n_ctx = open_model(tiny).hparams.context_length
    args = argparse.Namespace(cmd="engine", model=tiny, shape=None, prompt_tokens=n_ctx, decode_prompt=16,
                              decode_tokens=n_ctx - 16)
    assert model_problem(args) is None
    args.decode_tokens += 1
    assert model_problem(args).startswith(f"--decode-prompt 16 + --decode-tokens {n_ctx - 15} = {n_ctx + 1} tokens")


def test_a_plans_error_says_what_sets_the_ctx_and_batch_it_names_in_a_stage_without_those_flags(tiny, capsys):
    """(the plan's errors name run-pipeline's --ctx and --batch: a probe's, where the bench has no
    --ctx and its --batch is a list)"""
    assert bench.main(["pipeline", "-m", tiny, "--device", "cpu", "--vram-gb", "0.001", "--tokens", "0",
                       "--generate-tokens", "0", "-b", "8", "--reps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bin/bench: error: --vram-gb 0.001 is too small") and err.endswith(
        "lower --step-tokens, --batch or --ctx (bin/bench pipeline sizes --ctx from --tokens, --generate-tokens, "
        "-b and the passes; --batch is the largest -b)\n"), err
    assert bench.sized("serve", "lower --ctx or --batch").endswith("(bin/bench serve sizes --ctx from -p and --tokens; "
                                                                   "--batch is the largest -c)")
    assert bench.sized("reader", "lower --ctx") == "lower --ctx" and bench.sized("serve", "raise --vram-gb") == \
        "raise --vram-gb"  # (a stage that opens no engine, a message that names neither)


def test_a_trace_over_the_model_it_measures_is_refused_before_anything_runs(tiny, capsys):
    """(a probe's: bin/bench pipeline -m X --trace X replaced the model with its trace, status 0)"""
    before = open(tiny, "rb").read()
    assert bench.main(["pipeline", "-m", str(tiny), "--device", "cpu", "--trace", str(tiny)]) == 2
    assert capsys.readouterr().err == (f"bin/bench pipeline: error: --trace {tiny}: is -m's file, which the trace "
                                       "would replace; give another file (see bin/bench pipeline --help)\n")
    assert open(tiny, "rb").read() == before


@pytest.mark.parametrize("flags, named", [(["--expert-cache-gb", "1"], "--expert-cache-gb: does"),
                                          (["--expert-policy", "lru", "--moe-dense", "stream"],
                                           "--moe-dense, --expert-policy: do")])
def test_expert_flags_with_a_dense_model_are_refused_as_run_pipeline_refuses_them(tiny, capsys, flags, named):
    """(a probe's: --expert-cache-gb with a dense model ran the stage and did nothing, status 0)"""
    assert bench.main(["pipeline", "-m", tiny, "--device", "cpu", "--tokens", "4", "--generate-tokens", "2",
                       "--reps", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bin/bench pipeline: error: {named} nothing with a dense model (llama, no experts); drop"), err


def test_expert_flags_with_a_mixture_of_experts_are_taken(tmp_path):
    import argparse

    import ggufgen
    from benchmarks.flags import model_problem

    moe = ggufgen.write_model(str(tmp_path / "moe.gguf"), arch="qwen3moe", n_layer=1, n_expert=4, n_expert_used=2)
    args = argparse.Namespace(cmd="serve", model=moe, shape=None, expert_cache_gb=1.0, expert_policy="lru",
                              prompt_tokens=4, tokens=4)
    assert model_problem(args) is None
    args.model, args.shape, args.layers = None, "qwen3-30b-a3b", 2
    assert model_problem(args) is None
    args.shape = "llama-3.1-8b"
    assert model_problem(args).startswith("--expert-cache-gb, --expert-policy: do nothing with a dense model (llama")
