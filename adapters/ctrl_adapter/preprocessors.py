"""Control-image preprocessors that need no downloaded weights (OpenCV and NumPy only).

Each takes any image (`PIL.Image`, an `[H, W]` / `[H, W, 3]` array, uint8 or floats in 0..1, a `[3, H, W]` tensor in
0..1, or a path) and returns the RGB `PIL.Image` a ControlNet of that kind expects: white structure on black for edges
and scribbles, brighter = nearer for depth. `none` passes the user's image through (a ready-made control image).
The studio shows the result as the unit's preview.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image

from adapter_studio.errors import StudioError


def to_pil(image: Any, what: str = "control image") -> Image.Image:
    """Any supported image as an RGB `PIL.Image`; a `StudioError` naming the type for anything else."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise StudioError(f"{what}: {str(image)!r} is not an image file (give a PIL image, an array or a path "
                              "to an existing image)")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise StudioError(f"{what}: cannot read {str(image)!r} as an image: {e}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or min(arr.shape[:2]) < 1:
            raise StudioError(f"{what}: an array must be [H, W] or [H, W, 3] (a tensor [3, H, W]), got shape "
                              f"{list(image.shape)}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise StudioError(f"{what} must be an image (PIL image, array [H, W(, 3)], tensor [3, H, W] in 0..1 or a path); "
                      f"got {type(image).__name__}")


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


def _rgb(channel: np.ndarray) -> Image.Image:
    return Image.fromarray(channel.astype(np.uint8)).convert("RGB")


def _normalize(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x, dtype=np.uint8) if hi <= lo else ((x - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


def none(image: Image.Image) -> Image.Image:
    """The image as it is (a ready-made control image, or any image the user wants to condition on)."""
    return image


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (OpenCV, thresholds 100/200 as in the ControlNet and Ctrl-Adapter releases): white on black."""
    return _rgb(cv2.Canny(np.asarray(image), low, high))


def softedge(image: Image.Image) -> Image.Image:
    """Soft edges (for HED / PiDiNet-style ControlNets): Sobel gradient magnitude of the blurred luminance."""
    g = cv2.GaussianBlur(_gray(image).astype(np.float32), (0, 0), sigmaX=max(1.0, min(image.size) / 256))
    mag = np.sqrt(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) ** 2 + cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) ** 2)
    return _rgb(_normalize(np.sqrt(mag)))  # sqrt: keeps faint edges visible, as soft-edge maps do


def depth(image: Image.Image) -> Image.Image:
    """A depth-like map from luminance (no depth model): smoothed and stretched, brighter = nearer."""
    g = cv2.GaussianBlur(_gray(image).astype(np.float32), (0, 0), sigmaX=max(1.0, min(image.size) / 64))
    return _rgb(_normalize(g))


def grayscale(image: Image.Image) -> Image.Image:
    """Luminance in three channels (recolouring ControlNets)."""
    return _rgb(_gray(image))


def mask(image: Image.Image) -> Image.Image:
    """A binary mask: luminance thresholded at the middle grey (white = 255, black = 0)."""
    return _rgb(np.where(_gray(image) >= 128, 255, 0))


def segmentation(image: Image.Image) -> Image.Image:
    """A segmentation map passed through unchanged (its colours are the classes)."""
    return image


def blur(image: Image.Image) -> Image.Image:
    """A Gaussian blur (blur ControlNets): sigma 1/64 of the shorter side."""
    sigma = max(1.0, min(image.size) / 64)
    return Image.fromarray(cv2.GaussianBlur(np.asarray(image), (_odd(4 * sigma), _odd(4 * sigma)), sigma))


def tile(image: Image.Image) -> Image.Image:
    """A low-resolution version (tile ControlNets): area-downsampled 8x, then upsampled back (bicubic)."""
    w, h = image.size
    small = cv2.resize(np.asarray(image), (max(1, w // 8), max(1, h // 8)), interpolation=cv2.INTER_AREA)
    return Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))


def scribble(image: Image.Image) -> Image.Image:
    """Scribble-like strokes: edges of the smoothed image, thickened and binarised (white strokes on black)."""
    g = cv2.GaussianBlur(_gray(image), (0, 0), sigmaX=max(1.0, min(image.size) / 128))
    edges = cv2.Canny(g, 50, 150)
    k = _odd(min(image.size) / 128)
    return _rgb(np.where(cv2.dilate(edges, np.ones((k, k), np.uint8)) > 0, 255, 0))


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": none, "canny": canny, "softedge": softedge, "depth": depth, "grayscale": grayscale, "mask": mask,
    "segmentation": segmentation, "blur": blur, "tile": tile, "scribble": scribble,
}


def preprocess(image: Any, name: str = "none", what: str = "control image") -> Image.Image:
    """`image` through the preprocessor `name` (a key of `PREPROCESSORS`), as an RGB `PIL.Image`."""
    fn = PREPROCESSORS.get(name or "none")
    if fn is None:
        raise StudioError(f"unknown control preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
    return fn(to_pil(image, what))
