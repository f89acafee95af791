"""Where a UNet takes residuals and where a ControlNet gives them: channels, resolution levels, Ctrl-Adapter locations.

diffusers' UNets (`UNet2DConditionModel`, `UNetMotionModel`) and `ControlNetModel` share one layout of down
residuals: conv_in's output, then per down block one output per resnet layer and one for its downsampler (every block
but the last). Residual `i` of a ControlNet made for SD1.5 therefore has the same role as residual `i` of any UNet
whose config has the same block structure; the Ctrl-Adapter feeds source residual `i` to target residual `i`, as the
released checkpoints do (an SD1.5 ControlNet's first 9 residuals go to SDXL's 9, upsampled 2x).

The paper's adapter locations are resolution levels: A = the residuals at full latent resolution (SD1.5: conv_in and
the first block's two resnets), B = the next level (the first downsampler and the second block's resnets), C, D, and M
= the mid block. Per location 1, 2 or 3 residuals get an adapter (released checkpoints: the last one, the first and
last, or all three).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from adapter_studio.errors import StudioError

LOCATION_NAMES = "ABCDEFGH"


@dataclass(frozen=True)
class ResidualLayout:
    """The residual inputs of a UNet (or outputs of a ControlNet).

    Attributes:
        channels: channels of each down residual, in diffusers' order.
        levels: resolution level of each down residual: its size is the latent size halved (rounding up) `level` times.
        mid_channels, mid_level: the same for the mid residual.
    """

    channels: tuple[int, ...]
    levels: tuple[int, ...]
    mid_channels: int
    mid_level: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ResidualLayout":
        """The layout of a UNet / ControlNet / UNetMotionModel config (`block_out_channels`, `layers_per_block`)."""
        cfg = dict(config)
        widths = list(cfg["block_out_channels"])
        layers = cfg.get("layers_per_block", 1)
        n = len(cfg.get("down_block_types", widths))
        channels, levels = [widths[0]], [0]
        for b in range(n):
            count = layers if isinstance(layers, int) else layers[b]
            channels += [widths[b]] * count
            levels += [b] * count
            if b < n - 1:  # the downsampler's output, already at the next level
                channels.append(widths[b])
                levels.append(b + 1)
        return cls(tuple(channels), tuple(levels), widths[-1], n - 1)

    def __len__(self) -> int:
        return len(self.channels)

    def describe(self) -> str:
        """`'32@1 32@1 32@2 ... mid 64@4'`: channels @ downsampling factor, for error messages."""
        down = " ".join(f"{c}@{2 ** lv}" for c, lv in zip(self.channels, self.levels))
        return f"{len(self)} down residuals [{down}], mid {self.mid_channels}@{2 ** self.mid_level}"

    def down_sizes(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """`(h, w)` of each down residual for a latent of `latent_size`."""
        return [level_size(latent_size, lv) for lv in self.levels]

    def mid_size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        return level_size(latent_size, self.mid_level)


def level_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """`(h, w)` after `level` stride-2 downsamplers (kernel 3, padding 1: each rounds up)."""
    h, w = latent_size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def select_residuals(levels: tuple[int, ...] | list[int], locations: str = "ABCDM",
                     per_location: int = 3) -> tuple[list[int], bool]:
    """`(down residual ids, mid?)` of the paper's locations.

    Args:
        levels: `ResidualLayout.levels` of the source ControlNet.
        locations: letters A, B, C, ... (resolution levels 0, 1, 2, ...) and M (the mid block).
        per_location: adapters per location: 1 = the last residual of the level, 2 = the first and the last,
            3 (or more) = every residual of the level (SD1.5 has three per level).
    """
    unknown = set(locations) - set(LOCATION_NAMES[: max(levels) + 1]) - {"M"}
    if unknown:
        raise StudioError(f"Ctrl-Adapter locations {sorted(unknown)} do not exist here; this ControlNet has "
                          f"{LOCATION_NAMES[: max(levels) + 1]} (resolution levels) and M (mid)")
    if per_location < 1:
        raise StudioError(f"adapters per location must be at least 1, got {per_location}")
    ids: list[int] = []
    for letter in sorted(set(locations) - {"M"}):
        at_level = [i for i, lv in enumerate(levels) if lv == LOCATION_NAMES.index(letter)]
        if per_location == 1:
            pick = [at_level[-1]]
        elif per_location >= len(at_level):
            pick = at_level
        else:  # evenly spaced, first and last included (2 of 3 = first and last, as released)
            pick = [at_level[int(round(j))] for j in np.linspace(0, len(at_level) - 1, per_location)]
        ids += pick
    return sorted(ids), "M" in locations
