"""Ctrl-Adapter / ControlNet as a studio family ("ctrl"): loader, mix inputs, unit form, training, inspect, writers.

A unit holds one to three conditions: a ControlNet each (`controlnet`, `controlnet_2`, `controlnet_3`), fused per
residual, then the optional Ctrl-Adapter (`adapter`, with its router in `router/` when it has one) carries them to the
pipeline's model. Without an adapter the unit is a plain ControlNet (or diffusers' MultiControlNet: the residuals are
summed). The unit's weight scales the result; its start/end are the step window. `python -m adapter_studio inspect`
describes ControlNets and adapters (`formats.inspect_ctrl`); `convert --to diffusers` writes a single-file ControlNet
as a diffusers folder, and `writers["folder"]` writes a loaded unit's adapter (a released one, say) in our folder.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from adapter_studio.errors import MixError, StudioError
from adapter_studio.family import Family, Field, TrainingScript, Weights, WeightsFile
from adapter_studio.files import input_image

from .adapter import CtrlAdapter
from .conditions import CONDITION_KEYS, FUSION_CHOICES, UNIT_KEYS, preview, suffix
from .formats import inspect_ctrl, load_ctrl_adapter
from .preprocessors import PREPROCESSORS

MAX_CONDITIONS = 3


def load(weights: Weights, pipe: Any) -> CtrlAdapter:
    """A Ctrl unit for `pipe`: its ControlNets in order, the optional adapter, checked against `pipe.unet`."""
    given = [weights.get(f"controlnet{suffix(k)}") for k in range(MAX_CONDITIONS)]
    if not given[0]:
        raise MixError("a Ctrl-Adapter / ControlNet unit needs 'controlnet' (a diffusers ControlNet folder, hub id or "
                       "single file)")
    if given[2] and not given[1]:
        raise MixError("a Ctrl unit with a 3rd ControlNet needs a 2nd one (conditions are numbered in order)")
    nets = [g for g in given if g]
    return load_ctrl_adapter(nets, adapter=weights.get("adapter"), unet=pipe.unet)


def _image(p: Any, base_dir: Path | None, what: str) -> Any:
    return None if p is None else input_image(p, base_dir, f"Ctrl {what}")  # None: no control for that sample


def _images(value: Any, base_dir: Path | None, what: str) -> Any:
    """Paths -> images, keeping the structure (one path, a list, a list of lists); a one-item list is one image."""
    if isinstance(value, list):
        out = [_images(v, base_dir, what) if isinstance(v, list) else _image(v, base_dir, what) for v in value]
        return out[0] if len(out) == 1 and not isinstance(value[0], list) else out
    return _image(value, base_dir, what)


def inputs_from_json(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """JSON unit inputs -> call inputs: `image[_k]` paths become images; the rest is kept (checked at the call).

    The settings of a 2nd or 3rd condition without an image are dropped: the studio's form stores every field, so a
    unit with one ControlNet carries the other conditions' defaults, which mean nothing there."""
    keys = {f"{key}{suffix(k)}" for key in CONDITION_KEYS for k in range(MAX_CONDITIONS)} | set(UNIT_KEYS)
    unknown = set(inputs) - keys
    if unknown:
        raise MixError(f"unknown Ctrl inputs {sorted(unknown)}; known: {', '.join(CONDITION_KEYS)} (and _2, _3), "
                       f"guess_mode, fusion")
    empty = {f"{key}{suffix(k)}" for k in range(1, MAX_CONDITIONS) if inputs.get(f"image{suffix(k)}") in (None, [])
             for key in CONDITION_KEYS}
    out: dict[str, Any] = {}
    for key, val in ((k, v) for k, v in inputs.items() if k not in empty):
        if key in ("controlnet_prompt_embeds", "controlnet_negative_prompt_embeds"):
            raise MixError(f"Ctrl input {key!r} is a tensor: the Python API takes it, a mix does not")
        if key.startswith("image"):
            out[key] = _images(val, base_dir, key)
        elif key == "conditions":
            if not isinstance(val, list):
                raise MixError("Ctrl input 'conditions' must be a list of objects, one per ControlNet")
            out[key] = [{**c, "image": _images(c.get("image"), base_dir, "image")} if isinstance(c, dict) else c
                        for c in val]
        else:
            out[key] = val
    for key in ("guess_mode", *(f"skip_latents{suffix(k)}" for k in range(MAX_CONDITIONS))):
        if isinstance(out.get(key), str):  # the form's choice widgets store "on" / "off"
            out[key] = out[key] == "on"
    if out.get("fusion") not in (None, *FUSION_CHOICES):
        raise MixError(f"Ctrl input 'fusion' must be one of {', '.join(FUSION_CHOICES)}, got {out['fusion']!r}")
    return out


def _preview(values: dict[str, Any], k: int) -> Any:
    try:
        return preview(values, k)
    except StudioError:
        return None  # the form shows no preview for an unreadable upload; the call itself says what is wrong


def _condition_fields(k: int) -> tuple[Field, ...]:
    nth = "" if k == 0 else f" ({k + 1}{'nd' if k == 1 else 'rd'} ControlNet)"
    return (
        Field(f"image{suffix(k)}", "images", f"Control image{nth}", required=k == 0,
              preview=partial(_preview, k=k),
              info="one image, or one per sample; on a video model one per frame"),
        Field(f"preprocessor{suffix(k)}", "choice", f"Preprocessor{nth}", default="none",
              choices=tuple(PREPROCESSORS), info="none: the image is already a control image"),
        Field(f"conditioning_scale{suffix(k)}", "number", f"Conditioning scale{nth}", default=1.0, minimum=0.0,
              maximum=2.0, step=0.05, info="diffusers' controlnet_conditioning_scale; 0 = this condition is off"),
    )


def _save_adapter_folder(adapter: CtrlAdapter, path: Path) -> Path:
    """Our adapter folder (`config.json` + safetensors, the router in `router/`)."""
    return adapter.save_pretrained(path)


def _save_controlnet(adapter: CtrlAdapter, path: Path) -> Path:
    """The unit's (first) ControlNet as a diffusers folder: a single file (original or diffusers keys) converted."""
    adapter.controlnets[0].save_pretrained(path)
    return Path(path)


#: diffusers folders that hold a ControlNet (the dropdowns list no other class for it)
CONTROLNETS = ("ControlNetModel", "SparseControlNetModel", "ControlNetXSAdapter")

FAMILY = Family(
    name="ctrl", label="Ctrl-Adapter / ControlNet", loader=load, inputs_from_json=inputs_from_json, order=30,
    help="Structure control: ControlNets on their own model, or carried to another model through a Ctrl-Adapter.",
    weights=(
        WeightsFile("controlnet", "ControlNet", folder="controlnet", config_classes=CONTROLNETS),
        WeightsFile("adapter", "Ctrl-Adapter (empty = plain ControlNet)", required=False, folder="ctrl",
                    config_classes=("CtrlAdapterModel", "ControlNetAdapter")),  # ours, the release's
        WeightsFile("controlnet_2", "2nd ControlNet (optional)", required=False, folder="controlnet",
                    config_classes=CONTROLNETS),
        WeightsFile("controlnet_3", "3rd ControlNet (optional)", required=False, folder="controlnet",
                    config_classes=CONTROLNETS),
    ),
    # the first condition and the unit-wide settings first: the form lays fields out in this order
    fields=(
        *_condition_fields(0),
        Field("skip_latents", "choice", "Latent skipping", default="off", choices=("off", "on"),
              info="the (1st) ControlNet sees the control image, not the noisy latent: for sparse controls"),
        Field("guess_mode", "choice", "Guess mode", default="off", choices=("off", "on"),
              info="the ControlNet ignores the prompt: only the conditional half, scales 0.1..1 by depth"),
        Field("fusion", "choice", "Several ControlNets", default="auto", choices=FUSION_CHOICES,
              info="auto: router if the adapter has one, else equal weights; sum = diffusers' MultiControlNet"),
        *(f for k in range(1, MAX_CONDITIONS) for f in _condition_fields(k)),
    ),
    training=(TrainingScript("train/ctrl_adapter.py", "ctrl_adapter*.yaml", data_key="data_dir", weights="adapter"),),
    comfy_nodes=("AdapterStudioCtrlAdapterLoader", "AdapterStudioApplyCtrlAdapter"),
    inspect=inspect_ctrl,
    writers={"folder": _save_adapter_folder, "diffusers": _save_controlnet},
)
