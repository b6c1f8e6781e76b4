"""The residency plan's arithmetic at full scale (synthetic indexes of real shapes, no files)."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as QT

from layerstream.compute.expert_layout import slot_bytes
from layerstream.coordinator.plan import GiB
from layerstream.errors import ConfigError
from layerstream.loader.layout import layer_layouts
from layerstream.loader.synth import shaped_index
from plans import plan, shaped


def seg(nbytes: int) -> int:
    """A tensor of 10 MiB or more in the caching allocator: a segment of its own, rounded up to 2 MiB."""
    return -(-nbytes // (2 << 20)) * (2 << 20)


def ring(layouts, n: int) -> int:
    return n * seg(max(lay.nbytes for lay in layouts))



def test_parts_add_up_and_stay_within_the_budget(l70):
    p = plan(l70, 8)
    assert sum(v for _, v in p.parts) == p.device_bytes <= 8 * GiB
    names = dict(p.parts)
    # blocks, not fp16, each layer's copy in a segment of its own rounded up to 2 MiB, and its two
    # norms (32 KiB in fp16) in the small pool's 2 MiB segments
    blocks = sum(-(-l70[1][i].nbytes // (2 << 20)) * (2 << 20) for i in p.resident)
    assert names["resident layers"] == blocks + (-(-len(p.resident) * 2 * 16384 // (2 << 20))) * (2 << 20)
    assert names["layer slots"] == ring(l70[1], p.vram_slots) and p.vram_slots >= 2


def test_quantized_residency_keeps_several_times_more_layers(l8, l70):
    """The issue's budgets: dequantized residency kept 0 of 32 layers of the 8B at 4 GiB."""
    q8, d8 = plan(l8, 4, ctx=1024), plan(l8, 4, ctx=1024, quantized=False)
    assert len(q8.resident) >= 16, q8.describe()
    assert len(q8.resident) >= 3 * max(1, len(d8.resident)), (q8.describe(), d8.describe())
    q70 = plan(l70, 8, ctx=1024)
    assert len(q70.resident) >= 8, q70.describe()  # llama.cpp's -ngl 14 holds its head on the host
    assert q70.kv_device_layers == 80


def test_batch_64_fits_8_gib_with_kv_split(l70):
    """Refused before ("needs 13.47 GiB"): now the KV of the layers that fit stays on the device."""
    p = plan(l70, 8, ctx=512, max_seqs=64)
    assert p.device_bytes <= 8 * GiB
    assert 0 < p.kv_device_layers < 80, p.describe()
    assert p.kv_on_host and "in host memory" in p.describe()
    assert p.step_tokens >= 64


def test_grid_of_budgets_batches_and_contexts(l70, l8):
    for model in (l8, l70):
        prev = -1
        for gib in (1, 2, 4, 8, 16, 48):
            for B, ctx, T in [(1, 4096, None), (8, 4096, None), (64, 512, None), (1, 4096, 2048), (16, 2048, 512)]:
                try:
                    p = plan(model, gib, ctx=ctx, max_seqs=B, step_tokens=T)
                except ConfigError as e:
                    assert "too small" in str(e) and "needs at least" in str(e)
                    continue
                assert p.device_bytes <= gib * GiB, (gib, B, ctx, T, p.describe())
                assert sum(v for _, v in p.parts) == p.device_bytes
                assert p.step_tokens == (T or p.step_tokens) and B <= p.step_tokens <= max(512, T or 0)
                if (B, ctx, T) == (1, 4096, None):
                    assert len(p.resident) >= prev  # more budget never keeps fewer layers
                    prev = len(p.resident)


def test_step_tokens_shrink_before_refusing(l70):
    roomy, tight = plan(l70, 8), plan(l70, 2.1)
    assert roomy.step_tokens == 512 and tight.step_tokens < 512


def test_too_small_names_the_minimum(l70):
    with pytest.raises(ConfigError, match=r"--vram-gb 0\.5 is too small .* needs at least \d+\.\d\d GiB \(head"):
        plan(l70, 0.5)


@pytest.mark.parametrize("gib", [0.0001, 0.022])
def test_too_small_says_the_budget_as_given_and_a_minimum_that_plans(l8, gib):
    """A probe's: '--vram-gb 0.00 is too small ... needs at least 0.02 GiB' for 0.0001, and 0.022
    refused with 'needs at least 0.02': the budget as given, the minimum rounded up, so that it plans."""
    import re

    with pytest.raises(ConfigError) as e:
        plan(l8, gib, ctx=512)
    msg = str(e.value)
    assert msg.startswith(f"--vram-gb {gib:g} is too small"), msg
    step = re.search(r"with (\d+) (tokens?) a step", msg)  # ('with 1 tokens a step', a probe's)
    assert step and (step.group(2) == "token") == (step.group(1) == "1"), msg
    least = float(re.search(r"needs at least (\d+\.\d\d) GiB", msg).group(1))
    assert least > gib and plan(l8, least, ctx=512).device_bytes <= least * GiB


def test_no_budget_keeps_everything_and_counts_it(l8):
    p = plan(l8, None)
    assert len(p.resident) == 32 and not p.streamed and p.kv_device_layers == 32
    assert p.budget_bytes is None and p.device_bytes > sum(lay.nbytes for lay in l8[1])


def test_a_third_vram_slot_costs_resident_layers_and_fits(l70):
    """--vram-slots 3 (for a CPU share): one more streamed layer's slot, paid for by resident layers."""
    two, three = plan(l70, 8), plan(l70, 8, vram_slots=3)
    assert two.vram_slots == 2 and three.vram_slots == 3
    assert len(three.resident) < len(two.resident) and three.device_bytes <= 8 * GiB
    assert dict(three.parts)["layer slots"] == ring(l70[1], 3)
    with pytest.raises(ConfigError, match="--vram-slots 1: give 2 to 16"):
        plan(l70, 8, vram_slots=1)


def test_slots_that_do_not_fit_are_named(l8):
    """--vram-slots 16 where two slots fit and sixteen do not was refused as "--resident-layers
    0 does not fit --vram-gb 1.50 ...; lower --resident-layers", an option it never gave (seen checking
    a probe's --vram-slots 16 on a small model)."""
    with pytest.raises(ConfigError, match=r"^--vram-slots 16 does not fit --vram-gb 1\.50: the plan needs [\d.]+ GiB; "
                                          r"lower --vram-slots$"):
        plan(l8, 1.5, vram_slots=16)
    assert plan(l8, 1.5).streamed  # (two fit)
    with pytest.raises(ConfigError, match=r"^--resident-layers 20 does not fit --vram-gb 1\.50: .*; lower --resident-layers$"):
        plan(l8, 1.5, resident_layers=20, vram_slots=16)
    # past the model's layers, as given (a probe's: 1000 was named as the layer count)
    n = l8[0].hparams.n_layer
    with pytest.raises(ConfigError, match=rf"^--resident-layers 1000 \(all {n} layers\) does not fit --vram-gb 1\.50: "):
        plan(l8, 1.5, resident_layers=1000)
    # -ngl's layers that fit with two slots: the slots are what does not fit
    with pytest.raises(ConfigError, match=r"^--vram-slots 16 does not fit --vram-gb 1\.50: .*; lower --vram-slots$"):
        plan(l8, 1.5, resident_layers=0, vram_slots=16)


def test_bad_prefetch_and_step_tokens_are_refused(l8):
    with pytest.raises(ConfigError, match="--prefetch 1000000000: at most 32"):
        plan(l8, 4, prefetch=10**9, max_prefetch=32)
    with pytest.raises(ConfigError, match="--step-tokens 0"):
        plan(l8, 4, step_tokens=0)


def test_a_step_larger_than_its_sequences_contexts_is_sized_as_they_are(l8):
    """A probe's: --step-tokens (or --prefill-chunk, single-process) 4194304 with --ctx 64 sized a
    step of four million tokens, then asked for 1,558 GiB and said to lower --ctx or --batch."""
    from layerstream.coordinator.plan import check_local_host

    assert plan(l8, 4, ctx=64, max_seqs=2, step_tokens=4194304).step_tokens == 128
    index, _ = l8
    huge = check_local_host(index, dtype_bytes=2, ctx=64, max_seqs=2, step_tokens=4194304, host_bytes=1 << 60)
    assert huge == check_local_host(index, dtype_bytes=2, ctx=64, max_seqs=2, step_tokens=128, host_bytes=1 << 60)


def test_cpu_share_takes_memory_after_the_host_cache_never_from_it(l70, monkeypatch):
    from layerstream.compute.cpu.sizing import packed_bytes
    from layerstream.coordinator import plan as plan_mod

    index, layouts = l70
    monkeypatch.setattr(plan_mod, "_mem_available", lambda: 76 * GiB)
    p = plan(l70, 8, host_cache_bytes=None)
    cache = p.cache_layers * p.slot_bytes
    streamed = [layouts[i] for i in p.streamed]
    assert p.cache_layers == len(p.streamed)  # 76 GiB: the host cache holds every streamed layer
    f = plan_mod.fit_cpu_share(p, layouts, 0.9, explicit=False)
    assert 0 < f < 0.9  # the packed rows get half of what the cache leaves, so auto shrinks
    assert packed_bytes(streamed, f) <= (76 * GiB - cache) // 2 < packed_bytes(streamed, f + 0.05)
    with pytest.raises(ConfigError, match="--cpu-share 0.9 packs .* lower --cpu-share"):
        plan_mod.fit_cpu_share(p, layouts, 0.9, explicit=True)
    assert plan_mod.fit_cpu_share(p, layouts, 0.1, explicit=True) == 0.1
    monkeypatch.setattr(plan_mod, "_mem_available", lambda: cache)  # nothing beside the cache
    assert plan_mod.fit_cpu_share(p, layouts, 0.9, explicit=False) == 0.0


def test_the_default_share_takes_a_moes_experts_read_in_place_beside_cuda_and_packs_nothing(l70, monkeypatch):
    """--cpu-share default (compute/cpu/config.py) through the launch's fit: kept for a streamed MoE
    on CUDA whose experts the native kernel reads in place, with no host memory counted; none on
    the CPU, for a dense model, or where the kernel is not built (packing its experts would cost
    host memory the user never asked for), or with fewer than 8 threads for it. A share asked for
    still packs and counts."""
    from layerstream.compute.cpu import sizing
    from layerstream.compute.cpu.config import CpuShareConfig, parse_cpu_share
    from layerstream.coordinator import launch, plan as plan_mod
    from layerstream.coordinator.launch import fit_share

    monkeypatch.setattr(plan_mod, "_mem_available", lambda: 256 * GiB)
    index = shaped_index("qwen3-30b-a3b")
    layouts = layer_layouts(index)
    p = plan((index, layouts), 4)
    default, off = parse_cpu_share("default"), CpuShareConfig()
    monkeypatch.setattr(sizing, "native_blocks", lambda: True)
    monkeypatch.setattr(launch, "threads_default", lambda: 12)  # (a 16-core host's)
    assert fit_share(default, "cuda", p, layouts) == (default, p)  # (p.cpu_share_bytes stays 0)
    # too few threads for the CPU to read as fast as the link: none, whether --cpu-threads or the cores say so
    assert fit_share(default, "cuda", p, layouts, 4) == (off, p)
    assert fit_share(default, "cuda", p, layouts, 8) == (default, p)
    monkeypatch.setattr(launch, "threads_default", lambda: 4)  # (8 cores)
    assert fit_share(default, "cuda", p, layouts) == (off, p)
    assert fit_share(default, "cuda", p, layouts, 12) == (default, p)
    monkeypatch.setattr(launch, "threads_default", lambda: 12)
    assert fit_share(default, "cpu", p, layouts) == (off, p)
    dense = plan(l70, 8)
    assert fit_share(default, "cuda", dense, l70[1]) == (off, dense)
    monkeypatch.setattr(sizing, "native_blocks", lambda: False)  # no C compiler: experts would be packed
    assert fit_share(default, "cuda", p, layouts) == (off, p)
    asked, q = fit_share(parse_cpu_share("8:0.5"), "cuda", p, layouts)
    assert asked.pack_max == 0.5 and q.cpu_share_bytes == sizing.expert_packed_bytes([layouts[i] for i in p.streamed]) > 0


@pytest.mark.parametrize("gib", [4, 8])
def test_qwen3_moe_shape_plans_at_small_budgets(gib):
    index = shaped_index("qwen3-30b-a3b")
    layouts = layer_layouts(index)
    p = plan((index, layouts), gib)
    assert p.streamed and p.device_bytes <= gib * GiB
    assert p.step_tokens == 512  # decode copies only the chosen experts: no smaller step for more layers
    assert dict(p.parts)["layer slots"] == ring(layouts, 2)  # a layer's 128 experts stream as one slot
    # the streamed layers keep their attention, router and norms on the device: each layer's
    # tensors but its three expert tensors, a small part of the layer
    dense = [sum(t.nbytes for t in lay.tensors if not t.name.endswith("_exps.weight")) for lay in layouts]
    assert p.dense_resident and dict(p.parts)["streamed layers' attention"] == sum(dense[i] for i in p.streamed)
    assert sum(dense) < layouts[0].nbytes * 2
    # a decode step of up to 10 tokens streams experts (8 of 128 each): 80 of them at most in flight,
    # and the pool's slot of zeros (NOTE [ the expert pool ])
    per_expert = sum(t.nbytes for t in layouts[0].tensors if t.name.endswith("_exps.weight")) // 128
    assert dict(p.parts)["experts in flight"] == 81 * per_expert
    # and two sets of the next layer's predicted experts, twice a token's 8 each by default
    # (compute/experts.py, NOTE [ expert prefetch ]); they need its router on the device
    assert p.expert_prefetch == 16 and dict(p.parts)["experts copied ahead"] == 2 * 16 * per_expert
    assert "routers resident, 16 experts a layer copied ahead on a prediction" in p.describe()
    # the expert cache: one layer's slot, and what the budget leaves once no more layers fit, in
    # whole expert slots; given, it is as given
    slot = slot_bytes(layouts)
    cache = dict(p.parts)["expert cache"]
    assert cache >= p.slot_bytes and (cache - p.slot_bytes) % slot == 0
    assert gib * GiB - 2 * slot < p.device_bytes <= gib * GiB  # (another slot and its slack would not fit)
    assert len(plan((index, layouts), gib, expert_cache_bytes=p.slot_bytes).resident) == len(p.resident)
    few = plan((index, layouts), gib, resident_layers=0)  # (-ngl 0: the cache takes the resident layers' experts' room)
    assert dict(few.parts)["expert cache"] >= cache + sum(layouts[i].nbytes - dense[i] for i in p.resident) - 2 * slot
    assert gib * GiB - 2 * slot < few.device_bytes <= gib * GiB
    given = plan((index, layouts), gib, expert_cache_bytes=GiB // 4)
    assert dict(given.parts)["expert cache"] == GiB // 4 and given.expert_cache_bytes == GiB // 4
    off = plan((index, layouts), gib, expert_prefetch=0)
    assert off.expert_prefetch == 0 and dict(off.parts)["experts copied ahead"] == 0
    assert "copied ahead" not in off.describe()
    assert len(off.resident) >= len(p.resident)
    with pytest.raises(ConfigError, match="--expert-prefetch 129: use 0 .off. to 128"):
        plan((index, layouts), gib, expert_prefetch=129)
    s = plan((index, layouts), gib, moe_dense="stream")
    assert not s.dense_resident and dict(s.parts)["streamed layers' attention"] == 0
    assert s.expert_prefetch == 0 and dict(s.parts)["experts copied ahead"] == 0
    assert len(s.resident) >= len(p.resident) and s.device_bytes <= gib * GiB
    # KV comes first: a long context's KV leaves no room for them, and the plan still fits
    k = plan((index, layouts), 4, ctx=4096, max_seqs=8)
    assert not k.dense_resident and k.device_bytes <= 4 * GiB
    with pytest.raises(ConfigError, match="--moe-dense 'all'"):
        plan((index, layouts), gib, moe_dense="all")


def test_a_cuda_device_whose_driver_cannot_start_is_one_line(monkeypatch):
    """--device auto takes CUDA where NVML sees a device (device.cuda_visible); where its driver then
    cannot start, the budget's fit says so and what to do, instead of torch's traceback."""
    import torch

    from layerstream.coordinator.plan import fit_budget
    from layerstream.errors import ConfigError

    def fails(device):
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nmore")

    monkeypatch.setattr(torch.cuda, "get_device_properties", fails)
    with pytest.raises(ConfigError, match=r"^the CUDA device could not start \(The NVIDIA driver on your system is "
                                          r"too old \(found version 11040\)\.\); update its driver, or give --device cpu$"):
        fit_budget(torch.device("cuda"))


def test_a_step_within_the_fused_rows_keeps_no_dequantization_buffer(l8):
    """The buffer is counted where a step may dequantize: above the fewest rows any of this model's
    types takes on a fused kernel (the 8B's Q4_K and Q6_K: 32), not above the fewest of every type
    (Q5_K's 4). At 4 GiB that buffer is the 26th layer of a run that generates."""
    p32, p33 = (plan(l8, 4, ctx=512, step_tokens=t, evaluates=False) for t in (32, 33))
    assert not p32.dequant_scratch and "dequantization scratch" not in {k for k, v in p32.parts if v}
    assert p33.dequant_scratch and dict(p33.parts)["dequantization scratch"] > 0
    assert len(p32.resident) == 26 and len(p33.resident) == 25, (p32.describe(), p33.describe())
    default = plan(l8, 4, ctx=512, evaluates=False)
    assert len(default.resident) == 25 and default.smaller_step == (32, 26)
    assert "--step-tokens 32 would keep 26 layers resident" in default.describe()
    assert len(plan(l8, 4, ctx=512, step_tokens=16, evaluates=False).resident) == 26
    # an evaluating plan's head takes 16 rows of its steps, on the split-K kernel: its float32 partial
    # sums (memory.captured_partials) take the 26th layer
    assert len(plan(l8, 4, ctx=512, step_tokens=16).resident) == 25
    # qsmall's 32-row tile covers the matrices it was measured on, not the head: an evaluating plan's
    # 32-token step computes the head of its 32 rows, and keeps the buffer for it
    assert plan(l8, 4, ctx=512, step_tokens=32).dequant_scratch
    from layerstream.compute.qlinear import fused_max_rows

    assert [fused_max_rows(int(QT.Q4_K), N, K) for N, K in ((14336, 4096), (4096, 14336), (1024, 4096))] == [32] * 3
    assert fused_max_rows(int(QT.Q6_K), 128256, 4096) == fused_max_rows(int(QT.Q4_K), 28672, 8192) == 16  # (head, 70B FFN)
    assert fused_max_rows(int(QT.Q5_K), 4096, 4096) == 4


def test_a_mixture_of_experts_keeps_the_buffer_above_its_grouped_kernels_rows():
    """Its prompt path dequantizes the experts above GROUPED_MAX_TOKENS rows (compute/moe.py)."""
    from layerstream.compute.moe import GROUPED_MAX_TOKENS

    q = shaped("qwen3-30b-a3b")
    at = {t: plan(q, 8, ctx=512, step_tokens=t, evaluates=False) for t in (GROUPED_MAX_TOKENS, GROUPED_MAX_TOKENS + 1)}
    assert not at[GROUPED_MAX_TOKENS].dequant_scratch and at[GROUPED_MAX_TOKENS + 1].dequant_scratch


def test_a_generating_run_counts_its_sampled_rows_of_logits(l8):
    """NOTE [ rows of logits ]: HEAD_CHUNK rows where steps may evaluate, else a row a sequence (and
    one a draft token), at most the step's tokens; the scratch follows."""
    from layerstream.compute.qlinear import HEAD_CHUNK

    ev, gen = plan(l8, 4, ctx=512, step_tokens=64), plan(l8, 4, ctx=512, step_tokens=64, evaluates=False)
    assert ev.logit_rows == HEAD_CHUNK and gen.logit_rows == 1
    assert dict(gen.parts)["step scratch"] < dict(ev.parts)["step scratch"]
    assert plan(l8, 4, ctx=512, max_seqs=4, draft_tokens=3, evaluates=False).logit_rows == 16
    assert plan(l8, 4, ctx=512, max_seqs=4, draft_tokens=3, step_tokens=8, evaluates=False).logit_rows == 8


def test_a_known_prompt_and_reply_take_the_step_whose_passes_move_fewest_bytes(l8):
    """NOTE [ step tokens ]: 8B at 4 GiB, a short prompt and 256 tokens: 32-token steps keep 26 layers and
    move fewer bytes in all than one 512-token prompt pass and 25 layers (16-token steps keep as many but
    take more passes); a long document keeps large steps."""
    short = plan(l8, 4, ctx=512, evaluates=False, job=(65, 256))
    assert short.step_tokens == 32 and len(short.resident) == 26 and short.for_job and short.smaller_step is None
    assert "chosen for the prompts and -n this run expects" in short.describe()
    long = plan(l8, 4, ctx=4096, evaluates=False, job=(3000, 256))
    assert long.step_tokens >= 256 and long.smaller_step is None, long.describe()  # (no hint the job's cost refused)
    # the host KV a job moves is its own length's, not a full context's: no layer given for KV the job never fills
    default = plan(l8, 4, ctx=4096, evaluates=False)
    for job in ((81, 256), (3000, 256)):
        assert len(plan(l8, 4, ctx=4096, evaluates=False, job=job).resident) >= len(default.resident), job
    assert plan(l8, 4, ctx=512, evaluates=False, job=(65, 256), step_tokens=512).step_tokens == 512  # (asked)
    # a prompt pass runs eagerly, its layers' launches at least: 400 tokens before 100 take one 512-token
    # pass and a layer less rather than thirteen 32-token passes (by bytes alone: 32-token steps)
    assert plan(l8, 4, ctx=512, evaluates=False, job=(400, 100)).step_tokens == 512
    assert plan(l8, 4, ctx=512, evaluates=False, job=(300, 200)).step_tokens == 32
    assert plan(l8, 4, ctx=512, evaluates=False, job=(65, 256), device_type="cpu", quantized=True).step_tokens == 512
