"""IP-Adapter as a studio family ("ip"): its loader, its mix inputs, its unit form and its training script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter_studio.block_scale import BLOCK_PRESETS
from adapter_studio.errors import MixError
from adapter_studio.family import Family, Field, TrainingScript, Weights, WeightsFile
from adapter_studio.files import input_image, input_path

from .adapter import IPAdapter
from .formats import inspect_weights, load_ip_adapter, save_original


def load(weights: Weights, pipe: Any) -> IPAdapter:
    """An IP-Adapter for `pipe` from a file / folder / hub id, checked against its UNet and image encoder."""
    path = weights.get("weights")
    if not path:
        raise MixError("an IP-Adapter unit needs 'weights' (a .bin/.safetensors file or an IP-Adapter folder)")
    return load_ip_adapter(path, unet=pipe.unet, image_encoder=getattr(pipe, "image_encoder", None))


def _image(p: Any, base_dir: Path | None, what: str) -> Any:
    return input_image(p, base_dir, f"IP-Adapter {what}")


def inputs_from_json(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """JSON unit inputs -> call inputs.

    `image`: a path or a list of paths; `sample_images`: a list (one per sample) of paths or lists of paths;
    `mask`: a path to a grey image (white = inside); `combine`: "concat" | "average";
    `image_embeds`: a `.safetensors` path holding `image_embeds` (and optionally `negative_image_embeds`).
    """
    out: dict[str, Any] = {}
    for key, val in inputs.items():
        if key == "image":
            out[key] = [_image(p, base_dir, key) for p in val] if isinstance(val, list) else _image(val, base_dir, key)
        elif key == "sample_images":
            if not isinstance(val, list):
                raise MixError("IP-Adapter 'sample_images' must be a list with one entry per sample")
            out[key] = [[_image(p, base_dir, key) for p in v] if isinstance(v, list) else _image(v, base_dir, key)
                        for v in val]
        elif key == "mask":
            out[key] = input_image(val, base_dir, "IP-Adapter mask", mode="L")
        elif key == "image_embeds":
            from safetensors.torch import load_file

            tensors = load_file(str(input_path(val, base_dir, "IP-Adapter image_embeds")))
            if "image_embeds" not in tensors:
                raise MixError(f"IP-Adapter 'image_embeds' file {val!r} lacks the tensor 'image_embeds'")
            out["image_embeds"] = tensors["image_embeds"]
            if "negative_image_embeds" in tensors:
                out["negative_image_embeds"] = tensors["negative_image_embeds"]
        elif key == "combine":
            if val not in ("concat", "average"):
                raise MixError(f"IP-Adapter 'combine' must be 'concat' or 'average', got {val!r}")
            out[key] = val
        else:
            raise MixError(f"unknown IP-Adapter input {key!r}; known: image, sample_images, mask, combine, image_embeds")
    return out


def _saved(adapter: IPAdapter, path: Path) -> Path:
    adapter.save_pretrained(path)
    return Path(path)


FAMILY = Family(
    name="ip", label="IP-Adapter", loader=load, inputs_from_json=inputs_from_json, order=10,
    prompts_by_image="image", default_weight=0.8,
    weights=(WeightsFile(config_classes=("IPAdapter",)),),
    help="Image prompt: the reference images steer content or style through every cross-attention.",
    fields=(
        Field("image", "images", "Reference images", required=True,
              info="one or more; several images are combined as set below"),
        Field("mask", "image", "Region mask (optional)",
              info="white = where the image prompt acts; resized to the output"),
        Field("combine", "choice", "Several images", default="concat", choices=("concat", "average"),
              info="concat: every image's tokens (diffusers); average: one mean image embedding"),
        Field("blocks", "choice", "Blocks", target="scale", default="all blocks", choices=BLOCK_PRESETS,
              info="InstantStyle: style-only / layout-only inject into one block each"),
        Field("custom_scale", "json", "Per-block scale (JSON)", target="scale", default="",
              info='e.g. {"up": {"block_1": [0.0, 1.0]}} (diffusers set_ip_adapter_scale keys)',
              visible_when=("blocks", "custom")),
    ),
    training=(TrainingScript("train/ip_adapter.py", "ip_adapter*.yaml", data_key="data_dir"),),
    comfy_nodes=("AdapterStudioIPAdapterLoader", "AdapterStudioApplyIPAdapter"),
    inspect=inspect_weights,
    writers={"folder": _saved,  # our format: from_pretrained / hub ids
             "original": save_original},  # .bin or .safetensors by DEST's suffix: diffusers' load_ip_adapter reads it
)

