"""The streaming pipeline with real processes: token identity with the single-process engine, faults."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import zmq

import ggufgen
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine, EngineConfig
from layerstream.coordinator.pipeline_config import (
    Budget,
    CpuOptions,
    ExpertOptions,
    PipelineConfig,
    ProcessOptions,
    ReaderOptions,
)
from layerstream.errors import ContextFullError, PipelineError
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import layer_layouts
from layerstream.proto.signals import STOP_SIGNALS, TERMINATE
from procs import descendants, ends_with_the_test, leaked, segments

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_leftovers")]

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPTS = [[5, 17, 33, 80, 81, 90, 100], [200, 3, 9]]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def _engine(path, pcfg=None, **kw):
    index = open_model(path)
    cfg = EngineConfig(device="cpu", ctx=kw.pop("ctx", 64), max_seqs=2, **kw)
    return Engine.open(cfg, pcfg, index=index)


def _generate(engine, prompts=PROMPTS, params=GREEDY):
    """Greedy continuations as token ids (EOS ignored by a long max_tokens and comparing ids)."""
    out = []
    for p in prompts:
        seq_text = "".join(engine.generate(list(p), params))
        out.append(seq_text)
    out.append(engine.generate_batch([list(p) for p in prompts], params))
    return out


@pytest.fixture(scope="module")
def reference(model):
    with _engine(model) as e:
        return _generate(e)


@pytest.mark.parametrize("pcfg", [
    PipelineConfig(),  # no budget: every layer resident after one pass
    PipelineConfig(budget=Budget(resident_layers=0)),  # everything streamed, host cache holds all
    PipelineConfig(budget=Budget(resident_layers=2, prefetch=4, kv_on_host=True), readers=ReaderOptions(count=3, direct=True)),
    PipelineConfig(budget=Budget(resident_layers=0, prefetch=1, host_cache_gb=0, kv_on_host=True)),
    PipelineConfig(budget=Budget(resident_layers=0, prefetch=4, host_cache_gb=0), readers=ReaderOptions(count=2),
                   procs=ProcessOptions(transport="tcp")),
], ids=["resident", "streamed", "2-resident-3-readers-kv-host-direct", "prefetch1-no-cache", "tcp-2-readers"])
def test_pipeline_matches_single_process(model, reference, pcfg):
    with _engine(model, pcfg) as e:
        assert _generate(e) == reference
        assert e.core.lookahead == 1  # (two steps ahead only on a GPU: launch.Launch.steps_ahead)


@pytest.mark.parametrize("pcfg", [None, PipelineConfig()], ids=["single-process", "pipeline"])
def test_the_warm_up_steps_leave_the_output_as_it_was(model, reference, pcfg):
    """The warm-up (warm_up.py, NOTE [ warm-up ]: a prompt chunk and a decode step on row 0, run on the
    CPU here as on a GPU) leaves every reply as without it, greedy and seeded, on the row it used."""
    with _engine(model, pcfg) as e:
        seeded = e.generate_batch([list(p) for p in PROMPTS], SEEDED)
    with _engine(model, pcfg, warm_up=True) as e:
        assert e.core.free_rows == [0, 1] and not e.core.row_tokens
        assert _generate(e) == reference
        assert e.generate_batch([list(p) for p in PROMPTS], SEEDED) == seeded


SEEDED = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.3, repeat_last_n=8, seed=123,
                        max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("pcfg", [PipelineConfig(budget=Budget(resident_layers=0, prefetch=1, host_cache_gb=0)), PipelineConfig()],
                         ids=["streamed-prefetch1-no-cache", "resident"])
def test_seeded_sampling_and_stops_on_the_compute_side_match_the_single_process_engine(model, pcfg):
    """The compute process samples (each request's generator and penalty window kept there) and
    feeds each decode step the id it sampled before; two steps are in flight (core.py, NOTE [ one
    step behind ]): seeded, filtered and penalized text, and a stop string, end as in one process."""
    with _engine(model) as e:
        want = e.generate_batch([list(p) for p in PROMPTS], SEEDED)
        stop = want[0][4:6]
        stopped = SamplingParams(**{**SEEDED.__dict__, "stop": (stop,)})
        want_stopped = e.generate_batch([list(p) for p in PROMPTS], stopped)
    assert want_stopped[0] == want[0][: want[0].find(stop)]
    with _engine(model, pcfg) as e:
        assert e.generate_batch([list(p) for p in PROMPTS], SEEDED) == want
        assert e.generate_batch([list(p) for p in PROMPTS], stopped) == want_stopped
        assert e.finish_reasons[0] == "stop"


def test_vram_budget_for_two_layers_streams_the_rest(model, reference):
    index = open_model(model)
    from layerstream.compute.device import default_dtype, keeps_quantized
    from layerstream.coordinator.memory import Sizes
    from layerstream.coordinator.plan import GiB, make_plan
    from layerstream.loader.layout import layer_layouts

    nb = torch.finfo(default_dtype(torch.device("cpu"))).bits // 8  # the engine's dtype
    layouts = layer_layouts(index)
    full = make_plan(index, layouts, vram_bytes=None, host_cache_bytes=None, dtype_bytes=nb, ctx=64, max_seqs=2)
    assert full.resident == (0, 1, 2, 3) and not full.streamed
    # the budget of the fixed part, the streamed layers' working copies and one resident layer, in
    # the CPU's form of weights (its blocks with the native kernel, else dequantized: on the CPU a
    # streamed layer then costs its bytes and two dequantized copies, all four resident cost more)
    kw = dict(host_cache_bytes=None, dtype_bytes=nb, ctx=64, max_seqs=2, quantized=keeps_quantized("cpu"),
              device_type="cpu")
    one = Sizes(index, layouts, nb, 64, 2, kw["quantized"], False, False).resident_prefix[1]
    probe = make_plan(index, layouts, vram_bytes=10 * GiB, resident_layers=0, step_tokens=64, **kw)
    budget = probe.device_bytes + one + 4096
    plan = make_plan(index, layouts, vram_bytes=budget, step_tokens=64, **kw)
    assert plan.resident == (0,) and plan.streamed == (1, 2, 3)
    with _engine(model, PipelineConfig(budget=Budget(vram_gb=budget / GiB, step_tokens=64))) as e:
        assert e.backend.plan.resident == (0,)
        assert _generate(e) == reference


def test_budget_too_small_is_a_clear_error(model):
    from layerstream.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^Budget\.vram_gb=\S+ is too small .*; raise Budget\.vram_gb, or lower "
                                           r"Budget\.step_tokens, max_seqs or ctx$"):  # (a Python caller's names)
        _engine(model, PipelineConfig(budget=Budget(vram_gb=1e-6)))


def test_smollm_pipeline_matches_single_process(smollm_path):
    prompt = "The three primary colours are"
    params = SamplingParams(temperature=0, max_tokens=16)
    with _engine(smollm_path, ctx=128) as e:
        want = "".join(e.generate(prompt, params))
    with _engine(smollm_path, PipelineConfig(budget=Budget(resident_layers=0, kv_on_host=True), readers=ReaderOptions(count=2)), ctx=128) as e:
        assert "".join(e.generate(prompt, params)) == want


@pytest.mark.parametrize("split", ["layers", "rows"])
def test_cpu_share_gives_the_same_tokens_on_mixed_types(model, split, monkeypatch):
    """The CPU computes half, then all, of each 4-bit matrix's rows (Q4_K here; Q8_0 and Q6_K stay on
    the device), or the 4-bit FFN matrices of half, then all, of the streamed layers: greedy
    tokens equal the single-process engine's, in float32. The device here is the CPU, whose rows
    of a split matrix stay on its native kernel: without Triton's interpreter (a machine with no
    GPU has no driver for Triton) they must not reach a Triton kernel."""
    with _engine(model, dtype="float32") as e:
        want = _generate(e)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the pipeline's children inherit it
    for share in ("0.5", "1"):
        pcfg = PipelineConfig(budget=Budget(resident_layers=0, step_tokens=8), cpu=CpuOptions(share=share, split=split))
        with _engine(model, pcfg, dtype="float32") as e:
            assert _generate(e) == want
            snaps = e.backend.collect_stats()
            work = {k: v for s in snaps for k, v in s.get("bytes", {}).items() if k == "cpu_share"}
            assert work.get("cpu_share", 0) > 0  # the CPU did compute its rows
            what = "layers' 4-bit FFN matrices" if split == "layers" else "4-bit rows"
            assert f"\nCPU share: fixed at {float(share):.0%} of the {what}" in e.backend.stats_table(snaps)
            assert e.backend.plan.cpu_share_bytes > 0


def test_cpu_share_on_smollm_agrees_with_the_single_process_engine(smollm_path, smollm_engine):
    """Teacher-forced top-1 of the pipeline with the CPU computing half the Q4_1 rows against the
    single-process engine (float32 both): at least 99% agreement, logits close."""
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
            "combined a screw press with movable metal type.")
    ids = smollm_engine.encode(text)
    want = smollm_engine.logits(ids)
    with _engine(smollm_path, PipelineConfig(budget=Budget(resident_layers=0, step_tokens=8), cpu=CpuOptions(share="0.5")), ctx=128,
                 dtype="float32") as e:
        got = e.logits(ids)
        assert sum(s.get("bytes", {}).get("cpu_share", 0) for s in e.backend.collect_stats()) > 0
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.99, agree
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()


def test_cpu_share_option_is_checked(model):
    from layerstream.errors import ConfigError

    for bad in ("1.5", "-0.1", "half", "nan"):
        with pytest.raises(ConfigError, match=rf"^CpuOptions\.share='{bad}': "):
            _engine(model, PipelineConfig(cpu=CpuOptions(share=bad)))
    with pytest.raises(ConfigError, match=r"^CpuOptions\.split='columns'"):
        _engine(model, PipelineConfig(cpu=CpuOptions(share="0.5", split="columns")))


@pytest.mark.parametrize("arch,kw", [("qwen3moe", {}), ("mixtral", dict(arch="llama", n_expert=4)),
                                     ("gemma3", dict(tied=True))])
def test_moe_and_gemma3_stream_whole_layers(tmp_path, arch, kw):
    """Mixture-of-experts layers (experts as 3-D tensors) and Gemma 3's stream like any layer."""
    path = ggufgen.write_model(tmp_path / f"{arch}.gguf", **(dict(arch=arch) | kw), n_layer=3, seed=4)
    with _engine(path, dtype="float32") as e:
        want = _generate(e)
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), readers=ReaderOptions(count=2)), dtype="float32") as e:
        assert _generate(e) == want


@pytest.mark.parametrize("cache_gb,moe_dense", [(0.0002, "resident"), (1.0, "resident"), (1.0, "stream")],
                         ids=["evicting-cache", "large-cache", "dense-streamed"])
@pytest.mark.parametrize("arch,kw", [("qwen3moe", {}), ("mixtral", dict(arch="llama"))])
def test_decode_fetches_only_chosen_experts(tmp_path, arch, kw, cache_gb, moe_dense):
    """Decode steps copy the router's chosen experts only (a cache of about 8 experts evicts, a
    large one keeps them): the same tokens as the single-process engine, fewer bytes moved. The
    layers' other tensors are copied once and kept, unless they are told to stream."""
    path = ggufgen.write_model(tmp_path / f"{arch}.gguf", **(dict(arch=arch) | kw), n_layer=3, n_expert=16,
                               n_expert_used=2, seed=4)
    prompts = [[5, 17, 33, 80], [9, 3]]
    with _engine(path, dtype="float32") as e:
        want = e.generate_batch(prompts, GREEDY)
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(cache_gb, moe_dense)),
                 dtype="float32") as e:
        assert e.backend.plan.dense_resident == (moe_dense == "resident")
        assert e.generate_batch(prompts, GREEDY) == want
        stats = e.backend.collect_stats()
        ex = next(s["experts"] for s in stats if s.get("experts"))
        copied = sum(s.get("bytes", {}).get("copy", 0) for s in stats)
    index = open_model(path)
    layer_experts = index.layers[0]["ffn_up_exps.weight"].nbytes * 3
    dense = sum(t.nbytes for t in index.layers[0].values()) - layer_experts  # a layer's tensors but its experts
    whole = sum(lay.nbytes for lay in layer_layouts(index))  # a step that streams whole layers
    assert ex["steps"] >= 10 and ex["misses"] > 0
    # the first step (6 prompt tokens, expected to touch over half the experts) streams whole layers;
    # every later one is an expert step, which copies the dense parts only when they are not kept
    assert copied == whole + (0 if moe_dense == "resident" else ex["steps"] * 3 * dense)
    assert ex["bytes"] < ex["steps"] * 3 * layer_experts / 2  # under half of streaming whole layers
    if cache_gb >= 1:
        assert ex["hits"] > 0 and ex["misses"] <= 3 * 16  # each expert copied once at most
    else:
        assert ex["misses"] > 3 * 16  # evicted experts came back


def test_streamed_experts_as_blocks_run_grouped(tmp_path):
    """Experts kept as GGUF blocks (Triton's interpreter here): a decode step's chosen experts,
    fetched into the cache's own tensors or served and dropped, run in grouped launches that find
    them by address (NOTE [ grouped experts ]); the same tokens as the single-process engine,
    which finds them as byte ranges of its resident 3-D tensors."""
    pytest.importorskip("triton")
    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe", qtype="Q8_0", n_layer=1, n_expert=8,
                               n_expert_used=2, seed=5)
    prompts = [[5, 17, 33], [9, 3]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cache_gb = 3 * (3 * 128 * 68) / 2**30  # three of the 8 experts (each three 128 x 64 Q8_0 matrices): some
    # of a step's experts are cached, others served and dropped
    with _engine(path, dtype="float32", weights="quantized") as e:
        want = e.generate_batch(prompts, params)
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(cache_gb)), dtype="float32",
                 weights="quantized") as e:
        assert e.generate_batch(prompts, params) == want
        ex = next(s["experts"] for s in e.backend.collect_stats() if s.get("experts"))
    assert ex["steps"] >= 3 and ex["misses"] > 0 and ex["hits"] > 0


def test_decode_lends_the_layer_slots_to_the_expert_cache_and_a_prompt_takes_them_back(tmp_path):
    """NOTE [ the layer slots lent to the expert cache ]: decode steps admit experts into the room
    of the ring's layer slots; the next prompt, which streams whole layers, takes it back (the
    entries there dropped), and the decode after it lends it again. Through both rounds the tokens
    are the single-process engine's, and a cache this small holds more with the room than without."""
    pytest.importorskip("triton")
    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe", qtype="Q8_0", n_layer=2, n_expert=8,
                               n_expert_used=2, seed=5)
    prompts, later = [[5, 17, 33], [9, 3]], [[40, 41, 42, 43, 44, 45], [60, 61, 62, 63, 64]]  # (no prefix shared)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cache_gb = (3 * 128 * 68) / 2**30  # one expert: alone, most of a step's chosen experts are served and dropped
    with _engine(path, dtype="float32", weights="dense") as e:  # (dense: no Triton kernel, slow under the interpreter)
        want = [e.generate_batch(prompts, params), e.generate_batch(later, params)]
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(cache_gb, prefetch=0)),
                 dtype="float32", weights="quantized") as e:
        assert e.backend.plan.dense_resident and e.backend.plan.vram_slots >= 1
        assert e.generate_batch(prompts, params) == want[0]
        first = next(s["experts"] for s in e.backend.collect_stats() if s.get("experts"))
        assert e.generate_batch(later, params) == want[1]
        second = next(s["experts"] for s in e.backend.collect_stats() if s.get("experts"))
    assert first["lends"] == 1 and first["reclaimed"] == 0, first  # lent at the first decode step
    assert second["lends"] == 2 and second["reclaimed"] > 0, second  # the second prompt took it back
    assert first["hits"] > 1, first  # more than the one expert of the cache's own slot kept


def test_decode_copies_the_predicted_experts_ahead(tmp_path):
    """NOTE [ expert prefetch ]: each streamed layer's router, applied to the layer before's expert
    input, predicts its experts, which are copied ahead. Where they come from never changes the
    tokens (those of the single-process engine on dequantized weights, with the prefetch and
    without); the step's chosen experts are the same (cached + copied ahead + copied after the
    router), and those copied ahead are not copied again."""
    pytest.importorskip("triton")
    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe", qtype="Q8_0", n_layer=3, n_expert=8,
                               n_expert_used=2, seed=5)
    prompts = [[5, 17, 33], [9, 3]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cache_gb = 2 * (3 * 128 * 68) / 2**30  # two of a layer's 8 experts: most of a step's are not cached
    with _engine(path, dtype="float32", weights="dense") as e:  # (dense: no Triton kernel, slow under the interpreter)
        want = e.generate_batch(prompts, params)
    got = {}
    for ahead in (0, 3):
        with _engine(path, PipelineConfig(budget=Budget(resident_layers=0), experts=ExpertOptions(cache_gb, prefetch=ahead)),
                     dtype="float32", weights="quantized") as e:
            assert e.backend.plan.expert_prefetch == ahead
            assert e.generate_batch(prompts, params) == want
            snaps = e.backend.collect_stats()
            got[ahead] = next(s["experts"] for s in snaps if s.get("experts"))
            table = e.backend.stats_table(snaps)
    off, on = got[0], got[3]
    assert off["prefetched"] == off["prefetch_hits"] == 0
    assert 0 < on["prefetch_hits"] <= on["prefetched"], on
    assert "copied ahead on the previous layer's prediction" in table, table
    assert "\nexpert_prefetch " in table and "\nwait_route " in table, table  # their own rows of stages
    chosen = off["hits"] + off["misses"]
    assert on["hits"] + on["misses"] + on["prefetch_hits"] == chosen  # the same experts chosen
    layer = open_model(path).layers[0]
    per = sum(layer[n].nbytes for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")) // 8
    assert off["bytes"] == off["misses"] * per
    assert on["bytes"] == (on["misses"] + on["prefetched"]) * per  # those copied ahead were not copied again


@pytest.mark.parametrize("kv_on_host", [False, True], ids=["device-kv", "host-kv"])
def test_next_turn_reuses_the_kv_its_row_holds(model, kv_on_host):
    """A conversation's second turn prefills only what follows the first (NOTE [ prefix reuse ]
    in core.py): the compute process's KV of a freed row, on the device or in host memory,
    stays until another sequence writes it. The same tokens as an engine that prefills it all."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def turn(e, rid, prompt):
        e.core.add_request(rid, prompt, params)
        return [t for o in e.core.run_to_completion() for t in o.token_ids]

    turn1 = PROMPTS[0]
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=1, kv_on_host=kv_on_host)), dtype="float32") as e:
        reply = turn(e, "t1", turn1)
        turn2 = turn1 + reply + [7, 8, 9]
        got = turn(e, "t2", turn2)
        assert e.core.reused_tokens == len(turn1) + len(reply) - 1
    with _engine(model, dtype="float32") as e:
        assert turn(e, "t2", turn2) == got


def test_sliding_window_in_pipeline(model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with _engine(model, ctx=16, on_context_full="slide", sink_tokens=4) as e:
        want = e.generate_batch([PROMPTS[0]], params)
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0)), ctx=16, on_context_full="slide", sink_tokens=4) as e:
        assert e.generate_batch([PROMPTS[0]], params) == want
        assert e.finish_reasons == ["length"]
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0)), ctx=16, on_context_full="error") as e:
        with pytest.raises(ContextFullError, match="context size"):
            e.generate_batch([PROMPTS[0]], params)


def test_reader_killed_mid_generation_is_restarted(model, reference):
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0, prefetch=1))
    with _engine(model, pcfg) as e:
        reader = e.backend.sup.children["reader-0"].proc
        pieces = []
        for n, piece in enumerate(e.generate(list(PROMPTS[0]), GREEDY)):
            pieces.append(piece)
            if n == 2:
                os.kill(reader.pid, signal.SIGKILL)
        assert "".join(pieces) == reference[0]
        assert e.backend.sup.children["reader-0"].restarts == 1
        assert e.backend.sup.children["reader-0"].proc.pid != reader.pid


@pytest.mark.default_threads
@pytest.mark.parametrize("sig", sorted(STOP_SIGNALS))
def test_children_ignore_a_stop_signal_sent_to_the_group(model, reference, sig, caplog):
    """A SIGTERM to the whole process group (systemd's stop, `timeout`) killed the readers and
    compute at once: the server's grace for the requests in flight was cut short, and the reader's
    death was logged and the reader restarted while the run stopped (a hostile-user probe). The
    children ignore every signal a group gets, SIGTERM as SIGINT and SIGHUP: the launcher alone
    decides how the run stops (NOTE [ SIGINT while a child starts ])."""
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0, prefetch=1))
    with _engine(model, pcfg) as e:
        children = {i: c.proc for i, c in e.backend.sup.children.items()}
        pieces = []
        for n, piece in enumerate(e.generate(list(PROMPTS[0]), GREEDY)):
            pieces.append(piece)
            if n == 2:
                for proc in children.values():
                    os.kill(proc.pid, sig)
        assert "".join(pieces) == reference[0]
        assert {i: c.proc.pid for i, c in e.backend.sup.children.items()} == {i: p.pid for i, p in children.items()}
        assert all(p.exitcode is None for p in children.values())
    assert "died" not in caplog.text


def test_reader_killed_between_calls_is_restarted_by_check_and_reads_again(model, reference):
    """An idle server's look (Pipeline.check) restarts a reader killed between calls; the next call,
    which must read every layer again, answers as before. The restarted reader's connection was
    refused (its identity still held by the dead one's pipe, which the coordinator's socket drops
    only when touched) and the call stalled on its reads (a hostile-user probe)."""
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0, prefetch=1), procs=ProcessOptions(stall_timeout_s=20))
    with _engine(model, pcfg) as e:
        assert "".join(e.generate(list(PROMPTS[0]), GREEDY)) == reference[0]
        reader = e.backend.sup.children["reader-0"].proc
        os.kill(reader.pid, signal.SIGKILL)
        reader.join(10)
        e.backend.check()
        assert e.backend.sup.children["reader-0"].restarts == 1
        time.sleep(1.0)  # (the new reader connects and says Ready while nothing reads the sockets)
        assert "".join(e.generate(list(PROMPTS[1]), GREEDY)) == reference[1]
        assert e.backend.sup.children["reader-0"].ready is not None


def test_compute_killed_is_a_clear_error(model, caplog):
    """One line saying what died; a later call says what to do too (close the engine and open
    another), and no stray lines go to stderr (the Python API probe's: 'could not send Forward to
    compute: Host unreachable', twice)."""
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))) as e:
        os.kill(e.backend.sup.children["compute"].proc.pid, signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(PipelineError, match="^the compute process died"):
            e.generate_batch([PROMPTS[0]], GREEDY)
        with pytest.raises(PipelineError, match=r"^the compute process died \(exit code -9\); this pipeline has "
                                                "stopped: close the engine and open another$"):
            e.generate_batch([PROMPTS[0]], GREEDY)
    assert "could not send" not in caplog.text


def test_garbage_frames_are_counted_and_the_run_goes_on(model, reference):
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))) as e:
        be = e.backend
        ctx = zmq.Context()
        try:
            for addr in (be.links.ep.control, be.links.ep.readers, be.links.ep.compute):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 2000)  # let the frames go out before close
                s.connect(addr)
                s.send_multipart([b"garbage"])
                s.send_multipart([bytes([99, 20]), b"\x90"])  # wrong protocol version
                s.send_multipart([bytes([1, 250]), b"\x90"])  # unknown tag
                s.close()
            # and to each child, through the coordinator's sockets
            be.links.socks["compute"].send_multipart([b"compute", b"\x01"])
            be.links.socks["readers"].send_multipart([b"reader-0", bytes([1, 10]), b"\xc1"])
            be.links.socks["control"].send_multipart([b"staging", bytes([7, 1]), b""])
        finally:
            ctx.term()
        assert _generate(e) == reference
        snaps = be.collect_stats()
        assert be.links.bad.total >= 9
        by = {s["ident"]: s.get("bad_messages", {}).get("bad_messages", 0) for s in snaps if "ident" in s}
        assert by["compute"] >= 1 and by["reader-0"] >= 1


def test_trace_holds_reads_copies_dequant_and_compute(model, tmp_path):
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0), procs=ProcessOptions(trace=True))) as e:
        e.generate_batch([PROMPTS[0]], GREEDY)
        snaps = e.backend.collect_stats()
        table = e.backend.stats_table(snaps)
        path = str(tmp_path / "run.trace.json")
        e.backend.write_trace(path, snaps)
    with open(path) as f:
        trace = json.load(f)
    cats = {ev.get("cat") for ev in trace["traceEvents"] if ev["ph"] == "X"}
    assert {"read", "copy", "dequant", "compute"} <= cats
    for ev in trace["traceEvents"]:
        if ev["ph"] == "X":
            assert ev["dur"] > 0 and ev["ts"] >= 0
    assert "read" in table and "GB/s" in table and "prefetch" in table
    # each process named by its role, the staging process too (it keeps no timeline: it was "?")
    names = sorted(ev["args"]["name"] for ev in trace["traceEvents"] if ev.get("name") == "process_name")
    assert names == ["compute compute", "coordinator 0", "reader reader-0", "staging staging"], names


def _sigint_default() -> None:
    """In the launcher before exec: SIGINT as a terminal gives it. A shell runs a background job
    (`.ci/run &`) with SIGINT ignored, and an ignored SIGINT stays ignored across exec: Python
    then installs no Ctrl-C handler, and the launcher rightly carries on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ends_with_the_test()


def _launcher(model, *args):
    # PYTHONFAULTHANDLER: a launcher that hangs prints every thread's stack on SIGABRT
    return subprocess.Popen(
        [os.path.join(REPO, "bin", "run-pipeline"), "--model", model, "--device", "cpu", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=os.environ | {"PYTHONFAULTHANDLER": "1"}, preexec_fn=_sigint_default,
    )


_INTERRUPT_IN_PYRUN = """
import ctypes

def interrupted_in_pyrun():
    # a Ctrl-C that lands in code evaluated through PyRun_String, as torch's import runs some
    run = ctypes.pythonapi.PyRun_String
    run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
    run(b"raise KeyboardInterrupt", 257, {}, {})
"""


@pytest.mark.default_threads
def test_a_caught_ctrl_c_exits_130_from_the_launcher(tmp_path):
    """Run as `python -m`, CPython dies by SIGINT at exit (-2) once a KeyboardInterrupt has left
    code evaluated through PyRun_String, even where the program caught it (its flag for an
    unhandled Ctrl-C is set there and checked after SystemExit). The launcher runs the CLI as a
    command, so a Ctrl-C that run-pipeline catches exits 130, as the README says."""
    (tmp_path / "pyrun_ki.py").write_text(_INTERRUPT_IN_PYRUN + "\ntry:\n    interrupted_in_pyrun()\n"
                                          "except KeyboardInterrupt:\n    raise SystemExit(130)\n")
    as_module = subprocess.run([sys.executable, "-m", "pyrun_ki"], cwd=tmp_path)
    if as_module.returncode != -signal.SIGINT:
        pytest.skip(f"this CPython exits {as_module.returncode} as a module: nothing to guard against")
    (tmp_path / "sitecustomize.py").write_text(  # the CLI's engine meets that Ctrl-C, and main() catches it
        _INTERRUPT_IN_PYRUN + "\nimport layerstream.loader.gguf_index as gi\n"
        "gi.open_model = lambda *a, **k: interrupted_in_pyrun()\n")
    p = subprocess.run([os.path.join(REPO, "bin", "run-pipeline"), "hello"], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert "run-pipeline: interrupted" in p.stderr, p.stderr
    assert p.returncode == 130, (p.returncode, p.stderr)


@pytest.mark.default_threads
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_launcher_stops_within_5_s_on_signal(model, sig):
    """SIGHUP and SIGQUIT go to the whole group, as a closed terminal and a Ctrl-\\ send them: the
    children ignore them (at their defaults they died under the launcher, and SIGQUIT's left the
    run's shared-memory segment) and the launcher stops them as on SIGTERM."""
    before = segments()
    p = _launcher(model, "--resident-layers", "0", "--host-cache-gb", "0", "-n", "100000", "--ignore-eos",
                  "--temperature", "1", "--ctx", "100000", "hello")
    try:
        # wait until it generates (the pipeline is up): its first text comes once the children have
        # started and a step has run
        assert p.stdout.read(1), f"no text before its end: {p.stderr.read()[-4000:]}"
        kids = descendants(p.pid)
        assert kids, "the launcher started no processes"
        t0 = time.monotonic()
        if sig in (signal.SIGHUP, signal.SIGQUIT):
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)  # its stacks, to stderr
            time.sleep(2)
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"not stopped 10 s after {sig.name}; its stderr: {p.communicate()[1][-6000:]}")
        assert time.monotonic() - t0 < 5
        assert p.returncode == 128 + sig  # as shells report
        time.sleep(0.5)
        alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "zombie" not in open(f"/proc/{k}/status").read().lower()]
        assert not alive, f"processes left: {alive}"
        assert not leaked(before, run=p.pid)
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_launcher_pipeline_stats_and_trace(model, tmp_path):
    trace = str(tmp_path / "t.json")
    p = _launcher(model, "--resident-layers", "1", "-n", "8", "--temperature", "0", "--stats", "--trace", trace, "hi")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "stage" in err and "read" in err and f"events written to {trace}" in err
    # and where the compute stream waited, from the trace's steps of layers (proto/timeline.py)
    assert f"events written to {trace}\ndevice stream, medians over " in err, err
    with open(trace) as f:
        assert json.load(f)["traceEvents"]





def test_split_model_parts_on_two_drives_one_reader_each(model, reference, tmp_path):
    src = tmp_path / "tiny.gguf"
    src.write_bytes(open(model, "rb").read())
    parts = ggufgen.split_model(str(src), 2)
    drives = [tmp_path / "driveA", tmp_path / "driveB"]
    here = tmp_path / "model"
    here.mkdir()
    for part, drive in zip(parts, drives):
        drive.mkdir()
        moved = drive / os.path.basename(part)
        os.replace(part, moved)
        os.symlink(moved, here / os.path.basename(part))
    first = str(here / os.path.basename(parts[0]))
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0), readers=ReaderOptions(count=2, dirs=tuple(map(str, drives))))
    with _engine(first, pcfg) as e:
        assert _generate(e) == reference
        plan = e.backend.reader_plan
        assert [len(f) for f in plan.files] == [1, 1]


def test_foreign_peer_on_tcp_cannot_end_or_steer_the_run(model, reference):
    """Another local user can reach 127.0.0.1: without the run's CURVE keys a well-formed Failed
    or ForwardDone never gets through, and an oversized frame is dropped by MAXMSGSIZE."""
    from layerstream.proto.codec import encode
    from layerstream.proto.messages import Failed, ForwardDone

    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0), procs=ProcessOptions(transport="tcp"))) as e:
        be = e.backend
        assert be.links.curve is not None
        assert be.links.socks["control"].getsockopt(zmq.MAXMSGSIZE) == be.launch.max_msg_in
        bad_before = be.links.bad.total
        ctx = zmq.Context()
        try:
            for addr in (be.links.ep.control, be.links.ep.readers, be.links.ep.compute):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 500)
                s.setsockopt(zmq.IDENTITY, b"stranger")
                s.connect(addr)
                s.send_multipart(encode(Failed("compute", "compute", "where", "ended by a stranger", "")))
                s.send_multipart(encode(ForwardDone(1, [1, 3], "float32", {}), [b"\0" * 12]))
                s.close()
        finally:
            ctx.term()
        assert _generate(e) == reference
        assert be.failure is None
        assert be.links.bad.total == bad_before, "the stranger's messages reached the coordinator"


def test_messages_from_the_wrong_role_or_with_bad_fields_are_dropped(model, reference):
    from layerstream.proto.messages import ForwardDone, LayerDone, StepFailed

    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))) as e:
        be = e.backend
        before = be.links.bad.total
        bad = [("reader-0", ForwardDone(be.core.step_no, [1, 2], "float32", {}), [b"\0" * 8]),  # not the compute
               ("compute", ForwardDone(be.core.step_no, [1, 2], "O", {}), [b"\0" * 16]),  # object dtype
               ("compute", ForwardDone(be.core.step_no, [1, 9], "float32", {}), [b"\0" * 8]),  # size mismatch
               ("compute", ForwardDone(be.core.step_no, [], "float32", {}, [5, 6], [0]), []),  # ids without codes
               ("compute", ForwardDone(be.core.step_no, [], "float32", {}, [10**6], [0]), []),  # no such token
               ("compute", ForwardDone(be.core.step_no, [], "float32", {}, [5], [9]), []),  # no such code
               ("compute", LayerDone(be.core.step_no, [[10**6, 0]]), []),  # no such layer
               ("stranger", LayerDone(be.core.step_no, [[0, 0]]), []),  # no child of this run
               ("reader-0", StepFailed(be.core.step_no, "x"), [])]  # not the compute
        for ident, msg, extra in bad:
            be.loop.run_until_complete(be.dispatch(ident, msg, extra, False))
        assert be.links.bad.total == before + len(bad) and not be.results and not be.failed_steps
        # a frame above the bound on the coordinator's sockets is dropped by libzmq; the run goes on
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(be.links.ep.control)
            s.send(b"\1" * (be.launch.max_msg_in + 1))
            s.close()
        finally:
            ctx.term()
        assert _generate(e) == reference


def test_stalled_compute_process_ends_the_run_with_a_line_naming_it(model):
    """The watchdog: a compute process stopped mid-run (SIGSTOP) no longer hangs the user."""
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0), procs=ProcessOptions(stall_timeout_s=2))) as e:
        be = e.backend
        pid = be.sup.children["compute"].proc.pid
        stop, took = be._close, []  # the stop after the verdict: SIGKILL for the stopped child, at once

        def timed_stop():
            t = time.monotonic()
            stop()
            took.append(time.monotonic() - t)
        be._close = timed_stop
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(PipelineError, match=r"the compute process sent nothing for 2 s .*ProcessOptions\.stall_timeout_s"):
                e.generate_batch([PROMPTS[0]], GREEDY)
            assert time.monotonic() - t0 < 15
            # (it asked the stopped child to stop and waited, then SIGTERM and waited: 3.5 s and more)
            assert took[0] < 3.0 and be.sup.children["compute"].proc.exitcode == -signal.SIGKILL, took
        finally:
            with contextlib.suppress(ProcessLookupError):  # the failed run may have stopped it already
                os.kill(pid, signal.SIGCONT)


def test_stalled_reader_is_blamed_not_the_compute_process(model):
    """The watchdog names the stage that is behind: with the reader stopped (SIGSTOP), compute
    waits for a layer whose read is outstanding, and the line names the reader, the layer and
    the staging slot, not the compute process."""
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0, prefetch=1), procs=ProcessOptions(stall_timeout_s=2))
    with _engine(model, pcfg) as e:
        pid = e.backend.sup.children["reader-0"].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(PipelineError, match=r"^the reader process reader-0 did not read layer \d into staging "
                                                    r"slot \d for 2 s while the compute process waited for it .*"
                                                    r"ProcessOptions\.stall_timeout_s") as err:
                e.generate_batch([PROMPTS[0]], GREEDY)
            assert time.monotonic() - t0 < 15
            assert "compute process sent nothing" not in str(err.value) and "\n" not in str(err.value)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _in_children(code: str, tmp_path, monkeypatch) -> None:
    """`code` run at the start of every process spawned from now on (a sitecustomize on their PYTHONPATH),
    not in this one."""
    (tmp_path / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


_SHM_FULL = """
import multiprocessing.shared_memory as _sm
_init = _sm.SharedMemory.__init__
def _full(self, name=None, create=False, size=0, *a, **k):
    if create:
        raise OSError(28, "No space left on device")
    _init(self, name, create, size, *a, **k)
_sm.SharedMemory.__init__ = _full
"""


def test_staging_that_cannot_make_its_arena_fails_the_start_with_its_own_error(model, tmp_path, monkeypatch):
    """Staging fails at once, while its links may still be connecting: each of several starts
    ends in one line that names the staging process and gives its own error."""
    _in_children(_SHM_FULL, tmp_path, monkeypatch)
    for _ in range(3):
        with pytest.raises(PipelineError) as err:
            _engine(model, PipelineConfig(budget=Budget(resident_layers=0)))
        line = str(err.value)
        assert re.match(r"the staging process (failed|died \(exit code 1\)): ConfigError: cannot create a "
                        r".* shared-memory segment layerstream-\d+-p\d+-[0-9a-f]+: \[Errno 28\] No space left on device$",
                        line), line


_COMPUTE_ASLEEP = """
import sys, time
class _Asleep:  # the compute process's start hangs without using the CPU (a lock, a dead mount)
    def find_spec(self, name, path=None, target=None):
        if name == "layerstream.compute.compute_proc":
            time.sleep(600)
sys.meta_path.insert(0, _Asleep())
"""


def test_a_child_that_hangs_in_its_start_ends_it_after_the_stall_timeout(model, tmp_path, monkeypatch):
    """A compute process that hangs before its Ready, using no CPU, ends the start after
    --stall-timeout with one line naming it (a hostile-user probe: it waited for the start's
    ready_timeout_s, 180 s at its default), and it is killed at once, not waited for."""
    _in_children(_COMPUTE_ASLEEP, tmp_path, monkeypatch)
    before = segments()
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as err:
        _engine(model, PipelineConfig(budget=Budget(resident_layers=0), procs=ProcessOptions(stall_timeout_s=2)))
    assert str(err.value) == ("the compute process used no CPU for 2 s of its start (stalled: stopped, hung or swapping); "
                              "raise ProcessOptions.stall_timeout_s if that is expected")
    assert time.monotonic() - t0 < 60
    assert not leaked(before, run=os.getpid())  # (not another worker's run, whose staging a test killed)


def test_a_run_killed_with_its_process_group_leaves_no_segment_after_the_next_start(model):
    """SIGKILL of a run's whole process group (its resource tracker too) leaves its segment;
    the next run's start removes it (and the autouse fixture sees nothing left).

    Another test worker's start may sweep the dead run's segment first (the same code under
    test, racing ours), so the kill is tried again until the segment is seen left behind; a
    segment that goes every time went by itself, which fails the test."""
    import tempfile

    script = (
        "import time\n"
        "from layerstream.coordinator.engine import Engine, EngineConfig\n"
        "from layerstream.coordinator.pipeline_config import Budget, PipelineConfig\n"
        "if __name__ == '__main__':\n"
        f"    cfg = EngineConfig(model={model!r}, device='cpu', ctx=64)\n"
        "    e = Engine.open(cfg, PipelineConfig(Budget(resident_layers=0)))\n"
        "    print(e.backend.arena.name, flush=True)\n"
        "    time.sleep(120)\n"
    )

    def group_gone(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True, cwd=tempfile.gettempdir())
        try:
            name = p.stdout.readline().strip()
            assert name.startswith("layerstream-"), name
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            deadline = time.monotonic() + 10
            while not group_gone(p.pid) and time.monotonic() < deadline:  # its children, reaped by init
                time.sleep(0.05)
            assert group_gone(p.pid)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        if os.path.exists(f"/dev/shm/{name}"):
            break
    else:
        pytest.fail(f"the killed run's segment went by itself, three times ({name})")
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))):
        assert not os.path.exists(f"/dev/shm/{name}")


def test_progress_hook_follows_the_start_and_the_first_read_of_every_layer(model, reference):
    """on_progress(done, total, what): the children as they report ready, then the layers as the
    first pass reads each once; each stage counts up to its total."""
    seen = []
    pcfg = PipelineConfig(budget=Budget(resident_layers=0), readers=ReaderOptions(count=2), on_progress=lambda d, t, w: seen.append((w, d, t)))
    with _engine(model, pcfg) as e:
        assert [x for x in seen if x[0] == "processes"] == [("processes", d, 4) for d in range(5)]
        assert _generate(e)[0] == reference[0]
    layers = [(d, t) for w, d, t in seen if w == "layers"]
    assert layers == [(d, 4) for d in range(5)], seen


def test_staging_killed_is_a_clear_error_and_its_segment_goes(model):
    """The coordinator removes a dead staging process's segment itself (and takes it off the
    resource tracker's list, which would otherwise warn of a leak at exit)."""
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))) as e:
        name = e.backend.arena.name
        assert os.path.exists(f"/dev/shm/{name}")
        os.kill(e.backend.sup.children["staging"].proc.pid, signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(PipelineError, match="the staging process died"):
            e.generate_batch([PROMPTS[0]], GREEDY)
        assert not os.path.exists(f"/dev/shm/{name}")


def test_model_file_truncated_during_a_run_names_the_file(tmp_path):
    """Readers see a short read, the compute process a SIGBUS on its memory map: either way the
    one error line names the file."""
    import shutil

    path = str(tmp_path / "cut.gguf")
    ggufgen.write_model(path, arch="llama", n_layer=4, n_embd=256, n_ff=512, seed=3)
    with _engine(path, PipelineConfig(budget=Budget(resident_layers=0, host_cache_gb=0))) as e:
        e.generate_batch([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))
        os.truncate(path, 4096)
        with pytest.raises(PipelineError) as err:
            e.generate_batch([PROMPTS[0]], GREEDY)
        assert path in str(err.value) and "\n" not in str(err.value)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_bad_tokenizer_found_after_start_leaves_nothing_behind(model, tmp_path, monkeypatch):
    """The tokenizer is read once the processes run: its error still stops them and removes the
    run directory (the autouse fixture checks processes and segments)."""
    from layerstream.coordinator import links
    from layerstream.errors import ModelError

    made = []
    real = links.make_run_dir
    monkeypatch.setattr(links, "make_run_dir", lambda *a: made.append(real(*a)) or made[-1])
    bad = ggufgen.rewrite_metadata(model, tmp_path / "no-merges.gguf", {}, drop=("tokenizer.ggml.merges",))
    with pytest.raises(ModelError):
        _engine(bad, PipelineConfig(budget=Budget(resident_layers=0)))
    assert len(made) == 1 and not os.path.exists(made[0])


def test_unclosed_engine_over_the_pipeline_cleans_up_at_exit(model):
    """An API user who never calls close(): at interpreter exit every process stops and the run
    directory and the segment go."""
    import tempfile

    script = (
        "from layerstream.coordinator.engine import Engine, EngineConfig\n"
        "from layerstream.coordinator.pipeline_config import Budget, PipelineConfig\n"
        "if __name__ == '__main__':\n"
        f"    cfg = EngineConfig(model={model!r}, device='cpu', ctx=64)\n"
        "    e = Engine.open(cfg, PipelineConfig(Budget(resident_layers=0)))\n"
        "    print(e.backend.links.run_dir, e.backend.arena.name, flush=True)\n"
    )
    r = subprocess.run([os.sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    run_dir, seg = r.stdout.split()
    assert not os.path.exists(run_dir) and not os.path.exists(f"/dev/shm/{seg}")
    assert "leaked" not in r.stderr and "Traceback" not in r.stderr


def test_cpu_computes_a_share_of_the_streamed_experts(tmp_path):
    """NOTE [ CPU experts ]: with --cpu-share the CPU computes half of each decode step's missing
    experts (Q4_K, packed for aten's int4 matmul on first use) while the device fetches and
    computes the rest, whose grouped launches leave the CPU's pairs out. One-token steps, teacher
    forced: the logits of the single-process engine (its weights dequantized)."""
    pytest.importorskip("triton")
    path = ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe", qtype="Q4_K", n_layer=2, n_embd=256,
                               n_ff=256, n_expert=8, n_expert_used=2, seed=7)
    ids = [5, 17, 33, 80, 81]  # (each one-token step runs the interpreter's grouped experts: the fewest that show the share)
    with _engine(path, dtype="float32", weights="dense") as e:  # (dense: no Triton kernel, slow under the interpreter)
        want = e.logits(ids)
    # (prefetch off: experts copied ahead are not missing, and the CPU would take fewer)
    pcfg = PipelineConfig(budget=Budget(resident_layers=0, step_tokens=1), cpu=CpuOptions(share="0.5"),
                          experts=ExpertOptions(2 * 3 * 256 * 144 / 2**30, prefetch=0))
    with _engine(path, pcfg, dtype="float32", weights="quantized") as e:
        got = e.logits(ids)
        snaps = e.backend.collect_stats()
        table = e.backend.stats_table(snaps)
    ex = next(s["experts"] for s in snaps if s.get("experts"))
    assert ex["cpu"] >= 2 * (len(ids) - 1) // 2, ex  # about half of every one-token step's misses, 2 layers
    assert ex["misses"] > 0  # the device fetched the others
    assert "\nCPU experts: fixed at 50% of the missing experts" in table, table
    assert "4-bit rows" not in table, table  # a MoE layer's share is its experts: its attention is not split
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() == 1.0
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()


@pytest.mark.parametrize("pcfg", [PipelineConfig(budget=Budget(resident_layers=0, prefetch=1, host_cache_gb=0)),
                                  PipelineConfig(budget=Budget(resident_layers=1, kv_on_host=True))], ids=["streamed", "kv-on-host"])
def test_prompt_lookup_over_the_pipeline_gives_the_single_process_text(model, reference, pcfg):
    """Drafts verified on the compute side (protocol 5: a sample count per sequence, the drafts
    accepted back), rejected positions rolled back in device or host KV: greedy text is the text
    without lookup, and seeded, penalized sampling with lookup gives the single-process engine's
    text with lookup."""
    prompts = [list(p) + list(p) for p in PROMPTS]  # repeats: lookup finds drafts
    with _engine(model, lookup=4) as e:
        seeded = e.generate_batch(prompts, SEEDED)
    with _engine(model, pcfg, lookup=4) as e:
        assert _generate(e) == reference
        assert e.generate_batch(prompts, SEEDED) == seeded
        assert e.core.spec.drafted > 0


def test_a_signal_while_the_children_are_asked_to_stop_is_not_reported_again(model, caplog):
    """A Ctrl-C that lands in close's request to the children (timeout(1) sends a second SIGINT)
    was logged again when the task holding it was collected: 'Task exception was never
    retrieved'. Close goes on, stops the children, and leaves nothing to report."""
    import gc
    import logging

    e = _engine(model, PipelineConfig(budget=Budget(resident_layers=0)))

    async def interrupted(*a, **k):
        raise KeyboardInterrupt

    e.backend.links.send = interrupted
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        e.close()
        gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert all(c.proc.exitcode is not None for c in e.backend.sup.children.values())


def test_a_staging_killed_unnoticed_leaves_no_segment_after_close(model):
    """Staging SIGKILLed and the run closed before the coordinator handled its death (another
    child's death ended the run first): close removes the segment, so that the resource tracker
    does not warn of a leak after the run's one line."""
    e = _engine(model, PipelineConfig(budget=Budget(resident_layers=0)))
    name = e.backend.arena.name
    staging = e.backend.sup.children["staging"].proc
    os.kill(staging.pid, signal.SIGKILL)
    staging.join(10)
    assert os.path.exists(f"/dev/shm/{name}")
    e.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def _close_after_a_run(model, reference, before=lambda sup: None):
    """A run that answers right, `before(its Supervisor)`, then close(): the seconds close() took, the
    Supervisor and the arena's name."""
    e = _engine(model, PipelineConfig())
    try:
        assert _generate(e) == reference
        sup, name = e.backend.sup, e.backend.arena.name
        before(sup)
        t0 = time.monotonic()
        e.close()
        return time.monotonic() - t0, sup, name
    finally:
        e.close()


def test_close_kills_a_stopped_child_at_once_and_leaves_nothing(model, reference):
    """A hostile-user probe: the reader and staging stopped (SIGSTOP) after a run that needed neither
    any more (every layer resident). close() asked them to stop and waited 2 s, sent SIGTERM, which a
    stopped process takes only once continued, and waited 1.5 s more before SIGKILL: 3.5 s at the end
    of a successful run, for each. A stopped child is killed at once now; the arena goes with the
    run, and no process is left (no_leftovers)."""
    def stop_them(sup):
        for ident in ("reader-0", "staging"):
            os.kill(sup.children[ident].proc.pid, signal.SIGSTOP)

    took, sup, name = _close_after_a_run(model, reference, stop_them)
    assert took < 1.5, took
    assert {i: c.proc.exitcode for i, c in sup.children.items()} == \
        {"reader-0": -signal.SIGKILL, "staging": -signal.SIGKILL, "compute": 0}
    assert not os.path.exists(f"/dev/shm/{name}")


_SLOW_EXIT = """
import atexit, time
def _slow():  # the reader's and staging's exits take long (a stuck close of a file on a dead mount)
    with open("/proc/self/comm") as f:
        if f.read().startswith(("layerstream-rea", "layerstream-sta")):
            time.sleep(60)
atexit.register(_slow)
"""


def test_close_does_not_wait_seconds_for_children_slow_to_exit(model, reference, tmp_path, monkeypatch):
    """Children that take the Shutdown and then do not end (asleep in their exit) held close() 2 s
    each before their SIGTERM, the readers' and compute's wait, then staging's: 4 s at the end of a
    successful run. They are given one short wait from the Shutdown now, then terminated."""
    _in_children(_SLOW_EXIT, tmp_path, monkeypatch)
    took, sup, _ = _close_after_a_run(model, reference)
    assert took < 2.0, took
    assert {i: c.proc.exitcode for i, c in sup.children.items()} == \
        {"reader-0": -TERMINATE, "staging": -TERMINATE, "compute": 0}


@pytest.mark.parametrize("when", ["sent", "before"])
def test_ctrl_c_inside_the_pipelines_submit_leaves_the_engine_usable(model, reference, when, ctrl_c_raises):
    """A real SIGINT landing inside the pipeline's submit, just after a step's Forward went to the
    compute process ("sent") or as it is about to go ("before"): the call raises KeyboardInterrupt
    and the next call generates as before. (It closed the pipeline: the step's number was taken and
    its Forward sent, but neither recorded, and the next step failed 'step n sent, but the layer
    schedule is at step m'.)"""
    from layerstream.proto.messages import Forward

    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))) as e:
        links = e.backend.links
        send, forwards = links.send, []

        async def interrupted(link, ident, msg):
            if isinstance(msg, Forward):
                forwards.append(msg.step)
                if len(forwards) == 3:
                    if when == "before":
                        os.kill(os.getpid(), signal.SIGINT)
                    sent = await send(link, ident, msg)
                    if when == "sent":
                        os.kill(os.getpid(), signal.SIGINT)
                    return sent
            return await send(link, ident, msg)

        links.send = interrupted
        with pytest.raises(KeyboardInterrupt):
            e.generate_batch([list(p) for p in PROMPTS], GREEDY)
        links.send = send
        assert e.generate_batch([list(p) for p in PROMPTS], GREEDY) == reference[-1]


def test_ctrl_c_inside_an_evaluation_step_leaves_no_answer_for_the_next(model, ctrl_c_raises):
    """Scoring (Engine.logits) steps the pipeline itself: a Ctrl-C held back until its step was sent
    and recorded left that step's answer to the next call's collect, which gave the old logits."""
    from layerstream.proto.messages import Forward

    ids = [5, 17, 33, 80]
    with _engine(model, PipelineConfig(budget=Budget(resident_layers=0))) as e:
        want = e.logits(ids)
        links = e.backend.links
        send = links.send

        async def interrupted(link, ident, msg):
            sent = await send(link, ident, msg)
            if isinstance(msg, Forward):
                os.kill(os.getpid(), signal.SIGINT)
            return sent

        links.send = interrupted
        with pytest.raises(KeyboardInterrupt):
            e.logits([9, 9, 9])
        links.send = send
        assert torch.equal(e.logits(ids), want)
