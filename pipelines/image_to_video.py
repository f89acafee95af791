"""Image-to-video sampling: a first image + a prompt -> the frames of a video; and writing them as GIF / MP4 / WebM.

`ImageToVideoPipeline` runs on a `StudioPipeline` wrapping diffusers' `AnimateDiffPipeline`. A call:

1. encodes the first image once with the pipeline's VAE (resized to the video's size, with a `UserWarning` saying so,
   when its size differs);
2. starts from the **Frame Similarity Prior** (I2V-Adapter, Guo et al. 2024, as its reference inference does): the
   first frame's latent repeated over the frames, each element kept sharp with probability `fsp_sharp_ratio` and
   otherwise taken from a Gaussian-blurred copy (`fsp_blur_sigma`, 9x9 kernel), noised to the first timestep; frame 0
   is the clean latent;
3. hands the first frame's latent to every enabled adapter that takes one (an adapter naming its input in
   `first_frame_input`: the I2V-Adapter), which holds frame 0 at it through sampling;
4. gives the same image to the image-prompt units named in `image_prompt` (IP-Adapter). Every other adapter in the
   stack acts in the same call as well (AGD; Ctrl with one control image per frame through `adapter_inputs`).

The pipeline names no family: it finds first-frame adapters by their `first_frame_input` attribute and a unit's
image-prompt input by its family's `prompts_by_image`.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from adapter_studio.errors import MixError, StudioError
from adapter_studio.registry import get_family

from .studio_pipeline import StudioPipeline

#: the reference inference's Frame Similarity Prior: half the elements sharp, blur sigma 18 (latent pixels), 9x9 kernel
FSP_SHARP_RATIO = 0.5
FSP_BLUR_SIGMA = 18.0
FSP_KERNEL_SIZE = 9

Generator = torch.Generator | list[torch.Generator] | None


class ImageToVideoPipeline:
    """A first image + a prompt -> video frames, on a `StudioPipeline` over an `AnimateDiffPipeline`.

    Args:
        pipe: the studio pipeline; its stack must hold an enabled first-frame adapter (an I2V-Adapter) at call time.
    """

    def __init__(self, pipe: StudioPipeline):
        if "num_frames" not in inspect.signature(pipe.pipe.__call__).parameters:
            raise StudioError(f"image-to-video needs a video pipeline (AnimateDiff); this is a "
                              f"{type(pipe.pipe).__name__}")
        self.pipe = pipe

    @torch.no_grad()
    def __call__(self, image: Any, prompt: str | list[str] | None = None, *, num_frames: int = 16,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 25,
                 generator: Generator = None, frame_similarity_prior: bool = True,
                 fsp_sharp_ratio: float = FSP_SHARP_RATIO, fsp_blur_sigma: float = FSP_BLUR_SIGMA,
                 image_prompt: str | Sequence[str] = (), adapter_inputs: dict[str, dict[str, Any]] | None = None,
                 **kwargs: Any) -> Any:
        """Sample videos whose frame 0 is `image`.

        Args:
            image: the first frame: a PIL image, an `[H, W, 3]` array (uint8, or float in [0, 1]) or a `[3, H, W]` /
                `[1, 3, H, W]` tensor in [0, 1].
            prompt, num_frames, height, width, num_inference_steps, generator: as diffusers' AnimateDiff pipeline
                (height / width default to the model's resolution, not the image's).
            frame_similarity_prior: start from the Frame Similarity Prior (else from AnimateDiff's plain noise).
            fsp_sharp_ratio: share of the prior's latent elements kept sharp (the rest come from the blurred copy).
            fsp_blur_sigma: sigma of the prior's Gaussian blur, in latent pixels (0: no blur).
            image_prompt: names of image-prompt units (IP-Adapter) that get `image` as their reference for this call.
            adapter_inputs: per-call inputs by unit name, as `StudioPipeline` takes them (Ctrl: its per-frame images).
            **kwargs: everything else `StudioPipeline` takes (`guidance`, `guidance_scale`, `negative_prompt`,
                `num_videos_per_prompt`, `output_type`, `callback_on_step_end`, ...).

        Returns:
            diffusers' `AnimateDiffPipelineOutput`: `frames` is a list (one per video) of `num_frames` PIL images, or
            `[B, F, 3, H, W]` for `output_type="pt"`, `[B, C, F, h, w]` latents for `output_type="latent"`.
        """
        studio, pipe = self.pipe, self.pipe.pipe
        takers = [s for s in studio.stack if s.enabled and getattr(s.adapter, "first_frame_input", None)]
        if not takers:
            raise StudioError("image-to-video needs an enabled adapter that takes the first frame (an I2V-Adapter "
                              f"unit); the stack holds {[s.name for s in studio.stack] or 'none'}")
        height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor  # AnimateDiff's own default
        width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
        first = encode_first_frame(pipe.vae, image, height, width)  # [1, C, h, w]
        inputs = {name: dict(given) for name, given in (adapter_inputs or {}).items()}
        for slot in takers:
            inputs.setdefault(slot.name, {})[slot.adapter.first_frame_input] = first
        for name in [image_prompt] if isinstance(image_prompt, str) else image_prompt:
            inputs.setdefault(name, {})[self._image_prompt_key(name)] = image
        if frame_similarity_prior:
            if kwargs.get("latents") is not None:
                raise StudioError("the frame similarity prior makes the starting latents: pass latents only with "
                                  "frame_similarity_prior=False")
            scheduler = pipe.scheduler
            scheduler.set_timesteps(num_inference_steps, device=studio.device)  # the same call the pipeline makes
            batch = _batch_size(prompt, kwargs)
            latents = frame_similarity_prior_latents(first.to(studio.device).expand(batch, -1, -1, -1), num_frames,
                                                     scheduler, generator, fsp_sharp_ratio, fsp_blur_sigma)
            # diffusers multiplies given latents by init_noise_sigma (1 for DDIM, > 1 for Euler-type samplers)
            kwargs["latents"] = (latents / scheduler.init_noise_sigma).to(pipe.unet.dtype)
        return studio(prompt, num_frames=num_frames, height=height, width=width,
                      num_inference_steps=num_inference_steps, generator=generator, adapter_inputs=inputs, **kwargs)

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


def frame_similarity_prior_latents(first: torch.Tensor, num_frames: int, scheduler: Any, generator: Generator = None,
                                   sharp_ratio: float = FSP_SHARP_RATIO,
                                   blur_sigma: float = FSP_BLUR_SIGMA) -> torch.Tensor:
    """The Frame Similarity Prior: starting latents `[B, C, F, h, w]` from the first frame's latent `[B, C, h, w]`.

    Each frame is the first frame's latent with every element, with probability `1 - sharp_ratio`, replaced by a
    Gaussian-blurred copy's (sigma `blur_sigma`), noised by `scheduler.add_noise` to `scheduler.timesteps[0]` (set
    the timesteps first); frame 0 stays the clean latent. Random draws, in this order: the sharp/blurred mask
    (uniform), then the noise, both from `generator`. The result is in the scheduler's own space (divide by
    `init_noise_sigma` before handing it to a diffusers pipeline as `latents`).
    """
    if not 0.0 <= sharp_ratio <= 1.0:
        raise StudioError(f"fsp_sharp_ratio must lie in [0, 1], got {sharp_ratio}")
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


@torch.no_grad()
def encode_first_frame(vae: Any, image: Any, height: int, width: int) -> torch.Tensor:
    """The first image -> its VAE latent `[1, C, height / s, width / s]`, scaled by `vae.config.scaling_factor`.

    Takes a PIL image, an `[H, W, 3]` array (uint8, or float in [0, 1]) or a `[3, H, W]` / `[1, 3, H, W]` tensor in
    [0, 1]; another size is resized (bicubic, antialiased) with a `UserWarning`. The latent is the posterior's mean.
    The same steps as the I2V-Adapter's own encoding of its `image` input, so both give the same latent.
    """
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
    x = (image[None] if image.ndim == 3 else image).detach().to("cpu", torch.float32)
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise StudioError(f"a first frame tensor must be [3, H, W] or [1, 3, H, W], got {list(image.shape)}")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise StudioError(f"first frame values must lie in [0, 1] (got {float(x.min()):.3g}..{float(x.max()):.3g})")
    h0, w0 = x.shape[-2:]
    if (h0, w0) != (height, width):
        warnings.warn(f"I2V-Adapter: the first image is {w0}x{h0}; resized to the video's {width}x{height}",
                      UserWarning, stacklevel=3)
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True).clamp(0.0, 1.0)
    x = (x * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


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


def _uniform(shape: tuple[int, ...], generator: Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers of `shape`, drawn on the generator's device (one generator per sample for a list)."""
    if isinstance(generator, list):
        return torch.cat([_uniform((1, *shape[1:]), g, device) for g in generator])
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _batch_size(prompt: str | list[str] | None, kwargs: dict[str, Any]) -> int:
    """Videos in the call: prompts (or prompt embeddings) x videos per prompt, as `StudioPipeline` counts them."""
    if prompt is not None:
        n = 1 if isinstance(prompt, str) else len(prompt)
    elif kwargs.get("prompt_embeds") is not None:
        n = kwargs["prompt_embeds"].shape[0]
    else:
        raise StudioError("give a prompt or prompt_embeds")
    return n * int(kwargs.get("num_videos_per_prompt", kwargs.get("num_images_per_prompt", 1)))
