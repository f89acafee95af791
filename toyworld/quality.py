"""What each family does, measured on the toy world: every score against the same model without the adapter.

Each function takes the loaded pipeline(s) and adapters, generates on held-out scenes (the `test` split; training
drew from `train`) at fixed seeds, reads the pictures back with `metrics.analyze`, and returns a dict of named
numbers plus the pictures (for the grids). `bench/quality.py` runs them at full size and writes docs/quality.md;
`tests/test_quality.py` runs small versions on the shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .clips import clip_for
from .metrics import analyze, iou, psnr
from .scenes import COLORS, POSITIONS, SHAPES, render, render_mask, scene_for

CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}


@dataclass
class Result:
    """Named scores (`scores`), the pictures behind them (`images`: rows of PIL images for a grid) and a line on
    how they were made (`setup`)."""

    scores: dict[str, float]
    images: list[list[Image.Image]] = field(default_factory=list)
    setup: str = ""


def _gen(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _batched(sp: Any, prompts: list[str], seed: int, batch: int, **kwargs: Any) -> list[Image.Image]:
    """`sp(prompts)` in batches, sample `i` seeded with `seed + i` whatever the batch size; `per_sample` kwargs
    (lists in `adapter_inputs`) are cut along."""
    per_sample = kwargs.pop("per_sample", None)  # (slot, key, values)
    out: list[Image.Image] = []
    for lo in range(0, len(prompts), batch):
        hi = min(len(prompts), lo + batch)
        extra = dict(kwargs)
        if per_sample is not None:
            slot, key, values = per_sample
            extra["adapter_inputs"] = {slot: {key: values[lo:hi]}}
        res = sp(prompts[lo:hi], generator=_gen(seed + lo, hi - lo), **extra)
        out += res.images
    return out


def _nearest_position(center: tuple[float, float] | None) -> str | None:
    if center is None:
        return None
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - center[0]) ** 2 + (POSITIONS[p][1] - center[1]) ** 2)


def base_model(sp: Any, n: int = 48, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
               batch: int = 16) -> Result:
    """Text to image: how often the picture has the caption's colour, shape and position (held-out captions)."""
    scenes = [scene_for("test", i) for i in range(n)]
    images = _batched(sp, [s.caption for s in scenes], seed, batch, num_inference_steps=steps,
                      guidance_scale=guidance_scale, height=64, width=64)
    reads = [analyze(im) for im in images]
    scores = {
        "color": float(np.mean([r.color == s.color for r, s in zip(reads, scenes)])),
        "shape": float(np.mean([r.shape == s.shape for r, s in zip(reads, scenes)])),
        "position": float(np.mean([_nearest_position(r.center) == s.position for r, s in zip(reads, scenes)])),
    }
    scores["color_and_shape"] = float(np.mean([r.color == s.color and r.shape == s.shape for r, s in zip(reads, scenes)]))
    return Result(scores, [images[i:i + 8] for i in range(0, min(n, 32), 8)],
                  f"{n} held-out captions, {steps} DDIM steps, CFG {guidance_scale}")


def ip_adapter(sp: Any, ip: Any, n: int = 48, steps: int = 20, guidance_scale: float = 5.0, scale: float = 1.0,
               seed: int = 0, batch: int = 16, prompt: str = "") -> Result:
    """Image prompt: how often the picture's colour and shape are the reference's, with the IP-Adapter and without
    (the same prompt, default empty, and seeds)."""
    refs = [render(scene_for("test-ip", i), 64) for i in range(n)]
    truth = [scene_for("test-ip", i) for i in range(n)]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=64, width=64)
    sp.add(ip, name="ip", scale=scale)
    try:
        with_ip = _batched(sp, [prompt] * n, seed, batch, per_sample=("ip", "sample_images", refs), **kw)
    finally:
        sp.remove("ip")
    without = _batched(sp, [prompt] * n, seed, batch, **kw)
    scores: dict[str, float] = {}
    for label, images in (("ip", with_ip), ("none", without)):
        reads = [analyze(im) for im in images]
        scores[f"color_{label}"] = float(np.mean([r.color == s.color for r, s in zip(reads, truth)]))
        scores[f"shape_{label}"] = float(np.mean([r.shape == s.shape for r, s in zip(reads, truth)]))
    rows = [[refs[i], with_ip[i], without[i]] for i in range(min(n, 8))]
    return Result(scores, rows, f"{n} held-out references, prompt {prompt!r}, scale {scale}, {steps} steps, "
                                f"CFG {guidance_scale}")


def ctrl_adapter(sp: Any, ctrl: Any, n: int = 48, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
                 batch: int = 16, controlnet: Any = None) -> Result:
    """Structure control: IoU of the generated shape with the control mask, with the Ctrl-Adapter, with the plain
    ControlNet (`controlnet`, when given) and with neither; the prompt is the held-out scene's caption."""
    scenes = [scene_for("test-ctrl", i) for i in range(n)]
    masks = [render_mask(s, 64) for s in scenes]
    prompts = [s.caption for s in scenes]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=64, width=64)
    runs: dict[str, list[Image.Image]] = {}
    for label, unit in (("ctrl", ctrl), ("controlnet", controlnet)):
        if unit is None:
            continue
        sp.add(unit, name="ctrl")
        try:
            runs[label] = _batched(sp, prompts, seed, batch,
                                   per_sample=("ctrl", "image", [m.convert("RGB") for m in masks]), **kw)
        finally:
            sp.remove("ctrl")
    runs["none"] = _batched(sp, prompts, seed, batch, **kw)
    truth = [np.asarray(m) > 127 for m in masks]
    scores = {f"iou_{label}": float(np.mean([iou(analyze(im).mask, t) for im, t in zip(images, truth)]))
              for label, images in runs.items()}
    rows = [[masks[i].convert("RGB")] + [runs[k][i] for k in runs] for i in range(min(n, 8))]
    return Result(scores, rows, f"{n} held-out masks with their captions, {steps} steps, CFG {guidance_scale}; "
                                f"columns: mask, {', '.join(runs)}")


def i2v_adapter(sp: Any, i2v: Any, n: int = 8, num_frames: int = 8, steps: int = 20, guidance_scale: float = 5.0,
                seed: int = 0) -> Result:
    """Image to video: PSNR of frame 0 to the given first frame, and frame-to-frame consistency (mean PSNR of
    neighbouring frames; how often a frame shows the first frame's colour and shape), with the I2V-Adapter and
    without (the same caption and seed)."""
    clips = [clip_for("test", i) for i in range(n)]
    firsts = [c.frames(1, 64)[0] for c in clips]
    kw = dict(num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale, height=64, width=64)
    videos: dict[str, list[list[Image.Image]]] = {"i2v": [], "none": []}
    for i, (clip, first) in enumerate(zip(clips, firsts)):
        sp.add(i2v, name="i2v", image=first)
        try:
            videos["i2v"].append(sp(clip.caption, generator=torch.Generator().manual_seed(seed + i), **kw).frames[0])
        finally:
            sp.remove("i2v")
        videos["none"].append(sp(clip.caption, generator=torch.Generator().manual_seed(seed + i), **kw).frames[0])
    scores: dict[str, float] = {}
    for label, vids in videos.items():
        scores[f"frame0_psnr_{label}"] = float(np.mean([psnr(v[0], f) for v, f in zip(vids, firsts)]))
        scores[f"neighbour_psnr_{label}"] = float(np.mean([psnr(a, b) for v in vids for a, b in zip(v, v[1:])]))
        keep = []
        for v, clip in zip(vids, clips):
            for frame in v[1:]:
                r = analyze(frame)
                keep.append(r.shape == clip.start.shape and (clip.motion == "recolor" or r.color == clip.start.color))
        scores[f"identity_kept_{label}"] = float(np.mean(keep))
    rows = []
    for i in range(min(n, 3)):
        rows += [[firsts[i]] + list(videos["i2v"][i]), [firsts[i]] + list(videos["none"][i])]
    return Result(scores, rows, f"{n} held-out clips (first frame + caption), {num_frames} frames, {steps} steps, "
                                f"CFG {guidance_scale}; rows alternate I2V-Adapter / none")


def agd(sp: Any, agd_adapter: Any, n: int = 48, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
        batch: int = 16) -> Result:
    """Guidance distilled: PSNR to the CFG picture at the same seed (AGD: one UNet pass per step, CFG two), against
    the unguided single pass (w = 1) as the baseline with the same cost; and the caption accuracy of each."""
    scenes = [scene_for("test", i) for i in range(n)]
    prompts = [s.caption for s in scenes]
    kw = dict(num_inference_steps=steps, height=64, width=64)
    cfg_images = _batched(sp, prompts, seed, batch, guidance_scale=guidance_scale, **kw)
    plain = _batched(sp, prompts, seed, batch, guidance_scale=1.0, **kw)
    sp.add(agd_adapter, name="agd")
    try:
        distilled = _batched(sp, prompts, seed, batch, guidance_scale=guidance_scale, **kw)
    finally:
        sp.remove("agd")
    scores: dict[str, float] = {}
    for label, images in (("agd", distilled), ("unguided", plain), ("cfg", cfg_images)):
        if label != "cfg":
            scores[f"psnr_to_cfg_{label}"] = float(np.mean([psnr(a, b) for a, b in zip(images, cfg_images)]))
        reads = [analyze(im) for im in images]
        scores[f"color_and_shape_{label}"] = float(np.mean([r.color == s.color and r.shape == s.shape
                                                            for r, s in zip(reads, scenes)]))
    rows = [[cfg_images[i], distilled[i], plain[i]] for i in range(min(n, 8))]
    return Result(scores, rows, f"{n} held-out captions, w = {guidance_scale}, {steps} steps; columns: CFG (2 passes "
                                "per step), AGD (1 pass), unguided (1 pass)")
