"""Matrices kept as GGUF blocks on the CPU device (QuantWeight.native, compute/qlinear.py NOTE
[ native blocks on the CPU device ]): the native kernel's rows and the dequantized row chunks
against float64 over gguf-py's dequantizer, one native call a linear_many or glu group, the
weights' form on the CPU (weights_form), and the fallback to dense where the kernel is missing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT, quants

from layerstream.compute import qlinear
from layerstream.compute.cpu import native
from layerstream.compute.device import keeps_quantized, weights_form
from layerstream.compute.qlinear import QuantWeight, glu, linear, linear_many
from layerstream.compute.weights import GlobalWeights, ResidentLayers, device_weight
from layerstream.errors import ConfigError
from tests.compute.test_cpu_native import TYPES, exact_x, rows

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler: the native CPU kernel cannot be built")


def native_weight(qt: QT, N: int, K: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """(the blocks as a native QuantWeight, gguf-py's dequantization as float64 [N, K])."""
    raw = rows(qt, N, K, seed)
    ref = torch.from_numpy(quants.dequantize(raw, qt).reshape(N, K)).double()
    return QuantWeight(torch.from_numpy(raw.reshape(-1).copy()), int(qt), (N, K), native=True), ref


@pytest.fixture
def native_calls(monkeypatch):
    """The jobs of each native.matmuls call, in order."""
    calls: list[int] = []
    real = native.matmuls

    def counted(jobs, *a, **k):
        calls.append(len(jobs))
        return real(jobs, *a, **k)

    monkeypatch.setattr(native, "matmuls", counted)
    return calls


@needs_kernel
@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 40, 70])
def test_linear_on_cpu_blocks_matches_float64_over_gguf_dequantize(qt, T, native_calls):
    """Up to native.MAX_TOKENS rows one native call, up to NATIVE_MAX_ROWS a call each
    native.MAX_TOKENS, more the dequantized rows (no native call)."""
    N, K = 67, 512
    w, ref = native_weight(qt, N, K, seed=int(qt) * 7 + T)
    x = exact_x(T, K, torch.Generator().manual_seed(T))
    bias = torch.randn(N)
    want = x.double() @ ref.T + bias.double()
    got = linear(x, w, bias)
    assert got.shape == (T, N) and got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 2e-5 * want.abs().max().item()
    assert native_calls == {1: [1], 3: [1], 16: [1], 40: [1, 1, 1], 70: []}[T]
    if T <= qlinear.NATIVE_MAX_ROWS:  # a row's result is the same whatever rows share its step
        assert torch.equal(linear(x[-1:], w, bias), got[-1:])
    # bf16 activations come back bf16 (the float32 product rounded once)
    xb = x.bfloat16()
    got_b = linear(xb, w)
    assert got_b.dtype == torch.bfloat16
    assert (got_b.double() - xb.double() @ ref.T).abs().max().item() < 1e-2 * want.abs().max().item()


@needs_kernel
def test_prompt_rows_dequantize_in_row_chunks_written_into_their_columns(monkeypatch):
    N, K, T = 600, 256, qlinear.NATIVE_MAX_ROWS + 1
    w, ref = native_weight(QT.Q4_K, N, K, seed=5)
    x = exact_x(T, K, torch.Generator().manual_seed(2))
    monkeypatch.setattr(qlinear, "CPU_CHUNK_ELEMS", 300 * K)  # chunks of 256 rows: 256, 256, 88
    spans = []
    real = qlinear.dequantize
    monkeypatch.setattr(qlinear, "dequantize", lambda raw, qt, shape, **k: spans.append(shape[0]) or real(raw, qt, shape, **k))
    for bias in (None, torch.randn(N)):
        spans.clear()
        got = linear(x, w, bias)
        want = x.double() @ ref.T + (0 if bias is None else bias.double())
        assert (got.double() - want).abs().max().item() < 2e-5 * want.abs().max().item()
        assert spans == [256, 256, 88]


@needs_kernel
def test_linear_many_multiplies_every_native_matrix_in_one_call(native_calls):
    """q, k and v (any types, one K) in one native call, biases added; prompt rows none."""
    K = 512
    ws = [native_weight(qt, n, K, seed=i) for i, (qt, n) in enumerate([(QT.Q4_1, 64), (QT.Q8_0, 32), (QT.Q6_K, 32)])]
    biases = [None, torch.randn(32), None]
    for T in (1, 5, 16):
        native_calls.clear()
        x = exact_x(T, K, torch.Generator().manual_seed(T))
        got = linear_many(x, [w for w, _ in ws], biases)
        assert native_calls == [3]
        for y, (w, ref), b in zip(got, ws, biases):
            want = x.double() @ ref.T + (0 if b is None else b.double())
            assert y.shape == (T, w.shape[0]) and (y.double() - want).abs().max().item() < 2e-5 * want.abs().max().item()
            assert torch.equal(y, linear(x, w, b))  # one call or one each: the same rows
    for T, calls in ((40, [3, 3, 3]), (qlinear.NATIVE_MAX_ROWS + 1, [])):  # 16 rows a call; prompts dequantized
        native_calls.clear()
        x = exact_x(T, K, torch.Generator().manual_seed(0))
        for y, (w, ref), b in zip(linear_many(x, [w for w, _ in ws], biases), ws, biases):
            want = x.double() @ ref.T + (0 if b is None else b.double())
            assert (y.double() - want).abs().max().item() < 2e-5 * want.abs().max().item()
        assert native_calls == calls


@needs_kernel
def test_glu_takes_gate_and_up_in_one_native_call(native_calls):
    K, N = 256, 96
    (gate, rg), (up, ru) = native_weight(QT.Q4_0, N, K, seed=1), native_weight(QT.Q4_0, N, K, seed=2)
    for T in (1, 16):
        native_calls.clear()
        x = exact_x(T, K, torch.Generator().manual_seed(T))
        xd = x.double()
        want = F.silu(xd @ rg.T) * (xd @ ru.T)
        got = glu(x, gate, up)
        assert native_calls == [2] and got.shape == (T, N)
        assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert glu(exact_x(qlinear.NATIVE_MAX_ROWS + 1, K, torch.Generator()), gate, up) is None  # prompt rows: the caller's


@needs_kernel
def test_native_form_keeps_the_kernels_types_as_blocks_and_the_rest_dense():
    def t(qt, shape):
        return SimpleNamespace(qtype=int(qt), shape=shape, name="w")

    def raw(qt, shape):
        return torch.from_numpy(rows(qt, int(np.prod(shape[:-1])), shape[-1], seed=0).reshape(-1).copy())

    q = device_weight(raw(QT.Q4_K, (8, 256)), t(QT.Q4_K, (8, 256)), torch.float32, "native")
    assert isinstance(q, QuantWeight) and q.native and q.shape == (8, 256)
    b = quants.quantize(np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32), QT.Q5_0)
    d = device_weight(torch.from_numpy(b.reshape(-1).copy()), t(QT.Q5_0, (8, 256)), torch.float32, "native")
    assert isinstance(d, torch.Tensor)  # a type the kernel lacks
    torch.testing.assert_close(d, torch.from_numpy(quants.dequantize(b, QT.Q5_0)).reshape(8, 256))
    e = device_weight(raw(QT.Q4_K, (2, 8, 256)), t(QT.Q4_K, (2, 8, 256)), torch.float32, "native")
    assert isinstance(e, torch.Tensor) and e.shape == (2, 8, 256)  # experts stay as they are on the CPU
    tq = device_weight(raw(QT.Q4_K, (8, 256)), t(QT.Q4_K, (8, 256)), torch.float32, True)
    assert isinstance(tq, QuantWeight) and not tq.native  # True: the Triton kernels' blocks (tests)


def test_weights_form_on_the_cpu(monkeypatch):
    if native.available():
        assert weights_form("cpu") == "native" and weights_form("cpu", "native") == "native"
        assert keeps_quantized("cpu")
    assert weights_form("cpu", "dense") == "dense"
    with pytest.raises(ValueError, match="use auto, quantized, native or dense"):
        weights_form("cpu", "fast")
    monkeypatch.setattr(native, "library", lambda: None)  # the kernel missing: dense, as before it
    assert weights_form("cpu") == "dense" and not keeps_quantized("cpu")
    with pytest.raises(ConfigError, match="native weights .* native kernel built"):
        weights_form("cpu", "native")


def test_a_triton_found_but_not_importing_stops_the_computing_side_in_one_line(monkeypatch):
    """weights_form (the launcher's plan) only finds Triton; where the weights are computed with,
    computing_form checks it imports and says what to do where it does not."""
    pytest.importorskip("triton")
    from layerstream.compute import device

    assert device.computing_form("cpu", "quantized") == weights_form("cpu", "quantized") == "triton"  # (TRITON_INTERPRET)
    monkeypatch.setattr(device, "have_triton", lambda: False)
    assert weights_form("cpu", "quantized") == "triton"
    with pytest.raises(ConfigError, match=r"Triton is installed but does not import .* give --weights dense"):
        device.computing_form("cpu", "quantized")
    assert device.computing_form("cpu", "dense") == "dense"


def test_without_the_kernel_the_default_model_loads_dense(smollm_path, monkeypatch):
    from layerstream.loader.gguf_index import open_model

    monkeypatch.setattr(native, "library", lambda: None)
    w = ResidentLayers(open_model(smollm_path), "cpu", torch.float32, layers=[0], quantized=weights_form("cpu")).layer(0)
    assert all(isinstance(v, torch.Tensor) for v in w.values())


@needs_kernel
def test_the_embedding_gathered_from_native_blocks_is_the_host_gathers(smollm_path):
    from layerstream.loader.gguf_index import open_model

    index = open_model(smollm_path)
    toks = torch.tensor([0, 1, 504, 49151, 504])
    for dtype in (torch.float32, torch.bfloat16):
        blocks = GlobalWeights(index, "cpu", dtype, embed_on_device=True, quantized="native")
        assert isinstance(blocks.head, QuantWeight) and blocks.head.native and blocks.head is blocks.embd_dev
        assert torch.equal(blocks.embed(toks), GlobalWeights(index, "cpu", dtype).embed(toks))


@pytest.fixture(scope="module")
def dense_engine(smollm_path):
    """The single-process engine on the default model as smollm_engine, its weights dequantized."""
    from layerstream.coordinator.engine import Engine

    engine = Engine.load(smollm_path, device="cpu", dtype="float32", ctx=512, max_seqs=4, weights="dense")
    yield engine
    engine.close()


@needs_kernel
def test_the_engine_on_native_blocks_gives_the_dense_engines_greedy_tokens(smollm_engine, dense_engine):
    from layerstream.compute.sampling import SamplingParams

    assert smollm_engine.cfg.weights == "auto" and weights_form("cpu") == "native"
    layer = smollm_engine.backend.runner.source.layer(0)
    assert isinstance(layer["ffn_up.weight"], QuantWeight) and layer["ffn_up.weight"].native
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    assert smollm_engine.generate_batch(prompts, greedy) == dense_engine.generate_batch(prompts, greedy)
    # a prompt of at most NATIVE_MAX_ROWS rows goes to the native kernel: its logits within the
    # kernel's rounding of x (about 1e-5 a dot product) of the dense ones
    ids = smollm_engine.encode("The three primary colours are")
    assert len(ids) <= qlinear.NATIVE_MAX_ROWS
    got, want = smollm_engine.logits(ids), dense_engine.logits(ids)
    assert (got - want).abs().max().item() < 1e-2 and torch.equal(got.argmax(-1), want.argmax(-1))


@needs_kernel
def test_the_plan_counts_blocks_for_the_cpu_and_keeps_24_of_smollm2s_30_layers_at_0_15_gib(smollm_path):
    """The default model at --vram-gb 0.15 --ctx 512 on the CPU (issue 24's target), planned as
    run-pipeline plans it: its layers counted as their blocks (Q4_1), the tied Q8_0 head too."""
    from layerstream.coordinator.launch import make_launch
    from layerstream.coordinator.memory import Sizes
    from layerstream.coordinator.pipeline_config import Budget, PipelineConfig
    from layerstream.loader.gguf_index import open_model
    from layerstream.loader.layout import layer_layouts

    index = open_model(smollm_path)
    layouts = layer_layouts(index)
    for dtype in (torch.bfloat16, torch.float32):
        plan = make_launch(index, torch.device("cpu"), dtype, 512, 1, PipelineConfig(budget=Budget(vram_gb=0.15))).plan
        assert len(plan.resident) >= 24, plan.describe()
        assert "decode graphs" not in plan.breakdown()  # planned for the CPU, not as CUDA
        e = dtype.itemsize
        sz = Sizes(index, layouts, e, 512, 1, True, False, False)
        norms = sum(t.shape[0] * e for layer in index.layers for t in layer.values() if len(t.shape) == 1)
        assert sz.resident_prefix[30] == sum(lay.nbytes for lay in layouts) + norms  # the blocks, the norms dense
        assert sz.head == index.globals["token_embd.weight"].nbytes + 576 * e
        # prompt steps: the largest row chunk's temporaries (the head's 1792 rows); decode steps none
        chunk = qlinear.chunk_rows(49152, 576, qlinear.CPU_CHUNK_ELEMS) * 576
        assert chunk <= qlinear.CPU_CHUNK_ELEMS and sz.dequant_scratch(128) == chunk * qlinear.CPU_DEQUANT_BYTES
        assert sz.dequant_scratch(qlinear.NATIVE_MAX_ROWS) == 0


def test_the_cpus_plan_counts_as_blocks_only_what_the_native_kernel_reads():
    from layerstream.coordinator.memory import Sizes

    cpu, cuda = Sizes(None, [], 2, 512, 1, True, False, False), Sizes(None, [], 2, 512, 1, True, True, False)
    for qt, shape, on_cpu in [(QT.Q4_K, (8, 256), True), (QT.Q8_0, (8, 256), True), (QT.Q5_0, (8, 256), False),
                              (QT.Q4_K, (2, 8, 256), False)]:
        t = SimpleNamespace(qtype=int(qt), shape=shape)
        assert cpu.kept_as_blocks(t) == on_cpu and cuda.kept_as_blocks(t)
