"""The per-forward context the adapter stack hands to every adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ForwardContext:
    """What is known about one UNet forward before it runs.

    Attributes:
        batch_size: the UNet batch `N` (`2 * B` under classifier-free guidance: unconditional half first).
        cfg: True when the batch is `[unconditional; conditional]` halves.
        timestep: `[N]` timesteps of this forward.
        progress: `[N]` fraction of sampling done, in [0, 1] (step index / steps while sampling, else 1 - t/T), or
            None until `step_progress()` is first asked (the stack computes it only then: reading the timestep on
            the CPU waits for the GPU, which a compiled step without step windows need not do).
        latent_size: `(H, W)` of the latent sample.
        num_frames: frames per video sample (1 for images).
        unet: the UNet being run (adapters use its frozen time embedding, for instance).
        encoder_hidden_states: the forward's text tokens `[N, S, D]` as the UNet was given them (None where the
            caller does not know them), so an adapter can prepare what depends on the prompt once for all layers.
        cache: per-forward scratch space shared by adapters.
        compile_part: compiled mode: `compile_part(module)` is `module` compiled with the stack's options (kept
            across forwards), for the work an adapter runs outside the UNet's graph (a ControlNet); None when eager.
    """

    batch_size: int
    cfg: bool
    timestep: torch.Tensor
    progress: torch.Tensor | None
    latent_size: tuple[int, int]
    num_frames: int = 1
    unet: Any = None
    encoder_hidden_states: torch.Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    progress_fn: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    compile_part: Callable[[torch.nn.Module], Callable[..., Any]] | None = field(default=None, repr=False)

    def step_progress(self) -> torch.Tensor:
        """`progress`, computed by `progress_fn` on first use."""
        if self.progress is None and self.progress_fn is not None:
            self.progress = self.progress_fn()
        return self.progress

    def time_embedding(self) -> torch.Tensor:
        """The UNet's plain timestep embedding `[N, time_embed_dim]` (no added conditioning), computed once per
        forward for every adapter that asks."""
        emb = self.cache.get("time_embedding")
        if emb is None:
            unet = self.unet
            dtype = unet.time_embedding.linear_1.weight.dtype
            t_proj = unet.time_proj(self.timestep).to(dtype)  # Timesteps returns float32 whatever the UNet's dtype
            emb = self.cache["time_embedding"] = unet.time_embedding(t_proj)
        return emb

    def unet_dtype(self) -> torch.dtype:
        """The UNet's weight dtype, read once per forward (diffusers' `ModelMixin.dtype` walks every submodule:
        about a millisecond per read on an SD1.5 UNet, which a compiled step cannot afford)."""
        dtype = self.cache.get("unet_dtype")
        if dtype is None:
            dtype = self.cache["unet_dtype"] = next(self.unet.parameters()).dtype
        return dtype

    def spatial_size(self, seq_len: int) -> tuple[int, int]:
        """`(h, w)` of an attention layer whose token count is `seq_len` (the latent downsampled by 2**k)."""
        H, W = self.latent_size
        k = round(math.log(H * W / seq_len, 4)) if seq_len else 0
        h, w = math.ceil(H / 2**k), math.ceil(W / 2**k)
        if h * w != seq_len:  # odd sizes: diffusers' downsamplers round up, fall back to the aspect ratio
            h = max(1, round(math.sqrt(seq_len * H / W)))
            w = seq_len // h
        return h, w

    def expand(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Repeat a per-sample tensor `[N, ...]` to an attention batch `n = N * frames` (video: `(b f)` order)."""
        if t.shape[0] == n:
            return t
        if n % t.shape[0]:
            raise ValueError(f"cannot expand a batch of {t.shape[0]} to {n}")
        return t.repeat_interleave(n // t.shape[0], dim=0)


@dataclass
class UNetCall:
    """The arguments of one UNet forward, as residual adapters see them.

    Attributes:
        sample: the latent input `[N, C, H, W]` (video: `[N, C, F, H, W]`), after any latent pinning.
        timestep: `[N]` timesteps.
        encoder_hidden_states: the text tokens `[N, S, D]`.
        added_cond_kwargs: SDXL's `{"text_embeds": [N, P], "time_ids": [N, 6]}`, else None.
        num_frames: frames per video sample (1 for images).
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    added_cond_kwargs: dict[str, Any] | None = None
    num_frames: int = 1


@dataclass
class CallInfo:
    """What an adapter learns once per pipeline call, before sampling (to encode its inputs once).

    Attributes:
        pipe: the diffusers pipeline (its image encoder, VAE, ... may be used).
        batch_size: conditional samples `B` of the call (prompts x images per prompt).
        num_images_per_prompt: how often each prompt is repeated (diffusers' repeat order: p0, p0, p1, p1).
        cfg: True when the UNet batch is `[unconditional; conditional]` (`N = 2B`).
        guidance_scale: the requested guidance scale (CFG scale, or AGD's w).
        device, dtype: where the UNet runs.
        num_frames: frames per sample (video pipelines), else 1.
        height, width: the output size in pixels (None where the caller does not know it: a plain diffusers call).
        prompt, negative_prompt: the call's texts, as given (a string, a list, or None with prompt embeddings).
        num_inference_steps: the sampling steps (None where unknown).
        generator: the call's generator(s), for adapters that draw random numbers (an initial latent).
    """

    pipe: Any
    batch_size: int
    num_images_per_prompt: int
    cfg: bool
    guidance_scale: float
    device: torch.device
    dtype: torch.dtype
    num_frames: int = 1
    height: int | None = None
    width: int | None = None
    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    num_inference_steps: int | None = None
    generator: Any = None


def host_to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` (on the host) on `device` in `dtype`, without making the host wait for the device's queue (a tensor
    already on a device is moved as `.to` would).

    A plain `.to("cuda")` waits for every kernel queued before it (PyTorch synchronises blocking copies); between
    sampling steps that stalls the queue. From pinned memory the copy is asynchronous, and PyTorch's pinned-memory
    cache keeps the source alive until the copy has run.
    """
    t = t if dtype is None else t.to(dtype)
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
