"""The decoupled image cross-attention of IP-Adapter, computed as a term added after the layer's own attention.

diffusers' IP-Adapter processor computes `to_out(text_attention + scale * image_attention)`. `to_out[0]` is linear,
so the studio adds `scale * image_attention @ W_out^T` (no bias: the base attention already added it) after the
unchanged base attention; equal up to float rounding.

Two ways to compute the image attention of one layer, same result:

* `standard`: `q = to_q(h)`, per-head SDPA over the image keys/values, then `W_out`. Costs a second `to_q` and
  `W_out` product over all `L` positions (`2 L C^2`).
* `folded`: the image tokens are few (`T` = 4 or 16) and fixed for a whole sampling run, so `W_q` and `W_out` are
  folded into them once: per head `K'_h = k_h W_q,h / sqrt(d)` (`[T, C]`) and `V'_h = v_h W_out,h^T` (`[T, C_out]`).
  The layer then costs `h @ K'^T` (`[L, heads*T]`), a softmax per head and `P @ V'` — `2 L C heads T` instead of
  `2 L C^2`, cheaper whenever `heads * T < C` (every SD1.5/SDXL layer with 4 or 16 tokens). The sum over heads
  happens inside the second product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def image_keys_values(tokens: torch.Tensor, to_k_ip: nn.Linear, to_v_ip: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens [G, T, C_cross]` -> keys and values `[G, T, inner]`."""
    return to_k_ip(tokens), to_v_ip(tokens)


def use_folded(attn: nn.Module, num_tokens: int) -> bool:
    """Whether the folded form is cheaper for this layer (`heads * T < inner`)."""
    return attn.heads * num_tokens < attn.to_q.out_features


def fold(attn: nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fold the layer's `to_q` and `to_out[0]` into the image keys/values.

    Args:
        attn: the diffusers `Attention` (its `to_q [inner, C_in]`, optional bias, `to_out[0] [C_out, inner]`).
        key, value: `[G, T, inner]` image keys/values.

    Returns:
        `k_fold [G, C_in, heads*T]` (softmax scale included), `k_bias [G, 1, heads*T]` (from `to_q`'s bias, or None)
        and `v_fold [G, heads*T, C_out]`.
    """
    heads = attn.heads
    g, t, inner = key.shape
    d = inner // heads
    w_q = attn.to_q.weight.view(heads, d, -1)  # [H, d, C_in]
    k = key.view(g, t, heads, d) * d**-0.5
    # K'[g, c, h*T + t] = sum_d k[g, t, h, d] * W_q[h, d, c]
    k_fold = torch.einsum("gthd,hdc->gcht", k, w_q).reshape(g, -1, heads * t)
    k_bias = None
    if attn.to_q.bias is not None:
        k_bias = torch.einsum("gthd,hd->ght", k, attn.to_q.bias.view(heads, d)).reshape(g, 1, heads * t)
    w_o = attn.to_out[0].weight.view(-1, heads, d)  # [C_out, H, d]
    v_fold = torch.einsum("gthd,ohd->ghto", value.view(g, t, heads, d), w_o).reshape(g, heads * t, -1)
    return k_fold, k_bias, v_fold


def folded_attention(hidden_states: torch.Tensor, k_fold: torch.Tensor, k_bias: torch.Tensor | None,
                     v_fold: torch.Tensor, heads: int) -> torch.Tensor:
    """Image attention from folded keys/values.

    Args:
        hidden_states: `[G, M, C_in]` queries' inputs, `M` = positions of every sample sharing group `g`'s tokens.
        k_fold, k_bias, v_fold: from `fold`, batch `G`.
    Returns:
        `[G, M, C_out]`, already through `W_out` (no bias).
    """
    scores = torch.baddbmm(k_bias.expand(-1, hidden_states.shape[1], -1), hidden_states, k_fold) if k_bias is not None \
        else torch.bmm(hidden_states, k_fold)
    g, m, ht = scores.shape
    probs = scores.view(g, m, heads, ht // heads).softmax(dim=-1).view(g, m, ht)
    return torch.bmm(probs, v_fold)


def standard_attention(attn: nn.Module, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Image attention the plain way: `SDPA(to_q(h), k, v) @ W_out^T`.

    Args:
        hidden_states: `[G, M, C_in]`; key, value: `[G, T, inner]` (SDPA attends over `T` for every position).
    Returns:
        `[G, M, C_out]`.
    """
    g, m, _ = hidden_states.shape
    heads = attn.heads
    q = attn.to_q(hidden_states)
    d = q.shape[-1] // heads
    q = q.view(g, m, heads, d).transpose(1, 2)
    k = key.view(g, -1, heads, d).transpose(1, 2)
    v = value.view(g, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(g, m, heads * d)
    return F.linear(out, attn.to_out[0].weight)
