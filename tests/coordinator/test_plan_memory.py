"""The plan's step arithmetic, the caching allocator's rounding, host memory and the batch the budget
holds (synthetic indexes of real shapes, and the default model's own index; nothing is allocated)."""

from __future__ import annotations

import pytest

from layerstream.coordinator import memory
from layerstream.coordinator.memory import step_scratch
from layerstream.coordinator.plan import GiB, largest_batch, make_plan
from layerstream.errors import ConfigError
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import layer_layouts
from layerstream.loader.synth import shaped_index
from plans import plan

MiB = 1 << 20




@pytest.fixture(scope="module")
def smollm(smollm_path):
    index = open_model(smollm_path)
    return index, layer_layouts(index)



@pytest.mark.parametrize("sizes,want", [
    ([100], 2 * MiB),  # the small pool's 2 MiB segment
    ([512] * 4096, 2 * MiB), ([512] * 4097, 4 * MiB),  # 512-byte blocks, 4096 to a small segment
    ([MiB, MiB], 2 * MiB), ([MiB + 1], 20 * MiB),  # above 1 MiB: the 20 MiB segments
    ([8 * MiB] * 2, 20 * MiB), ([8 * MiB] * 3, 40 * MiB),  # two 8 MiB KV tensors a segment, 4 MiB left over
    ([9 * MiB, 2 * MiB, 9 * MiB], 20 * MiB), ([9 * MiB, 3 * MiB, 9 * MiB], 40 * MiB),  # one segment's 20 MiB
    ([int(9.5 * MiB)] * 2, 20 * MiB),  # the second takes the 10.5 MiB left whole (1 MiB is not split off)
    ([10 * MiB], 10 * MiB), ([10 * MiB + 1], 12 * MiB), ([132 * MiB + 512], 134 * MiB),  # own segments
])
def test_the_caching_allocators_rounding(sizes, want):
    assert memory.reserved_bytes(sizes) == want
    assert memory.reserved_bytes(sizes, cuda=False) == sum(sizes)


def test_8b_at_4_gib_keeps_as_many_layers_as_llama_cpp(l8):
    """Issue 24's targets (batch 1, 512-token steps): at least 25 of 32 layers at --ctx 512 and 22 at
    --ctx 4096 (llama.cpp's -ngl 26 fits the same memory). Before, 23 and 14: the math kernel's
    float32 temporaries (600 MiB for a 512-token chunk at 4096), 112 MiB of dequantization
    scratch, KV tensors rounded into shared segments."""
    short, long = plan(l8, 4, ctx=512), plan(l8, 4, ctx=4096)
    assert len(short.resident) >= 25, (short.describe(), short.breakdown())
    assert len(long.resident) >= 22, (long.describe(), long.breakdown())
    for p in (short, long):
        assert p.step_tokens == 512 and p.device_bytes <= 4 * GiB and sum(v for _, v in p.parts) == p.device_bytes
        parts = dict(p.parts)
        # one 4096-row chunk of a 4096-wide matrix in fp16; attention's temporaries are tens of MiB
        assert parts["dequantization scratch"] == 32 * MiB
        assert parts["step scratch"] < 160 * MiB, p.breakdown()
    assert short.kv_device_layers == 32
    # at 4096 the KV of some streamed layers goes to host memory: at a full context it moves as many
    # bytes a pass as the layer it makes room for, and fewer below it
    assert len(long.resident) <= long.kv_device_layers < 32 and "in host memory" in long.describe()
    # a decode-only plan: one token a step, no dequantization buffer, no cuBLAS workspace, a few MiB
    for ctx in (512, 4096):
        one = plan(l8, 4, ctx=ctx, step_tokens=1)
        parts = dict(one.parts)
        assert one.step_tokens == 1 and one.device_bytes <= 4 * GiB
        assert parts["dequantization scratch"] == 0 and parts["cuBLAS workspace"] == 0
        assert parts["step scratch"] < 8 * MiB
        assert len(one.resident) >= len(plan(l8, 4, ctx=ctx).resident)
    # the default names a smaller step where it would move DECODE_GAIN fewer bytes a pass
    assert short.smaller_step is not None and short.smaller_step[1] > len(short.resident)
    assert f"--step-tokens {short.smaller_step[0]} would keep {short.smaller_step[1]} layers" in short.describe()
    assert plan(l8, 4, ctx=512, step_tokens=512).smaller_step is None  # asked for: no hint


def test_70b_at_8_gib_keeps_its_prompt_steps(l70):
    """512-token steps at 8 GiB; at --ctx 4096 the layers first, the streamed layers' KV partly in host
    memory (the same bytes a pass at a full context, fewer below it). Before: 10 and 7 resident."""
    short, long = plan(l70, 8, ctx=512), plan(l70, 8, ctx=4096)
    assert short.step_tokens == long.step_tokens == 512
    assert short.kv_device_layers == 80 and len(short.resident) >= 11, short.describe()
    assert len(long.resident) >= 11 and long.kv_device_layers < 80, long.describe()
    kv_first = plan(l70, 8, ctx=4096, kv_on_host=False)
    assert kv_first.kv_device_layers == 80 and len(kv_first.resident) >= 9, kv_first.describe()
    n = 80
    sz_layer = [lay.nbytes for lay in l70[1]]
    kv_layer = 2 * 4096 * 8 * 128 * 2
    moved = sum(sz_layer[len(long.resident):]) + (n - long.kv_device_layers) * kv_layer
    assert moved <= sum(sz_layer[len(kv_first.resident):])


def test_smollm2_at_0_15_gib_keeps_24_layers_as_blocks(smollm):
    """Refused before ("needs at least 0.51 GiB") though its quantized layers take about 66 MB."""
    p = plan(smollm, 0.15, ctx=512)
    assert len(p.resident) >= 24 and p.device_bytes <= 0.15 * GiB, (p.describe(), p.breakdown())


def test_step_scratch_follows_tokens_context_and_the_attention_path(l8):
    index, _ = l8
    hp = index.hparams

    def s(T, ctx, **kw):
        return step_scratch(index, T, dtype_bytes=2, ctx=ctx, max_seqs=1, quantized=True, **kw)

    # decode reads the cache in place: a few MiB whatever the context
    assert s(1, 4096) < 4 * MiB and s(1, 4096) - s(1, 512) < MiB
    # a sliding ring takes the general path, which gathers K and V and rotates K: 5 * 8 MiB at 4096,
    # and no longer expands them to every head in float32 (2 * 32 heads * 4096 slots * 128 * 4 bytes)
    kv = 4096 * hp.attn.n_head_kv * hp.attn.head_dim * 2
    assert 5 * kv <= s(1, 4096, sliding=True) < 2 * hp.attn.n_head * 4096 * hp.attn.head_dim * 4
    # prompt steps: more tokens, more context, more bytes; every position's logits, 64 rows at a time
    assert s(2, 512) < s(64, 512) < s(512, 512) < s(512, 4096)
    assert s(64, 512) >= 64 * hp.n_vocab * 4
    # a 512-token chunk at 4096: attention's folded path holds tens of MiB (the math kernel's float32
    # scores and expanded K/V took about 600 MiB), so the FFN's and the head's tensors weigh as much
    assert s(512, 4096) - s(512, 512) < 64 * MiB and s(512, 4096) < 160 * MiB


def test_70b_step_scratch_at_a_long_context(l70):
    """The 70B's 512-token chunk at 4096 (64 query heads, 8 KV heads): its attention in two groups of
    query rows under the cap; 0.68 GiB of step scratch before, under 0.2 GiB now."""
    index, _ = l70

    def s(T, ctx):
        return step_scratch(index, T, dtype_bytes=2, ctx=ctx, max_seqs=1, quantized=True)

    assert s(512, 4096) < 0.2 * GiB and s(512, 4096) - s(512, 512) < 64 * MiB


def test_host_memory_is_planned_before_anything_is_allocated(smollm):
    """Issue 23: --ctx 4194304 or --batch 4096 on the CPU allocated past 10 GB with no refusal."""
    index, layouts = smollm
    cpu = dict(vram_bytes=None, host_cache_bytes=None, dtype_bytes=2, quantized=False, device_type="cpu")
    kv_row = 2 * 30 * 3 * 64 * 2  # bytes of one token's KV over the 30 layers
    with pytest.raises(ConfigError, match=r"needs \d+\.\d\d GiB of host memory \(.*the CPU device's memory "
                                          r"(\d+\.\d\d) GiB.*\); 8\.00 GiB is available: lower --ctx or --batch"):
        make_plan(index, layouts, ctx=4194304, max_seqs=1, host_bytes=8 * GiB, **cpu)
    with pytest.raises(ConfigError, match="is available: lower --ctx or --batch"):
        make_plan(index, layouts, ctx=4096, max_seqs=4096, host_bytes=8 * GiB, **cpu)
    ok = make_plan(index, layouts, ctx=4096, max_seqs=4, host_bytes=8 * GiB, **cpu)
    assert ok.host_bytes <= 8 * GiB and dict(ok.host_parts)["the CPU device's memory"] >= 4 * 4096 * kv_row
    # on a GPU the KV of the layers that do not fit goes to pinned host memory: checked too
    with pytest.raises(ConfigError, match=r"KV in host memory (\d+\.\d\d) GiB"):
        make_plan(index, layouts, vram_bytes=2 * GiB, host_cache_bytes=0, dtype_bytes=2, quantized=True,
                  ctx=1 << 16, max_seqs=1, kv_on_host=True, host_bytes=GiB)
    # the host cache takes half of what is left by default, and an explicit one that does not fit is refused
    p = make_plan(index, layouts, vram_bytes=GiB // 10, host_cache_bytes=None, dtype_bytes=2, quantized=True,
                  ctx=512, max_seqs=1, host_bytes=GiB)
    assert p.host_bytes <= GiB
    with pytest.raises(ConfigError, match="--host-cache-gb"):
        make_plan(index, layouts, vram_bytes=GiB // 10, host_cache_bytes=60 << 20, dtype_bytes=2, quantized=True,
                  ctx=512, max_seqs=1, host_bytes=70 << 20)


def test_largest_batch_is_the_most_rows_whose_plan_fits(l8):
    kw = dict(vram_bytes=16 * GiB, host_cache_bytes=0, dtype_bytes=2, ctx=4096, quantized=True, host_bytes=512 * GiB)
    b = largest_batch(*l8, most=64, **kw)
    assert 8 <= b < 64
    p = make_plan(*l8, max_seqs=b, **kw)
    assert p.kv_rows == b and p.kv_device_layers == 32 and p.step_tokens >= b
    over = make_plan(*l8, max_seqs=b + 1, **kw)
    assert over.kv_device_layers < 32  # one row more would move KV every pass
    assert largest_batch(*l8, most=4, **kw) == 4
    small = dict(kw, vram_bytes=4 * GiB)
    assert 1 <= largest_batch(*l8, **small) <= 8
    with pytest.raises(ConfigError, match="too small"):
        largest_batch(*l8, **dict(kw, vram_bytes=GiB // 4))


def test_the_gpu_budget_grid_covers_different_plans():
    """test_gpu.py's grid (the budget guarantee measured on a device) spans streamed-only, split-KV,
    partly and fully resident plans, decode-only and prompt-sized steps."""
    index = shaped_index("llama-3.1-8b", n_layer=4)
    layouts = layer_layouts(index)
    seen = set()
    for gib, batch in [(0.87, 4), (1.1, 8), (1.25, 4), (1.45, 16), (2.5, 1), (1.1, 1)]:
        p = make_plan(index, layouts, vram_bytes=int(gib * GiB), host_cache_bytes=0, dtype_bytes=2, ctx=1280,
                      max_seqs=batch, quantized=True, host_bytes=64 * GiB)
        assert p.device_bytes <= gib * GiB
        seen.add((len(p.resident), p.kv_device_layers, p.step_tokens))
    assert {r for r, _, _ in seen} >= {0, 1, 2, 4} and any(kv < 4 for _, kv, _ in seen)
    assert any(r == kv == 0 for r, kv, _ in seen)  # every layer streamed, its KV in host memory
    assert {t for _, _, t in seen} >= {1, 512}


def test_pinned_host_memory_is_counted_as_torch_holds_it(l8):
    """On CUDA the host KV (a pinned tensor for each layer's K and V) and the embedding table the
    device reads in place (compute/embedding.py) take their sizes rounded up to a power of two."""
    index, _ = l8
    p = plan(l8, 4, ctx=4096)
    parts = dict(p.host_parts)
    emb = index.globals["token_embd.weight"].nbytes  # 128256 x 4096 Q4_K: 282 MB -> 512 MiB pinned
    assert parts["token embedding (pinned)"] == 512 * MiB > emb
    n_host = index.hparams.n_layer - p.kv_device_layers
    assert n_host > 0
    half = 4096 * 8 * 128 * 2  # one layer's K (or V): ctx x KV heads x head dim x 2 bytes, 8 MiB
    assert parts["KV in host memory"] == n_host * 2 * half
    cpu = plan(l8, None, ctx=512, device_type="cpu", quantized=False)
    assert "token embedding (pinned)" not in dict(cpu.host_parts)


def test_an_eager_fused_step_counts_its_partial_sums():
    """qsmall splits K in SMALL_SPLITS launched eagerly too: a 32-token step of the 8B holds gate's
    [4, 32, 14336] float32 partials beside the FFN's activations, and the step's largest tensor is
    theirs (the allocator's large pool); a captured decode step leaves them to the graphs' pool."""
    from layerstream.compute.kernel_shapes import SMALL_SPLITS
    from layerstream.coordinator.memory import step_peak

    hp = shaped_index("llama-3.1-8b").hparams
    kw = dict(e=2, ctx=512, max_seqs=1, cuda=True, head_chunk=1)
    peak, largest = step_peak(hp, 32, quantized=True, **kw)
    assert largest == SMALL_SPLITS * 32 * hp.n_ff * 4
    dense_peak, dense_largest = step_peak(hp, 32, quantized=False, **kw)  # (dense weights: cuBLAS, no partials)
    assert dense_largest < largest and peak > dense_peak
    assert step_peak(hp, 32, quantized=True, decode_only=True, **kw)[1] < largest


def test_a_head_not_kept_as_blocks_bounds_no_step():
    """A float16 head runs on cuBLAS and never dequantizes: the layers' fused rows bound the step
    (32 on the 8B's Q4_K_M matrices), and an evaluating step of 16 rows keeps no dequantization buffer."""
    import dataclasses

    from gguf import GGMLQuantizationType as QT

    from layerstream.coordinator.memory import Sizes

    index = shaped_index("llama-3.1-8b")
    head = index.globals["output.weight"]
    index.globals["output.weight"] = dataclasses.replace(head, qtype=int(QT.F16), nbytes=head.shape[0] * head.shape[1] * 2)
    f16 = Sizes(index, layer_layouts(index), 2, 512, 1, True, True, False)
    q6 = Sizes(shaped_index("llama-3.1-8b"), layer_layouts(shaped_index("llama-3.1-8b")), 2, 512, 1, True, True, False)
    assert (f16.fused_rows, q6.fused_rows) == (32, 16)
    assert f16.dequant_scratch(16) == 0 and f16.dequant_scratch(33) > 0 and q6.dequant_scratch(32) > 0
