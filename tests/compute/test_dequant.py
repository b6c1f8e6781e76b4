"""Dequantization: bit-exact with gguf.quants.dequantize for every supported type, on CPU and CUDA."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants

from layerstream.compute.dequant import SUPPORTED, check_supported, dequantize, tensor_nbytes
from layerstream.errors import ModelError, UnsupportedQuantError

# byte offsets of each block's fp16 scale fields (d, and m / dmin where the type has one)
SCALE_OFFSETS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
}
QUANTS = list(SCALE_OFFSETS)
FLOATS = [QT.F32, QT.F16, QT.BF16]
SHAPES = [(1, 256), (3, 512), (17, 1024)]


def random_quant_bytes(qtype: QT, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random blocks whose fp16 scale fields hold small finite values; (rows, bytes_per_row) uint8."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = shape[0] * shape[1] // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(shape[0], -1)


def random_float_bytes(qtype: QT, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(rows, bytes_per_row) uint8 of random finite F32 / F16 / BF16 values."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if qtype == QT.F32:
        return x.view(np.uint8)
    if qtype == QT.F16:
        return x.astype(np.float16).view(np.uint8)
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16 by truncation


def random_bytes(qtype: QT, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return (random_float_bytes if qtype in FLOATS else random_quant_bytes)(qtype, shape, seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", QUANTS + FLOATS, ids=lambda q: q.name)
def test_bit_exact_with_gguf_py(qtype, shape):
    data = random_bytes(qtype, shape, seed=shape[0])
    ref = torch.from_numpy(quants.dequantize(data, qtype).reshape(shape).copy())
    out = dequantize(torch.from_numpy(data.reshape(-1)), qtype, shape, name="t")
    assert out.dtype == torch.float32 and out.shape == shape
    assert not ref.isnan().any()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
def test_float_round_trip(qtype):
    src = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qtype]
    x = torch.randn(5, 64).to(src)
    raw = x.view(-1).view(torch.uint8)
    out = dequantize(raw, qtype, (5, 64), dtype=src)
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()  # a fresh tensor, never a view of the staging bytes
    assert torch.equal(dequantize(raw, qtype, (5, 64)), x.float())


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q8_0, QT.Q6_K], ids=lambda q: q.name)
def test_half_output_close(qtype):
    data = random_quant_bytes(qtype, (4, 512))
    raw = torch.from_numpy(data.reshape(-1))
    ref = dequantize(raw, qtype, (4, 512))
    out = dequantize(raw, qtype, (4, 512), dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-5)


def test_unaligned_bytes():
    data = random_quant_bytes(QT.Q4_K, (2, 256)).reshape(-1)
    padded = torch.zeros(data.size + 1, dtype=torch.uint8)
    padded[1:] = torch.from_numpy(data)
    ref = dequantize(torch.from_numpy(data), QT.Q4_K, (2, 256))
    assert torch.equal(dequantize(padded[1:], QT.Q4_K, (2, 256)), ref)


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.Q8_K, QT.Q8_1], ids=lambda q: q.name)
def test_unsupported_type_names_tensor(qtype):
    assert qtype not in SUPPORTED
    raw = torch.zeros(tensor_nbytes(qtype, (1, 256)), dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantError, match=f"blk.0.attn_q.weight is stored as {qtype.name}"):
        dequantize(raw, qtype, (1, 256), name="blk.0.attn_q.weight")
    with pytest.raises(UnsupportedQuantError, match="blk.3.ffn_up.weight"):
        check_supported(qtype, "blk.3.ffn_up.weight")


def test_wrong_byte_count():
    n = tensor_nbytes(QT.Q4_K, (2, 256))
    assert n == 2 * 144
    with pytest.raises(ModelError, match="blk.1.ffn_down.weight"):
        dequantize(torch.zeros(n - 1, dtype=torch.uint8), QT.Q4_K, (2, 256), name="blk.1.ffn_down.weight")
    with pytest.raises(ModelError, match="blk.1.ffn_down.weight"):
        dequantize(torch.zeros(n, dtype=torch.uint8), QT.Q4_K, (2, 200), name="blk.1.ffn_down.weight")


def test_tensor_nbytes():
    assert tensor_nbytes(QT.F16, (3, 7)) == 42
    assert tensor_nbytes(QT.Q8_0, (4, 64)) == 4 * 2 * 34
    assert tensor_nbytes(QT.Q6_K, (256,)) == 210
    with pytest.raises(ModelError):
        tensor_nbytes(QT.Q4_0, (4, 33))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", QUANTS + FLOATS, ids=lambda q: q.name)
def test_cuda_matches_cpu(qtype):
    shape = (33, 1024)
    raw = torch.from_numpy(random_bytes(qtype, shape).reshape(-1))
    cpu = dequantize(raw, qtype, shape)
    gpu = dequantize(raw.cuda(), qtype, shape)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    half = dequantize(raw.cuda(), qtype, shape, dtype=torch.float16)
    assert torch.equal(half.cpu(), cpu.half())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K],
                         ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(1, 256), (3, 768), (19, 4096)])
def test_fused_cuda_kernel_matches_torch_path_and_gguf(qtype, shape):
    data = random_bytes(qtype, shape, seed=7).reshape(-1)
    padded = torch.zeros(data.size + 64, dtype=torch.uint8)
    padded[32 : 32 + data.size] = torch.from_numpy(data)
    raw = padded.cuda()[32 : 32 + data.size]  # a slice at an offset, as in a VRAM slot
    fused = dequantize(raw, qtype, shape)
    plain = dequantize(raw, qtype, shape, fused=False)
    ref = torch.from_numpy(quants.dequantize(data, qtype).reshape(shape))
    assert torch.equal(fused, plain)
    assert torch.equal(fused.cpu(), ref)
    assert torch.equal(dequantize(raw, qtype, shape, dtype=torch.float16).cpu(), ref.half())
