"""Prompt lookup on a real model: acceptance, tokens a pass and decode time, with and without.

    python -m layerstream.benchmarks.lookup_bench [-m MODEL] [--device cpu] [--lookup 0 4 8] [-n 96]

Greedy replies to editing and summarising prompts through the chat template (the default model:
SmolLM2-135M-Instruct); each reply is checked to be the same text at every --lookup. The first
--lookup given runs first, on a fresh row; the others reuse the prompt's KV (NOTE [ prefix reuse ]),
which the decode times leave out anyway."""

from __future__ import annotations

import argparse

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine import Engine
from layerstream.coordinator.turn import Turn

PARAGRAPH = ("The city library opens at nine in the morning and closes at eight in the evening. Members may "
             "borrow up to ten books for three weeks, and the reading room on the second floor is open to "
             "everyone. Late returns cost twenty cents a day.")
PROMPTS = {
    "edit": f"Rewrite this text, changing 'nine' to 'ten' and 'eight' to 'seven'. Keep everything else.\n\n{PARAGRAPH}",
    "summary": f"Summarise this text in two sentences, reusing its words.\n\n{PARAGRAPH}",
    "code": "Rename the variable `total` to `sum_of_items` in this function and show the whole function:\n\n"
            "def add_items(items):\n    total = 0\n    for item in items:\n        total = total + item.price\n"
            "    print('total:', total)\n    return total\n",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 by default: in bfloat16 a near-tie may flip with "
                                                       "the step's shape, with or without lookup")
    ap.add_argument("--lookup", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("-n", "--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    with Engine.load(args.model, device=args.device, dtype=args.dtype, ctx=1024) as e:
        for name, text in PROMPTS.items():
            ids = e.encode(text, chat=True)
            base = None
            for n in args.lookup:
                t = Turn(e, ids, SamplingParams(temperature=0, max_tokens=args.max_tokens, lookup=n))
                out = "".join(t.pieces())
                base = out if base is None else base
                r = t.rates
                lk = r.lookup.line() if r.lookup else "lookup: off"
                print(f"{name:8s} --lookup {n}: {r.sampled} tokens, decode {r.decode_s:.2f} s "
                      f"({max(r.sampled - 1, 0) / max(r.decode_s, 1e-9):.1f} tokens/s); {lk}"
                      + ("" if out == base else "  TEXT DIFFERS"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
