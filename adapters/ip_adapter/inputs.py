"""Turning what a user gives an IP-Adapter (images, precomputed embeddings, masks) into batched tensors.

Conventions (the same as diffusers' `ip_adapter_image_embeds` for one adapter):

* embeddings of the `base` variant: `[G, I, D]` (G = 1 shared by every sample, or one row per sample; I reference
  images); `[D]` and `[I, D]` are accepted as shared.
* embeddings of `plus` / `full` (encoder hidden states): `[G, I, S, D]`; `[S, D]` and `[I, S, D]` are shared.
* masks: `[H, W]` (every sample) or `[G, H, W]`, values in [0, 1], any resolution with the image's aspect ratio.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from adapter_studio.errors import StudioError


def _is_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor))


def image_list(images: Any) -> list[Any]:
    """One image or a list of images -> a non-empty list (PIL images, HxWxC arrays or CxHxW tensors)."""
    if images is None:
        return []
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    for x in items:
        if not _is_image(x):
            raise StudioError(f"IP-Adapter reference images must be PIL images, arrays or tensors, got {type(x).__name__}")
    return items


def pixel_values(pipe: Any, images: Sequence[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Preprocess images with the pipeline's `feature_extractor` (as diffusers does) -> `[I, 3, h, w]`.

    A 4-D tensor is taken as already preprocessed pixel values, like diffusers' `encode_image`.
    """
    if len(images) == 1 and isinstance(images[0], torch.Tensor) and images[0].ndim == 4:
        return images[0].to(device=device, dtype=dtype)
    if getattr(pipe, "feature_extractor", None) is None:
        raise StudioError("the pipeline has no feature_extractor to preprocess IP-Adapter images; pass image_embeds")
    return pipe.feature_extractor(list(images), return_tensors="pt").pixel_values.to(device=device, dtype=dtype)


@torch.no_grad()
def encode_pixels(image_encoder: Any, pixels: torch.Tensor, hidden_states: bool) -> torch.Tensor:
    """`[I, 3, h, w]` -> `image_embeds [I, D]` (base) or penultimate hidden states `[I, S, D]` (plus, full)."""
    if hidden_states:
        return image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return image_encoder(pixels).image_embeds


def normalize_embeds(embeds: Any, hidden_states: bool, what: str = "image_embeds") -> torch.Tensor:
    """Bring precomputed embeddings to `[G, I, D]` (base) or `[G, I, S, D]` (plus, full)."""
    if isinstance(embeds, (list, tuple)):
        embeds = torch.stack([torch.as_tensor(e) for e in embeds])
    t = torch.as_tensor(embeds)
    want = 4 if hidden_states else 3
    while t.ndim < want:
        t = t.unsqueeze(0)
    if t.ndim != want:
        form = "[batch, images, tokens, dim] (or [images, tokens, dim])" if hidden_states else \
            "[batch, images, dim] (or [images, dim], [dim])"
        raise StudioError(f"IP-Adapter {what} must be {form}; got a tensor of shape {list(t.shape)}")
    return t


def expand_batch(t: torch.Tensor, batch: int, num_images_per_prompt: int = 1, what: str = "inputs") -> torch.Tensor:
    """Per-sample rows: `t [G, ...]` with G = 1 (kept: shared), `batch`, or `batch / num_images_per_prompt`
    (one row per prompt, repeated like diffusers repeats prompts: p0, p0, p1, p1)."""
    g = t.shape[0]
    if g == 1 or g == batch:
        return t
    if num_images_per_prompt > 1 and g * num_images_per_prompt == batch:
        return t.repeat_interleave(num_images_per_prompt, dim=0)
    raise StudioError(f"IP-Adapter {what} has {g} rows; give 1 (shared), one per sample ({batch})"
                      + (f" or one per prompt ({batch // num_images_per_prompt})" if num_images_per_prompt > 1 else ""))


def to_mask(mask: Any) -> torch.Tensor:
    """A mask as `[G, H, W]` float in [0, 1] from a PIL image (L/RGB; 255 = inside), an array, a tensor or a list."""
    from PIL import Image

    if isinstance(mask, (list, tuple)):
        parts = [to_mask(m) for m in mask]
        if len({tuple(p.shape[1:]) for p in parts}) != 1:
            raise StudioError(f"IP-Adapter masks of one batch must share a size, got {[list(p.shape[1:]) for p in parts]}")
        return torch.cat(parts)
    if isinstance(mask, Image.Image):
        t = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    else:
        channels_last = isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[-1] in (1, 3, 4)
        t = torch.as_tensor(np.asarray(mask, dtype=np.float32) if not isinstance(mask, torch.Tensor) else mask).float()
        if channels_last:  # an HxWxC image array: its first channel
            t = t[..., 0]
        if t.numel() and t.max() > 1.0:
            t = t / 255.0
    if t.ndim == 2:
        t = t[None]
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 3:
        raise StudioError(f"an IP-Adapter mask must be [H, W] or [batch, H, W], got shape {list(t.shape)}")
    return t.clamp(0.0, 1.0)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[G, H, W]` -> `[G, h*w, 1]` by area averaging: a cell fully outside the mask stays exactly 0 (diffusers uses
    bicubic, which rings outside the mask)."""
    m = torch.nn.functional.adaptive_avg_pool2d(mask[:, None], size)
    return m.flatten(1)[..., None]
