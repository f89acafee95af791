"""A Ctrl unit's inputs: one entry per condition (ControlNet), their control images, and where each acts.

Inputs (slot inputs or `adapter_inputs` per call), for condition k (k = 1, 2, 3: the key carries no suffix for the
first, `_2`, `_3` for the others) or as `conditions=[{...}, ...]` with the unsuffixed keys:

* `image[_k]`: the control image(s):
  - one image: every sample (and every frame);
  - a list: one per prompt or one per sample of the call (images), or one per frame (video target);
  - a list of lists (video): per prompt or sample, one per frame;
  a `None` in a list leaves that sample (or frame: sparse control) without this condition.
* `preprocessor[_k]`: a name of `preprocessors.PREPROCESSORS` (default `none`: the image is the control image).
* `conditioning_scale[_k]`: diffusers' `controlnet_conditioning_scale` for this condition (default 1; 0 = absent).
* `start[_k]`, `end[_k]`: this condition's step window within the unit's, with the stack's rule
  (`start <= progress < end`, end = 1 includes the last step).
* `skip_latents[_k]`: latent skipping (the ControlNet sees zeros instead of the noisy latent; for sparse controls).

Unit-wide: `guess_mode` (diffusers' guess mode: the ControlNets see only the conditional half under CFG, residuals
scaled from 0.1 to 1 over the depth), `fusion` (`auto`, `sum`, `equal`, `router`; see `router.py`), and
`controlnet_prompt_embeds` / `controlnet_negative_prompt_embeds` (`[1 or B, S, D]`: prompt tokens for ControlNets whose
text width differs from the target's; by default the ControlNet reads the target's tokens, or their first `D`
channels — on SDXL the CLIP ViT-L part).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from adapter_studio.errors import StudioError

from .preprocessors import PREPROCESSORS, preprocess

CONDITION_KEYS = ("image", "preprocessor", "conditioning_scale", "start", "end", "skip_latents")
UNIT_KEYS = ("conditions", "guess_mode", "fusion", "controlnet_prompt_embeds", "controlnet_negative_prompt_embeds")
FUSION_CHOICES = ("auto", "sum", "equal", "router")
Item = Image.Image | torch.Tensor | None


def suffix(k: int) -> str:
    """Key suffix of condition `k` (0-based): '' for the first, '_2', '_3', ... for the others."""
    return "" if k == 0 else f"_{k + 1}"


@dataclass
class Condition:
    """One condition of a call, its images preprocessed.

    Attributes:
        images: `[M][F_i]` items (an RGB `PIL.Image`, a `[3, h, w]` tensor in 0..1, or None = absent there);
            M = 1 (shared), the number of prompts or the number of samples; F_i = 1 (every frame) or the frame count.
        conditioning_scale, start, end, skip_latents: see the module docstring.
        cache: control tensors already resized, keyed by pixel size.
    """

    images: list[list[Item]] | None
    conditioning_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    skip_latents: bool = False
    cache: dict[Any, Any] = field(default_factory=dict)

    def tensors(self, size: tuple[int, int], factor: int, label: str,
                expected: tuple[int, int]) -> torch.Tensor:
        """The control images `[M, F_i, 3, H, W]` in 0..1 (zeros where absent) at pixel `size` = `(H, W)`, resized
        with diffusers' control image processor (as `StableDiffusionControlNetPipeline.prepare_image`).

        Images whose size is not `expected` (the output's) are reported once through `warnings.warn`; resizing from
        the output size to a ControlNet run at another resolution (`source_scale`) is by design and silent."""
        hit = self.cache.get(size)
        if hit is not None:
            return hit
        proc = VaeImageProcessor(vae_scale_factor=factor, do_convert_rgb=True, do_normalize=False)
        H, W = size
        rows, resized = [], set()
        for per_sample in self.images:
            frames = []
            for item in per_sample:
                if item is None:
                    frames.append(torch.zeros(3, H, W))
                    continue
                h, w = (item.size[1], item.size[0]) if isinstance(item, Image.Image) else tuple(item.shape[-2:])
                if (h, w) != tuple(expected):
                    resized.add((w, h))
                frames.append(proc.preprocess(item if isinstance(item, Image.Image) else item[None], height=H,
                                              width=W)[0])
            rows.append(torch.stack(frames))
        if resized:
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted(resized))
            warnings.warn(f"{label} of {sizes} resized to the output size {expected[1]}x{expected[0]}; give "
                          "control images of the output size to avoid resampling", stacklevel=2)
        out = self.cache[size] = torch.stack(rows)
        return out


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes", 1):
        return True
    if value in ("off", "false", "no", 0, None, ""):
        return False
    raise StudioError(f"Ctrl input {what!r} must be true/false (or 'on'/'off'), got {value!r}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise StudioError(f"Ctrl input {what!r} must be a number, got {value!r}")
    return float(value)


def _item(image: Any, preprocessor: str, what: str) -> Item:
    """One control image, preprocessed; tensors and float arrays pass through unquantized when not preprocessed."""
    if image is None:
        return None
    if preprocessor == "none" and isinstance(image, (torch.Tensor, np.ndarray)) and not (
            isinstance(image, np.ndarray) and image.dtype == np.uint8):
        t = torch.as_tensor(image).detach().float().cpu()
        if t.ndim == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):  # [H, W, C] array
            t = t.permute(2, 0, 1)
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise StudioError(f"{what}: a tensor must be [3, H, W] (or [H, W]) in 0..1, got shape {list(t.shape)}")
        return t.expand(3, -1, -1).clamp(0.0, 1.0)
    return preprocess(image, preprocessor, what)


def _images(value: Any, preprocessor: str, video: bool, what: str) -> list[list[Item]]:
    """The `[M][F_i]` structure of an `image` input (see the module docstring)."""
    if isinstance(value, torch.Tensor) and value.ndim == 4:  # a batch [M, 3, H, W]
        value = list(value)
    elif isinstance(value, torch.Tensor) and value.ndim == 5:  # [M, F, 3, H, W]
        value = [list(v) for v in value]
    if not isinstance(value, (list, tuple)):
        return [[_item(value, preprocessor, what)]]
    if not value:
        raise StudioError(f"{what}: an empty list; give one image, or one per sample / frame")
    nested = [isinstance(v, (list, tuple)) for v in value]
    if any(nested) and not all(nested):
        raise StudioError(f"{what}: mix of images and lists; give a flat list or a list of lists (per sample, per "
                          "frame)")
    if all(nested):
        if not video and any(len(v) != 1 for v in value):
            raise StudioError(f"{what}: lists of several images per sample are frames, and this model makes images; "
                              "give one image per sample")
        return [[_item(x, preprocessor, what) for x in v] for v in value]
    if video:  # a flat list on a video model: one image per frame, for every sample
        return [[_item(x, preprocessor, what) for x in value]]
    return [[_item(x, preprocessor, what)] for x in value]


def parse_conditions(inputs: dict[str, Any], num_conditions: int, video: bool) -> list[Condition]:
    """The conditions of `inputs` (flat suffixed keys and/or `conditions`), one per ControlNet; a condition without
    an image is absent everywhere."""
    per: list[dict[str, Any]] = [{} for _ in range(num_conditions)]
    known = {f"{key}{suffix(k)}" for key in CONDITION_KEYS for k in range(num_conditions)}
    unknown = set(inputs) - known - set(UNIT_KEYS) - {"_prepared"}
    if unknown:
        more = [k for k in unknown if any(k.startswith(c) for c in CONDITION_KEYS)]
        hint = (f" (this unit has {num_conditions} ControlNet{'s' if num_conditions > 1 else ''})" if more else "")
        raise StudioError(f"unknown Ctrl inputs {sorted(unknown)}{hint}; known: {', '.join(CONDITION_KEYS)} (with "
                          f"_2, _3 for more ControlNets), {', '.join(UNIT_KEYS)}")
    for k in range(num_conditions):
        for key in CONDITION_KEYS:
            if f"{key}{suffix(k)}" in inputs:
                per[k][key] = inputs[f"{key}{suffix(k)}"]
    listed = inputs.get("conditions")
    if listed is not None:
        if not isinstance(listed, (list, tuple)) or len(listed) > num_conditions or \
                not all(isinstance(c, dict) for c in listed):
            raise StudioError(f"Ctrl input 'conditions' must be a list of at most {num_conditions} dicts (one per "
                              f"ControlNet), got {listed!r:.80}")
        for k, c in enumerate(listed):
            bad = set(c) - set(CONDITION_KEYS)
            if bad:
                raise StudioError(f"Ctrl condition {k + 1}: unknown keys {sorted(bad)}; known: "
                                  f"{', '.join(CONDITION_KEYS)}")
            per[k].update(c)
    out = []
    for k, c in enumerate(per):
        what = f"control image {k + 1}" if num_conditions > 1 else "control image"
        name = c.get("preprocessor") or "none"
        if name not in PREPROCESSORS:
            raise StudioError(f"{what}: unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
        start = _number(c.get("start", 0.0), f"start{suffix(k)}")
        end = _number(c.get("end", 1.0), f"end{suffix(k)}")
        if not 0.0 <= start <= end <= 1.0:
            raise StudioError(f"Ctrl condition {k + 1}: window must satisfy 0 <= start <= end <= 1, got {start}..{end}")
        image = c.get("image")
        out.append(Condition(
            images=None if image is None else _images(image, name, video, what),
            conditioning_scale=_number(c.get("conditioning_scale", 1.0), f"conditioning_scale{suffix(k)}"),
            start=start, end=end, skip_latents=_flag(c.get("skip_latents", False), f"skip_latents{suffix(k)}")))
    return out


def preview(values: dict[str, Any], k: int = 0) -> Image.Image | None:
    """The studio's preview of condition `k`: its first control image through its preprocessor (None if none)."""
    image = values.get(f"image{suffix(k)}")
    while isinstance(image, (list, tuple)):
        image = next((x for x in image if x is not None), None)
    if image is None:
        return None
    return preprocess(image, values.get(f"preprocessor{suffix(k)}") or "none",
                      f"control image {k + 1}" if k else "control image")


def check_unit(inputs: dict[str, Any]) -> tuple[bool, str]:
    """`(guess_mode, fusion)` of the unit-wide inputs."""
    fusion = inputs.get("fusion") or "auto"
    if fusion not in FUSION_CHOICES:
        raise StudioError(f"Ctrl input 'fusion' must be one of {', '.join(FUSION_CHOICES)}, got {fusion!r}")
    return _flag(inputs.get("guess_mode", False), "guess_mode"), fusion

