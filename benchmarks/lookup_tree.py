"""Trees of prompt-lookup drafts beside its chain, replayed over a real model's greedy replies.

    python -m layerstream.benchmarks.lookup_tree [-m MODEL] [-n 256] [--depth 4 8] [--budget 8 16 32]

Greedy verification keeps a draft's tokens while they equal the model's own greedy tokens, so one
greedy reply (generated once, without drafts) says what any draft would have had accepted at each
point. The chain that `--lookup K --draft-policy fixed` drafts (PromptLookup.propose; the test
checks the passes against the engine's) and trees of up to BUDGET tokens are replayed over the
same reply: each decode pass gives its accepted drafts and one token of its own, and tokens a pass
counts the decode passes, as `--lookup`'s line does. A tree takes, for each suffix length from the
longest, every earlier occurrence of the suffix, most recent first, and merges what followed each
(up to DEPTH tokens) into one trie. A streamed pass costs about the same for one token as for tens
(issue 26), so tokens a pass is the gain a tree could bring; what it would cost (a tree attention
mask in the verifying pass, the trie's bookkeeping) is not measured here.
"""

from __future__ import annotations

import argparse

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.lookup import NGRAM_MAX, NGRAM_MIN, PromptLookup

from .lookup_bench import PROMPTS


def tree_draft(tokens: list[int], depth: int, budget: int, nmax: int = NGRAM_MAX, nmin: int = NGRAM_MIN) -> set[tuple]:
    """The trie of drafts after `tokens` as the set of its paths from the root (each a tuple of
    tokens; prefix-closed), at most `budget` of them: what followed every earlier occurrence of the
    sequence's suffixes, longest suffix first, then most recent."""
    L, nodes = len(tokens), set()
    for n in range(min(nmax, L - 1), nmin - 1, -1):
        suffix = tokens[L - n:]
        for i in range(L - 1, n - 1, -1):  # i: the token after an earlier occurrence ending at i - 1
            if tokens[i - n:i] != suffix:
                continue
            for d in range(1, min(depth, L - i) + 1):
                path = tuple(tokens[i:i + d])
                if path not in nodes:
                    if len(nodes) == budget:
                        return nodes
                    nodes.add(path)
    return nodes


def accepted(paths, truth: list[int]) -> int:
    """The longest path (of a chain or a trie) that the greedy tokens `truth` begin with."""
    return max((len(p) for p in paths if list(p) == truth[:len(p)]), default=0)


def passes(prompt: list[int], reply: list[int], draft) -> int:
    """Decode passes that give `reply` after its first token (the prompt's pass gives that one, with
    no draft), each keeping its draft's accepted tokens and one of its own; draft(tokens so far) -> paths."""
    j, n = 1, 0
    while j < len(reply):
        j += 1 + accepted(draft(prompt + reply[:j]), reply[j:])
        n += 1
    return n


def chain(depth: int):
    def draft(tokens: list[int]) -> list[tuple]:
        d = PromptLookup(tokens).propose(depth)
        return [tuple(d[:k]) for k in range(1, len(d) + 1)]
    return draft


def greedy_reply(engine, ids: list[int], max_tokens: int) -> list[int]:
    """The model's greedy reply to `ids` (to its end of sequence or max_tokens), as token ids."""
    core, out = engine.core, []
    core.add_request("r", ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    while core.has_unfinished():
        for o in core.step():
            out += o.token_ids
    return out


def main(argv=None) -> int:
    from layerstream.coordinator.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("-n", "--max-tokens", type=int, default=256)
    ap.add_argument("--depth", type=int, nargs="+", default=[4, 8], help="draft tokens of the chain; a tree's depth")
    ap.add_argument("--budget", type=int, nargs="+", default=[8, 16, 32], help="a tree's tokens at most")
    args = ap.parse_args(argv)
    with Engine.load(args.model, device=args.device, dtype=args.dtype, ctx=1024) as e:
        replies = {name: (ids, greedy_reply(e, ids, args.max_tokens))
                   for name, ids in ((name, e.encode(text, chat=True)) for name, text in PROMPTS.items())}
    print("prompt   reply  draft                 passes  tokens a pass  (decode passes, after the prompt's)")
    for name, (ids, reply) in replies.items():
        rows = [("none", len(reply) - 1)]
        for d in args.depth:
            rows.append((f"chain of {d}", passes(ids, reply, chain(d))))
            for b in args.budget:
                if b > d:
                    rows.append((f"tree {d} deep, {b}", passes(ids, reply, lambda t, d=d, b=b: tree_draft(t, d, b))))
        for label, n in rows:
            print(f"{name:8s} {len(reply):5d}  {label:20s} {n:6d}  {(len(reply) - 1) / max(n, 1):6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
