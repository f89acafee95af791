"""Reading and writing I2V-Adapter checkpoints, with shape checks against the UNet before anything is built.

Read:

* the original release: a UNet state dict (or `{"state_dict": ...}`) holding, per spatial self-attention,
  `{layer}.attn1.to_q_ff.weight`, `{layer}.attn1.to_out_ff.weight` and `.bias` under the UNet's module paths
  (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q_ff.weight`, ...), as a `.safetensors` file or a
  pickle (`.bin` / `.pt` / `.pth` / `.ckpt`, read with `torch.load(weights_only=True)`). Keys of other modules (a
  full UNet's, an IP-Adapter's) are ignored; a prefix before the UNet's path (`module.`, `unet.`) is dropped.
  `diffusion_pytorch_model.safetensors` of our folder holds the same keys, so it reads the same way;
* our folder (`config.json` + `diffusion_pytorch_model.safetensors`, `I2VAdapter.save_pretrained`), or a hub id
  holding one.

Write: our folder (`adapter.save_pretrained`) and the original single file (`save_original`: `.safetensors`, or
`.bin` / `.pt` through `torch.save`), which the reference code loads with `unet.load_state_dict(..., strict=False)`.

Inspect (`inspect_weights`, for `python -m adapter_studio inspect`): what a file or folder is without a model.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter_studio.errors import CheckpointError
from adapter_studio.files import read_state_dict

from .modeling_i2v_adapter import PARAMS, I2VAdapter, check_fits, spatial_self_attention_layers

ORIGINAL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# an optional prefix (`module.`, `unet.`), the attn1 layer's module path in the UNet, the parameter
_KEY = re.compile(r"^(?:.*?\.)?((?:down_blocks|mid_block|up_blocks)\..*\.attn1)\.(to_q_ff\.weight|to_out_ff\.weight|"
                  r"to_out_ff\.bias)$")


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The flat dict of a `.safetensors` file or of a pickle (through `weights_only=True`; `state_dict` unwrapped)."""
    obj = read_state_dict(path, "I2V-Adapter weights")
    return obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj


def layer_tensors(sd: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """`{attn1 module path: {"to_q_ff.weight": ..., "to_out_ff.weight": ..., "to_out_ff.bias": ...}}` of a state dict
    with the original names; raises `CheckpointError` when it holds none or a layer lacks one of the three."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _KEY.match(key)
        if m and isinstance(value, torch.Tensor):
            out.setdefault(m.group(1), {})[m.group(2)] = value
    if not out:
        raise CheckpointError("no I2V-Adapter weights in this state dict: expected keys '<layer>.attn1.to_q_ff.weight' "
                              f"and '<layer>.attn1.to_out_ff.weight/bias' under the UNet's module paths; found e.g. "
                              f"{sorted(sd)[:3]} ({len(sd)} keys)")
    incomplete = [f"{path}.{p}" for path, d in out.items() for p in PARAMS if p not in d]
    if incomplete:
        raise CheckpointError(f"I2V-Adapter weights lack {incomplete[:3]} ({len(incomplete)} tensors missing)")
    return out


def adapter_from_state_dict(sd: dict[str, Any], unet: nn.Module) -> I2VAdapter:
    """An `I2VAdapter` from a state dict with the original names, checked against `unet` before it is built.

    Raises:
        CheckpointError when the dict holds no I2V-Adapter weights; IncompatibleAdapterError (expected vs found)
        when `unet` is not a video UNet or the layers / shapes differ. `unet` is only read.
    """
    tensors = layer_tensors(sd)
    check_fits({path: {p: tuple(t.shape) for p, t in d.items()} for path, d in tensors.items()}, unet)
    layers = spatial_self_attention_layers(unet)
    paths = [p for p in layers if p in tensors]  # the UNet's order, whatever the file's
    if len(paths) < len(layers):
        warnings.warn(f"the I2V-Adapter weights cover {len(paths)} of this UNet's {len(layers)} spatial "
                      "self-attention layers; the others get no first-frame branch", UserWarning, stacklevel=3)
    adapter = I2VAdapter(layer_paths=paths, query_dims=[layers[p].to_q.in_features for p in paths],
                         inner_dims=[layers[p].to_q.out_features for p in paths],
                         out_dims=[layers[p].to_out[0].out_features for p in paths])
    adapter.load_state_dict({f"{path}.{p}": t for path, d in tensors.items() for p, t in d.items()}, strict=True)
    return adapter


def load_i2v_adapter(source: str | os.PathLike, unet: nn.Module) -> I2VAdapter:
    """An `I2VAdapter` for `unet` from an original-format file, our folder, or a hub id holding our folder.

    Raises:
        CheckpointError / IncompatibleAdapterError naming expected and found shapes; `unet` is never modified.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix not in ORIGINAL_SUFFIXES:
            raise CheckpointError(f"{str(path)!r} is not an I2V-Adapter file: expected one of "
                                  f"{', '.join(ORIGINAL_SUFFIXES)} or a save_pretrained folder")
        adapter = adapter_from_state_dict(read_weights(path), unet)
    else:
        adapter = _load_folder(str(source), unet)
    return adapter.to(device=unet.device, dtype=unet.dtype)


def _load_folder(folder: str, unet: nn.Module) -> I2VAdapter:
    local = Path(folder)
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{folder!r} is not an I2V-Adapter folder: no config.json (expected a "
                                  "save_pretrained folder or an original .safetensors / .bin file)")
        try:
            cls_name = json.loads(config.read_text()).get("_class_name")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config} is not valid JSON: {e}") from None
        if cls_name != I2VAdapter.__name__:
            raise CheckpointError(f"{folder!r} holds a {cls_name!r}, not an {I2VAdapter.__name__}")
    elif local.suffix in ORIGINAL_SUFFIXES or local.is_absolute():
        raise CheckpointError(f"I2V-Adapter weights {folder!r} do not exist")
    try:
        adapter = I2VAdapter.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as e:
        where = "folder" if local.is_dir() else "hub id (no such local file or folder)"
        why = str(e).splitlines()[0][:300]
        raise CheckpointError(f"cannot load the I2V-Adapter {where} {folder!r}: {why}") from None
    adapter.check_compatible(unet)
    return adapter


def original_state_dict(adapter: I2VAdapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the original release's names (they are its own state dict keys), on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}


def save_original(adapter: I2VAdapter, path: str | os.PathLike) -> Path:
    """Write the original single-file format: `.safetensors`, or `.bin` / `.pt` / `.pth` (`torch.save`, flat)."""
    path = Path(path)
    sd = original_state_dict(adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={"format": "pt"})
    elif path.suffix in (".bin", ".pt", ".pth"):
        torch.save(sd, str(tmp))
    else:
        raise CheckpointError(f"save_original writes .safetensors, .bin, .pt or .pth, got {path.name!r}")
    os.replace(tmp, path)
    return path


def inspect_weights(path: str | os.PathLike) -> dict[str, Any]:
    """What an I2V-Adapter file or folder is, without a model: format, variant, base (layers and widths),
    parameters, dtype.

    Raises CheckpointError when `path` is not an I2V-Adapter (`python -m adapter_studio inspect` asks every family).
    """
    path = Path(path)
    if path.is_dir():
        return _inspect_folder(path)
    if path.suffix not in ORIGINAL_SUFFIXES:
        raise CheckpointError(f"{path.name} is not an I2V-Adapter file (expected {', '.join(ORIGINAL_SUFFIXES)})")
    sd = read_weights(path)
    tensors = layer_tensors(sd)
    others = len(sd) - sum(len(d) for d in tensors.values())
    fmt = "original single file (.safetensors)" if path.suffix == ".safetensors" else f"original pickle ({path.suffix})"
    first = next(iter(tensors.values()))["to_q_ff.weight"]
    return {"format": fmt,
            "variant": f"inside a UNet checkpoint ({others} other keys ignored)" if others else "adapter weights",
            "base": _base({p: int(d["to_q_ff.weight"].shape[1]) for p, d in tensors.items()}),
            "parameters": sum(t.numel() for d in tensors.values() for t in d.values()),
            "dtype": str(first.dtype).removeprefix("torch.")}


def _inspect_folder(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} is not an I2V-Adapter folder (no config.json)")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON: {e}") from None
    if cfg.get("_class_name") != I2VAdapter.__name__:
        raise CheckpointError(f"{folder} holds a {cfg.get('_class_name')!r}, not an {I2VAdapter.__name__}")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        shapes = [f.get_slice(k).get_shape() for k in keys]
        dtype = f.get_slice(keys[0]).get_dtype() if keys else "?"
    base = _base(dict(zip(cfg.get("layer_paths") or [], cfg.get("query_dims") or [])))
    return {"format": "folder (save_pretrained)", "variant": "adapter weights",
            "base": {**base, "trained for": cfg.get("base_model") or "?"},
            "parameters": sum(math.prod(s) for s in shapes), "dtype": str(dtype).lower()}


def _base(widths: dict[str, int]) -> dict[str, Any]:
    """The base model a file was made for, as far as its layers say: how many spatial self-attentions, where, and
    their channel widths."""
    where = {part: sum(p.startswith(part) for p in widths) for part in ("down_blocks", "mid_block", "up_blocks")}
    return {"spatial self-attention layers": len(widths),
            "by block": ", ".join(f"{k.split('_')[0]} {v}" for k, v in where.items()),
            "channel widths": sorted(set(widths.values()))}
