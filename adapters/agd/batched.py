"""Every layer's AGD keys and values of one UNet forward in a few batched products.

Each `GuidanceCrossAttention` block turns `[w, t, prompt_1 .. prompt_S]` into keys and values of its own: a w encoder
(Fourier features, MLP, LayerNorm), two Linears (timestep, prompt), positions, then `k_proj` / `v_proj`. Done block by
block that is about ten small kernels per layer and forward (16 layers on SD1.5), which is what made AGD's sampling
step launch-bound on a GPU (docs/agd.md). All blocks share `hidden_dim`, so their weights stack along a leading layer
axis `L` and the same work is a handful of batched products for every layer at once:

* the w tokens and the prompt tokens are fixed for a whole sampling call: their keys/values (`[L, N, K, 2H]`, keys
  and values side by side) are computed once per call and kept by `AGDAdapter` while no weight needs gradients;
* only the timestep token changes between steps. `k_proj(timestep_proj(t_emb) + pe_1)` is affine in `t_emb`, so the
  two Linears and the position fold into one `[L * 2H, T]` weight per call, and each forward costs one product for
  every layer: in eager mode in the stack's pre-hook, copied into the kept keys/values in place (`set_timestep`); in
  compiled mode inside the graph, where each layer puts its row in front of the kept keys/values (no eager kernel and
  no Python per step for AGD outside the graph).

A training step (weights change every forward) takes `all_keys_values`: the same stacked products in the blocks' own
order, differentiable, nothing kept. Keys of the parts concatenated equal keys of the concatenated tokens (`k_proj`
acts per token): both give the per-block computation up to float rounding (tests/test_agd_adapter.py checks it).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .layers import GuidanceCrossAttention


class StackedBlocks:
    """The weights of `L` `GuidanceCrossAttention` blocks stacked along a leading layer axis.

    Stacking copies the weights (it is differentiable, so a training step may build it every forward); inference
    builds it once per sampling call. Shapes: `H` = hidden_dim, `M` = the w encoder's MLP width, `T` = timestep_dim,
    `C` = prompt_dim.
    """

    def __init__(self, blocks: Sequence[GuidanceCrossAttention]):
        def stack(name: str) -> torch.Tensor | None:
            """Tensor `name` (e.g. "k_proj.weight") of every block, stacked: `[L, ...]`; None where blocks lack it."""
            module, _, attr = name.rpartition(".")
            try:
                got = [getattr(b.get_submodule(module), attr) for b in blocks]
            except AttributeError:  # timestep_proj / prompt_proj is None
                return None
            return None if got[0] is None else torch.stack(got)  # None: a Linear without bias

        first = blocks[0]
        enc = "guidance_scale_embedder.net"  # [Fourier features, MLP, LayerNorm]
        self.freqs = stack(f"{enc}.0.frequencies").float()  # [L, H]
        self.phases = stack(f"{enc}.0.phases").float()  # [L, H]
        self.w1, self.b1 = stack(f"{enc}.1.net.0.weight"), stack(f"{enc}.1.net.0.bias")  # [L, M, H], [L, M]
        self.w2, self.b2 = stack(f"{enc}.1.net.2.weight"), stack(f"{enc}.1.net.2.bias")  # [L, H, M], [L, H]
        self.ln_w, self.ln_b = stack(f"{enc}.2.weight"), stack(f"{enc}.2.bias")  # [L, H]
        self.ln_eps = first.get_submodule(f"{enc}.2").eps
        self.wt, self.bt = stack("timestep_proj.weight"), stack("timestep_proj.bias")  # [L, H, T], [L, H] or None
        self.wp, self.bp = stack("prompt_proj.weight"), stack("prompt_proj.bias")  # [L, H, C], [L, H] or None
        # keys and values side by side: one product gives both, `[L, 2H, H]` / `[L, 2H]`
        self.w_kv = torch.cat([stack("k_proj.weight"), stack("v_proj.weight")], dim=1)
        bk, bv = stack("k_proj.bias"), stack("v_proj.bias")
        self.b_kv = None if bk is None else torch.cat([bk, bv], dim=1)
        self.pe = first.pos_enc.pe  # [max_len, H], the same table in every block (a function of max_len, H)
        self.dtype = self.w_kv.dtype
        self._t_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def has_timestep(self) -> bool:
        return self.wt is not None

    @property
    def has_prompt(self) -> bool:
        return self.wp is not None

    @property
    def prompt_offset(self) -> int:
        """Position of the first prompt token: after w and, with timestep conditioning, t."""
        return 2 if self.has_timestep else 1

    def keys_values(self, tokens: torch.Tensor, first_position: int) -> torch.Tensor:
        """Tokens `[L, N, K, H]` at positions `first_position ..` -> keys and values side by side `[L, N, K, 2H]`."""
        L, n, k, h = tokens.shape
        if first_position + k > self.pe.shape[0]:
            raise ValueError(f"{first_position + k} guidance tokens exceed the positional table's {self.pe.shape[0]}")
        x = (tokens + self.pe[first_position:first_position + k].to(tokens.dtype)).reshape(L, n * k, h)
        kv = torch.bmm(x, self.w_kv.transpose(1, 2)) if self.b_kv is None else \
            torch.baddbmm(self.b_kv[:, None, :], x, self.w_kv.transpose(1, 2))
        return kv.view(L, n, k, 2 * h)

    def w_tokens(self, w: torch.Tensor) -> torch.Tensor:
        """Guidance scales `[N]` -> every layer's embedded w `[L, N, H]` (each block's `embed_w`)."""
        feats = torch.cos(2 * math.pi * (self.freqs[:, None, :] * w.float()[None, :, None] + self.phases[:, None, :]))
        x = torch.baddbmm(self.b1[:, None, :], feats.to(self.w1.dtype), self.w1.transpose(1, 2)).relu()
        x = torch.baddbmm(self.b2[:, None, :], x, self.w2.transpose(1, 2))
        x = F.layer_norm(x, x.shape[-1:], eps=self.ln_eps)
        return x * self.ln_w[:, None, :] + self.ln_b[:, None, :]

    def t_tokens(self, t_emb: torch.Tensor) -> torch.Tensor:
        """The UNet's time embedding `[N, T]` -> every layer's timestep token `[L, N, H]` (one product)."""
        return torch.einsum("nc,lhc->lnh", t_emb.to(self.dtype), self.wt) + self.bt[:, None, :]

    def prompt_tokens(self, prompt: torch.Tensor) -> torch.Tensor:
        """Prompt tokens `[N, S, C]` -> every layer's projected prompt `[L, N, S, H]` (one product)."""
        return torch.einsum("nsc,lhc->lnsh", prompt.to(self.dtype), self.wp) + self.bp[:, None, None, :]

    def all_keys_values(self, w: torch.Tensor, t_emb: torch.Tensor | None, prompt: torch.Tensor | None) -> torch.Tensor:
        """Keys and values of `[w, t, prompt...]` `[L, N, K, 2H]` in the blocks' own order of operations (a training
        step: differentiable, nothing kept)."""
        parts = [self.keys_values(self.w_tokens(w)[:, :, None], 0)]
        if t_emb is not None and self.has_timestep:
            parts.append(self.keys_values(self.t_tokens(t_emb)[:, :, None], 1))
        if prompt is not None and self.has_prompt:
            parts.append(self.keys_values(self.prompt_tokens(prompt), self.prompt_offset))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def call_keys_values(self, w: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """What stays fixed over a sampling call, `[L, N, K, 2H]`: keys/values of w and of the prompt, with the
        timestep's slot (position 1) left for `set_timestep` to fill every forward."""
        parts = [self.keys_values(self.w_tokens(w)[:, :, None], 0)]
        if self.has_timestep:
            parts.append(torch.zeros_like(parts[0]))
        if prompt is not None and self.has_prompt:
            parts.append(self.keys_values(self.prompt_tokens(prompt), self.prompt_offset))
        return torch.cat(parts, dim=2)

    def timestep_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The timestep's Linear, its position and `k_proj` / `v_proj` folded into one weight `[L*2H, T]` and bias
        `[L*2H]` (computed once, in float32, then the blocks' dtype): `t_emb -> [w, t, ...]`'s slot-1 keys/values."""
        if self._t_kv is None:
            pos = (self.bt + self.pe[1].to(self.bt.dtype)).float()  # [L, H]
            w = torch.bmm(self.w_kv.float(), self.wt.float())  # [L, 2H, T]
            b = torch.bmm(self.w_kv.float(), pos[:, :, None])[..., 0]
            if self.b_kv is not None:
                b = b + self.b_kv.float()
            self._t_kv = (w.flatten(0, 1).to(self.dtype), b.flatten().to(self.dtype))
        return self._t_kv


def timestep_keys_values(weight: tuple[torch.Tensor, torch.Tensor], t_emb: torch.Tensor, layers: int) -> torch.Tensor:
    """This forward's timestep keys/values for every layer, `[N, L, 2H]`: one product `[N, T] x [T, L*2H]`
    (`weight` from `StackedBlocks.timestep_weight`)."""
    w, b = weight
    return torch.addmm(b, t_emb.to(w.dtype), w.t()).view(t_emb.shape[0], layers, -1)


def set_timestep(kv: torch.Tensor, kv_t: torch.Tensor) -> None:
    """Write `kv_t` `[N, L, 2H]` into slot 1 of the call's keys/values `kv` `[L, N, K, 2H]` in place (eager mode)."""
    kv[:, :, 1].copy_(kv_t.transpose(0, 1))
