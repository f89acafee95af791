"""What a generation leaves on disk: one PNG per image carrying its own mix (plus the sidecar JSON), and for video
models the first clip as GIF, MP4 (H.264) and WebM (VP8) written with imageio's ffmpeg.

Image *k* of a batch is recorded with its own seed (`seed + k`), `num_images` 1 and each unit's `sample_mask` entry
for that image, so every output reproduces alone.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from adapter_studio.mix import Mix

from .metadata import save_png_with_mix

MAX_SEED = 2**32 - 1


@dataclass
class GenerationResult:
    """What one call produced: PNG paths (each with its mix), sidecar JSON paths, the batch mix, a video if any."""

    images: list[Path]
    sidecars: list[Path]
    mix: Mix
    seconds: float
    videos: dict[str, Path] = field(default_factory=dict)  # "gif" / "mp4" / "webm" of the first clip (video models)
    info: str = ""

    def gallery(self) -> list[tuple[str, str]]:
        """`(png path, "seed N")` per image, N being that image's own seed."""
        return [(str(p), f"seed {(self.mix.sampling.seed + k) % (MAX_SEED + 1)}") for k, p in enumerate(self.images)]


def image_mix(mix: Mix, k: int) -> Mix:
    """The mix of image `k` of a batch made by `mix`: its seed, one image, and each unit's switch for that image."""
    one = copy.deepcopy(mix)
    one.sampling.seed = (mix.sampling.seed + k) % (MAX_SEED + 1)
    one.sampling.num_images = 1
    for u in one.units:
        if u.sample_mask is not None:
            u.sample_mask = [u.sample_mask[k]]
    return one


def write_outputs(mix: Mix, out: Any, outputs_dir: Path, seconds: float) -> GenerationResult:
    """Write the pipeline output `out` of a completed `mix` under `outputs_dir/<date>/`."""
    s = mix.sampling
    day = outputs_dir / time.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    frames = getattr(out, "frames", None)
    # video pipelines: a clip per sample; its first frame is the still carrying the mix
    stills = [clip[0] for clip in frames] if frames is not None else out.images
    images: list[Path] = []
    for k, img in enumerate(stills):
        one = image_mix(mix, k)
        images.append(save_png_with_mix(img, day / f"{stamp}-{one.sampling.seed}-{uuid.uuid4().hex[:6]}.png", one))
    # the first clip's files take the stem of its still, so `clip.json` beside `clip.mp4` is that clip's own mix
    videos = write_video(frames[0], images[0].with_suffix(""), fps=s.fps) if frames is not None else {}
    info = (f"{len(images)} image(s), {s.width}x{s.height}, {s.steps} steps {s.sampler}, "
            f"{s.guidance.upper()} {s.guidance_scale:g}, seed {s.seed}, {len(mix.units)} unit(s), {seconds:.2f} s")
    return GenerationResult(images=images, sidecars=[p.with_suffix(".json") for p in images], mix=mix,
                            seconds=seconds, videos=videos, info=info)


def write_video(frames: Sequence[Image.Image], stem: str | os.PathLike, fps: int) -> dict[str, Path]:
    """Write frames as `stem.gif`, `stem.mp4` (H.264) and `stem.webm` (VP8); returns the paths by format.

    Frame sides are multiples of 8 (the studio's sizes), so `macro_block_size=8` keeps the size exact.
    """
    import imageio.v3 as iio

    stem = Path(stem)
    clip = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    out = {"gif": stem.with_suffix(".gif"), "mp4": stem.with_suffix(".mp4"), "webm": stem.with_suffix(".webm")}
    iio.imwrite(out["gif"], clip, duration=max(1, round(1000 / fps)), loop=0)
    for fmt, codec in (("mp4", "libx264"), ("webm", "libvpx")):
        iio.imwrite(out[fmt], clip, plugin="FFMPEG", fps=fps, codec=codec, macro_block_size=8,
                    ffmpeg_log_level="error")
    return out
