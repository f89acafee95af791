"""`CtrlAdapterModel`: the trainable part of Ctrl-Adapter — ControlNet residuals of a source backbone in, residuals of a
target UNet out.

One `CtrlAdapterBlock` per selected down residual (`down_blocks_adapter.{k}`, k counting the selected residuals in
order) and optionally one for the mid residual (`mid_block_adapter`): the released checkpoints' layout. Unselected
target residuals are zeros. A diffusers `ModelMixin` / `ConfigMixin`: `save_pretrained` writes `config.json` +
`diffusion_pytorch_model.safetensors`, `from_pretrained` reads them (local folder or hub id).
"""

from __future__ import annotations

import math

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from adapter_studio.errors import IncompatibleAdapterError, StudioError

from .blocks import CtrlAdapterBlock
from .residuals import LOCATION_NAMES, ResidualLayout, select_residuals


def is_video_unet(unet: nn.Module) -> bool:
    """True for AnimateDiff's `UNetMotionModel` (its residual batch is samples x frames)."""
    return "motion_max_seq_length" in dict(unet.config)


class CtrlAdapterModel(ModelMixin, ConfigMixin):
    """Maps a source ControlNet's residuals onto a target UNet's residual inputs.

    Args:
        source_channels: channels of each ControlNet down residual.
        source_mid_channels: channels of the ControlNet mid residual.
        target_channels, target_levels: channels and resolution level of each target down residual.
        target_mid_channels, target_mid_level: the same for the target mid residual.
        down_ids: the residuals that get an adapter (source residual i feeds target residual i).
        add_mid: the mid residual gets an adapter (location M).
        cross_attention_dim: width of the target's prompt tokens (the adapter's transformers attend to them).
        num_blocks: resnet + transformer layers per adapter.
        add_*: which modules each adapter has (temporal ones for video targets).
        num_attention_heads, attention_head_dim, norm_num_groups: see `CtrlAdapterBlock`.
        source_scale: the ControlNet's latent size over the target's (0.5: an SD1.5 ControlNet at 512 px under SDXL
            at 1024 px, as released); the ControlNet sees the latent area-resized by it.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, source_channels: list[int] = (), source_mid_channels: int = 0,
                 target_channels: list[int] = (), target_levels: list[int] = (), target_mid_channels: int = 0,
                 target_mid_level: int = 0, down_ids: list[int] = (), add_mid: bool = True,
                 cross_attention_dim: int = 768, num_blocks: int = 2, add_spatial_resnet: bool = True,
                 add_temporal_resnet: bool = False, add_spatial_transformer: bool = True,
                 add_temporal_transformer: bool = False, num_attention_heads: int = 8, attention_head_dim: int = 64,
                 norm_num_groups: int = 32, source_scale: float = 1.0):
        super().__init__()
        if len(target_channels) != len(target_levels):
            raise StudioError(f"CtrlAdapterModel: {len(target_channels)} target channels, {len(target_levels)} levels")
        bad = [i for i in down_ids if i >= min(len(source_channels), len(target_channels))]
        if bad:
            raise StudioError(f"CtrlAdapterModel: residuals {bad} are selected, but the ControlNet gives "
                              f"{len(source_channels)} and the target takes {len(target_channels)}")
        block = dict(cross_attention_dim=cross_attention_dim, num_layers=num_blocks,
                     add_spatial_resnet=add_spatial_resnet, add_temporal_resnet=add_temporal_resnet,
                     add_spatial_transformer=add_spatial_transformer,
                     add_temporal_transformer=add_temporal_transformer, num_attention_heads=num_attention_heads,
                     attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups)
        self.down_blocks_adapter = nn.ModuleList(
            [CtrlAdapterBlock(source_channels[i], target_channels[i], **block) for i in down_ids])
        self.mid_block_adapter = (CtrlAdapterBlock(source_mid_channels, target_mid_channels, **block)
                                  if add_mid else None)

    @classmethod
    def for_models(cls, controlnet: nn.Module, unet: nn.Module, locations: str | None = None,
                   per_location: int = 3, num_blocks: int = 2, temporal: bool | None = None,
                   **kwargs: Any) -> "CtrlAdapterModel":
        """A new adapter from `controlnet`'s backbone to `unet`.

        Args:
            locations: the paper's letters (A, B, C, ... = resolution levels, M = mid); default: every level the
                target has a residual for, and M.
            per_location: adapters per location (1, 2 or 3; see `residuals.select_residuals`).
            temporal: add temporal resnets and transformers; default: when `unet` is a video UNet.
            kwargs: any other config entry (`num_attention_heads`, `attention_head_dim`, `source_scale`, ...).
        """
        src, tgt = ResidualLayout.from_config(controlnet.config), ResidualLayout.from_config(unet.config)
        n = min(len(src), len(tgt))
        if locations is None:
            locations = "".join(LOCATION_NAMES[lv] for lv in sorted(set(src.levels[:n]))
                                if all(i < n for i, v in enumerate(src.levels) if v == lv)) + "M"
        down_ids, add_mid = select_residuals(src.levels, locations, per_location)
        if temporal is None:
            temporal = is_video_unet(unet)
        if "norm_num_groups" not in kwargs:
            # 32 groups (the release's) where every channel count allows; a backbone of other widths (the toy model's
            # 48 / 96) gets the largest count under 32 that divides them all
            widths = math.gcd(*src.channels, src.mid_channels, *tgt.channels, tgt.mid_channels)
            kwargs["norm_num_groups"] = max(g for g in range(1, 33) if widths % g == 0)
        return cls(source_channels=list(src.channels), source_mid_channels=src.mid_channels,
                   target_channels=list(tgt.channels), target_levels=list(tgt.levels),
                   target_mid_channels=tgt.mid_channels, target_mid_level=tgt.mid_level, down_ids=down_ids,
                   add_mid=add_mid, cross_attention_dim=unet.config.cross_attention_dim, num_blocks=num_blocks,
                   add_temporal_resnet=temporal, add_temporal_transformer=temporal, **kwargs)

    @property
    def source_layout(self) -> tuple[tuple[int, ...], int]:
        return tuple(self.config.source_channels), self.config.source_mid_channels

    @property
    def target_layout(self) -> ResidualLayout:
        c = self.config
        return ResidualLayout(tuple(c.target_channels), tuple(c.target_levels), c.target_mid_channels,
                              c.target_mid_level)

    def check_fits(self, controlnet_config: Any, unet_config: Any) -> None:
        """Raise `IncompatibleAdapterError` (expected vs found) unless the adapter was made for this ControlNet
        (its residual channels) and this UNet (its residual layout and prompt width)."""
        src = ResidualLayout.from_config(controlnet_config)
        channels, mid = self.source_layout
        if (src.channels, src.mid_channels) != (channels, mid):
            raise IncompatibleAdapterError(
                f"this Ctrl-Adapter reads ControlNet residuals of channels {list(channels)} (mid {mid}); the "
                f"ControlNet gives {list(src.channels)} (mid {src.mid_channels}): it was made for another source "
                "backbone")
        tgt = ResidualLayout.from_config(unet_config)
        if tgt != self.target_layout:
            raise IncompatibleAdapterError(
                f"this Ctrl-Adapter writes {self.target_layout.describe()}; this UNet takes {tgt.describe()} "
                "(channels@downsampling): it was made for another target model")
        width = dict(unet_config).get("cross_attention_dim")
        if width != self.config.cross_attention_dim:
            raise IncompatibleAdapterError(f"this Ctrl-Adapter attends to prompt tokens of width "
                                           f"{self.config.cross_attention_dim}; this UNet's are {width} wide")

    @property
    def temporal(self) -> bool:
        return bool(self.config.add_temporal_resnet or self.config.add_temporal_transformer)

    def forward(self, down: list[torch.Tensor], mid: torch.Tensor | None, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, latent_size: tuple[int, int],
                num_frames: int = 1) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Target residuals from (fused) ControlNet residuals.

        Args:
            down: the ControlNet's down residuals, `[n, C_src_i, h_i, w_i]` each (`n = batch * num_frames`).
            mid: its mid residual `[n, C_src_mid, h, w]` (None: no mid adapter output).
            timestep: `[n]` timesteps.
            encoder_hidden_states: the target's prompt tokens `[n, S, D]`.
            latent_size: `(H, W)` of the target's latent (each residual's size follows from its level).
            num_frames: frames per sample on a video target, else 1.

        Returns:
            one `[n, C_tgt_i, H_i, W_i]` per target down residual (zeros where no adapter is selected) and the mid
            residual `[n, C_tgt_mid, H_mid, W_mid]`, or None without a mid adapter.
        """
        layout = self.target_layout
        sizes = layout.down_sizes(latent_size)
        ref = down[0]
        out = [None] * len(layout)
        for block, i in zip(self.down_blocks_adapter, self.config.down_ids):
            out[i] = block(down[i], sizes[i], timestep, encoder_hidden_states, num_frames)
        for i, t in enumerate(out):
            if t is None:
                out[i] = ref.new_zeros(ref.shape[0], layout.channels[i], *sizes[i])
        mid_out = None
        if self.mid_block_adapter is not None and mid is not None:
            mid_out = self.mid_block_adapter(mid, layout.mid_size(latent_size), timestep, encoder_hidden_states,
                                             num_frames)
        return out, mid_out
