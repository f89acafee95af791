"""Small building blocks of the AGD adapter: scalar encoders (guidance scale w) and positional encodings.

Parameter names and `nn.Sequential` indices follow the upstream AGD checkpoints (cristianpjensen/agd), so an
upstream state dict loads into these modules key for key.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierEncoding(nn.Module):
    """Random Fourier features of a scalar: `cos(2 pi (f * x + phi))` with fixed random `f ~ N(0, 1)`, `phi ~ U[0, 1)`.

    The frequencies and phases are buffers (saved with the weights): a trained adapter is only valid with the very
    features it was trained on.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim))
        self.register_buffer("phases", torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[...]` (any float) -> `[..., dim]` float32."""
        x = x.float().unsqueeze(-1)
        return torch.cos(2 * math.pi * (self.frequencies.float() * x + self.phases.float()))


class MLP(nn.Module):
    """Linear -> ReLU -> Linear; with `normed=True`: Linear -> ReLU -> Dropout -> LayerNorm -> Linear -> Dropout.

    The two layouts are the two MLP flavours upstream uses (cross-attention adapter vs additive adapter); keeping
    their indices keeps upstream keys (`net.0`, `net.2` / `net.0`, `net.3`, `net.4`) loadable.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, normed: bool = False, dropout: float = 0.0):
        super().__init__()
        if normed:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                     nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, out_dim), nn.Dropout(dropout))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
        first, last = self.net[0], self.last
        # ReLU layers: He-style gain keeps the activations' scale through the MLP
        nn.init.xavier_uniform_(first.weight, gain=math.sqrt(2.0))
        nn.init.xavier_uniform_(last.weight, gain=math.sqrt(2.0))
        nn.init.zeros_(first.bias)
        nn.init.zeros_(last.bias)

    @property
    def last(self) -> nn.Linear:
        """The output Linear (zeroed by the additive adapter so it starts adding nothing)."""
        return [m for m in self.net if isinstance(m, nn.Linear)][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in_dim]` -> `[..., out_dim]`."""
        return self.net(x)


class ScalarEncoder(nn.Module):
    """A scalar (the guidance scale w) -> `[..., dim]`: Fourier features, MLP, LayerNorm."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, normed_mlp: bool = False, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            FourierEncoding(dim),
            MLP(dim, dim, int(dim * mlp_ratio), normed=normed_mlp, dropout=dropout),
            nn.LayerNorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[...]` -> `[..., dim]` in the dtype of the encoder's weights."""
        feats = self.net[0](x).to(self.net[2].weight.dtype)
        return self.net[2](self.net[1](feats))


def sinusoidal_table(max_len: int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`[max_len, dim]` table: sines of every position in the first half of the channels, cosines in the second."""
    if dim % 2:
        raise ValueError(f"positional encoding needs an even width, got {dim}")
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)


class PositionalEncoding(nn.Module):
    """Adds a fixed sinusoidal encoding of the token position (so w, t and the prompt tokens stay distinguishable)."""

    def __init__(self, dim: int, max_len: int = 250):
        super().__init__()
        # recomputed on construction, not stored: it is a pure function of (max_len, dim)
        self.register_buffer("pe", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., S, dim]` -> same shape; `S <= max_len`."""
        if x.shape[-2] > self.pe.shape[0]:
            raise ValueError(f"{x.shape[-2]} guidance tokens exceed the positional table's {self.pe.shape[0]} positions")
        return x + self.pe[: x.shape[-2]].to(x.dtype)
