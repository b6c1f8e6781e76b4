"""Synthetic GGUF files of real models' shapes with random weights, for benchmarks (never for correctness).

`write_shaped_model` writes a GGUF whose tensors have the shapes, quant types and byte sizes of a
real model (synth_shapes.SHAPES: Llama 3.1 8B / 70B, SmolLM2 135M, Qwen3-30B-A3B) and whose bytes
are random raw quant blocks with small finite fp16 scales (synth_blocks.py), so dequantized weights
are sane and activations stay finite. It streams: the tensor table is written first, then each
tensor is generated and written alone, so memory stays at about the largest tensor (the output
head) however large the file. The tokenizer is synth_vocab.py's; skewed routers synth_routing.py's.

    python -m layerstream.loader.synth OUT.gguf --shape llama-3.1-8b --layers 8 --quant Q4_K_M
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from layerstream.loader.synth_blocks import CALIBRATION_BLOCKS, random_float, random_quant_blocks
from layerstream.loader.synth_routing import router_scales
from layerstream.loader.synth_shapes import (
    FILE_TYPES,
    MAX_LAYERS,
    QUANT_MIXES,
    SHAPES,
    ModelShape,
    llama3_rope_factors,
    resolve_shape,
    tensor_type,
)
from layerstream.loader.synth_vocab import CHAT_TEMPLATE, add_tokenizer
from layerstream.proto.signals import HOW, Stopped, raise_on_stop, restore

__all__ = ["SHAPES", "ModelShape", "main", "resolve_shape", "shaped_index", "write_shaped_model"]


@dataclass(frozen=True)
class _Planned:
    """One tensor to write: its name, type, torch-order shape and the generator of its data."""

    name: str
    qtype: QT
    shape: tuple[int, ...]  # torch order
    make: Callable[[np.random.Generator], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * type_size


# NOTE [ routing of random weights ]
# Random Q and K score the keys nearly alike, so each query's attention output is close to the
# mean of the values before it: nearly the same vector for every later token. With the token
# embedding small beside the layers' outputs (as in a trained model, and at the gains the dense
# shapes keep), that shared part grows layer by layer and soon dominates the residual stream, and
# a random router then sends every token to much the same few experts: the "uniform" MoE shape
# routed with more skew than `--route-skew 0.5` asks for in its deeper layers (BENCHMARKS.md,
# "routing of the synthetic MoE"), which flattered the expert cache. So the mixture-of-experts
# shapes take a large token embedding and a small attention output: each token's own embedding
# stays the larger part of the stream through the layers, the router's inputs stay about as
# independent as `router_scales` assumes, and uniform routing is uniform. The dense shapes keep
# their gains: nothing in their speed depends on their activations.
MOE_EMBD_GAIN, MOE_ATTN_OUT_GAIN = 20.0, 0.2


def _plan(shape: ModelShape, mix: str, route_skew: float = 0.0) -> list[_Planned]:
    """Every tensor of the model in file order (llama.cpp's), with a generator for its data."""
    out: list[_Planned] = []
    L = shape.n_layer

    def mat(name: str, rows: int, cols: int, gain: float = 0.7) -> None:
        qt = tensor_type(mix, name, cols, L)
        std = gain / math.sqrt(cols)
        if qt in (QT.F16, QT.F32):
            make = lambda rng, r=rows, c=cols, q=qt, s=std: random_float(rng, (r, c), q, s)  # noqa: E731
        else:
            make = lambda rng, r=rows, c=cols, q=qt, s=std: random_quant_blocks(  # noqa: E731
                rng, (r, c), q, s, sample_blocks=CALIBRATION_BLOCKS)
        out.append(_Planned(name, qt, (rows, cols), make))

    def vec(name: str, n: int) -> None:
        make = lambda rng, n=n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
        out.append(_Planned(name, QT.F32, (n,), make))

    def experts(name: str, rows: int, cols: int) -> None:  # [E, rows, cols], written as E * rows rows
        mat(name, shape.n_expert * rows, cols)
        t = out.pop()
        out.append(replace(t, shape=(shape.n_expert, rows, cols)))

    def router(name: str) -> None:  # llama.cpp leaves ffn_gate_inp unquantized
        n, e = shape.n_embd, shape.n_expert

        def make(rng: np.random.Generator) -> np.ndarray:
            w = rng.standard_normal((e, n)) / math.sqrt(n)
            if route_skew:  # NOTE [ skewed routing ]
                w *= router_scales(e, shape.n_expert_used, route_skew, rng)[:, None]
            return w.astype(np.float32)

        out.append(_Planned(name, QT.F32, (e, n), make))

    hd = shape.head_dim
    q_dim, kv_dim = shape.n_head * hd, shape.n_head_kv * hd
    embd_gain, out_gain = (MOE_EMBD_GAIN, MOE_ATTN_OUT_GAIN) if shape.n_expert else (2.0, 0.7)
    mat("token_embd.weight", shape.n_vocab, shape.n_embd, gain=embd_gain)
    if shape.rope_freqs:
        factors = llama3_rope_factors(hd, shape.rope_theta)
        out.append(_Planned("rope_freqs.weight", QT.F32, (hd // 2,), lambda rng: factors))
    for i in range(L):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", shape.n_embd)
        mat(p + "attn_q.weight", q_dim, shape.n_embd)
        mat(p + "attn_k.weight", kv_dim, shape.n_embd)
        mat(p + "attn_v.weight", kv_dim, shape.n_embd)
        if shape.arch == "qwen3moe":
            vec(p + "attn_q_norm.weight", hd)
            vec(p + "attn_k_norm.weight", hd)
        mat(p + "attn_output.weight", shape.n_embd, q_dim, gain=out_gain)
        vec(p + "ffn_norm.weight", shape.n_embd)
        if shape.n_expert:
            router(p + "ffn_gate_inp.weight")
            experts(p + "ffn_gate_exps.weight", shape.n_ff_exp, shape.n_embd)
            experts(p + "ffn_up_exps.weight", shape.n_ff_exp, shape.n_embd)
            experts(p + "ffn_down_exps.weight", shape.n_embd, shape.n_ff_exp)
        else:
            mat(p + "ffn_gate.weight", shape.n_ff, shape.n_embd)
            mat(p + "ffn_up.weight", shape.n_ff, shape.n_embd)
            mat(p + "ffn_down.weight", shape.n_embd, shape.n_ff)
    vec("output_norm.weight", shape.n_embd)
    if not shape.tied:
        mat("output.weight", shape.n_vocab, shape.n_embd, gain=2.0)
    return out


def shaped_index(shape: str | ModelShape, mix: str = "Q4_K_M", n_layer: int | None = None):
    """A ModelIndex of `shape` whose tensors lie in a file that is never written: for planning
    (sizes, layouts) at full scale without 40 GB on disk."""
    from layerstream.loader.gguf_index import AttentionShape, HParams, ModelIndex, MoeParams, RopeParams, TensorInfo

    shape = resolve_shape(shape, n_layer)
    path = f"/nonexistent/{shape.name}-{mix}.gguf"
    off, layers, glob = 0, [{} for _ in range(shape.n_layer)], {}
    for t in _plan(shape, mix):
        info = TensorInfo(t.name, int(t.qtype), t.shape, path, off, t.nbytes)
        off += -(-t.nbytes // 32) * 32
        if t.name.startswith("blk."):
            _, i, short = t.name.split(".", 2)
            layers[int(i)][short] = info
        else:
            glob[t.name] = info
    hd = shape.head_dim
    hp = HParams(shape.arch, shape.n_layer, shape.n_embd, shape.n_ff, shape.n_vocab, shape.norm_eps,
                 AttentionShape(shape.n_head, shape.n_head_kv, hd),
                 RopeParams(shape.rope_theta, hd, shape.arch != "llama", has_freqs=shape.rope_freqs),
                 MoeParams(shape.n_expert, shape.n_expert_used, shape.n_ff_exp),
                 context_length=shape.context_length, tied_output=shape.tied)
    return ModelIndex(path, [path], {}, hp, layers, glob)


def write_shaped_model(path: str | os.PathLike, shape: str | ModelShape = "llama-3.1-8b", n_layer: int | None = None,
                       quant: str | None = None, seed: int = 0, progress: bool = False, route_skew: float = 0.0) -> str:
    """Write a random-weight GGUF of `shape` (a SHAPES name or a ModelShape) and return its path.

    n_layer overrides the shape's layer count; quant is a llama.cpp-like mix: Q4_K_M (None), Q8_0 or F16;
    route_skew: the share of each MoE layer's routing decisions its hot tenth of experts takes
    (NOTE [ skewed routing ]; 0: a random router, uniform).
    Tensors are generated and written one at a time (bounded memory); tensor i draws from its own
    random stream (seed, i), so a file with fewer layers holds the same first layers.
    """
    path = os.fspath(path)
    shape = resolve_shape(shape, n_layer)
    quant = quant or "Q4_K_M"
    if quant not in QUANT_MIXES:
        raise ValueError(f"quant mix {quant!r}: use one of {', '.join(QUANT_MIXES)}")
    if route_skew:
        if not shape.n_expert:
            raise ValueError(f"--route-skew: shape {shape.name} has no experts to route")
        router_scales(shape.n_expert, shape.n_expert_used, route_skew, np.random.default_rng(0))  # (refused before writing)
    tensors = _plan(shape, quant, route_skew)
    _check_space(path, shape, quant, sum(t.nbytes for t in tensors))

    w = gguf.GGUFWriter(path, shape.arch)
    w.add_name(f"synthetic {shape.name} {quant}")
    w.add_file_type(FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(shape.norm_eps)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_vocab_size(shape.n_vocab)
    if shape.head_size:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
        w.add_expert_feed_forward_length(shape.n_ff_exp)
    add_tokenizer(w, shape.n_vocab)
    w.add_chat_template(CHAT_TEMPLATE)
    for t in tensors:  # the table first (torch-order shapes; GGUFWriter reverses them) ...
        w.add_tensor_info(t.name, t.shape, np.float16 if t.qtype == QT.F16 else np.float32, t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is a nicety: write without it
            tqdm = None
        bar = tqdm and tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=os.path.basename(path))
    try:
        for i, t in enumerate(tensors):  # ... then each tensor's data, generated alone
            arr = t.make(np.random.default_rng([seed, i]))
            if arr.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: generated {arr.nbytes} bytes, the table says {t.nbytes}")
            w.write_tensor_data(arr)
            del arr
            if bar:
                bar.update(t.nbytes)
    finally:
        if bar:
            bar.close()
        w.close()
    return path


HEADER_ROOM = 64 << 20  # (the table, the tokenizer and the alignment's padding: well under this)


def _check_space(path: str, shape: ModelShape, quant: str, nbytes: int) -> None:
    """Refuse, before a byte is written, a file its folder has no room for (a large shape's full disk,
    found near its end, cost the whole write and left the disk full meanwhile)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # (no such folder: the write itself says so, in its own words)
        return
    need = nbytes + HEADER_ROOM
    if need > free:
        raise ValueError(f"{shape.name} {quant} ({shape.n_layer} layers) needs {need / 1e9:.1f} GB and {folder} has "
                         f"{free / 1e9:.1f} GB free; write it on a larger disk (for bin/bench, set TMPDIR) or give "
                         f"fewer layers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerstream.loader.synth",
                                description="Write a random-weight GGUF of a real model's shape (for benchmarks).")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b", help="model shape (default llama-3.1-8b)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    p.add_argument("--quant", choices=QUANT_MIXES, default="Q4_K_M", help="quant mix, as llama.cpp's (default Q4_K_M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route-skew", type=float, default=0.0, metavar="F",
                   help="mixture-of-experts shapes: a tenth of each layer's experts take about F of its routing "
                        "decisions (0.5: as measured on DeepSeekMoE; default 0: uniform)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("out: an empty path; give the .gguf file to write")
    # refused before writing: the whole model was written first, then the rename over a folder failed,
    # and one over a device (run as root) replaced /dev/null with the model
    if args.out.endswith(os.sep) or os.path.isdir(args.out):
        p.error(f"{args.out}: a folder; give the path of the .gguf file to write")
    if os.path.lexists(args.out) and not os.path.isfile(args.out):
        p.error(f"{args.out}: exists and is not a regular file; give another path")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: must be 0 or more")
    if args.layers is not None and not 1 <= args.layers <= MAX_LAYERS:  # (resolve_shape's words name n_layer=)
        p.error(f"--layers {args.layers}: give 1 to {MAX_LAYERS}")
    # written beside its name and renamed when whole: a run cut short (Ctrl-C, SIGTERM, a full disk)
    # leaves no partial file that later reads as a damaged download
    part = f"{args.out}.part{os.getpid()}"

    # every stop signal, not SIGTERM alone: a closed terminal or a Ctrl-\ left the part file, a model's size
    previous = raise_on_stop()
    t0 = time.perf_counter()
    try:
        write_shaped_model(part, args.shape, args.layers, args.quant, args.seed, progress=True,
                           route_skew=args.route_skew)
        os.replace(part, args.out)
    except ValueError as e:  # (a value the shape cannot take: refused before writing)
        print(f"synth: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # (its own words name the part file, or nothing: a short write on a full disk)
        print(f"synth: error: {args.out}: {e.strerror or e}; nothing written", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # (Ctrl-C, or SIGTERM, SIGHUP, SIGQUIT as Stopped)
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"synth: {HOW[signum]}; {args.out} not written", file=sys.stderr)
        return 128 + signum
    finally:
        restore(previous)
        with contextlib.suppress(OSError):  # (never made, or a read-only folder: the error above said so)
            os.unlink(part)
    dt = time.perf_counter() - t0
    size = os.path.getsize(args.out)
    shape = resolve_shape(args.shape, args.layers)
    print(f"wrote {args.out}: {shape.name} {args.quant}, {shape.n_layer} layers, {size / 1e9:.3f} GB "
          f"({size / 2**30:.2f} GiB) in {dt:.1f} s ({size / dt / 1e9:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
