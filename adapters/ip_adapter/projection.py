"""Image projection models of IP-Adapter: CLIP image features -> tokens the UNet's cross-attention reads.

Three variants, with the parameter names of the original tencent-ailab checkpoints, so that the original
single-file format is exactly `{"image_proj": projection.state_dict(), ...}` and diffusers' `load_ip_adapter`
recognises the variant from the key names:

* `base` (`ImageProjModel`): the pooled, projected CLIP embedding `[B, D]` -> Linear -> `[B, N, C]` -> LayerNorm.
  Keys `proj.weight [N*C, D]`, `proj.bias`, `norm.weight [C]`, `norm.bias`. diffusers assumes N = 4.
* `plus` (Perceiver `Resampler`): the encoder's penultimate hidden states `[B, S, D]` -> `[B, Q, C]` with Q learned
  queries (16 in IP-Adapter Plus). Keys `latents`, `proj_in`, `layers.{i}.0.*` (attention: `norm1`, `norm2`,
  `to_q`, `to_kv`, `to_out`), `layers.{i}.1.{0,1,3}` (feed-forward), `proj_out`, `norm_out`. diffusers assumes
  depth 4 and 64 channels per head.
* `full` (`MLPProjModel`, IP-Adapter Full): an MLP applied to every token of the penultimate hidden states,
  `[B, S, D]` -> `[B, S, C]`. Keys `proj.0` (Linear D->D), `proj.2` (Linear D->C), `proj.3` (LayerNorm C).

Here C is the UNet's `cross_attention_dim` and D the image encoder's width (`projection_dim` for base,
`hidden_size` for plus and full).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("base", "plus", "full")


class ImageProjModel(nn.Module):
    """`base`: one pooled image embedding -> `num_tokens` tokens.

    Args:
        image_embed_dim: D, width of the image encoder's `image_embeds` (its `projection_dim`).
        cross_attention_dim: C, the UNet's `cross_attention_dim`.
        num_tokens: N, tokens per image (4 in the released checkpoints).
    """

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, D]` -> `[B, N, C]`."""
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(image_embeds.shape[0], self.num_tokens, self.cross_attention_dim))


class PerceiverAttention(nn.Module):
    """Latent queries attend to `[image tokens; latents]` (the Perceiver / Flamingo resampler block).

    Keys: `norm1` (image tokens), `norm2` (latents), `to_q`, `to_kv` (keys and values stacked), `to_out`.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """`x [B, S, dim]` image tokens, `latents [B, Q, dim]` -> update `[B, Q, dim]` (residual not added)."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, self.heads * self.dim_head))


def _feed_forward(dim: int, mult: float) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear (no biases); keys `0`, `1`, `3` as in the original checkpoints."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """`plus`: `num_queries` learned latents read the image encoder's hidden states through `depth` blocks.

    Args:
        dim: width of the latents (768 in IP-Adapter Plus SD1.5).
        depth: number of attention + feed-forward blocks (4 in every release; diffusers assumes 4).
        dim_head, heads: attention heads (diffusers assumes `dim_head` = 64).
        num_queries: Q, output tokens (16).
        embedding_dim: D, width of the image encoder's hidden states.
        output_dim: C, the UNet's `cross_attention_dim`.
        ff_mult: feed-forward expansion.
    """

    def __init__(self, dim: int, depth: int = 4, dim_head: int = 64, heads: int = 12, num_queries: int = 16,
                 embedding_dim: int = 1024, output_dim: int = 768, ff_mult: float = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, S, D]` -> `[B, Q, C]`."""
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class MLPProjModel(nn.Module):
    """`full`: an MLP on every token, `[B, S, D]` -> `[B, S, C]` (IP-Adapter Full / Full Face)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(image_embed_dim, image_embed_dim), nn.GELU(),
                                  nn.Linear(image_embed_dim, cross_attention_dim), nn.LayerNorm(cross_attention_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states.to(self.proj[0].weight.dtype))


def build_projection(kind: str, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4,
                     resampler_dim: int | None = None, resampler_depth: int = 4, resampler_heads: int | None = None,
                     resampler_dim_head: int = 64, resampler_ff_mult: float = 4) -> nn.Module:
    """The projection model of a variant ("base", "plus" or "full").

    For `plus`, `resampler_dim` defaults to `cross_attention_dim` and `resampler_heads` to `resampler_dim // 64`
    (at least 1), the original recipe.
    """
    if kind == "base":
        return ImageProjModel(image_embed_dim, cross_attention_dim, num_tokens)
    if kind == "plus":
        dim = resampler_dim or cross_attention_dim
        heads = resampler_heads or max(1, dim // resampler_dim_head)
        return Resampler(dim=dim, depth=resampler_depth, dim_head=resampler_dim_head, heads=heads,
                         num_queries=num_tokens, embedding_dim=image_embed_dim, output_dim=cross_attention_dim,
                         ff_mult=resampler_ff_mult)
    if kind == "full":
        return MLPProjModel(image_embed_dim, cross_attention_dim)
    raise ValueError(f"unknown IP-Adapter projection {kind!r}; expected one of {', '.join(PROJECTIONS)}")


def uses_hidden_states(kind: str) -> bool:
    """True when the variant reads the encoder's penultimate hidden states `[B, S, D]` (plus, full), False when it
    reads the pooled `image_embeds [B, D]` (base)."""
    return kind != "base"
