"""I2V-Adapter as a studio family ("i2v"): its loader, its mix inputs and its unit form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter_studio.errors import MixError
from adapter_studio.family import Family, Field, Weights

from .formats import load_i2v_adapter
from .modeling_i2v_adapter import I2VAdapter


def load(weights: Weights, pipe: Any) -> I2VAdapter:
    """The family loader: `weights["weights"]` (an original file, our folder or a hub id) for `pipe.unet`."""
    path = weights.get("weights")
    if not path:
        raise MixError("an I2V-Adapter unit needs weights (an original .safetensors/.bin file or a save_pretrained "
                       "folder)")
    return load_i2v_adapter(path, pipe.unet)


def inputs_from_json(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """A unit's JSON inputs -> call inputs: `image`, the path of the first frame (looked up under `base_dir` first)."""
    unknown = set(inputs) - {"image"}
    if unknown:
        raise MixError(f"I2V-Adapter unit inputs: unknown keys {sorted(unknown)}; allowed: image")
    if "image" not in inputs:
        return {}
    p = inputs["image"]
    if not isinstance(p, str):
        raise MixError(f"I2V-Adapter input 'image' must be a path string, got {type(p).__name__}")
    path = Path(p)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.is_file():
        raise MixError(f"I2V-Adapter input 'image': {p!r} does not exist")
    from PIL import Image

    with Image.open(path) as im:
        return {"image": im.convert("RGB")}


FAMILY = Family(
    name="i2v", label="I2V-Adapter", loader=load, inputs_from_json=inputs_from_json, order=30,
    output="video", model_kinds=("video",),
    help="Image to video: the image is frame 0 and every frame attends to it (AnimateDiff models).",
    fields=(
        Field("image", "image", "First frame", required=True,
              info="frame 0 of the video; an image of another size is resized to the video's (with a warning)"),
    ),
    comfy_nodes=("AdapterStudioI2VAdapterLoader", "AdapterStudioApplyI2VAdapter"),
)
