"""The AGD family for the studio registry: load an adapter from any supported file, read its mix inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adapter_studio.errors import CheckpointError, MixError
from adapter_studio.family import Family, Field, TrainingScript, Weights, WeightsFile

from .modeling_agd import AGDAdapter
from .upstream import adapter_from_upstream, read_upstream_file
from .upstream import infer_config as upstream_config

UPSTREAM_SUFFIXES = (".pt", ".pth", ".ckpt")


def load(weights: Weights, pipe: Any) -> AGDAdapter:
    """The family loader: `weights["weights"]` through `load_agd`."""
    return load_agd(weights.get("weights") or "", pipe)


def load_agd(weights: str, pipe: Any) -> AGDAdapter:
    """An `AGDAdapter` fitted to `pipe.unet` from:

    * a folder written by `save_pretrained` (`config.json` + `diffusion_pytorch_model.safetensors`), or a
      `.safetensors` file inside one;
    * an upstream AGD checkpoint `.pt` / `.pth` / `.ckpt` (read with `weights_only=True`);
    * a hub id holding such a folder (through `from_pretrained`).

    Raises CheckpointError / IncompatibleAdapterError (expected vs found) without touching `pipe`.
    """
    if not weights:
        raise CheckpointError("the AGD unit needs weights: a save_pretrained folder or an upstream .pt file")
    path = Path(weights)
    unet = pipe.unet
    if path.is_file() and path.suffix in UPSTREAM_SUFFIXES:
        adapter = adapter_from_upstream(path, unet)
    else:
        folder = path.parent if path.is_file() and path.suffix == ".safetensors" else path
        if folder.exists() and not (folder / "config.json").is_file():
            raise CheckpointError(f"{weights} is not an AGD adapter: no config.json next to the weights (expected a "
                                  f"save_pretrained folder or an upstream {'/'.join(UPSTREAM_SUFFIXES)} file)")
        if (folder / "config.json").is_file():
            try:
                cls_name = json.loads((folder / "config.json").read_text()).get("_class_name")
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
            if cls_name != AGDAdapter.__name__:
                raise CheckpointError(f"{folder} holds a {cls_name!r}, not an {AGDAdapter.__name__}")
        try:
            adapter = AGDAdapter.from_pretrained(str(folder))
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"could not load the AGD adapter {weights}: {str(e).splitlines()[0][:300]}") from None
        adapter.check_compatible(unet)
    return adapter.to(device=unet.device, dtype=unet.dtype)


def inspect_agd(path: Path) -> dict[str, Any]:
    """What an AGD folder or upstream checkpoint is, without a model (for `python -m adapter_studio inspect`)."""
    path = Path(path)
    folder = path.parent if path.is_file() and path.suffix == ".safetensors" else path
    if path.is_file() and path.suffix in UPSTREAM_SUFFIXES:
        model = read_upstream_file(path)
        cfg = upstream_config(model)
        tensors = [t for sd in model.values() for t in sd.values()]
        return {"format": "upstream .pt (cristianpjensen/agd)", "variant": cfg["arch"],
                "base": {"cross-attention layers": len(model), "time embedding width": cfg.get("timestep_dim"),
                         "prompt width": cfg.get("prompt_dim")},
                "hidden width": cfg["hidden_dim"], "parameters": sum(t.numel() for t in tensors),
                "dtype": str(tensors[0].dtype).removeprefix("torch.")}
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path} is neither an AGD folder (config.json) nor an upstream "
                              f"{'/'.join(UPSTREAM_SUFFIXES)} file")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
    if config.get("_class_name") != AGDAdapter.__name__:
        raise CheckpointError(f"{folder} holds a {config.get('_class_name')!r}, not an {AGDAdapter.__name__}")
    from safetensors import safe_open

    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors")
    with safe_open(str(weights), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype() if shapes else "?"
    return {"format": "folder (save_pretrained)", "variant": config.get("arch"),
            "base": {"cross-attention layers": len(config.get("layer_paths") or []),
                     "time embedding width": config.get("timestep_dim"), "prompt width": config.get("prompt_dim"),
                     "trained for": config.get("base_model") or "?"},
            "hidden width": config.get("hidden_dim"),
            "parameters": sum(math.prod(s) for s in shapes), "dtype": str(dtype).lower()}


def _save_folder(adapter: AGDAdapter, path: Path) -> Path:
    adapter.save_pretrained(path)
    return Path(path)


def agd_inputs_from_json(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Mix inputs of an AGD unit: optional `guidance_scale` (w; default: the call's guidance scale)."""
    unknown = set(inputs) - {"guidance_scale"}
    if unknown:
        raise MixError(f"AGD unit inputs: unknown keys {sorted(unknown)}; allowed: guidance_scale")
    out = {}
    if "guidance_scale" in inputs:
        w = inputs["guidance_scale"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MixError(f"AGD unit inputs: guidance_scale must be a number, got {w!r}")
        out["guidance_scale"] = float(w)
    return out


FAMILY = Family(
    name="agd", label="AGD guidance", loader=load, inputs_from_json=agd_inputs_from_json, order=40,
    guidance=AGDAdapter.guidance_mode, model_kinds=("sd15", "sdxl"),
    weights=(WeightsFile(config_classes=("AGDAdapter",)),),
    help="Replaces classifier-free guidance: one UNet pass per step; w is the guidance scale it was distilled for.",
    fields=(
        Field("guidance_scale", "number", "Guidance w", target="guidance", default=5.0, minimum=1.0, maximum=20.0,
              step=0.5, info="the AGD adapter's guidance scale (replaces the CFG scale)"),
    ),
    training=(
        TrainingScript("train/agd_trajectories.py", "agd*_trajectories.yaml", data_key=None,
                       produces_adapter=False),
        TrainingScript("train/agd.py", "agd*.yaml", data_key="trajectories"),
    ),
    comfy_nodes=("AdapterStudioAGDLoader", "AdapterStudioApplyAGD"),
    inspect=inspect_agd,
    writers={"folder": _save_folder},  # upstream's .pt is a pickle: read safely, never written
)
AGD_FAMILY = FAMILY
