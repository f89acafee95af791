"""Taking a mix elsewhere: the mix JSON, a runnable Python script that reproduces it, and video files.

The script builds the same diffusers pipeline (`StudioPipeline.from_preset`), loads the same adapter units with
`studio.mix.apply_mix`, sets the same scheduler and per-image seeds and calls it with the same arguments, so on
the same device and dtype it reproduces the studio's output exactly. (A ComfyUI workflow export joins here once
the ComfyUI nodes exist.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from studio.mix import Mix

from .engine import SAMPLERS


def mix_json(mix: Mix) -> str:
    return mix.to_json(indent=2)


def python_snippet(mix: Mix, models_dir: str | os.PathLike, out_prefix: str = "mix") -> str:
    """A standalone script reproducing `mix` (needs this project installed; weights named relative to models_dir)."""
    s = mix.sampling
    cls_name, extra = SAMPLERS[s["sampler"]]
    extra_txt = "".join(f", {k}={v!r}" for k, v in extra.items())
    body = json.dumps(mix.to_dict(), indent=4)
    lines = [
        f'"""Reproduce an Adapter Studio mix: {len(mix.units)} adapter unit(s) on {mix.model!r}, seed {s["seed"]}."""',
        "import json",
        "",
        "import diffusers",
        "import torch",
        "",
        "from pipelines.studio_pipeline import StudioPipeline",
        "from studio.mix import Mix, apply_mix",
        "",
        f"MODELS_DIR = {str(Path(models_dir).resolve())!r}  # the folder the weights names below are relative to",
        f"MIX = json.loads(r'''{body}''')",
        "",
        "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
        "mix = Mix.from_dict(MIX)",
        "pipe = StudioPipeline.from_preset(mix.model, torch_dtype=torch.float16 if device == \"cuda\" else None)",
        "pipe.to(device)",
        "apply_mix(mix, pipe, base_dir=MODELS_DIR)  # every unit's weights and inputs, on the UNet's device and dtype",
        f"pipe.pipe.scheduler = diffusers.{cls_name}.from_config(pipe.pipe.scheduler.config{extra_txt})",
        f"generator = [torch.Generator(\"cpu\").manual_seed({s['seed']} + i) for i in range({s['num_images']})]",
        "result = pipe(",
        f"    prompt={s['prompt']!r},",
        f"    negative_prompt={(s['negative_prompt'] or None)!r},",
        f"    num_inference_steps={s['steps']},",
        f"    height={s['height']},",
        f"    width={s['width']},",
        f"    guidance={s['guidance']!r},  # 'agd': one UNet pass per step, guidance_scale is the AGD adapter's w",
        f"    guidance_scale={float(s['guidance_scale'])!r},",
        f"    num_images_per_prompt={s['num_images']},",
        "    generator=generator,",
    ]
    for key in ("num_frames",):
        if key in s:
            lines.append(f"    {key}={s[key]!r},")
    lines += [
        ")",
        "images = result.images if hasattr(result, \"images\") else [clip[0] for clip in result.frames]",
        "for i, image in enumerate(images):",
        f"    image.save(f\"{out_prefix}-{{{s['seed']} + i}}.png\")",
        "",
    ]
    return "\n".join(lines)


def write_video(frames: Sequence[Image.Image], stem: str | os.PathLike, fps: int = 8) -> dict[str, Path]:
    """Write frames as `stem.gif`, `stem.mp4` (MPEG-4 part 2, plays in desktop players) and `stem.webm` (VP8, plays
    in browsers). Returns the written paths by format."""
    import cv2
    import numpy as np

    stem = Path(stem)
    frames = [f.convert("RGB") for f in frames]
    out: dict[str, Path] = {}
    gif = stem.with_suffix(".gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)
    out["gif"] = gif
    w, h = frames[0].size
    for suffix, codec in ((".mp4", "mp4v"), (".webm", "VP80")):
        path = stem.with_suffix(suffix)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), float(fps), (w, h))
        if not writer.isOpened():
            continue
        for f in frames:
            writer.write(cv2.cvtColor(np.asarray(f), cv2.COLOR_RGB2BGR))
        writer.release()
        if path.is_file() and path.stat().st_size:
            out[suffix[1:]] = path
    return out

