"""Taking a mix elsewhere: the pipeline call it makes, a runnable Python script that reproduces it, a ComfyUI workflow.

The script builds the same diffusers pipeline (`StudioPipeline.from_preset`), loads the same adapter units with
`adapter_studio.mix.apply_mix`, sets the same sampler (`StudioPipeline.set_sampler`) and per-image seeds, and calls
it with the arguments of `call_arguments` — the very arguments the engine runs — so on the same device and dtype
it reproduces the studio's output exactly. The ComfyUI workflow (`comfy_workflow_zip`) runs the same units through the
node pack `comfyui_adapter_studio` (docs/comfyui.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapter_studio.mix import Mix, Sampling


def call_arguments(s: Sampling) -> dict[str, Any]:
    """The `StudioPipeline` call of completed sampling settings, less the generators and callbacks.

    `num_frames` is passed only when set (the engine leaves it unset on image models).
    """
    args: dict[str, Any] = dict(prompt=s.prompt, negative_prompt=s.negative_prompt or None,
                                num_inference_steps=s.steps, height=s.height, width=s.width, guidance=s.guidance,
                                guidance_scale=float(s.guidance_scale), num_images_per_prompt=s.num_images)
    if s.num_frames is not None:
        args["num_frames"] = s.num_frames
    return args


def python_snippet(mix: Mix, models_dir: str | os.PathLike, out_prefix: str = "mix") -> str:
    """A standalone script reproducing a completed `mix` (needs this project installed; weights are named relative
    to `models_dir`, input images by their path in the studio's input store)."""
    s = mix.sampling
    body = json.dumps(mix.to_dict(), indent=4)
    lines = [
        f'"""Reproduce an Adapter Studio mix: {len(mix.units)} adapter unit(s) on {mix.model!r}, seed {s.seed}."""',
        "import json",
        "",
        "import torch",
        "",
        "from adapter_studio.mix import Mix, apply_mix",
        "from adapter_studio.pipelines.studio_pipeline import StudioPipeline",
        "",
        f"MODELS_DIR = {str(Path(models_dir).resolve())!r}  # the folder the weights names below are relative to",
        f"MIX = json.loads(r'''{body}''')",
        "",
        "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
        "mix = Mix.from_dict(MIX)",
        "pipe = StudioPipeline.from_preset(mix.model, torch_dtype=torch.float16 if device == \"cuda\" else None)",
        "pipe.to(device)",
        "apply_mix(mix, pipe, base_dir=MODELS_DIR)  # every unit's weights and inputs, on the UNet's device and dtype",
        f"pipe.set_sampler({s.sampler!r})",
        f"generator = [torch.Generator(\"cpu\").manual_seed({s.seed} + i) for i in range({s.num_images})]",
        "result = pipe(",
        *[f"    {key}={value!r}," for key, value in call_arguments(s).items()],
        "    generator=generator,",
        ")",
        "images = result.images if hasattr(result, \"images\") else [clip[0] for clip in result.frames]",
        "for i, image in enumerate(images):",
        f"    image.save(f\"{out_prefix}-{{{s.seed} + i}}.png\")",
        "",
    ]
    return "\n".join(lines)


def comfy_workflow_zip(mix: Mix, models_dir: Path, inputs_dir: Path, out_dir: Path) -> Path:
    """The ComfyUI export of a completed `mix` as a zip: workflow.json (UI), workflow_api.json (API), README.txt and
    the `input/` images and `models/` weights it reads (`adapter_studio.comfy_workflow`); returns its path."""
    from adapter_studio.comfy_workflow import export_comfy

    path = Path(out_dir) / f"mix-{mix.sampling.seed}-{len(mix.units)}units-comfyui.zip"
    return export_comfy(mix, base_dir=[models_dir, inputs_dir]).write_zip(path)
