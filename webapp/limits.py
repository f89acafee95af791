"""What one request may ask of this server: sizes, steps, images, input images, and a pixel×step budget.

The budget bounds the work of a request — width × height × steps × images (× frames on a video model) — so one
2048×2048 request cannot hold a CPU server for minutes while every other user waits. Its default depends on the
device (`DEVICE_PIXEL_STEPS`); `app.py --max-pixel-steps` sets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapter_studio.mix import Sampling

# Default pixel×step budget per request by device type: on a CPU one 512×512 image at 30 steps, on a GPU four
# 1024×1024 images at 50 steps (any other accelerator counts as a GPU).
DEVICE_PIXEL_STEPS = {"cpu": 512 * 512 * 30, "cuda": 1024 * 1024 * 50 * 4}


@dataclass
class Limits:
    """Caps on what one request may ask for (keeps a shared server responsive)."""

    min_side: int = 64  # output width/height
    max_side: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_input_pixels: int = 4096 * 4096  # per uploaded image
    max_input_bytes: int = 32 * 1024 * 1024
    max_pixel_steps: int | None = None  # None: DEVICE_PIXEL_STEPS of the server's device; 0: no budget

    def pixel_step_budget(self, device: str) -> int:
        """The budget on `device` ("cpu", "cuda", "cuda:1", ...); 0 = none."""
        if self.max_pixel_steps is not None:
            return int(self.max_pixel_steps)
        return DEVICE_PIXEL_STEPS["cpu" if device.split(":")[0] == "cpu" else "cuda"]


def pixel_steps(s: Sampling) -> int:
    """The work of completed sampling settings: width × height × steps × images (× frames)."""
    return s.width * s.height * s.steps * s.num_images * (s.num_frames or 1)


def budget_problem(s: Sampling, budget: int, device: str, min_side: int) -> str | None:
    """Why completed sampling settings exceed `budget` (naming it and what would fit), or None when they fit."""
    work = pixel_steps(s)
    if not budget or work <= budget:
        return None
    frames = s.num_frames or 1
    per_step = s.width * s.height * s.num_images * frames
    fits = []
    if budget // per_step >= 1:
        fits.append(f"{budget // per_step} step(s) at {s.width}×{s.height}")
    side = int(math.sqrt(budget / (s.steps * s.num_images * frames)) // 8 * 8)
    if side >= min_side:
        fits.append(f"{side}×{side} px at {s.steps} steps")
    if s.num_images > 1 and budget // (s.width * s.height * s.steps * frames) >= 1:
        fits.append(f"{budget // (s.width * s.height * s.steps * frames)} image(s) at this size and steps")
    shape = f"{s.width}×{s.height} px × {s.steps} steps × {s.num_images} image(s)" + (
        f" × {frames} frames" if s.num_frames else "")
    return (f"this request is {shape} = {work / 1e6:.1f} M pixel-steps, over this server's budget of "
            f"{budget / 1e6:.1f} M pixel-steps per request on {device} (app.py --max-pixel-steps); what fits: "
            + (" or ".join(fits) if fits else "a smaller size or fewer steps"))
