"""A self-draft's acceptance on a real model: its first k layers and its head drafting for it.

    python -m layerstream.benchmarks.draft_bench [-m MODEL] [--layers 4 8 15] [--draft-tokens 4] [-n 64]

Each draft is the model's own GGUF cut to its first k blocks (the same tensors for layers < k,
block_count k, the embedding, final norm and head kept), written to a temporary directory and
removed after. Greedy replies through the chat template to summarising, editing, code and chat
prompts, without a draft and with each; every reply is checked to be the text without a draft.
By default the draft policy is off (`--policy fixed`: every pass drafts --draft-tokens where the
reply has room), so that "accepted a pass" is the draft's own acceptance, not the policy's."""

from __future__ import annotations

import argparse
import os
import tempfile

import gguf
import numpy as np

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.coordinator.turn import Turn
from layerstream.errors import ConfigError
from layerstream.loader.default_model import default_model_path

PARAGRAPH = ("The city library opens at nine in the morning and closes at eight in the evening. Members may "
             "borrow up to ten books for three weeks, and the reading room on the second floor is open to "
             "everyone. Late returns cost twenty cents a day.")
PROMPTS = {
    "summary": f"Summarise this text in two sentences.\n\n{PARAGRAPH}",
    "edit": f"Rewrite this text, changing 'nine' to 'ten' and 'eight' to 'seven'. Keep everything else.\n\n{PARAGRAPH}",
    "code": "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "chat": "What are three good reasons to learn a second language?",
}


def first_layers(path: str, k: int, out: str) -> str:
    """Write the model at `path` cut to its first k blocks to `out` (gguf-py's reader and writer)."""
    r = gguf.GGUFReader(path)
    arch = str(r.fields["general.architecture"].contents())
    key = f"{arch}.block_count"
    n = int(r.fields[key].contents())
    if not 1 <= k < n:
        raise ConfigError(f"--layers {k}: {path} has {n} blocks; a draft keeps 1..{n - 1} of them")
    w = gguf.GGUFWriter(out, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = k if name == key else f.contents()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if len(value) == n and name.startswith(f"{arch}."):  # a per-layer value: the first k
                value = value[:k]
            w.add_key_value(name, list(value), f.types[0], sub_type=f.types[1] if len(f.types) > 1 else None)
        else:
            w.add_key_value(name, value, f.types[0])
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= k:
            continue
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def replies(e: Engine, prompts: dict[str, list[int]], n: int, adaptive: bool) -> dict[str, tuple[str, object]]:
    """name -> (greedy text, Rates) for each prompt, one at a time (batch 1)."""
    e.core.speculation.adaptive = adaptive
    out = {}
    for name, ids in prompts.items():
        t = Turn(e, ids, SamplingParams(temperature=0, max_tokens=n))
        out[name] = ("".join(t.pieces()), t.rates)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="a GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--policy", choices=("fixed", "adaptive"), default="fixed")
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    kw = dict(device="cpu", dtype=args.dtype, ctx=1024)
    model = args.model or default_model_path()
    with Engine.load(model, **kw) as e:
        prompts = {name: e.encode(text, chat=True) for name, text in PROMPTS.items()}
        base = replies(e, prompts, args.max_tokens, True)
    for name, (_, r) in base.items():
        print(f"{name:8s} no draft: {r.sampled} tokens, decode {r.decode_s:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.layers:
            draft = first_layers(model, k, os.path.join(tmp, f"first{k}.gguf"))
            with Engine.load(model, draft_model=draft, draft_tokens=args.draft_tokens, **kw) as e:
                got = replies(e, prompts, args.max_tokens, args.policy == "adaptive")
            os.remove(draft)
            for name, (text, r) in got.items():
                s = r.lookup
                print(f"{name:8s} first {k:2d} layers: {s.accepted / max(s.passes, 1):.2f} drafts accepted a pass "
                      f"({s.accepted} of {s.drafted}), {s.tokens / max(s.passes, 1):.2f} tokens a pass; decode "
                      f"{r.decode_s:.2f} s, {base[name][1].decode_s / max(r.decode_s, 1e-9):.2f}x the speed without"
                      + ("" if text == base[name][0] else "  TEXT DIFFERS"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
