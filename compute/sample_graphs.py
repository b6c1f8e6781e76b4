"""One row's sampling as a CUDA graph: the default sampler's twenty-odd launches in one replay.

NOTE [ a row's sampling in a graph ]
A sampled (not greedy) decode token ran `draw` eagerly: the largest logit, the finite check,
top-k (or a sort), softmax, the cumulative sum of top-p, min-p, the temperature's softmax, the
draw and its gathers, the codes, the ids' placement: about twenty-five launches, each costing
the host more than the device's work, which made the CLI's default sampling cost about as much a
token as a small model's whole step. So a step of one sequence that samples with a generator, no
penalty and top-k on (the CLI's defaults) replays a graph of all of it, captured once per
(vocabulary, dtype, k, temperature, top-p, min-p): the logits go into the graph's input in one
copy, the exponential noise of the draw is made outside it by the row's own generator, in the
shape `draw` makes it, so the ids are the eager path's for the same seed (tests/compute); the
graph writes the [3, 1] ids, codes and zero accepted drafts the host reads, and one more copy puts
the id in `last_ids`. A penalty (its window changes every step), batches, and top-k off or above
MAX_K (a sort of the whole vocabulary: temporaries the plan would have to hold for it) keep the
eager path.
The graphs are captured into the decode graphs' pool (the runner's GraphCapture), whose rule they
keep: the output is copied to the host before any other graph of the pool replays; so the draw's
temporaries take no memory of their own beyond the pool's (the plan counts the larger of the two,
and each kept graph's inputs: memory.Sizes.graphs, which SmolLM2's plan at --vram-gb 0.15 holds
within the margin its layers leave).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from layerstream.compute.graphs import GraphCapture  # noqa: TC001 - the constructor's type
from layerstream.compute.sampling import RowState, bad_codes, draw, noise_shape

KEEP = 2  # graphs kept (the least recently used dropped; the plan counts their inputs: memory.Sizes.graphs)
MAX_K = 1024  # the largest top-k a graph draws from (NOTE above)


class SampleGraphs:
    """Graphs of one row's draw (NOTE [ a row's sampling in a graph ]), on one CUDA device."""

    def __init__(self, capture: GraphCapture, last_ids: torch.Tensor):
        self.capture = capture  # the runner's: its pool and stream (each graph's output is read before the next replays)
        self.last_ids = last_ids
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # key -> graph, x, noise, out

    @staticmethod
    def takes(state: RowState | None, logits: torch.Tensor) -> bool:
        """Whether a step's one row of `logits` samples through a graph: drawn with a generator, no penalty."""
        return (state is not None and state.gen is not None and not state.params.penalized
                and 0 < state.params.top_k <= MAX_K and logits.dim() == 2 and logits.shape[0] == 1 and logits.is_cuda)

    def launch(self, logits: torch.Tensor, row: int, state: RowState) -> torch.Tensor:
        """Sample the row: [3, 1] long on the device (id, bad code, 0), its id also in last_ids[row]."""
        P = state.params
        V = logits.shape[1]
        key = (V, logits.dtype, P.top_k, P.temperature, P.top_p, P.min_p)
        g = self.graphs.get(key)
        if g is None:  # (the capture's runs read placeholder inputs: the step's come below)
            x = torch.zeros_like(logits)
            noise = torch.ones(noise_shape(1, V, P), dtype=torch.float32, device=logits.device)

            def body() -> torch.Tensor:
                ids, best = draw(x.float(), P, None, noise=noise)
                return torch.stack([ids, bad_codes(best).long(), torch.zeros_like(ids)])

            graph, out = self.capture.capture(body, "sampling")
            g = self.graphs[key] = (graph, x, noise, out)
            while len(self.graphs) > KEEP:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, x, noise, out = g
        x.copy_(logits)
        noise.exponential_(1, generator=state.gen)
        graph.replay()
        self.last_ids[row : row + 1].copy_(out[0])
        return out
