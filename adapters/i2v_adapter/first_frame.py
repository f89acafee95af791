"""The first frame: an image in any of the usual forms -> pixels -> the VAE latent frame 0 is pinned to; and the
Frame Similarity Prior, the starting latents a call makes from that latent.

The Frame Similarity Prior (Guo et al. 2024, as the reference inference makes it): the first frame's latent repeated
over the frames, each element kept sharp with probability `sharp_ratio` and otherwise taken from a Gaussian-blurred
copy (`blur_sigma`, 9x9 kernel), noised to the first timestep with the scheduler's own `add_noise`; frame 0 clean.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from adapter_studio.errors import StudioError

#: the reference inference's Frame Similarity Prior: half the elements sharp, blur sigma 18 (latent pixels), 9x9 kernel
FSP_SHARP_RATIO = 0.5
FSP_BLUR_SIGMA = 18.0
FSP_KERNEL_SIZE = 9

Generator = torch.Generator | list[torch.Generator] | None


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
def encode_first_frame(vae: Any, image: Any, height: int, width: int) -> torch.Tensor:
    """The first image (any form `first_frame_pixels` takes) -> its latent `[1, C, height / s, width / s]` (s the
    VAE's downsampling), scaled by `vae.config.scaling_factor` as diffusers' video pipelines decode it.

    An image of another size is resized (bicubic, antialiased) with a `UserWarning` saying so: the adapter encodes
    in calls that have no return channel of their own (a plain `StudioPipeline` call, a mix, the app). The latent is
    the mean of the VAE's posterior, so a first frame always encodes to the same latent.
    """
    pixels = first_frame_pixels(image)
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


def check_prior(sharp_ratio: Any, blur_sigma: Any) -> tuple[float, float]:
    """The two coefficients of the Frame Similarity Prior as floats; `StudioError` naming a bad one."""
    for name, value in (("fsp_sharp_ratio", sharp_ratio), ("fsp_blur_sigma", blur_sigma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise StudioError(f"I2V-Adapter {name} must be a number, got {value!r}")
    if not 0.0 <= sharp_ratio <= 1.0:
        raise StudioError(f"I2V-Adapter fsp_sharp_ratio must lie in [0, 1], got {sharp_ratio}")
    if blur_sigma < 0.0:
        raise StudioError(f"I2V-Adapter fsp_blur_sigma must be >= 0, got {blur_sigma}")
    return float(sharp_ratio), float(blur_sigma)


def frame_similarity_prior_latents(first: torch.Tensor, num_frames: int, scheduler: Any, generator: Generator = None,
                                   sharp_ratio: float = FSP_SHARP_RATIO,
                                   blur_sigma: float = FSP_BLUR_SIGMA) -> torch.Tensor:
    """The Frame Similarity Prior: starting latents `[B, C, F, h, w]` (float32) from the first frame's `[B, C, h, w]`.

    Each frame is the first frame's latent with every element, with probability `1 - sharp_ratio`, replaced by a
    Gaussian-blurred copy's (sigma `blur_sigma`), noised by `scheduler.add_noise` to `scheduler.timesteps[0]` (set
    the timesteps first); frame 0 stays the clean latent. Random draws, in this order: the sharp/blurred mask
    (uniform), then the noise, both from `generator` (one per sample for a list). The result is in the scheduler's
    own space (diffusers multiplies given latents by `init_noise_sigma`: divide by it before handing them over).
    """
    sharp_ratio, blur_sigma = check_prior(sharp_ratio, blur_sigma)
    b, c, h, w = first.shape
    first = first.float()
    shape = (b, c, num_frames, h, w)
    sharp = _uniform(shape, generator, first.device) >= 1.0 - sharp_ratio  # the reference: rand >= 0.5
    blurred = gaussian_blur(first, blur_sigma)  # the frames are equal before masking: blur one
    video = torch.where(sharp, first[:, :, None], blurred[:, :, None])
    noise = randn_tensor(shape, generator=generator, device=first.device, dtype=first.dtype)
    noisy = scheduler.add_noise(video, noise, scheduler.timesteps[:1].repeat(b))
    noisy[:, :, 0] = first
    return noisy


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = FSP_KERNEL_SIZE) -> torch.Tensor:
    """torchvision's `GaussianBlur(kernel_size, sigma)` (reflect padding) on `[N, C, h, w]`, without torchvision.

    The kernel shrinks to the largest odd size reflect padding allows on a small latent; `sigma <= 0` is no blur.
    """
    h, w = x.shape[-2:]
    k = min(kernel_size, 2 * min(h, w) - 1)
    k -= 1 - k % 2
    if sigma <= 0 or k < 2:
        return x
    half = (k - 1) / 2
    t = torch.linspace(-half, half, k, device=x.device, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, [k // 2] * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # separable: rows, then columns
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _uniform(shape: tuple[int, ...], generator: Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers of `shape`, drawn on the generator's device (one generator per sample for a list)."""
    if isinstance(generator, list):
        return torch.cat([_uniform((1, *shape[1:]), g, device) for g in generator])
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)
