"""The per-layer AGD modules: one sits beside every cross-attention (`attn2`) of the frozen UNet.

Both variants see the same conditioning: the guidance scale `w` (Fourier features + MLP + LayerNorm), the timestep
(the base UNet's own frozen time embedding, then a Linear) and the prompt tokens (a Linear projection). Both start
out adding exactly zero (zero-initialised output projection), so a fresh adapter leaves the UNet's conditional
prediction untouched.

* `GuidanceCrossAttention` ("attention", the paper's adapter): the attn2 input attends to the tokens
  `[w, t, prompt_1 .. prompt_S]` (plus a sinusoidal position encoding); its output is projected back to the
  attn2 output width.
* `GuidanceAdditive` ("additive"): token-independent; `w + t + mean(prompt)` embeddings summed, through an MLP, and
  the same vector added at every spatial position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import MLP, PositionalEncoding, ScalarEncoder


class GuidanceConditioning(nn.Module):
    """Embeds (w, t, prompt) into the layer's `hidden_dim` space; shared by both variants.

    Args:
        hidden_dim: width of the adapter's tokens.
        timestep_dim: width of the UNet's time embedding (None: no timestep token).
        prompt_dim: width of the prompt tokens, the UNet's `cross_attention_dim` (None: no prompt tokens).
        normed_mlp: MLP flavour of the w encoder (the additive variant uses the LayerNorm one, as upstream).
    """

    def __init__(self, hidden_dim: int, timestep_dim: int | None, prompt_dim: int | None, mlp_ratio: float = 4.0,
                 normed_mlp: bool = False, dropout: float = 0.0):
        super().__init__()
        self.guidance_scale_embedder = ScalarEncoder(hidden_dim, mlp_ratio, normed_mlp=normed_mlp, dropout=dropout)
        self.timestep_proj = nn.Linear(timestep_dim, hidden_dim) if timestep_dim else None
        self.prompt_proj = nn.Linear(prompt_dim, hidden_dim) if prompt_dim else None

    def embed_w(self, w: torch.Tensor) -> torch.Tensor:
        """`w` `[N]` -> `[N, hidden_dim]`."""
        return self.guidance_scale_embedder(w)

    def embed_t(self, t_emb: torch.Tensor) -> torch.Tensor:
        """The UNet's time embedding `[N, timestep_dim]` -> `[N, hidden_dim]`."""
        return self.timestep_proj(t_emb.to(self.timestep_proj.weight.dtype))

    def embed_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        """Prompt tokens `[n, S, prompt_dim]` -> `[n, S, hidden_dim]`."""
        return self.prompt_proj(prompt.to(self.prompt_proj.weight.dtype))


class GuidanceCrossAttention(GuidanceConditioning):
    """Cross-attention from the attn2 input onto `[w, t, prompt...]`, zero-initialised output projection.

    Args:
        input_dim: width of the attn2 input (its query dim) and of its output.
        hidden_dim: width of the adapter's queries, keys and values.
        num_heads: attention heads (`hidden_dim` must divide); the softmax scale is `1/sqrt(hidden_dim)` as upstream.
        max_len: positions of the token positional table (2 + prompt length must fit).
    """

    def __init__(self, input_dim: int, hidden_dim: int, timestep_dim: int | None, prompt_dim: int | None,
                 num_heads: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = False, dropout: float = 0.0,
                 max_len: int = 250):
        super().__init__(hidden_dim, timestep_dim, prompt_dim, mlp_ratio, normed_mlp=False)
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.scale = hidden_dim ** -0.5
        self.q_proj = nn.Linear(input_dim, hidden_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_dim, input_dim)
        self.pos_enc = PositionalEncoding(hidden_dim, max_len)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # zero output: a fresh adapter adds exactly nothing (the UNet gives its conditional prediction)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def tokens(self, w_tok: torch.Tensor, t_tok: torch.Tensor | None, prompt: torch.Tensor | None) -> torch.Tensor:
        """The key/value tokens `[n, 1 (+1) (+S), hidden_dim]` with positions encoded.

        Args:
            w_tok: `[n, hidden_dim]` embedded guidance scale.
            t_tok: `[n, hidden_dim]` embedded timestep, or None.
            prompt: `[n, S, prompt_dim]` prompt tokens, or None.
        """
        toks = [w_tok[:, None]]
        if t_tok is not None:
            toks.append(t_tok[:, None])
        if prompt is not None and self.prompt_proj is not None:
            toks.append(self.embed_prompt(prompt))
        return self.pos_enc(torch.cat([t.to(w_tok.dtype) for t in toks], dim=1))

    def forward(self, hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `[n, L, input_dim]`, `tokens` `[n, K, hidden_dim]` -> `[n, L, input_dim]`."""
        return self.attend(hidden_states, self.k_proj(tokens), self.v_proj(tokens))

    def attend(self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `[n, L, input_dim]` onto projected `keys` / `values` `[n, K, hidden_dim]` ->
        `[n, L, input_dim]` (what `forward` does after `k_proj` / `v_proj`; `adapters.agd.batched` makes the keys
        and values of every layer at once)."""
        n, L, _ = hidden_states.shape
        h = self.num_heads
        q = self.q_proj(hidden_states.to(self.q_proj.weight.dtype)).view(n, L, h, -1).transpose(1, 2)
        k = keys.view(n, keys.shape[1], h, -1).transpose(1, 2)
        v = values.view(n, values.shape[1], h, -1).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        return self.out_proj(att.transpose(1, 2).reshape(n, L, -1))


class GuidanceAdditive(GuidanceConditioning):
    """Token-independent variant: one vector per sample from `w + t + mean(prompt)`, added at every position.

    `guidance_scale_mult` multiplies w before its Fourier features (upstream uses 1000 for this variant).
    """

    def __init__(self, input_dim: int, hidden_dim: int, timestep_dim: int | None, prompt_dim: int | None,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, guidance_scale_mult: float = 1000.0):
        super().__init__(hidden_dim, timestep_dim, prompt_dim, mlp_ratio, normed_mlp=True, dropout=dropout)
        self.guidance_scale_mult = guidance_scale_mult
        self.out_proj = MLP(hidden_dim, input_dim, hidden_dim, normed=True, dropout=dropout)
        nn.init.zeros_(self.out_proj.last.weight)  # the bias is zero already: adds exactly nothing at init

    def embed_w(self, w: torch.Tensor) -> torch.Tensor:
        return self.guidance_scale_embedder(w * self.guidance_scale_mult)

    def vector(self, w_tok: torch.Tensor, t_tok: torch.Tensor | None, prompt: torch.Tensor | None) -> torch.Tensor:
        """`[n, hidden_dim]` embeddings (prompt `[n, S, prompt_dim]`) -> the added vector `[n, 1, input_dim]`."""
        c = w_tok
        if t_tok is not None:
            c = c + t_tok
        if prompt is not None and self.prompt_proj is not None:
            c = c + self.prompt_proj(prompt.to(self.prompt_proj.weight.dtype).mean(dim=1))
        return self.out_proj(c)[:, None]

    def forward(self, hidden_states: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """`[n, L, input_dim]`, `[n, 1, input_dim]` -> `[n, L, input_dim]` (a broadcast view, no copy)."""
        return vector.expand(-1, hidden_states.shape[1], -1)
