"""run-pipeline's warnings about flags it takes where they do nothing, or ask for what the model was
not trained for (a --ctx past its context), or more than the context holds (-n past it): one line
each, before the reply, and the run goes on.
Warned, not refused: whether such a flag acts depends on the model, the device and the plan, and
the same command line streams on a smaller device."""

from __future__ import annotations

import sys

from layerstream.coordinator.args import MAX_CTX, PROG, build_parser, given, shown

# the options of the streamed layers: where every layer stays on the device they have nothing to act on
STREAMED = ("host_cache_gb", "vram_slots", "expert_cache_gb", "expert_policy", "expert_prefetch")


def say(notes: list[str]) -> None:
    """Each note as a line of its own on stderr, in the words of the command's other warnings."""
    for note in notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr, flush=True)


def warn_flags(args, engine) -> None:
    """header_notes, device_notes and plan_notes on stderr, once the engine is open (a run that cannot
    open says its error alone) and before the reply."""
    notes = header_notes(args, engine.index)
    launch = getattr(engine.backend, "launch", None)
    if launch is not None:  # (the single-process engine has no plan, and refuses the pipeline's options)
        notes += device_notes(args, launch.device.type, launch.plan.budget_bytes is not None)
        notes += plan_notes(args, launch.plan, launch.device.type)
    say(notes)


def warn_past_context(engine, ids: list[int], max_tokens: int) -> None:
    """Warn where -n asks for more tokens than the context holds after the one-shot prompt's `ids`
    and a full context is an error: the run said so only once it had generated up to the context
    (a probe's)."""
    room = engine.cfg.ctx - len(ids)
    if engine.cfg.on_context_full == "error" and MAX_CTX > max_tokens > room > 0:  # (no room: the step's error)
        say([f"-n {max_tokens}: the context ({engine.cfg.ctx} tokens) holds {room} after the prompt's {len(ids)}; "
             "the reply stops there with an error unless it ends first (raise --ctx, or pass --on-context-full slide)"])


def header_notes(args, index) -> list[str]:
    """What the model's header says of the flags: a --ctx past the context the model was trained on
    (llama.cpp warns "n_ctx_train < n_ctx": the positions past it were never trained)."""
    notes, hp = [], index.hparams
    trained = index.metadata.get(f"{hp.arch}.context_length")  # (absent: the header's default of 4096 is no model's)
    if args.ctx is not None and trained is not None and args.ctx > hp.context_length:
        notes.append(f"{shown(args, 'ctx', args.ctx)} is beyond the model's trained context ({hp.context_length} "
                     "tokens); replies past it may lose coherence")
    return notes


def device_notes(args, device_type: str, budgeted: bool) -> list[str]:
    """What the device says of the flags: --kv-on-host on the CPU, whose memory is the host's (there
    the host KV's layer is copied out for each step: kv.HostKV.layer), where no --vram-gb budget is
    planned (under one, the flag leaves the KV out of the budget's count: more layers kept)."""
    if args.kv_on_host and device_type == "cpu" and not budgeted:
        return ["--kv-on-host saves nothing on the CPU: the KV is in host memory already (the device's memory is "
                "the host's), and the flag only adds a copy of each layer's KV every step; drop it"]
    return []


def plan_notes(args, plan, device_type: str) -> list[str]:
    """What the plan says of the flags of streamed layers (given other than their defaults): none acts
    where nothing streams; --vram-slots without a budget (the CPU's default: no limit) is the plan's
    own count; and on CUDA, slots past those the streamed layers can fill hold device memory that
    could keep layers resident."""
    parser, notes = build_parser(), []
    named = [d for d in STREAMED if given(parser, args, (d,))]
    if not plan.streamed and named:
        if args.resident_layers is not None and args.resident_layers >= len(plan.resident):
            why = f"{shown(args, 'resident_layers', args.resident_layers)} keeps every layer on the device"
            other = f"a smaller {_name(args, 'resident_layers')}"
        elif args.vram_gb is not None:
            why, other = f"every layer of the model fits in {shown(args, 'vram_gb', args.vram_gb)}", "a smaller --vram-gb"
        elif device_type == "cuda":  # (the budget: the GPU's free memory, plan.fit_budget)
            why, other = "every layer of the model fits in the GPU's free memory", "a --vram-gb below the model's size"
        else:
            why, other = "on the CPU without --vram-gb every layer is kept in memory", "--vram-gb"
        many = len(named) > 1
        notes.append(f"{', '.join(shown(args, d, getattr(args, d)) for d in named)} {'have' if many else 'has'} no "
                     f"effect: {why} (nothing streams); drop {'them' if many else 'it'}, or give {other} to stream")
        return notes
    if "vram_slots" not in named:
        return notes
    slots, k = shown(args, "vram_slots", args.vram_slots), len(plan.streamed)
    if plan.budget_bytes is None:  # (plan._fit: with no limit the streamed layers get slots of its own count)
        notes.append(f"{slots} has no effect without --vram-gb: with no memory budget the plan sets the streamed "
                     f"layers' slots itself ({plan.vram_slots}); drop it, or give --vram-gb to plan under a budget")
    elif device_type == "cuda" and not plan.dense_resident and plan.vram_slots > 2 * k:
        # past the first pass (which loads the resident layers through the ring) a streamed layer holds a
        # slot while it is copied and computed, and one more where the next step's copy of it is issued
        # ahead (compute/streamed.py, _issue_ahead): two a layer at most. (Where the streamed layers'
        # experts alone cross, decode lends the slots to the expert cache: expert_stream.py's NOTE.)
        notes.append(f"{slots}: {k} layer{'s stream' if k > 1 else ' streams'}, and past the first pass at most "
                     f"{2 * k} slots hold a layer at once (each streamed layer's copy, and the next step's copied "
                     f"ahead); the other {plan.vram_slots - 2 * k} hold device memory that could keep layers resident; "
                     f"give --vram-slots {2 * k}{' or fewer' if k > 1 else ''}")
    return notes


def _name(args, dest: str) -> str:
    """An option's name as the user typed it."""
    return getattr(args, "typed", {}).get(dest, ("--" + dest.replace("_", "-"),))[0]
