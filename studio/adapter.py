"""What an adapter must provide to run in the studio's adapter stack.

Every adapter is a `StudioAdapter` (an `nn.Module` holding only its own weights). Two ways of plugging into a
frozen UNet, one subclass each:

* `AttentionAdapter` adds a contribution to the output of some attention layers (`attn1` = self-attention,
  `attn2` = cross-attention). IP-Adapter, AGD and I2V-Adapter are attention adapters.
* `ResidualAdapter` produces the UNet's `down_block_additional_residuals` / `mid_block_additional_residual`
  (Ctrl-Adapter, ControlNet).

Any adapter may also shape latents (I2V-Adapter keeps frame 0 at the input image): `initial_latents` gives the
latents a `StudioPipeline` call starts from, `latents_before_unet` runs before every UNet call the stack sees
(sampling, training, a user's own loop), `latents_after_step` after every scheduler step of a `StudioPipeline` call.

The stack calls `prepare` once per UNet forward (to encode inputs once rather than once per layer) and
`contribution` once per attention layer an adapter covers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .context import CallInfo, ForwardContext, UNetCall


class StudioAdapter(nn.Module):
    """Base class of everything the stack runs.

    Class attributes:
        family: the family's registry name.
        guidance_mode: the guidance mode this adapter provides in place of classifier-free guidance (AGD: "agd"),
            or None. A `StudioPipeline` with such an adapter enabled runs one UNet pass per step.
    """

    family: ClassVar[str] = "adapter"
    guidance_mode: ClassVar[str | None] = None

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise `IncompatibleAdapterError` (naming expected and found shapes) if the adapter does not fit `unet`."""

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        """Encode the inputs once per pipeline call (reference images -> embeddings, ...); default: unchanged."""
        return inputs

    def initial_latents(self, inputs: dict[str, Any], call: CallInfo, scheduler: Any) -> torch.Tensor | None:
        """The latents sampling starts from, or None for the pipeline's own noise (the default).

        Called once per `StudioPipeline` call after `begin_call`, with the scheduler's timesteps already set for
        the call (`scheduler.timesteps[0]` is the first step). Return `[B, C, h, w]` (video: `[B, C, F, h, w]`) at
        the first step's noise level, as the sampler uses them (I2V-Adapter's Frame Similarity Prior); the pipeline
        divides by `scheduler.init_noise_sigma`, which diffusers multiplies into given latents. At most one enabled
        adapter of a call may return latents.
        """
        return None

    def latents_before_unet(self, sample: torch.Tensor, inputs: dict[str, Any], ctx: ForwardContext,
                            active: torch.Tensor) -> torch.Tensor | None:
        """The UNet's input with pinned parts replaced, or None to leave it as it is (the default).

        Args:
            sample: the UNet's latent input `[N, C, H, W]` (video: `[N, C, F, H, W]`).
            inputs: the slot's inputs for this call (what `begin_call` returned).
            ctx: this forward's context (timestep `[N]`, progress, sizes).
            active: `[N]` bools on the CPU, the samples this adapter acts on in this forward.
        """
        return None

    def latents_after_step(self, latents: torch.Tensor, inputs: dict[str, Any], step: int,
                           timestep: torch.Tensor, scheduler: Any) -> torch.Tensor | None:
        """The latents after scheduler step `step` with pinned parts replaced, or None (the default).

        Args:
            latents: `[B, C, H, W]` (video: `[B, C, F, H, W]`), the conditional samples of the call.
            inputs: the slot's inputs for this call (what `begin_call` returned).
            step: index of the step just taken; `timestep` its timestep; `scheduler` the pipeline's scheduler
                (to re-noise a pinned latent to the next step's level).
        """
        return None


class AttentionAdapter(StudioAdapter):
    """Base class of attention-level adapters.

    Subclasses set `family` and `target` and implement `layer_names` and `contribution`.
    """

    family: ClassVar[str] = "attention"
    #: which attention layers the adapter acts on: "attn1" (self-attention) or "attn2" (cross-attention)
    target: ClassVar[str] = "attn2"

    def layer_names(self) -> list[str]:
        """Processor names (keys of `unet.attn_processors`) this adapter adds to."""
        raise NotImplementedError

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


class ResidualAdapter(StudioAdapter):
    """Base class of residual-level adapters (Ctrl-Adapter): they produce UNet residual inputs."""

    family: ClassVar[str] = "residual"

    def residuals(self, inputs: dict[str, Any], ctx: ForwardContext,
                  call: UNetCall) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """`(down_residuals, mid_residual)` for this forward.

        Args:
            inputs: the slot's inputs for this call (what `begin_call` returned).
            ctx: the forward's context (timestep, progress, sizes, the UNet's time embedding on demand).
            call: the whole UNet call (sample, timestep, text tokens, `added_cond_kwargs`, frames).

        Returns:
            down residuals shaped like the UNet's down-block outputs (one per `adapter_studio.block_scale.
            residual_blocks` entry, batch `N`; video: `N * frames`), and the mid residual shaped like the mid
            block's output, or None for zeros.
        """
        raise NotImplementedError

    def zero_residuals(self, inputs: dict[str, Any], ctx: ForwardContext,
                       call: UNetCall) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
        """Zeros shaped as `residuals` would return them, computed without running anything, or None where the
        adapter cannot tell. Compiled mode hands them to the UNet while the adapter adds nothing (out of its window,
        scale 0, masked off), so the graph keeps its residual inputs: one graph instead of one with and one without."""
        return None
