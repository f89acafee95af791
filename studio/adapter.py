"""What an adapter must provide to run in the studio's adapter stack.

Two kinds, one per way of plugging into a frozen UNet:

* `AttentionAdapter` adds a contribution to the output of some attention layers (`attn1` = self-attention,
  `attn2` = cross-attention). IP-Adapter, AGD and I2V-Adapter are attention adapters.
* `ResidualAdapter` produces the UNet's `down_block_additional_residuals` / `mid_block_additional_residual`
  (Ctrl-Adapter).

An adapter is an `nn.Module` holding only its own weights. The stack calls `prepare` once per UNet forward (to
encode inputs once rather than once per layer) and `contribution` once per attention layer it covers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .context import CallInfo, ForwardContext


class AttentionAdapter(nn.Module):
    """Base class of attention-level adapters.

    Subclasses set `family` and `target` and implement `layer_names` and `contribution`.
    """

    family: ClassVar[str] = "attention"
    #: which attention layers the adapter acts on: "attn1" (self-attention) or "attn2" (cross-attention)
    target: ClassVar[str] = "attn2"

    def layer_names(self) -> list[str]:
        """Processor names (keys of `unet.attn_processors`) this adapter adds to."""
        raise NotImplementedError

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise `IncompatibleAdapterError` (naming expected and found shapes) if the adapter does not fit `unet`."""

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        """Encode the inputs once per pipeline call (e.g. reference images -> embeddings); default: unchanged."""
        return inputs

    def prepare(self, inputs: dict[str, Any], ctx: ForwardContext) -> Any:
        """Per-forward state computed once for all layers (e.g. image tokens `[N, T, C]`); default: the inputs."""
        return inputs

    def contribution(
        self,
        layer: str,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        state: Any,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """The term added to the attention output of `layer`.

        Args:
            layer: processor name, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor`.
            attn: the diffusers `Attention` module (its frozen `to_q`, `to_k`, ... may be reused).
            hidden_states: the attention's input `[n, L, C]`; `n` is the UNet batch `N` or `N * frames` for video.
            encoder_hidden_states: the text tokens `[n, S, D]` for attn2, None for attn1.
            state: what `prepare` returned for this forward.
            ctx: the forward's context (timestep, progress, sizes).

        Returns:
            `[n, L, C_out]`, C_out the attention's output width, to be added (times the gate) to its output.
        """
        raise NotImplementedError


class ResidualAdapter(nn.Module):
    """Base class of residual-level adapters (Ctrl-Adapter): they produce UNet residual inputs."""

    family: ClassVar[str] = "residual"

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise `IncompatibleAdapterError` if the residuals would not fit `unet`."""

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        """Encode the inputs once per pipeline call (e.g. preprocess control images); default: unchanged."""
        return inputs

    def residuals(
        self, inputs: dict[str, Any], ctx: ForwardContext, sample: torch.Tensor, timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Return `(down_residuals, mid_residual)` shaped like the UNet's down-block outputs, batch `N`."""
        raise NotImplementedError
