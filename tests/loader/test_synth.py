"""Synthetic models of real shapes: the index reads the right hparams and types; the engine runs them."""

import math
import signal
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from layerstream.loader.gguf_index import open_model
from layerstream.loader.synth import main, write_shaped_model
from layerstream.loader.synth_blocks import random_quant_blocks
from layerstream.loader.synth_shapes import SHAPES, ModelShape, tensor_type
from layerstream.proto.signals import STOP_SIGNALS
from procs import signal_state

TINY = ModelShape("tiny", n_embd=256, n_ff=512, n_layer=3, n_head=4, n_head_kv=2, n_vocab=300,
                  rope_theta=500000.0, rope_freqs=True, context_length=512)


def test_smollm2_shape_two_layers(tmp_path):
    path = write_shaped_model(tmp_path / "s.gguf", "smollm2-135m", n_layer=2)
    idx = open_model(path)
    hp, want = idx.hparams, SHAPES["smollm2-135m"]
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.n_ff, hp.attn.n_head, hp.attn.n_head_kv, hp.n_vocab) == (
        "llama", 2, want.n_embd, want.n_ff, want.n_head, want.n_head_kv, want.n_vocab)
    assert hp.rope.theta == want.rope_theta and not hp.rope.has_freqs
    # 576-wide rows do not fit 256-value K blocks: llama.cpp's fallbacks
    assert idx.layers[0]["attn_q.weight"].qtype == QT.Q5_0
    assert idx.layers[0]["ffn_down.weight"].qtype in (QT.Q4_K, QT.Q6_K)  # 1536-wide rows do
    assert idx.globals["output.weight"].qtype == QT.Q8_0
    assert idx.layers[1]["attn_norm.weight"].qtype == QT.F32


def test_q4_k_m_mix_follows_llama_cpp():
    n = 32
    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", 4096, n) == QT.Q6_K
    assert tensor_type("Q4_K_M", "blk.4.attn_v.weight", 4096, n) == QT.Q4_K
    assert tensor_type("Q4_K_M", "blk.6.ffn_down.weight", 14336, n) == QT.Q6_K
    assert tensor_type("Q4_K_M", "blk.5.ffn_up.weight", 4096, n) == QT.Q4_K
    assert tensor_type("Q4_K_M", "token_embd.weight", 4096, n) == QT.Q4_K
    assert tensor_type("Q4_K_M", "output.weight", 4096, n) == QT.Q6_K
    assert tensor_type("Q5_K_M", "blk.5.ffn_up.weight", 4096, n) == QT.Q5_K
    assert tensor_type("Q5_K_M", "blk.0.attn_v.weight", 4096, n) == QT.Q6_K
    assert tensor_type("Q5_K_M", "output.weight", 4096, n) == QT.Q6_K
    assert tensor_type("Q5_K_M", "blk.0.ffn_up.weight", 576, n) == QT.Q5_1  # llama.cpp's fallback
    assert tensor_type("Q8_0", "blk.5.ffn_up.weight", 4096, n) == QT.Q8_0
    assert tensor_type("F16", "blk.5.attn_norm.weight", 4096, n) == QT.F32


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q8_0", "F16"])
def test_tiny_shape_runs_in_the_engine(tmp_path, quant):
    from layerstream.coordinator.engine import Engine

    path = write_shaped_model(tmp_path / f"t-{quant}.gguf", TINY, quant=quant)
    idx = open_model(path)
    assert idx.hparams.rope.has_freqs and idx.hparams.n_layer == 3
    sizes = [idx.layer_nbytes(i) for i in range(3)]
    if quant in ("Q4_K_M", "Q5_K_M"):  # llama.cpp gives the last eighth of the layers Q6_K attn_v and ffn_down
        assert sizes[2] > sizes[0] == sizes[1]
    with Engine.load(path, device="cpu", dtype="float32", ctx=32) as eng:
        lg = eng.logits([1, 2, 3, 4, 5])
    assert lg.shape == (5, TINY.n_vocab) and torch.isfinite(lg).all()
    assert 0.05 < float(lg.std()) < 100


def test_sampled_calibration_gives_the_wanted_spread():
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    for qt in (QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q5_0):
        raw = random_quant_blocks(rng, (64, 512), qt, 0.02, sample_blocks=16)
        w = dequantize(raw, qt)
        assert np.isfinite(w).all()
        assert 0.01 < w.std() < 0.04 and abs(w.mean()) < 0.005, qt.name


def test_cli_prints_size_and_time(tmp_path, capsys):
    out = tmp_path / "c.gguf"
    assert main([str(out), "--shape", "smollm2-135m", "--layers", "1", "--quant", "Q8_0"]) == 0
    text = capsys.readouterr().out
    assert "GB" in text and " s " in text and out.exists()
    assert open_model(out).hparams.n_layer == 1
    assert math.isclose(out.stat().st_size / 1e9, float(text.split(" GB")[0].split()[-1]), abs_tol=1e-3)


TINY_MOE = ModelShape("tiny-moe", n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_vocab=300,
                      rope_theta=1e6, context_length=512, arch="qwen3moe", head_size=128, n_expert=8,
                      n_expert_used=2, n_ff_exp=256)


def test_moe_shape_matches_its_index_and_runs(tmp_path):
    """The Qwen3-30B-A3B layout in small: experts as 3-D tensors, an F32 router, q/k norms, head
    size from key_length; the written file and the file-less index agree tensor by tensor."""
    from layerstream.coordinator.engine import Engine
    from layerstream.loader.synth import shaped_index

    path = write_shaped_model(tmp_path / "moe.gguf", TINY_MOE)
    idx, planned = open_model(path), shaped_index(TINY_MOE)
    hp = idx.hparams
    assert (hp.arch, hp.moe.n_expert, hp.moe.n_expert_used, hp.moe.n_ff_exp, hp.attn.head_dim) == ("qwen3moe", 8, 2, 256, 128)
    assert idx.layers[0]["ffn_up_exps.weight"].shape == (8, 256, 256)
    assert idx.layers[0]["ffn_gate_inp.weight"].qtype == QT.F32
    for i in range(2):
        assert {k: (t.shape, t.qtype, t.nbytes) for k, t in idx.layers[i].items()} == \
               {k: (t.shape, t.qtype, t.nbytes) for k, t in planned.layers[i].items()}
    assert (planned.hparams.moe.n_expert, planned.hparams.attn.head_dim) == (8, 128)
    with Engine.load(path, device="cpu", dtype="float32", ctx=32) as eng:
        lg = eng.logits([1, 2, 3, 4, 5])
    assert lg.shape == (5, 300) and torch.isfinite(lg).all()
    # the full shape: about 18.6 GB at Q4_K_M, as llama.cpp's file of Qwen3-30B-A3B
    full = shaped_index("qwen3-30b-a3b")
    assert 17e9 < full.total_nbytes() < 20e9


def _hot_share_of(W: np.ndarray, n_used: int, hot: np.ndarray, seed: int) -> float:
    """The share of top-`n_used` choices of router W [E, n] over independent normal inputs that go
    to `hot` experts (an estimate independent of the calibration's sample)."""
    h = np.random.default_rng(seed).standard_normal((4000, W.shape[1]))
    top = np.argpartition(-(h @ W.T), n_used - 1, axis=1)[:, :n_used]
    return float(np.isin(top, hot).mean())


@pytest.mark.parametrize("skew", [0.3, 0.5])
def test_route_skew_gives_a_tenth_of_the_experts_the_stated_share(skew):
    """NOTE [ skewed routing ]: the Qwen3-30B-A3B router's shape (8 of 128 experts, rows of 2048)."""
    from layerstream.loader.synth_routing import router_scales

    E, k, n = 128, 8, 2048
    s = router_scales(E, k, skew, np.random.default_rng(1))
    hot = np.flatnonzero(s != 1)
    assert len(hot) == 13 and (s[hot] > 1).all()
    W = np.random.default_rng(2).standard_normal((E, n)) / math.sqrt(n)
    assert abs(_hot_share_of(W * s[:, None], k, hot, 3) - skew) < 0.03
    assert abs(_hot_share_of(W, k, hot, 3) - 13 / 128) < 0.03  # unscaled: uniform
    with pytest.raises(ValueError, match="0.10 to 0.7"):
        router_scales(E, k, 0.95, np.random.default_rng(1))  # past what scaling rows can give


def _routing_through_the_model(path, n_tokens: int = 400):
    """Each MoE layer's input and chosen experts over one prefill of random token ids (the CPU
    engine, float32): [(x [T, n_embd], chosen [T, k])], first layer first."""
    import torch

    from layerstream.compute import moe
    from layerstream.coordinator.engine import Engine

    seen, route = [], moe.moe_route

    def watched(hp, w, x):
        h, weight, chosen = route(hp, w, x)
        seen.append((x.double(), chosen))
        return h, weight, chosen

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe, "moe_route", watched)
        with Engine.load(str(path), device="cpu", dtype="float32", ctx=512) as eng:
            eng.logits(torch.randint(0, 300, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist())
    return seen


def test_a_random_moe_routes_uniformly_through_its_layers(tmp_path, monkeypatch):
    """NOTE [ routing of random weights ]: with the MoE shapes' gains each layer's input keeps its
    part shared by every token small (the mean vector's energy under 4% of a token's), and the two
    most chosen of 16 experts take about their uniform share of the decisions in every layer (2 of
    16: 12.5%; 400 tokens' sampling spread puts its top two near 17%). At the dense shapes' gains the
    shared part grows with depth (the cause of the skew this guards against; on the Qwen3-30B-A3B
    shape it reached two thirds by the sixth layer)."""
    from layerstream.loader import synth

    shape = replace(TINY_MOE, n_layer=6, n_expert=16)

    def shared(x):  # the energy of the tokens' mean vector against a token's mean energy
        m = x.mean(0)
        return float(m @ m / (x * x).sum(1).mean())

    seen = _routing_through_the_model(write_shaped_model(tmp_path / "u.gguf", shape))
    assert len(seen) == 6
    for x, chosen in seen:
        counts = np.bincount(chosen.flatten().numpy(), minlength=16)
        assert shared(x) < 0.04 and np.sort(counts)[-2:].sum() / counts.sum() < 0.23, (shared(x), counts)
    monkeypatch.setattr(synth, "MOE_EMBD_GAIN", 2.0)
    monkeypatch.setattr(synth, "MOE_ATTN_OUT_GAIN", 0.7)
    seen = _routing_through_the_model(write_shaped_model(tmp_path / "old.gguf", shape))
    assert shared(seen[-1][0]) > 0.1 > shared(seen[0][0])


def test_synth_writes_skewed_routers_and_refuses_what_it_cannot(tmp_path, capsys):
    path = write_shaped_model(tmp_path / "skew.gguf", TINY_MOE, route_skew=0.2)
    idx = open_model(path)
    for i in range(TINY_MOE.n_layer):
        t = idx.layers[i]["ffn_gate_inp.weight"]
        W = np.frombuffer(idx.tensor_bytes(t), dtype=np.float32).reshape(8, 256).astype(np.float64)
        norms = np.linalg.norm(W, axis=1)
        hot = np.array([norms.argmax()])  # one hot expert of 8, its row scaled up
        assert norms[hot[0]] > 1.5 * np.median(norms)
        assert abs(_hot_share_of(W, 2, hot, 5) - 0.2) < 0.03  # (uniform: 0.125)
    assert main([str(tmp_path / "x.gguf"), "--shape", "smollm2-135m", "--layers", "1", "--route-skew", "0.5"]) == 1
    assert "has no experts" in capsys.readouterr().err
    assert main([str(tmp_path / "y.gguf"), "--shape", "qwen3-30b-a3b", "--layers", "1", "--route-skew", "0.99"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("synth: error: --route-skew 0.99") and err.count("\n") == 1
    assert not (tmp_path / "y.gguf").exists()  # refused before writing


def test_a_synthetic_model_chats(tmp_path):
    """Its chat template (synth_vocab.CHAT_TEMPLATE) lets --chat run on a synthetic model, for the
    benchmarks: two piped turns, each answered, the second with the first's KV reused."""
    import subprocess
    from pathlib import Path

    path = write_shaped_model(tmp_path / "t.gguf", TINY)
    launcher = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"
    r = subprocess.run([str(launcher), "--single-process", "-m", str(path), "--device", "cpu", "--chat", "-n", "4",
                        "--temperature", "0", "--ignore-eos", "--stats"], input="hello there\nand again\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    turns = [line for line in r.stderr.splitlines() if line.startswith("prompt:")]
    assert len(turns) == 2 and "reused" in turns[1] and all("decode: 4 tokens" in t for t in turns), r.stderr


@pytest.mark.default_threads
@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGHUP, 129, "hung up"), (signal.SIGQUIT, 131, "quit")])
def test_a_write_cut_short_leaves_no_file_and_says_so(tmp_path, sig, status, word):
    """A probe's: Ctrl-C printed a traceback, and each signal left a partial file that later read as a
    damaged download ('re-download the file'); a closed terminal (SIGHUP) and a Ctrl-\\ (SIGQUIT) still
    left it, a model's size in /dev/shm, after SIGTERM was handled."""
    import subprocess
    import sys
    import time

    out = tmp_path / "big.gguf"

    def as_a_parent_left_them():
        # SIGINT as a terminal sends it, even where this test's runner ignores it and the child would
        # inherit that; every stop signal blocked, as a parent may pass them on across exec: one CI
        # run's synth took no SIGTERM and wrote the whole file, with status 0, as a blocked one did here
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    proc = subprocess.Popen([sys.executable, "-m", "layerstream.loader.synth", str(out), "--shape", "llama-3.1-8b"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_parent_left_them)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.iterdir()) and time.monotonic() < deadline:  # (writing has begun)
            time.sleep(0.05)
        time.sleep(0.5)
        met = signal_state(proc.pid)  # (what the signal met, for a failure's message: one CI run's SIGTERM was not taken)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, (met, err[-2000:])
    assert err.splitlines()[-1] == f"synth: {word}; {out} not written" and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_synth_refuses_a_negative_seed_and_an_empty_path_before_writing(tmp_path, capsys):
    for argv, words in (([str(tmp_path / "s.gguf"), "--seed", "-1"], "--seed -1: must be 0 or more"),
                        ([""], "out: an empty path")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_synth_refuses_a_folder_or_a_special_file_before_writing(tmp_path, capsys):
    """A probe's: a folder as the output wrote the whole model beside it before the rename failed
    (one ending in / then said 'Not a directory'), and run as root a device (/dev/null) was replaced
    by the model. A FIFO stands in for the device."""
    import os
    import stat

    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for out, words in ((tmp_path / "dir", "a folder"), (f"{tmp_path / 'dir'}/", "a folder"),
                       (tmp_path / "fifo", "exists and is not a regular file")):
        with pytest.raises(SystemExit) as e:
            main([str(out), "--shape", "smollm2-135m", "--layers", "1"])
        assert e.value.code == 2 and f"{out}: {words}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"] and not list((tmp_path / "dir").iterdir())
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


def test_a_model_its_disk_has_no_room_for_is_refused_before_a_byte_is_written(tmp_path, capsys, monkeypatch):
    """A probe's: bin/bench --shape llama-3.1-70b wrote 43 GB to the temporary folder with no
    check, to find a full disk near the end. The free space is a stand-in, a little short of the
    8B's size (its own tensors' bytes, from the index synth writes)."""
    import shutil
    from collections import namedtuple

    from benchmarks import bench
    from layerstream.loader.synth import shaped_index

    index = shaped_index("llama-3.1-8b")
    need = sum(t.nbytes for tensors in (*index.layers, index.globals) for t in tensors.values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * need, 9 * need, need))
    out = tmp_path / "8b.gguf"
    assert main([str(out), "--shape", "llama-3.1-8b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("synth: error: llama-3.1-8b Q4_K_M (32 layers) needs ") and " GB free; " in err, err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []
    # the same check for bin/bench's own temporary model, which names TMPDIR
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (where the bench writes)
    assert bench.main(["compute", "--shape", "llama-3.1-8b", "--device", "cpu", "--reps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bin/bench: error: llama-3.1-8b Q4_K_M (32 layers) needs ") and "TMPDIR" in err, err
    assert list(tmp_path.iterdir()) == []
    # a model that fits the stand-in's room is written
    assert main([str(out), "--shape", "smollm2-135m", "--layers", "1"]) == 0 and out.stat().st_size > 0


def test_a_layer_count_beyond_any_model_is_refused_at_once(tmp_path, capsys):
    """--layers of a hundred million planned every tensor (minutes, gigabytes of memory) before the
    disk's room refused it; a count above MAX_LAYERS is refused before anything is planned or
    written, as zero is: a usage error naming --layers (it named n_layer=, status 1), and the
    same bound for callers that give n_layer."""
    from layerstream.loader.synth_shapes import MAX_LAYERS, resolve_shape

    for n in (10**8, 0):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "x.gguf"), "--shape", "llama-3.1-8b", "--layers", str(n)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.endswith(f"error: --layers {n}: give 1 to {MAX_LAYERS}"), err
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=f"^n_layer=100000000: at most {MAX_LAYERS} layers"):
        resolve_shape("llama-3.1-8b", 10**8)
