"""Reading upstream AGD checkpoints (cristianpjensen/agd) safely.

Upstream saves `torch.save({"model": {module_path: state_dict}}, "NNNNNNN.pt")`, one state dict per adapted attn2
module (e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2`). We read it with `weights_only=True` and map
it onto an `AGDAdapter` whose per-layer parameter names are the upstream ones.

Upstream's SD/SDXL script adapts the attn2 layers of `layers_per_block` attentions per up block (one fewer than the
up blocks have), so an upstream checkpoint may cover a subset of the UNet's attn2 layers: the adapter built from it
covers exactly the layers the checkpoint holds. Only the "attention" and "additive" architectures are read;
upstream's "mlp_gate" / "learned_pos_emb" variants and class-label conditioning (DiT) are not part of the studio.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from adapter_studio.errors import CheckpointError, IncompatibleAdapterError

from .modeling_agd import AGDAdapter, cross_attention_layers

# buffers upstream stores that we rebuild from the config (checked for shape, not copied)
_REBUILT = ("pos_enc.pe",)


def read_upstream_file(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """`{module_path: state_dict}` of an upstream `.pt`, read with `weights_only=True`; CheckpointError otherwise."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"AGD checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{path} is not a readable AGD checkpoint: torch.load(weights_only=True) failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Expected a torch.save'd {{'model': {{module_path: state_dict}}}}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or not obj["model"]:
        found = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected an upstream AGD checkpoint {{'model': {{module_path: state_dict}}}}, "
                              f"found {found}")
    model = obj["model"]
    for name, sd in model.items():
        if not isinstance(name, str) or not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: entry {name!r} of 'model' is not a state dict of tensors")
    return model


def infer_config(model: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """AGDAdapter config fields (except layers) from the key names and shapes of an upstream checkpoint."""
    name, sd = next(iter(model.items()))
    keys = set(sd)
    freq = sd.get("guidance_scale_embedder.net.0.frequencies")
    if freq is None:
        raise CheckpointError(f"upstream AGD layer {name!r} has no guidance_scale_embedder: keys {sorted(keys)[:6]}")
    hidden = int(freq.shape[0])
    if "q_proj.weight" in keys:
        arch = "attention"
        mlp_w = sd["guidance_scale_embedder.net.1.net.0.weight"]
    elif "out_proj.net.0.weight" in keys:
        arch = "additive"
        mlp_w = sd["guidance_scale_embedder.net.1.net.0.weight"]
    else:
        raise CheckpointError(
            f"upstream AGD layer {name!r} is neither the 'attention' nor the 'additive' adapter (keys "
            f"{sorted(keys)[:6]}...); the studio reads only those two architectures")
    if any(k.startswith(("class_proj", "class_embedder", "timestep_embedder.")) for k in keys):
        raise CheckpointError(f"upstream AGD layer {name!r} uses class-label or its own timestep encoder (DiT); "
                              "the studio reads the UNet (SD/SDXL) checkpoints only")
    cfg = dict(hidden_dim=hidden, arch=arch, mlp_ratio=mlp_w.shape[0] / hidden,
               timestep_dim=int(sd["timestep_proj.weight"].shape[1]) if "timestep_proj.weight" in keys else None,
               prompt_dim=int(sd["prompt_proj.weight"].shape[1]) if "prompt_proj.weight" in keys else None)
    if arch == "attention":
        cfg["qkv_bias"] = "q_proj.bias" in keys
        if "pos_enc.pe" in keys:
            cfg["max_len"] = int(sd["pos_enc.pe"].shape[0])
    return cfg


def _input_dim(sd: dict[str, torch.Tensor], arch: str) -> int:
    return int(sd["q_proj.weight"].shape[1] if arch == "attention" else sd["out_proj.net.4.weight"].shape[0])


def upstream_to_state_dict(adapter: AGDAdapter, model: dict[str, dict[str, torch.Tensor]],
                           source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The adapter's full state dict from upstream per-module dicts; raises before anything is changed.

    Every upstream layer must be one of the adapter's layers and every tensor must have the expected shape
    (errors name both); layers of the adapter the checkpoint lacks keep their current (zero-output) weights.
    """
    current = adapter.state_dict()
    index = {p: i for i, p in enumerate(adapter.layer_paths)}
    out = dict(current)
    for path, sd in model.items():
        if path not in index:
            raise IncompatibleAdapterError(
                f"{source}: layer {path!r} is not an attn2 layer of this adapter/UNet; it has "
                f"{adapter.layer_paths[:3]}... ({len(index)} layers)")
        prefix = f"blocks.{index[path]}."
        expected = {k[len(prefix):]: v for k, v in current.items() if k.startswith(prefix)}
        given = {k: v for k, v in sd.items() if k not in _REBUILT}
        if set(given) != set(expected):
            raise CheckpointError(
                f"{source}: layer {path!r} keys do not fit: missing {sorted(set(expected) - set(given))[:4]}, "
                f"unexpected {sorted(set(given) - set(expected))[:4]}")
        for k, v in sd.items():
            ref = expected.get(k)
            if k in _REBUILT:
                blk = adapter.blocks[index[path]]
                pe = blk.pos_enc.pe if hasattr(blk, "pos_enc") else None
                if pe is not None and v.shape[-1] != pe.shape[-1]:
                    raise IncompatibleAdapterError(
                        f"{source}: {path}.{k} has shape {tuple(v.shape)}, expected (*, {pe.shape[-1]})")
                continue
            if tuple(v.shape) != tuple(ref.shape):
                raise IncompatibleAdapterError(
                    f"{source}: {path}.{k} has shape {tuple(v.shape)}, the adapter expects {tuple(ref.shape)}")
            out[prefix + k] = v.to(ref.dtype)
    return out


def adapter_from_upstream(path: str | os.PathLike, unet: nn.Module, **overrides: Any) -> AGDAdapter:
    """A new `AGDAdapter` for `unet` holding the weights of upstream checkpoint `path`.

    The layers are the checkpoint's module paths, which must be attn2 layers of `unet` of the checkpoint's widths
    (IncompatibleAdapterError names expected and found widths). `overrides` set config fields the file cannot tell
    (e.g. `num_heads`; upstream's SD scripts always use 1).
    """
    model = read_upstream_file(path)
    cfg = {**infer_config(model), **overrides}
    layers = cross_attention_layers(unet)
    unknown = [p for p in model if p not in layers]
    if unknown:
        raise IncompatibleAdapterError(
            f"{path}: module {unknown[0]!r} is not an attn2 layer of this UNet (it has {list(layers)[:3]}... "
            f"{len(layers)} attn2 layers); the checkpoint was made for another base model")
    paths = [p for p in layers if p in model]  # the UNet's order
    dims = []
    for p in paths:
        found, want = _input_dim(model[p], cfg["arch"]), layers[p].to_q.in_features
        if found != want:
            raise IncompatibleAdapterError(f"{path}: layer {p!r} was trained for width {found}, "
                                           f"this UNet's attn2 there has width {want}")
        dims.append(want)
    adapter = AGDAdapter(layer_paths=paths, input_dims=dims, base_model=f"upstream:{os.path.basename(str(path))}", **cfg)
    adapter.check_compatible(unet)
    adapter.load_state_dict(upstream_to_state_dict(adapter, model, source=str(path)))
    return adapter.eval()


def load_upstream_into(adapter: AGDAdapter, path: str | os.PathLike) -> AGDAdapter:
    """Load upstream weights into an existing adapter; on any error the adapter is left exactly as it was."""
    model = read_upstream_file(path)
    sd = upstream_to_state_dict(adapter, model, source=str(path))  # validates everything first
    adapter.load_state_dict(sd)
    return adapter


def adapter_to_upstream(adapter: AGDAdapter) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """The upstream checkpoint structure `{"model": {module_path: state_dict}}` of `adapter` (for interop tests)."""
    model: dict[str, dict[str, torch.Tensor]] = {}
    for i, path in enumerate(adapter.layer_paths):
        blk = adapter.blocks[i]
        sd = {k: v.detach().cpu().clone() for k, v in blk.state_dict().items()}
        if hasattr(blk, "pos_enc"):
            sd["pos_enc.pe"] = blk.pos_enc.pe.detach().cpu().clone()  # upstream stores the table
        model[path] = sd
    return {"model": model}
