"""The first frame: an image in any of the usual forms -> pixels -> the VAE latent that frame 0 is pinned to."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adapter_studio.errors import StudioError


def first_frame_pixels(image: Any) -> torch.Tensor:
    """A PIL image, an `[H, W, 3]` array (uint8, or float in [0, 1]) or a `[3, H, W]` / `[1, 3, H, W]` tensor in
    [0, 1] -> `[1, 3, H, W]` float32 in [0, 1] on the CPU."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise StudioError(f"a first frame array must be [H, W, 3], got {list(image.shape)}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        # np.array copies: torch warns on the read-only arrays PIL images give
        image = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / scale
    if not isinstance(image, torch.Tensor):
        raise StudioError(f"the first frame must be a PIL image, an array or a tensor, got {type(image).__name__}")
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise StudioError(f"a first frame tensor must be [3, H, W] or [1, 3, H, W], got {list(image.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise StudioError(f"first frame values must lie in [0, 1] (got {float(x.min()):.3g}..{float(x.max()):.3g})")
    return x


@torch.no_grad()
def encode_first_frame(vae: Any, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixels `[1, 3, H, W]` in [0, 1] -> the latent `[1, C, height / s, width / s]` (s the VAE's downsampling),
    scaled by `vae.config.scaling_factor` as diffusers' video pipelines decode it.

    An image of another size is resized (bicubic, antialiased) with a `UserWarning` saying so. The latent is the
    mean of the VAE's posterior, so a first frame always encodes to the same latent.
    """
    h0, w0 = pixels.shape[-2:]
    if (h0, w0) != (height, width):
        warnings.warn(f"I2V-Adapter: the first image is {w0}x{h0}; resized to the video's {width}x{height}",
                      UserWarning, stacklevel=2)
        pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True).clamp(0.0, 1.0)
    x = (pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


def per_sample(latents: torch.Tensor, n: int, cfg: bool) -> torch.Tensor:
    """The first frame's latent `[1 or B, C, h, w]` for a batch of `n` samples (`n = 2B` under CFG)."""
    k = latents.shape[0]
    if k == 1:
        return latents.expand(n, -1, -1, -1)
    if k == n:
        return latents
    if cfg and 2 * k == n:  # [unconditional; conditional] halves see the same first frames
        return torch.cat([latents, latents])
    raise StudioError(f"the I2V-Adapter has {k} first frames for a batch of {n // 2 if cfg else n} samples; give one "
                      "or one per sample")
