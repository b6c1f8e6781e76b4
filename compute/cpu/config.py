"""`--cpu-share` and `--cpu-split`, parsed once into the typed value the plan and the compute
process read."""

from __future__ import annotations

from dataclasses import dataclass, replace

from layerstream.compute.cpu.sizing import SPLITS
from layerstream.errors import ConfigError

AUTO_PACK_MAX = 0.9  # the largest CPU share "auto" may pack (the plan counts its host memory)


@dataclass(frozen=True)
class CpuShareConfig:
    """The CPU's share of the streamed layers: `auto` (timed and chosen per batch size), or a fixed
    `fraction` (0: none); `split` what it splits ("layers": whole 4-bit FFN matrices of some
    layers, "rows": the last rows of every 4-bit matrix); `pack_max` the largest share packed."""

    auto: bool = False
    fraction: float = 0.0
    split: str = "layers"
    pack_max: float = 0.0

    @property
    def off(self) -> bool:
        return not self.auto and not self.fraction

    def __str__(self) -> str:
        """The canonical --cpu-share value: "auto", "0" or the fraction."""
        return "auto" if self.auto else repr(self.fraction) if self.fraction else "0"

    def for_device(self, device_type: str) -> "CpuShareConfig":
        """None where there is no other device: on a CPU-only machine the device is the CPU already."""
        return CpuShareConfig(split=self.split) if self.auto and device_type != "cuda" else self

    def with_pack_max(self, pack_max: float) -> "CpuShareConfig":
        """The share with the largest share packed that fits (the plan's); none where nothing fits."""
        return replace(self, pack_max=pack_max) if pack_max else CpuShareConfig(split=self.split)


def parse_cpu_share(value: str, split: str = "layers") -> CpuShareConfig:
    """'auto', '0' ('off') or a fraction in (0, 1], and a split of SPLITS; anything else is a
    ConfigError. `pack_max` starts at the share (AUTO_PACK_MAX for auto)."""
    if split not in SPLITS:
        raise ConfigError(f"--cpu-split {split!r}: use one of {', '.join(SPLITS)}")
    v = str(value).strip().lower()
    if v == "auto":
        return CpuShareConfig(auto=True, split=split, pack_max=AUTO_PACK_MAX)
    if v in ("0", "off"):
        return CpuShareConfig(split=split)
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not 0 <= f <= 1:
        raise ConfigError(f"--cpu-share {value!r}: give auto, 0 or a fraction from 0 to 1")
    return CpuShareConfig(fraction=f, split=split, pack_max=f)
