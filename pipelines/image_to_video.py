"""Image to video in one call: a first image + a prompt -> the frames of a video; and writing them as GIF / MP4 / WebM.

The work happens in the I2V-Adapter itself, in any `StudioPipeline` call (a mix, the studio app): it encodes its
`image` input at the call's size, starts the call from the Frame Similarity Prior (`initial_latents`) and holds
frame 0 at the image. `ImageToVideoPipeline` only hands one image to the stack for one call: to every enabled
I2V-Adapter unit as its first frame and, when asked, to image-prompt units (IP-Adapter) as their reference.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from adapter_studio.adapters.i2v_adapter import I2VAdapter
from adapter_studio.errors import MixError, StudioError
from adapter_studio.registry import get_family

from .studio_pipeline import StudioPipeline


class ImageToVideoPipeline:
    """A first image + a prompt -> video frames, on a `StudioPipeline` over an `AnimateDiffPipeline`.

    Args:
        pipe: the studio pipeline; its stack must hold an enabled I2V-Adapter unit at call time.
    """

    def __init__(self, pipe: StudioPipeline):
        if "num_frames" not in inspect.signature(pipe.pipe.__call__).parameters:
            raise StudioError(f"image-to-video needs a video pipeline (AnimateDiff); this is a "
                              f"{type(pipe.pipe).__name__}")
        self.pipe = pipe

    def __call__(self, image: Any, prompt: str | list[str] | None = None, *, image_prompt: str | Sequence[str] = (),
                 adapter_inputs: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> Any:
        """Sample videos whose frame 0 is `image`.

        Args:
            image: the first frame: a PIL image, an `[H, W, 3]` array (uint8, or float in [0, 1]) or a `[3, H, W]` /
                `[1, 3, H, W]` tensor in [0, 1].
            prompt: as diffusers' AnimateDiff pipeline.
            image_prompt: names of image-prompt units (IP-Adapter) that get `image` as their reference for this call.
            adapter_inputs: per-call inputs by unit name, as `StudioPipeline` takes them (the I2V unit's
                `frame_similarity_prior`, `fsp_sharp_ratio`, `fsp_blur_sigma`; Ctrl's per-frame images).
            **kwargs: everything else `StudioPipeline` takes (`num_frames`, `height`, `width`, `num_inference_steps`,
                `generator`, `guidance`, `guidance_scale`, `negative_prompt`, `num_videos_per_prompt`,
                `output_type`, `callback_on_step_end`, ...); height / width default to the model's resolution.

        Returns:
            diffusers' `AnimateDiffPipelineOutput`: `frames` is a list (one per video) of `num_frames` PIL images, or
            `[B, F, 3, H, W]` for `output_type="pt"`, `[B, C, F, h, w]` latents for `output_type="latent"`.
        """
        studio = self.pipe
        units = [s.name for s in studio.stack if s.enabled and isinstance(s.adapter, I2VAdapter)]
        if not units:
            raise StudioError("image-to-video needs an enabled I2V-Adapter unit in the stack; it holds "
                              f"{[s.name for s in studio.stack] or 'none'}")
        inputs = {name: dict(given) for name, given in (adapter_inputs or {}).items()}
        for name in units:
            inputs.setdefault(name, {})["image"] = image
        for name in [image_prompt] if isinstance(image_prompt, str) else image_prompt:
            inputs.setdefault(name, {})[self._image_prompt_key(name)] = image
        return studio(prompt, adapter_inputs=inputs, **kwargs)

    def _image_prompt_key(self, name: str) -> str:
        """The input key under which unit `name` takes image prompts (its family's `prompts_by_image`)."""
        if name not in self.pipe.stack.slots:
            raise StudioError(f"image_prompt names {name!r}, which is not in the stack ({list(self.pipe.stack.slots)})")
        adapter = self.pipe.stack[name].adapter
        try:
            key = get_family(adapter.family).prompts_by_image
        except MixError:
            key = None
        if not key:
            raise StudioError(f"unit {name!r} ({adapter.family}) takes no image prompt; image_prompt names units of "
                              "a family with image prompts (IP-Adapter)")
        return key


def export_video(frames: Sequence[Image.Image] | np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write frames as `.gif`, `.mp4` (H.264) or `.webm` (VP9), by `path`'s suffix, at `fps` frames per second.

    Args:
        frames: PIL images, or an array `[F, H, W, 3]` (uint8, or float in [0, 1]).
        path: the file to write.
        fps: frames per second. GIF stores delays in hundredths of a second: rates dividing 100 are exact,
            others are rounded.
    """
    import imageio.v3 as iio

    path = Path(path)
    fmt = path.suffix.lower()
    clip = np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames])
    if clip.dtype != np.uint8:
        clip = (np.clip(clip, 0.0, 1.0) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == ".gif":
        iio.imwrite(path, clip, extension=".gif", duration=1000 / fps, loop=0)
    elif fmt in (".mp4", ".webm"):
        # macro_block_size=2: yuv420p needs even sides, and the studio's sizes (multiples of 8) are kept exactly
        iio.imwrite(path, clip, plugin="FFMPEG", fps=fps, codec="libx264" if fmt == ".mp4" else "libvpx-vp9",
                    macro_block_size=2, ffmpeg_log_level="error")
    else:
        raise StudioError(f"export_video writes .gif, .mp4 or .webm, got {path.name!r}")
    return path
