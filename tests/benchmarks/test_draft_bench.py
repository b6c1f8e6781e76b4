"""The self-draft benchmark's truncated model: the first k blocks of the GGUF, byte for byte, with
block_count k, refused outside 1..n-1; it loads and drafts for the whole model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import ggufgen
from layerstream.benchmarks.draft_bench import first_layers
from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.errors import ConfigError


def test_the_first_k_layers_are_the_models_own_tensors(tmp_path):
    full = ggufgen.write_model(tmp_path / "m.gguf", qtype="Q8_0", n_layer=3, seed=3)
    cut = first_layers(full, 2, str(tmp_path / "first2.gguf"))
    a, b = gguf.GGUFReader(full), gguf.GGUFReader(cut)
    assert int(b.fields["llama.block_count"].contents()) == 2
    want = {t.name: t for t in a.tensors if not t.name.startswith("blk.2.")}
    assert sorted(t.name for t in b.tensors) == sorted(want)
    for t in b.tensors:
        assert t.tensor_type == want[t.name].tensor_type and np.array_equal(np.array(t.data), np.array(want[t.name].data))
    assert b.fields["tokenizer.ggml.tokens"].contents() == a.fields["tokenizer.ggml.tokens"].contents()
    G = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with Engine.load(full, device="cpu", dtype="float32", ctx=64) as e:
        want_text = e.generate_batch([[5, 77, 200, 13]], G)
    with Engine.load(full, device="cpu", dtype="float32", ctx=64, draft_model=cut) as e:
        assert e.generate_batch([[5, 77, 200, 13]], G) == want_text and e.core.spec.drafted > 0
    for k in (0, 3):
        with pytest.raises(ConfigError, match=f"--layers {k}: .* has 3 blocks"):
            first_layers(full, k, str(tmp_path / "bad.gguf"))
