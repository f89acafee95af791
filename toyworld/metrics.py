"""Reading generated toy-world pictures back: what shape, what colour, where, and how well it matches.

`analyze` finds the ground (the border's median colour), the shape (pixels far from it), names the shape's colour
(nearest named colour of its median pixel) and its shape (the best IoU among the four shapes redrawn in the found
shape's box). Exact on rendered scenes (tested); on generated pictures it is the judge the quality numbers use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLORS, SHAPES, shape_polygon


ANGLES = tuple(range(-15, 16, 5))


@dataclass
class Reading:
    """What `analyze` saw: `shape` / `color` are None when no shape stands out from the ground."""

    shape: str | None
    color: str | None
    mask: np.ndarray  # (H, W) bool, the shape's pixels
    center: tuple[float, float] | None  # (x, y) as fractions of the side
    shape_iou: float  # IoU of the mask with the named shape redrawn in its box


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB picture (H, W, 3), got shape {arr.shape}")
    return arr


def ground_colors(image: Image.Image | np.ndarray, share: float = 0.1) -> np.ndarray:
    """(K, 3): the colours that make up at least `share` of the picture's border and of at least three of its four
    sides (a plain ground gives one, a striped one two; a shape in a corner reaches two sides at most, so even a
    large circle over the edge, up to a sixth of the border, does not count)."""
    arr = _as_array(image)
    sides = [arr[0], arr[-1], arr[:, 0], arr[:, -1]]
    border = np.concatenate(sides)
    bins = (border // 32).astype(np.int64)
    keys = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    side_keys = np.split(keys, np.cumsum([len(s) for s in sides])[:-1])
    values, counts = np.unique(keys, return_counts=True)
    kept = [k for k in values[counts >= share * len(border)]
            if sum(np.mean(sk == k) >= share for sk in side_keys) >= 3]
    if len(kept) == 0:
        return np.median(border, axis=0, keepdims=True)
    return np.stack([border[keys == k].mean(0) for k in kept])


def foreground(image: Image.Image | np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels farther than `threshold` (RGB distance) from every ground colour."""
    arr = _as_array(image)
    grounds = ground_colors(arr)
    dist = np.linalg.norm(arr[:, :, None, :] - grounds[None, None], axis=3).min(2)
    return dist > threshold


def name_color(rgb: np.ndarray) -> str:
    """The named shape colour nearest to `rgb`."""
    names = list(COLORS)
    dists = [np.linalg.norm(np.asarray(rgb, dtype=np.float32) - np.array(COLORS[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(dists))]


def _shape_mask(shape: str, box: tuple[int, int, int, int], side: int, angle: float = 0.0) -> np.ndarray:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    half = max(x1 - x0 + 1, y1 - y0 + 1) / 2
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=255)
    else:
        # the polygon scaled so its box is the found box (the shapes' vertices do not span exactly r)
        poly = np.array(shape_polygon(shape, 0.0, 0.0, 1.0, angle))
        lo, hi = poly.min(0), poly.max(0)
        poly = (poly - (lo + hi) / 2) / ((hi - lo).max() / 2) * half + np.array([cx, cy])
        draw.polygon([tuple(p) for p in poly], fill=255)
    return np.asarray(img) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def analyze(image: Image.Image | np.ndarray, min_area: float = 0.01) -> Reading:
    """Read the shape in a toy-world picture (see the module docstring); a shape under `min_area` of the picture
    is no shape."""
    arr = _as_array(image)
    mask = foreground(arr)
    side = arr.shape[0]
    if mask.sum() < min_area * mask.size:
        return Reading(None, None, mask, None, 0.0)
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    # squares, triangles and stars are drawn turned by up to 12 degrees: the best of a few turns
    scores = {s: max(iou(mask, _shape_mask(s, box, side, a)) for a in ((0.0,) if s == "circle" else ANGLES))
              for s in SHAPES}
    shape = max(scores, key=scores.get)
    color = name_color(np.median(arr[mask], axis=0))
    return Reading(shape, color, mask, (float(xs.mean() / side), float(ys.mean() / side)), scores[shape])


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio of two RGB pictures in dB (8-bit range)."""
    x, y = _as_array(a), _as_array(b)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
