"""I2V-Adapter as a studio family ("i2v"): its loader, its mix inputs, its unit form, its weights inspection and
writers, and its training script."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from adapter_studio.errors import MixError
from adapter_studio.family import Family, Field, TrainingScript, Weights, WeightsFile
from adapter_studio.files import input_image

from .first_frame import FSP_BLUR_SIGMA, FSP_SHARP_RATIO
from .formats import inspect_weights, load_i2v_adapter, save_original
from .modeling_i2v_adapter import I2VAdapter

JSON_INPUTS = ("image", "frame_similarity_prior", "fsp_sharp_ratio", "fsp_blur_sigma")


def load(weights: Weights, pipe: Any) -> I2VAdapter:
    """The family loader: `weights["weights"]` (an original file, our folder or a hub id) for `pipe.unet`."""
    path = weights.get("weights")
    if not path:
        raise MixError("an I2V-Adapter unit needs weights (an original .safetensors/.bin file or a save_pretrained "
                       "folder)")
    return load_i2v_adapter(path, pipe.unet)


def inputs_from_json(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """A unit's JSON inputs -> call inputs: `image`, the path of the first frame (looked up under `base_dir` first);
    `frame_similarity_prior` (true / false), `fsp_sharp_ratio`, `fsp_blur_sigma` (numbers), passed on as they are."""
    unknown = set(inputs) - set(JSON_INPUTS)
    if unknown:
        raise MixError(f"I2V-Adapter unit inputs: unknown keys {sorted(unknown)}; allowed: {', '.join(JSON_INPUTS)}")
    out: dict[str, Any] = {}
    if "frame_similarity_prior" in inputs:
        if not isinstance(inputs["frame_similarity_prior"], bool):
            raise MixError(f"I2V-Adapter input 'frame_similarity_prior' must be true or false, got "
                           f"{inputs['frame_similarity_prior']!r}")
        out["frame_similarity_prior"] = inputs["frame_similarity_prior"]
    for key in ("fsp_sharp_ratio", "fsp_blur_sigma"):
        if key in inputs:
            v = inputs[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MixError(f"I2V-Adapter input {key!r} must be a number, got {v!r}")
            out[key] = float(v)
    if "image" not in inputs:
        return out
    out["image"] = input_image(inputs["image"], base_dir, "I2V-Adapter image")
    return out


def _save_folder(adapter: I2VAdapter, path: Path) -> Path:
    adapter.save_pretrained(path)
    return Path(path)


FAMILY = Family(
    name="i2v", label="I2V-Adapter", loader=load, inputs_from_json=inputs_from_json, order=30,
    output="video", model_kinds=("video",),
    weights=(WeightsFile(config_classes=("I2VAdapter",)),),
    help="Image to video: the image is frame 0 and every frame attends to it (AnimateDiff models).",
    fields=(
        Field("image", "image", "First frame", required=True,
              info="frame 0 of the video; an image of another size is resized to the video's (with a warning)"),
        Field("fsp_sharp_ratio", "number", "Prior: sharp share", default=FSP_SHARP_RATIO, minimum=0.0, maximum=1.0,
              step=0.05, info="Frame Similarity Prior: share of the start kept sharp (more: steadier, less motion)"),
        Field("fsp_blur_sigma", "number", "Prior: blur sigma", default=FSP_BLUR_SIGMA, minimum=0.0, maximum=40.0,
              step=0.5, info="Frame Similarity Prior: blur of the rest, in latent pixels (0: none)"),
    ),
    training=(TrainingScript("train/i2v_adapter.py", "i2v_adapter*.yaml", data_key="data_dir"),),
    comfy_nodes=("AdapterStudioI2VAdapterLoader", "AdapterStudioApplyI2VAdapter"),
    inspect=inspect_weights,
    writers={"folder": _save_folder,  # our format: from_pretrained / hub ids
             "original": save_original},  # one .safetensors / .bin: the reference code's load_state_dict reads it
)
