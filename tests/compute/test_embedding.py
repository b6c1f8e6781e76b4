"""The token embedding gathered where the step runs (embedding.py, NOTE [ the embedding on the device ])."""

import pytest
import torch

import ggufgen
from layerstream.compute.embedding import mapped_embedding
from layerstream.compute.runner import ModelRunner
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.weights import GlobalWeights, ResidentLayers
from layerstream.loader.gguf_index import open_model


@pytest.fixture(scope="module", params=["Q4_K", "Q8_0", "F16"])
def index(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("embd") / "m.gguf")
    ggufgen.write_model(path, n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, qtype=request.param, seed=5)
    return open_model(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_gathered_by_ids_on_the_device_are_the_host_gathers(index, dtype):
    """The rows of ids held in a device tensor, dequantized, equal the host gather's, bit for bit."""
    glob = GlobalWeights(index, "cpu", dtype)
    emb = mapped_embedding(glob, torch.device("cpu"), dtype)
    ids = torch.tensor([0, 7, 7, index.hparams.n_vocab - 1, 3])
    got = emb(ids)
    assert got.dtype == dtype and torch.equal(got, glob.embed(ids))


def test_a_step_fed_its_last_sampled_ids_on_the_device_gives_the_logits_of_the_known_ids(index):
    """A runner with the device gather takes a -1 token from `last_ids` without the host knowing
    it: the logits equal those of the same step given the ids themselves."""
    hp = index.hparams
    glob = GlobalWeights(index, "cpu", torch.float32)
    runs = [ModelRunner(hp, glob, ResidentLayers(index, "cpu", torch.float32), "cpu", torch.float32, ctx=16,
                        max_seqs=2, embed=e) for e in (None, mapped_embedding(glob, torch.device("cpu"), torch.float32))]
    prompt = [SeqStep(1, [4, 9, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]), SeqStep(0, [8], [0], [0], [0])]
    last = torch.tensor([11, 6])  # what rows 0 and 1 sampled last
    decode = [SeqStep(1, [-1], [3], [3], [0, 1, 2, 3]), SeqStep(0, [-1], [1], [1], [0, 1])]
    known = [SeqStep(1, [6], [3], [3], [0, 1, 2, 3]), SeqStep(0, [11], [1], [1], [0, 1])]
    for r in runs:
        r.step(prompt, "none")
    want = runs[0].step(known, "last")
    assert torch.equal(runs[1].step(decode, "last", last), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_device_reads_the_pinned_table_in_place(index):
    """On CUDA the table stays in pinned host memory (no device bytes for it) and the rows the
    device gathers by ids on the device, dequantized there, are the host gather's."""
    dev = torch.device("cuda", torch.cuda.current_device())
    glob = GlobalWeights(index, dev, torch.float16, quantized=True)
    before = torch.cuda.memory_allocated(dev)
    emb = mapped_embedding(glob, dev, torch.float16)
    assert emb is not None and torch.cuda.memory_allocated(dev) == before
    assert emb.table.device == dev and emb.table.data_ptr() == emb.host.data_ptr()
    ids = torch.tensor([1, index.hparams.n_vocab - 1, 1], device=dev)
    assert torch.equal(emb(ids).cpu(), glob.embed(ids.cpu()).cpu())
