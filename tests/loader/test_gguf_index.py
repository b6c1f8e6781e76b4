"""open_model on synthetic GGUFs: hparams, byte ranges, split sets, bad input; reference forward sanity."""

import os
import re
import shutil

import gguf
import numpy as np
import pytest

import ggufgen
import reference
from layerstream.errors import ModelError
from layerstream.loader.gguf_index import open_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "llama": ggufgen.write_model(d / "llama.gguf", arch="llama", rope_freqs=True),
        "llama_tied": ggufgen.write_model(d / "llama_tied.gguf", arch="llama", tied=True, seed=1),
        "qwen2": ggufgen.write_model(d / "qwen2.gguf", arch="qwen2", n_head_kv=4, seed=2),
        "qwen3": ggufgen.write_model(d / "qwen3.gguf", arch="qwen3", n_layer=3, seed=3),
        "kquant": ggufgen.write_model(
            d / "kquant.gguf", n_embd=256, n_ff=256, n_vocab=300, qtype=["Q4_K", "Q6_K", "Q2_K", "Q5_K", "Q3_K", "Q8_0"]
        ),
    }


def test_hparams_llama(models):
    hp = open_model(models["llama"]).hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.attn.n_head, hp.attn.n_head_kv) == ("llama", 2, 64, 4, 2)
    assert (hp.attn.head_dim, hp.n_ff, hp.n_vocab, hp.rope.dim) == (16, 128, 256, 16)
    assert hp.rope.neox is False and hp.rope.theta == 10000.0 and hp.context_length == 256
    assert hp.norm_eps == pytest.approx(1e-5)
    assert hp.rope.has_freqs and not hp.tied_output


def test_hparams_qwen2(models):
    m = open_model(models["qwen2"])
    hp = m.hparams
    assert (hp.arch, hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim, hp.rope.neox) == ("qwen2", 4, 4, 16, True)
    assert m.layers[0]["attn_q.bias"].shape == (64,)
    assert m.layers[1]["attn_k.bias"].shape == (64,)


def test_hparams_qwen3_head_dim_from_key_length(models):
    m = open_model(models["qwen3"])
    hp = m.hparams
    assert (hp.arch, hp.n_layer, hp.attn.head_dim, hp.rope.dim, hp.rope.neox) == ("qwen3", 3, 32, 32, True)
    assert hp.attn.head_dim != hp.n_embd // hp.attn.n_head
    assert m.layers[2]["attn_q_norm.weight"].shape == (32,)
    assert m.layers[0]["attn_q.weight"].shape == (4 * 32, 64)
    assert m.layers[0]["attn_output.weight"].shape == (64, 4 * 32)


def test_tied_and_rope_freqs_detection(models):
    tied = open_model(models["llama_tied"]).hparams
    assert tied.tied_output and not tied.rope.has_freqs
    m = open_model(models["llama"])
    assert "output.weight" in m.globals and m.globals["rope_freqs.weight"].shape == (8,)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "kquant"])
def test_byte_ranges_match_gguf_reader(models, name):
    path = models[name]
    m = open_model(path)
    r = gguf.GGUFReader(path)
    infos = {**m.globals, **{f"blk.{i}.{k}": t for i, layer in enumerate(m.layers) for k, t in layer.items()}}
    assert sorted(infos) == sorted(t.name for t in r.tensors)
    raw = np.fromfile(path, dtype=np.uint8)
    for t in r.tensors:
        info = infos[t.name]
        assert info.qtype == int(t.tensor_type) and info.file == path
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))
        want = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert info.nbytes == want.size
        assert np.array_equal(raw[info.offset : info.offset + info.nbytes], want), t.name
        assert np.array_equal(m.tensor_bytes(info), want)
    assert m.total_nbytes() == sum(int(t.n_bytes) for t in r.tensors)


def test_split_model_reads_as_one(models, tmp_path):
    src = ggufgen.write_model(tmp_path / "m.gguf", arch="qwen2", seed=5)
    parts = ggufgen.split_model(src, 3)
    assert [os.path.basename(p) for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = open_model(src)
    for first in (parts[0], parts[2]):  # any part names the set
        m = open_model(first)
        assert m.files == parts and m.hparams == whole.hparams
        assert m.metadata["split.count"] == 3
        names = lambda x: {t.name for t in x.globals.values()} | {  # noqa: E731
            t.name for layer in x.layers for t in layer.values()
        }
        assert names(m) == names(whole)
    m = open_model(parts[0])
    per_file = {p: 0 for p in parts}
    for layer_w, layer_s in zip(whole.layers, m.layers):
        for k, t in layer_s.items():
            per_file[t.file] += 1
            assert np.array_equal(m.tensor_bytes(t), whole.tensor_bytes(layer_w[k]))
    for k, t in m.globals.items():
        per_file[t.file] += 1
        assert np.array_equal(m.tensor_bytes(t), whole.tensor_bytes(whole.globals[k]))
    assert all(n > 0 for n in per_file.values())
    for p in parts:  # offsets are each part's own GGUFReader offsets
        for t in gguf.GGUFReader(p).tensors:
            info = m.globals.get(t.name) or m.layers[int(t.name.split(".")[1])][t.name.split(".", 2)[2]]
            assert (info.file, info.offset, info.nbytes) == (p, int(t.data_offset), int(t.n_bytes))
    want = reference.reference_logits(src, [1, 2, 3])
    np.testing.assert_allclose(reference.reference_logits(parts[0], [1, 2, 3]), want)


def test_split_missing_part(tmp_path):
    parts = ggufgen.split_model(ggufgen.write_model(tmp_path / "m.gguf"), 3)
    os.remove(parts[1])
    with pytest.raises(ModelError, match="00002-of-00003"):
        open_model(parts[0])


def test_a_split_name_numbered_outside_its_whole_and_a_path_not_in_utf8_are_read_as_they_should(tmp_path):
    """Probes': m-00001-of-00000.gguf raised IndexError; a Latin-1 file name raised
    UnicodeEncodeError from the header cache's key (llama.cpp opens such names); a whole model
    named like a part was refused for its missing parts, where llama.cpp reads the split from the
    header and loads it. A part's name with numbers outside a whole is refused only for a part."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    whole = open_model(path)
    for name in ("m-00001-of-00000.gguf", "m-00003-of-00002.gguf", "m-00000-of-00001.gguf", "m-00001-of-00002.gguf"):
        os.link(path, tmp_path / name)
        got = open_model(str(tmp_path / name))
        assert got.files == [str(tmp_path / name)] and got.hparams == whole.hparams
    part = ggufgen.split_model(ggufgen.write_model(tmp_path / "p.gguf"), 2)[0]
    os.link(part, tmp_path / "p-00003-of-00002.gguf")
    with pytest.raises(ModelError, match=r"^.*: a split model's part name, but its numbers are not a part of a "
                                         r"whole \(gguf-split names parts -00001-of-0000N\.gguf"):
        open_model(str(tmp_path / "p-00003-of-00002.gguf"))
    latin = os.fsdecode(bytes(tmp_path) + b"/mod\xe8le.gguf")  # (a surrogate escape in str, as argv gives it)
    os.link(path, latin)
    assert open_model(latin).hparams == open_model(path).hparams


def test_a_split_set_is_checked_by_each_parts_numbers_tensors_and_count(tmp_path):
    """A probe's: parts were matched by their names alone, so a part of another split loaded, its
    tensors taking the place of the set's (the last part's copy of a name won)."""
    parts = ggufgen.split_model(ggufgen.write_model(tmp_path / "m.gguf"), 2)
    other = ggufgen.split_model(ggufgen.write_model(tmp_path / "o.gguf", n_layer=1), 2)
    os.replace(other[1], parts[1])
    with pytest.raises(ModelError, match=r"m-00002-of-00002\.gguf: tensor \S+ is also in \S+m-00001-of-00002\.gguf; "
                                         r"the parts are not one gguf-split set$"):
        open_model(parts[0])
    parts = ggufgen.split_model(ggufgen.write_model(tmp_path / "n.gguf"), 3)
    keep = tmp_path / "keep.gguf"
    shutil.copy(parts[1], keep)
    for change, drop, said in (({"split.no": 2}, (), "part 3 of 3"), ({"split.count": 4}, (), "part 2 of 4"),
                               ({}, ("split.no",), "no split.no and split.count")):
        ggufgen.rewrite_metadata(keep, parts[1], change, drop)
        with pytest.raises(ModelError, match=rf"n-00002-of-00003\.gguf: named part 2 of 3, but its metadata says "
                                             rf"{said}; the parts are not one gguf-split set"):
            open_model(parts[0])
    shutil.copy(keep, parts[1])
    assert open_model(parts[0]).files == parts
    ggufgen.rewrite_metadata(parts[0], keep, {"split.tensors.count": 999})
    os.replace(keep, parts[0])
    with pytest.raises(ModelError, match=r"split model lists 999 tensors but its parts hold \d+"):
        open_model(parts[0])


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("keep", [100, 2000, -1])
def test_truncated_file(tmp_path, keep):
    path = ggufgen.truncate(ggufgen.write_model(tmp_path / "t.gguf"), keep)
    with pytest.raises(ModelError) as e:
        open_model(path)
    assert path in one_line(e)


def test_wrong_magic(tmp_path):
    path = ggufgen.corrupt_magic(ggufgen.write_model(tmp_path / "bad.gguf"))
    with pytest.raises(ModelError, match="not a GGUF file") as e:
        open_model(path)
    assert path in one_line(e)


@pytest.mark.parametrize("key, needle", [("general.name", b"ggufgen-llama"), ("tokenizer.ggml.tokens", "Ă".encode())])
def test_a_string_value_that_is_not_utf8_is_named(tmp_path, key, needle):
    """A probe's: a metadata string with a byte that is no UTF-8 (gguf-py decodes it when read) ended
    in a traceback; now one line naming the file and the key."""
    path = ggufgen.write_model(tmp_path / "u.gguf")
    raw = bytearray(open(path, "rb").read())
    raw[raw.index(needle)] = 0xFF
    open(path, "wb").write(raw)
    with pytest.raises(ModelError) as e:
        open_model(path)
    msg = one_line(e)
    assert path in msg and f"metadata '{key}'" in msg and "not UTF-8" in msg


def test_a_later_blocks_tensor_of_another_shape_is_refused_at_load(tmp_path):
    """A probe's: blk.1.ffn_gate's two dimensions swapped (its bytes as many) loaded, and the first step
    failed deep in a matmul; every block's main tensors are checked against the metadata, as
    llama.cpp does at load."""
    import struct

    path = ggufgen.write_model(tmp_path / "s.gguf", n_layer=2)
    raw = bytearray(open(path, "rb").read())
    name = b"blk.1.ffn_gate.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    d0, d1 = struct.unpack_from("<QQ", raw, at + 4)
    assert n_dims == 2 and d0 != d1
    struct.pack_into("<QQ", raw, at + 4, d1, d0)
    open(path, "wb").write(raw)
    with pytest.raises(ModelError) as e:
        open_model(path)
    assert f"tensor blk.1.ffn_gate.weight has shape [{d0}, {d1}] where the metadata" in one_line(e)


def _offset_field(raw: bytearray, name: bytes) -> int:
    """Where tensor `name`'s data offset (relative to the data section) lies in a GGUF header."""
    import struct

    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    return at + 4 + 8 * n_dims + 4


@pytest.mark.parametrize("edit, needle", [
    ("overlap", "tensors blk.0.ffn_down.weight and blk.1.ffn_down.weight overlap"),
    ("misalign", "tensor token_embd.weight's data at byte"),
])
def test_tensor_offsets_that_overlap_or_leave_the_alignment_are_refused_at_load(tmp_path, edit, needle):
    """A probe's: one tensor's offset set to another's loaded and changed the text; token_embd shifted
    by a byte ended in NaN logits at the first step. As llama.cpp does at load, the offsets are
    checked: each at a multiple of the file's alignment, none overlapping another."""
    import struct

    path = ggufgen.write_model(tmp_path / "o.gguf", n_layer=2)
    raw = bytearray(open(path, "rb").read())
    if edit == "overlap":
        src = struct.unpack_from("<Q", raw, _offset_field(raw, b"blk.0.ffn_down.weight"))[0]
        struct.pack_into("<Q", raw, _offset_field(raw, b"blk.1.ffn_down.weight"), src)
    else:
        at = _offset_field(raw, b"token_embd.weight")
        struct.pack_into("<Q", raw, at, struct.unpack_from("<Q", raw, at)[0] + 1)
    open(path, "wb").write(raw)
    with pytest.raises(ModelError) as e:
        open_model(path)
    assert needle in one_line(e) and "re-download or re-convert the file" in one_line(e)


def test_no_such_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        open_model(tmp_path / "absent.gguf")


def test_a_directory_is_named_as_one(tmp_path):
    """A probe's: `bin/bench engine -m DIR` said "no such model file" (run-pipeline's own check says
    what this says)."""
    with pytest.raises(ModelError, match=r"is a directory; give the \.gguf file inside it"):
        open_model(str(tmp_path))


def test_unknown_architecture(tmp_path):
    path = ggufgen.write_unknown_arch(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(ModelError, match="'mamba'") as e:
        open_model(path)
    one_line(e)


def test_missing_tensor(tmp_path):
    path = ggufgen.write_missing_tensor(tmp_path / "miss.gguf", tensor="blk.1.ffn_up.weight")
    with pytest.raises(ModelError, match=r"blk\.1\.ffn_up\.weight") as e:
        open_model(path)
    one_line(e)


def test_missing_global_tensor(tmp_path):
    path = ggufgen.write_missing_tensor(tmp_path / "miss.gguf", tensor="output_norm.weight")
    with pytest.raises(ModelError, match="output_norm.weight"):
        open_model(path)


def test_unsupported_quant_is_indexed(tmp_path):
    # the index only records byte ranges; refusing IQ2_XXS is dequantization's job
    path = ggufgen.write_unsupported_quant(tmp_path / "iq.gguf")
    t = open_model(path).layers[0]["attn_q.weight"]
    assert t.qtype == int(gguf.GGMLQuantizationType.IQ2_XXS)
    assert t.nbytes == 256 * 256 // 256 * 66


# --- the synthetic models and the reference forward ---------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "kquant", "llama_tied"])
def test_reference_finite_and_spread(models, name):
    logits = reference.reference_logits(models[name], [1, 50, 100, 7, 200])
    assert logits.shape == (5, open_model(models[name]).hparams.n_vocab)
    assert np.isfinite(logits).all()
    assert (logits.std(axis=-1) > 0.3).all()  # not all tied
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-6).all()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_reference_is_causal(models, name):
    a = reference.reference_logits(models[name], [5, 6, 7, 8, 9, 10])
    b = reference.reference_logits(models[name], [5, 6, 7, 200, 201, 202])
    np.testing.assert_allclose(a[:3], b[:3], rtol=1e-12, atol=1e-12)
    assert not np.allclose(a[3:], b[3:])


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_reference_position_matters(models, name):
    # without RoPE attention is blind to the order of the context: [a, b, a] and [b, a, a]
    # would give the same last-position logits
    a = reference.reference_logits(models[name], [3, 40, 3])
    b = reference.reference_logits(models[name], [40, 3, 3])
    assert not np.allclose(a[2], b[2])


@pytest.mark.parametrize("neox", [False, True])
def test_reference_rope_is_relative(neox):
    cfg = reference.RefConfig("x", 1, 64, 4, 4, 16, 16, 10000.0, 1.0, 1e-5, neox)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 16)), rng.standard_normal((1, 1, 16))
    factors = rng.uniform(1, 4, 8)
    dot = lambda m, n: float(  # noqa: E731
        (reference.rope(q, np.array([m]), cfg, factors) * reference.rope(k, np.array([n]), cfg, factors)).sum()
    )
    assert dot(5, 2) == pytest.approx(dot(13, 10)) and dot(0, 0) == pytest.approx(float((q * k).sum()))
    assert dot(5, 2) != pytest.approx(dot(5, 3))


def test_reference_rope_freqs_change_logits(tmp_path):
    a = ggufgen.write_model(tmp_path / "a.gguf", rope_freqs=False, seed=4)
    b = ggufgen.write_model(tmp_path / "b.gguf", rope_freqs=True, seed=4)
    toks = [1, 2, 3, 4, 5, 6, 7, 8]
    la, lb = reference.reference_logits(a, toks), reference.reference_logits(b, toks)
    np.testing.assert_allclose(la[0], lb[0], rtol=1e-12)  # position 0: no rotation
    assert not np.allclose(la[1:], lb[1:])


def test_reference_tied_uses_token_embd(models):
    md, w = reference.load(models["llama_tied"])
    assert "output.weight" not in w
    logits = reference.forward(md, w, [1, 2])
    w["output.weight"] = w["token_embd.weight"]
    np.testing.assert_array_equal(reference.forward(md, w, [1, 2]), logits)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,kw", [("llama", {}), ("llama", {"tied": True}), ("qwen2", {}), ("qwen3", {"n_head_kv": 4})]
)
def test_reference_matches_transformers(tmp_path, arch, kw):
    """The reference against Hugging Face's own GGUF loader and forward (independent code)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = ggufgen.write_model(tmp_path / "m.gguf", arch=arch, n_vocab=300, **kw)
    extra = {"head_dim": 32} if arch == "qwen3" else {}  # transformers ignores qwen3.attention.key_length
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float64, **extra)
    toks = [1, 50, 100, 7, 200, 3, 9]
    with torch.no_grad():
        want = hf(torch.tensor([toks])).logits[0].double().numpy()
    np.testing.assert_allclose(reference.reference_logits(path, toks), want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("n_vocab", [256, 300])
def test_tokenizer_loads_in_transformers(tmp_path, n_vocab):
    transformers = pytest.importorskip("transformers")
    ggufgen.write_model(tmp_path / "m.gguf", n_vocab=n_vocab)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "hello world, the dog! ünï"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and max(ids) < n_vocab - 2
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (n_vocab - 2, n_vocab - 1, n_vocab)


def test_renamed_split_part_is_a_clear_error(tmp_path):
    parts = ggufgen.split_model(ggufgen.write_model(str(tmp_path / "m.gguf")), 2)
    renamed = str(tmp_path / "renamed.gguf")
    os.rename(parts[0], renamed)
    with pytest.raises(ModelError, match="part of a 2-part split model") as e:
        open_model(renamed)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count", 0, r"llama\.attention\.head_count = 0 is out of range"),
    ("llama.block_count", 4_000_000_000, r"llama\.block_count = 4000000000 is out of range"),
    ("llama.block_count", 5, r"llama\.block_count = 5 does not match the 2 blocks"),
    ("llama.attention.head_count_kv", 3, r"head_count_kv = 3 does not divide head_count 4"),
    ("llama.embedding_length", 96, r"tensor blk\.0\.attn_q\.weight has shape \[64, 64\] where the metadata"),
    ("llama.rope.dimension_count", 999, r"rope\.dimension_count = 999 is odd or above the head size"),
    ("llama.context_length", 0, r"context_length = 0 is out of range"),
    ("qwen3moe.expert_used_count", 9, r"expert_used_count = 9 is not from 1 to expert_count 4"),
    ("qwen3moe.expert_count", 0, r"expert_count = 0 is out of range"),
    ("qwen3moe.expert_feed_forward_length", 96, r"tensor blk\.0\.ffn_up_exps\.weight has shape \[4, 128, 64\]"),
])
def test_hostile_hyperparameters_are_one_line_naming_the_key(tmp_path, key, value, match):
    """Untrusted metadata is checked before anything is sized from it: no ZeroDivisionError, no
    billion-entry list, one line naming the key."""
    src = ggufgen.write_model(tmp_path / "ok.gguf", arch=key.split(".")[0])
    bad = ggufgen.rewrite_metadata(src, tmp_path / "bad.gguf", {key: value})
    with pytest.raises(ModelError, match=match) as e:
        open_model(bad)
    assert "\n" not in str(e.value)


def test_a_vocabulary_of_two_sizes_and_a_bad_rope_factor_are_refused_at_load_naming_the_key(tmp_path):
    """A probe's: an embedding of more rows than the tokenizer's tokens loaded, and sampled ids the
    tokenizer could not spell (one request's ValueError stopped the server); vocab_size below the
    tokens refused every prompt's ids; a rope scaling factor of 0 was said as the norm's epsilon and
    the base; Gemma 3's local base was not checked (NaN logits blamed on the weights)."""
    import gguf

    from layerstream.loader.synth_vocab import tokenizer_vocab

    tokens, types, merges, bos, eos = tokenizer_vocab(300)
    big = ggufgen.write_model(tmp_path / "big.gguf", n_vocab=400)
    short = ggufgen.rewrite_metadata(big, tmp_path / "short.gguf", {
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos})
    ok = ggufgen.write_model(tmp_path / "ok.gguf", n_vocab=300)
    VT = gguf.GGUFValueType
    cases = [(short, r"llama\.vocab_size = 400 does not match the tokenizer's 300 tokens"),
             (ggufgen.rewrite_metadata(ok, tmp_path / "v.gguf", {"llama.vocab_size": 100}),
              r"llama\.vocab_size = 100 does not match the tokenizer's 300 tokens")]
    for factor in (0.0, float("nan")):
        cases.append((ggufgen.rewrite_metadata(ok, tmp_path / f"r{factor}.gguf", {
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": factor},
            vtypes={"llama.rope.scaling.factor": VT.FLOAT32}), rf"llama\.rope\.scaling\.factor = {factor} is not a "))
    gemma = ggufgen.write_model(tmp_path / "g.gguf", arch="gemma3", n_layer=3)
    for base in (0.0, float("nan")):
        cases.append((ggufgen.rewrite_metadata(gemma, tmp_path / f"gb{base}.gguf", {"gemma3.rope.freq_base_swa": base}),
                      rf"gemma3\.rope\.freq_base_swa = {base} is not a positive number"))
    for path, match in cases:
        with pytest.raises(ModelError, match=rf"^{re.escape(str(path))}: metadata {match}") as e:
            open_model(path)
        assert "\n" not in str(e.value)
    assert open_model(ok).hparams.n_vocab == 300


def test_moe_and_gemma3_hyperparameters(tmp_path):
    hp = open_model(ggufgen.write_model(tmp_path / "moe.gguf", arch="qwen3moe")).hparams
    assert (hp.moe.n_expert, hp.moe.n_expert_used, hp.moe.n_ff_exp, hp.moe.expert_norm) == (4, 2, 128, True)
    assert "ffn_up.weight" not in hp.layer_tensors() and "ffn_gate_inp.weight" in hp.layer_tensors()
    src = ggufgen.write_model(tmp_path / "gemma3.gguf", arch="gemma3", n_layer=3)
    hp = open_model(src).hparams
    assert hp.attn.swa_window == 4 and [hp.is_swa(i) for i in range(3)] == [True, True, False]
    no_window = ggufgen.rewrite_metadata(src, tmp_path / "w0.gguf", {"gemma3.attention.sliding_window": 0})
    assert not open_model(no_window).hparams.is_swa(0)  # no window: every layer attends globally


def test_moe_layer_missing_an_expert_tensor_names_it(tmp_path):
    path = ggufgen.write_model(tmp_path / "m.gguf", arch="llama", n_expert=4, omit=["blk.1.ffn_down_exps.weight"])
    with pytest.raises(ModelError, match=r"blk\.1\.ffn_down_exps\.weight is missing"):
        open_model(path)


# -- the header cache (NOTE [ the header cache ] in loader/header_cache.py) ---------------------------

def _same_types(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_types(x, y) for x, y in zip(a, b))
    return True


def test_header_cache_serves_a_second_open(smollm_path, tmp_path, monkeypatch):
    """The second open of a file reads its parsed header from the cache, not gguf-py, and gives
    the same index: metadata (values and their types: the vocabulary, merges, scores), tensor
    table, hyperparameters."""
    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    first = open_model(smollm_path)
    assert len(list((tmp_path / "cache" / "headers").iterdir())) == 1

    def no_parse(*a, **k):
        raise AssertionError("parsed again")
    monkeypatch.setattr(gguf, "GGUFReader", no_parse)
    second = open_model(smollm_path)
    assert second.metadata == first.metadata and len(second.metadata["tokenizer.ggml.tokens"]) == 49152
    assert all(_same_types(second.metadata[k], v) for k, v in first.metadata.items())
    assert second.hparams == first.hparams and second.layers == first.layers and second.globals == first.globals


def test_header_cache_keeps_the_entries_used_last(tmp_path, monkeypatch):
    """A probe's: each touch of a file made one more entry and none went. Past MAX_ENTRIES the
    entries used longest ago go; one read since (a hit) stays."""
    from layerstream.loader import header_cache

    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(header_cache, "MAX_ENTRIES", 3)
    first = ggufgen.write_model(tmp_path / "first.gguf", n_layer=2)
    path = ggufgen.write_model(tmp_path / "m.gguf", n_layer=2)
    open_model(first)
    kept = header_cache.cache_path(first)
    for t in range(5):
        os.utime(kept, ns=(10**9 * (t + 10),) * 2)  # (first.gguf's entry the oldest but one, then read)
        open_model(first)
        os.utime(path, ns=(10**9 * (t + 1),) * 2)  # a touch: a new entry
        open_model(path)
        entries = list((tmp_path / "cache" / "headers").iterdir())
        assert len(entries) == min(t + 2, 3) and os.path.exists(kept)
    assert header_cache.cache_path(path) in {str(e) for e in entries}


def test_header_cache_follows_the_file(tmp_path, monkeypatch):
    """A file written again at the same path is parsed again; a damaged cache entry is parsed
    again and replaced; LAYERSTREAM_CACHE_DIR=0 caches nothing."""
    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    path = ggufgen.write_model(tmp_path / "m.gguf", n_layer=2)
    assert open_model(path).hparams.n_layer == 2
    ggufgen.write_model(tmp_path / "m.gguf", n_layer=3)
    assert open_model(path).hparams.n_layer == 3
    entries = sorted((tmp_path / "cache" / "headers").iterdir(), key=os.path.getmtime)
    assert len(entries) == 2
    entries[-1].write_bytes(b"\x92not msgpack")
    parses = []
    real = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda *a, **k: parses.append(1) or real(*a, **k))
    assert open_model(path).hparams.n_layer == 3 and parses == [1]
    assert open_model(path).hparams.n_layer == 3 and parses == [1]  # the entry was rewritten
    # truncating the file after it was cached still fails as a truncated file
    ggufgen.truncate(path, -1)
    with pytest.raises(ModelError, match="truncated"):
        open_model(path)
    assert parses == [1]  # (the header scan finds it truncated before gguf-py parses it)
    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", "0")
    other = ggufgen.write_model(tmp_path / "o.gguf", n_layer=2)
    open_model(other)
    open_model(other)
    assert len(parses) == 3 and len(list((tmp_path / "cache" / "headers").iterdir())) == 2


VT = gguf.GGUFValueType


@pytest.mark.parametrize("key,value,vtype,match", [
    ("llama.embedding_length", "sixty-four", VT.STRING, r"llama\.embedding_length is str 'sixty-four', expected an integer"),
    ("llama.block_count", 2.5, VT.FLOAT32, r"llama\.block_count is float 2\.5, expected an integer"),
    ("llama.block_count", True, VT.BOOL, r"llama\.block_count is bool True, expected an integer"),
    ("llama.context_length", [256], (VT.ARRAY, VT.UINT32), r"llama\.context_length is a list of 1 \(int\), expected an int"),
    ("llama.rope.freq_base", "1e4", VT.STRING, r"llama\.rope\.freq_base is str '1e4', expected a number"),
    ("llama.attention.layer_norm_rms_epsilon", [1.0], (VT.ARRAY, VT.FLOAT32), r"rms_epsilon is a list of 1 .*a number"),
    ("llama.attention.head_count_kv", ["2", "2"], (VT.ARRAY, VT.STRING), r"head_count_kv is a list of 2 \(str\), expected "
                                                                         r"a list of integers"),
    ("llama.rope.scaling.type", 1, VT.UINT32, r"llama\.rope\.scaling\.type is int 1, expected a string"),
    ("general.architecture", 7, VT.UINT32, r"general\.architecture is int 7, expected a string"),
    ("split.count", "two", VT.STRING, r"split\.count is str 'two', expected an integer"),
    ("gemma3.attention.sliding_window_pattern", ["a"], (VT.ARRAY, VT.STRING), r"sliding_window_pattern is a list of 1 "
                                                                             r"\(str\), expected a list of booleans"),
    ("gemma3.attention.sliding_window", "4", VT.STRING, r"sliding_window is str '4', expected an integer"),
    ("qwen3moe.expert_weights_norm", "yes", VT.STRING, r"expert_weights_norm is str 'yes', expected a boolean"),
])
def test_metadata_of_the_wrong_type_is_one_line_naming_key_and_type(tmp_path, key, value, vtype, match):
    arch = key.split(".")[0] if key.split(".")[0] in ggufgen.ARCHS else "llama"
    src = ggufgen.write_model(tmp_path / "ok.gguf", arch=arch)
    bad = ggufgen.rewrite_metadata(src, tmp_path / "bad.gguf", {key: value}, vtypes={key: vtype})
    with pytest.raises(ModelError, match=match) as e:
        open_model(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)


def test_the_reader_over_a_plain_view_reads_what_gguf_py_reads(tmp_path):
    """The header is parsed through a plain ndarray view of the memmap (np.memmap's Python-level
    slicing made most of a large vocabulary's parse): every field and tensor as gguf-py's own reader."""
    from layerstream.loader.gguf_index import _open_reader, read_metadata

    path = ggufgen.write_model(tmp_path / "m.gguf")
    fast, ref = _open_reader(path), gguf.GGUFReader(path)
    assert type(fast.data) is np.ndarray and isinstance(ref.data, np.memmap)
    assert read_metadata(fast) == read_metadata(ref) and fast.data_offset == ref.data_offset
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in fast.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ref.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(fast.tensors, ref.tensors))


def test_a_header_cache_entry_with_damaged_rows_is_parsed_again(tmp_path, monkeypatch):
    """A cache entry of the right format whose tensor rows are not [name, qtype, shape, offset,
    nbytes] is taken as absent: the header is parsed again and the entry rewritten."""
    import msgpack

    from layerstream.loader import header_cache

    monkeypatch.setenv("LAYERSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    path = ggufgen.write_model(tmp_path / "m.gguf")
    want = open_model(path).hparams
    (entry,) = (tmp_path / "cache" / "headers").iterdir()
    body = msgpack.unpackb(entry.read_bytes(), strict_map_key=False)
    body["tensors"][0][2] = 7  # a shape that is not a list
    entry.write_bytes(msgpack.packb(body))
    assert header_cache.read_cached(str(entry)) is None
    assert open_model(path).hparams == want
    assert header_cache.read_cached(str(entry)) is not None
