"""One Ctrl-Adapter block: maps one ControlNet residual onto one target UNet residual.

Per layer (`num_layers` of them): a spatial `ResnetBlock2D` with the block's own timestep embedding, then a spatial
transformer block whose cross-attention reads the target's prompt tokens; on video targets a `TemporalResnetBlock` and
a `TemporalBasicTransformerBlock` (acting across frames) are mixed in through learned `AlphaBlender`s. Parameter names
follow the released Ctrl-Adapter checkpoints (`spatial_resnets.{i}`, `spatial_attentions.{i}`, `resnet_time_embedding`,
`norm`, `proj_in`, `proj_out`, `temporal_resnets.{i}`, `temporal_attentions.{i}`, `resnets_time_mixer.{i}`,
`transformers_time_mixer.{i}`, `transformer_time_embedding`), so their state dicts load as they are where shapes fit.

Beyond the release (which keeps channels and doubles resolution for SDXL): the first resnet changes channels
(`in_channels` -> `out_channels`), and the input is resized to the target's size first — nearest for upsizing (for
integer factors this equals the release's in-resnet nearest upsampling: group norm and SiLU commute with it), area
for downsizing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import AlphaBlender, ResnetBlock2D, TemporalResnetBlock
from torch import nn


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`x` `[n, C, h, w]` at `size`: nearest when growing (the release's upsampling), area when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
        return F.interpolate(x, size=size, mode="nearest")
    return F.adaptive_avg_pool2d(x, size)


class CtrlAdapterBlock(nn.Module):
    """The adapter at one location.

    Args:
        in_channels: channels of the ControlNet residual it reads.
        out_channels: channels of the target residual it writes (the first resnet changes them).
        cross_attention_dim: width of the target's prompt tokens.
        num_layers: resnet + transformer layers.
        add_spatial_resnet, add_temporal_resnet, add_spatial_transformer, add_temporal_transformer: which modules.
        num_attention_heads, attention_head_dim: the transformer width is their product (512 in the release); each
            attention has `out_channels // attention_head_dim` heads of `attention_head_dim` channels.
        norm_num_groups: groups of the group norms (the temporal resnet's are fixed at 32 by diffusers).
    """

    def __init__(self, in_channels: int, out_channels: int, cross_attention_dim: int, num_layers: int = 1,
                 add_spatial_resnet: bool = True, add_temporal_resnet: bool = False,
                 add_spatial_transformer: bool = True, add_temporal_transformer: bool = False,
                 num_attention_heads: int = 8, attention_head_dim: int = 64, norm_num_groups: int = 32):
        super().__init__()
        if in_channels != out_channels and not add_spatial_resnet:
            raise ValueError(f"a Ctrl-Adapter block from {in_channels} to {out_channels} channels needs its spatial "
                             "resnet (it changes the channels)")
        self.num_layers = num_layers
        self.add_spatial_resnet, self.add_temporal_resnet = add_spatial_resnet, add_temporal_resnet
        self.add_spatial_transformer, self.add_temporal_transformer = add_spatial_transformer, add_temporal_transformer
        inner = num_attention_heads * attention_head_dim
        heads = out_channels // attention_head_dim
        temb = in_channels  # the release's width for the block's own timestep embedding

        if add_spatial_resnet or add_temporal_resnet:
            self.resnet_time_proj = Timesteps(temb, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.resnet_time_embedding = TimestepEmbedding(temb, temb)
        if add_spatial_transformer or add_temporal_transformer:
            self.norm = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-6)
            self.proj_in = nn.Linear(out_channels, inner)
            self.proj_out = nn.Linear(inner, out_channels)
        if add_temporal_transformer:
            # a learned embedding of the frame index, added before temporal attention
            self.transformer_time_proj = Timesteps(in_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.transformer_time_embedding = TimestepEmbedding(in_channels, inner)

        def each(make):
            return nn.ModuleList([make(i) for i in range(num_layers)])

        if add_spatial_resnet:
            self.spatial_resnets = each(lambda i: ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, temb_channels=temb,
                groups=norm_num_groups, eps=1e-6, use_in_shortcut=True))
        if add_temporal_resnet:
            # without a spatial resnet the channels stay as they are (checked above): the input is out_channels wide
            self.temporal_resnets = each(lambda i: TemporalResnetBlock(out_channels, out_channels, temb_channels=temb,
                                                                       eps=1e-6))
        if add_spatial_transformer:
            self.spatial_attentions = each(lambda i: BasicTransformerBlock(
                inner, heads, attention_head_dim, cross_attention_dim=cross_attention_dim))
        if add_temporal_transformer:
            self.temporal_attentions = each(lambda i: TemporalBasicTransformerBlock(
                inner, inner, heads, attention_head_dim, cross_attention_dim=cross_attention_dim))
        if add_spatial_resnet and add_temporal_resnet:
            self.resnets_time_mixer = each(lambda i: AlphaBlender(0.5, "learned_with_images"))
        if add_spatial_transformer and add_temporal_transformer:
            self.transformers_time_mixer = each(lambda i: AlphaBlender(0.5, "learned_with_images"))

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int], timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """Map one residual.

        Args:
            hidden_states: the ControlNet residual `[n, C_in, h, w]`; `n = batch * num_frames` in `(b f)` order.
            size: `(H, W)` of the target residual.
            timestep: `[n]` diffusion timesteps.
            encoder_hidden_states: the target's prompt tokens `[n, S, D]`.
            num_frames: frames per video sample (the temporal modules act across them), 1 for images.

        Returns:
            `[n, C_out, H, W]`.
        """
        # the ControlNet's residuals keep the latent's memory format (channels-last for a batch from the VAE), and
        # torch's CPU GroupNorm backward crashes on a channels-last input that needs no gradient (torch 2.13)
        hidden_states = resize(hidden_states, size).contiguous()
        n = hidden_states.shape[0]
        batch = n // num_frames
        dtype = hidden_states.dtype
        h, w = size
        # every frame of every sample is an image to the blender ("learned_with_images" then uses its learned alpha)
        image_only = torch.zeros(batch, num_frames, dtype=dtype, device=hidden_states.device)
        temb = None
        if self.add_spatial_resnet or self.add_temporal_resnet:
            temb = self.resnet_time_embedding(self.resnet_time_proj(timestep).to(dtype))  # [n, C_in]
        frame_emb = time_context = None
        if self.add_temporal_transformer:
            frames = torch.arange(num_frames, device=hidden_states.device).repeat(batch)
            frame_emb = self.transformer_time_embedding(self.transformer_time_proj(frames).to(dtype))[:, None]
            # temporal cross-attention reads the first frame's tokens, once per spatial position: [(b h w), S, D]
            first = encoder_hidden_states.reshape(batch, num_frames, *encoder_hidden_states.shape[1:])[:, 0]
            time_context = first.repeat_interleave(h * w, dim=0)

        for i in range(self.num_layers):
            if self.add_spatial_resnet:
                hidden_states = self.spatial_resnets[i](hidden_states, temb)
                spatial = hidden_states
            if self.add_temporal_resnet:
                c = hidden_states.shape[1]
                video = hidden_states.reshape(batch, num_frames, c, h, w).permute(0, 2, 1, 3, 4)  # [b, C, f, h, w]
                video = self.temporal_resnets[i](video, temb.reshape(batch, num_frames, -1))
                if self.add_spatial_resnet:
                    spatial = spatial.reshape(batch, num_frames, c, h, w).permute(0, 2, 1, 3, 4)
                    video = self.resnets_time_mixer[i](spatial, video, image_only_indicator=image_only)
                hidden_states = video.permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
            if not (self.add_spatial_transformer or self.add_temporal_transformer):
                continue
            residual = hidden_states
            c = hidden_states.shape[1]
            tokens = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(n, h * w, c)
            tokens = self.proj_in(tokens)  # [n, h*w, inner]
            if self.add_spatial_transformer:
                tokens = self.spatial_attentions[i](tokens, encoder_hidden_states=encoder_hidden_states)
                spatial_tokens = tokens
            if self.add_temporal_transformer:
                tokens = self.temporal_attentions[i](tokens + frame_emb, num_frames=num_frames,
                                                     encoder_hidden_states=time_context)
                if self.add_spatial_transformer:
                    tokens = self.transformers_time_mixer[i](spatial_tokens, tokens, image_only_indicator=image_only)
            tokens = self.proj_out(tokens)
            hidden_states = tokens.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous() + residual
        return hidden_states
