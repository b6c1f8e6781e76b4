"""`--cpu-share` and `--cpu-split`, parsed once into the typed value the plan and the compute
process read."""

from __future__ import annotations

from dataclasses import dataclass, replace

from layerstream.errors import ConfigError, shown

# Here, not beside the balancer and the sizing that use them, so that checking a configuration (the
# launchers' refusals) does not import torch.
BUCKETS = (1, 2, 4, 8)  # batch sizes the share is balanced for (a step takes the next bucket up)
SPLITS = ("layers", "rows")  # how the CPU's share is cut: whole layers, or rows of each matrix

AUTO_PACK_MAX = 0.9  # the largest CPU share "auto" may pack (the plan counts its host memory)
# The default share ("default"): a mixture-of-experts model's experts at decode steps of 5 to 8
# tokens, half of those missing from the device cache, where the CPU reads them in place (no host
# memory) beside a CUDA device; none anywhere else. At batch 8 such a share ran faster than none on
# every H100 host measured, and no share has yet run faster than none at batch 1 (BENCHMARKS.md:
# AE7, AF1 to AF3; AE1, AF4).
DEFAULT_BY_BATCH = ((8, 0.5),)
# ...and only where the share gets this many threads: the hosts where it won had 16 vCPUs (12
# threads, sizing.threads_default). Half of a step's missing experts is the CPU's part of the step
# only where the CPU reads them about as fast as the link does, which takes about 8 threads
# (threads_default's measurement); with 4 (8 cores usable) batch 8 ran below the hosts' runs with
# no share (BENCHMARKS.md: AS5 against AF1, AF2).
DEFAULT_MIN_THREADS = 8


@dataclass(frozen=True)
class CpuShareConfig:
    """The CPU's share of the streamed layers: `auto` (timed and chosen per batch size), or a fixed
    `fraction` (0: none), or a fixed share per batch size (`by_batch`: (B, F) pairs, B one of the
    balancer's BUCKETS in order, F for steps of B tokens up to the next B named, none below the
    first; `fraction` then the largest F); `split` what it splits ("layers": whole 4-bit FFN
    matrices of some layers, "rows": the last rows of every 4-bit matrix); `pack_max` the largest
    share packed; `experts_only`: the default (DEFAULT_BY_BATCH), a share of experts read in place
    beside a CUDA device alone, which packs nothing and never fails a plan."""

    auto: bool = False
    fraction: float = 0.0
    split: str = "layers"
    pack_max: float = 0.0
    by_batch: tuple[tuple[int, float], ...] = ()
    experts_only: bool = False

    @property
    def off(self) -> bool:
        return not self.auto and not self.fraction

    @property
    def asked(self) -> bool:
        """Whether a share was asked for (not "0", not the default): what --device cpu refuses."""
        return not self.off and not self.experts_only

    def __str__(self) -> str:
        """The canonical --cpu-share value: "default", "auto", "0", the fraction or the shares by batch size."""
        if self.experts_only:
            return "default"
        if self.by_batch and not self.off:
            return ",".join(f"{b}:{f!r}" for b, f in self.by_batch)
        return "auto" if self.auto else repr(self.fraction) if self.fraction else "0"

    def fixed(self) -> float | dict[int, float]:
        """A fixed share: the fraction, or {bucket: share} where it is given by batch size."""
        if not self.by_batch:
            return self.fraction
        return {b: next((f for a, f in reversed(self.by_batch) if a <= b), 0.0) for b in BUCKETS}

    def for_device(self, device_type: str) -> "CpuShareConfig":
        """None where there is no other device: on a CPU-only machine the device is the CPU already
        (auto and the default; a share asked for on the CPU is an error before this)."""
        return CpuShareConfig(split=self.split) if (self.auto or self.experts_only) and device_type != "cuda" else self

    def with_pack_max(self, pack_max: float) -> "CpuShareConfig":
        """The share with the largest share packed that fits (the plan's); none where nothing fits."""
        return replace(self, pack_max=pack_max) if pack_max else CpuShareConfig(split=self.split)


def parse_cpu_share(value: str, split: str = "layers") -> CpuShareConfig:
    """'default', 'auto', '0' ('off'), a fraction in (0, 1], or fractions by batch size ('B:F,B:F',
    each B one of BUCKETS, in order: CpuShareConfig.by_batch), and a split of SPLITS; anything else
    is a ConfigError. `pack_max` starts at the share (its largest; AUTO_PACK_MAX for auto)."""
    if split not in SPLITS:
        raise ConfigError(f"--cpu-split {split!r}: use one of {', '.join(SPLITS)}")
    v = str(value).strip().lower()
    if v == "default":
        top = max(f for _, f in DEFAULT_BY_BATCH)
        return CpuShareConfig(fraction=top, split=split, pack_max=top, by_batch=DEFAULT_BY_BATCH, experts_only=True)
    if v == "auto":
        return CpuShareConfig(auto=True, split=split, pack_max=AUTO_PACK_MAX)
    if v in ("0", "off"):
        return CpuShareConfig(split=split)
    if ":" in v:
        pairs = _by_batch(value, v)
        top = max(f for _, f in pairs)
        return CpuShareConfig(fraction=top, split=split, pack_max=top, by_batch=pairs) if top else CpuShareConfig(split=split)
    f = _fraction(v)
    if f is None:
        raise ConfigError(f"--cpu-share {shown(value)}: give default, auto, 0, a fraction from 0 to 1, or fractions by batch "
                          "size such as 8:0.5 or 1:0,8:0.5")
    return CpuShareConfig(fraction=f, split=split, pack_max=f)


def cpu_share_on_cpu(share: str, where: str) -> str:
    """The error of a share asked for where the compute device is the CPU itself (`where`: how it
    came to be the CPU)."""
    return (f"--cpu-share {shown(share)}: the compute device is the CPU ({where}), so no share of the layers "
            "crosses a link beside it; drop --cpu-share")


def _fraction(v: str) -> float | None:
    """v as a fraction from 0 to 1; None where it is not one (digits other than ASCII's, which
    float() reads, included, and their underscores)."""
    if not v.isascii() or "_" in v:
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if 0 <= f <= 1 else None


def _size(v: str) -> int | None:
    """v as a whole number; None where it is not one (as _fraction)."""
    if not v.isascii() or "_" in v:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _by_batch(value: str, v: str) -> tuple[tuple[int, float], ...]:
    """'B:F,B:F' as ((B, F), ...), each B one of BUCKETS, in increasing order, each F a fraction."""
    sizes = ", ".join(map(str, BUCKETS))
    out: list[tuple[int, float]] = []
    for item in v.split(","):
        b, _, f = item.strip().partition(":")
        share, size = _fraction(f.strip()), _size(b.strip())
        if size not in BUCKETS or share is None:
            raise ConfigError(f"--cpu-share {shown(value)}: {shown(item.strip())} is not BATCH:FRACTION with a batch size "
                              f"of {sizes} and a fraction from 0 to 1 (such as 8:0.5)")
        if out and size <= out[-1][0]:
            raise ConfigError(f"--cpu-share {shown(value)}: give each batch size once, smallest first (such as 1:0,8:0.5)")
        out.append((size, share))
    return tuple(out)
