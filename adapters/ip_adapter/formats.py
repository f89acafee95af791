"""Reading and writing IP-Adapter checkpoints in every format, with shape checks before anything is built.

Read:

* original tencent-ailab `.bin`: `torch.save({"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}})`,
  read with `torch.load(weights_only=True)`;
* original flattened `.safetensors`: the same keys with `image_proj.` / `ip_adapter.` prefixes (also what our own
  folder's `diffusion_pytorch_model.safetensors` holds, since the module uses the original names);
* diffusers-converted weights: a UNet state dict after `pipe.load_ip_adapter` (`encoder_hid_proj.
  image_projection_layers.{j}.*` + `{layer}.processor.to_k_ip.{j}.weight`), or `{"image_proj", "ip_adapter"}`
  whose projection keys carry diffusers' names (`image_embeds.weight`, `ff.net.0.proj`, `layers.0.ln0`, ...);
* our folder (`config.json` + `diffusion_pytorch_model.safetensors`, `IPAdapter.save_pretrained`).

Write: our folder (`adapter.save_pretrained`) and the original single file (`save_original`, `.bin` or
`.safetensors`), which diffusers' own `load_ip_adapter` reads.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from adapter_studio.errors import CheckpointError, IncompatibleAdapterError
from adapter_studio.files import read_state_dict

from .adapter import IPAdapter, check_cross_attention_dim, check_image_encoder, check_unet, cross_attention_layers

ORIGINAL_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


# ------------------------------------------------------------------------------------------------ reading files
def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The raw dict of a `.safetensors` (flat) or a pickle (through `weights_only=True`)."""
    return read_state_dict(path, "IP-Adapter weights")


def split_state_dict(sd: dict[str, Any], unet: nn.Module | None = None, index: int = 0) -> tuple[dict, dict]:
    """Any supported layout -> `(image_proj, ip_adapter)` with the original key names."""
    if "image_proj" in sd and "ip_adapter" in sd and isinstance(sd["image_proj"], dict):
        image_proj, ip = dict(sd["image_proj"]), dict(sd["ip_adapter"])
    elif any(k.startswith("image_proj.") for k in sd) and any(k.startswith("ip_adapter.") for k in sd):
        image_proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
        ip = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    elif any(k.startswith("encoder_hid_proj.image_projection_layers.") for k in sd):
        image_proj, ip = _from_diffusers_unet(sd, unet, index)
    else:
        raise CheckpointError("not an IP-Adapter checkpoint: expected keys 'image_proj' and 'ip_adapter' (original "
                              "format), 'image_proj.*'/'ip_adapter.*' (flattened) or 'encoder_hid_proj.*' (diffusers); "
                              f"found e.g. {sorted(sd)[:4]}")
    if _is_diffusers_proj(image_proj):
        image_proj = diffusers_proj_to_original(image_proj)
    if any("lora" in k for k in ip):
        raise CheckpointError("IP-Adapter FaceID checkpoints (with LoRA weights) are not supported")
    bad = [k for k in ip if not _IP_KEY.match(k)]
    if bad:
        raise CheckpointError(f"unexpected IP-Adapter attention keys {bad[:4]}; expected '<n>.to_k_ip.weight' and "
                              "'<n>.to_v_ip.weight'")
    return image_proj, ip


def _from_diffusers_unet(sd: dict[str, Any], unet: nn.Module | None, index: int) -> tuple[dict, dict]:
    prefix = f"encoder_hid_proj.image_projection_layers.{index}."
    image_proj = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not image_proj:
        found = sorted({k.split(".")[2] for k in sd if k.startswith("encoder_hid_proj.image_projection_layers.")})
        raise CheckpointError(f"the diffusers state dict has no IP-Adapter number {index}; it has {found}")
    if unet is None:
        raise CheckpointError("reading diffusers-converted IP-Adapter weights needs the UNet (for the layer order)")
    ip = {}
    for i, name in enumerate(cross_attention_layers(unet)):
        for kind in ("to_k_ip", "to_v_ip"):
            key = f"{name}.{kind}.{index}.weight"
            if key in sd:
                ip[f"{2 * i + 1}.{kind}.weight"] = sd[key]
    if not ip:
        raise CheckpointError("the diffusers state dict holds no to_k_ip/to_v_ip weights for this UNet's layers")
    return image_proj, ip


def _is_diffusers_proj(p: dict[str, Any]) -> bool:
    return any(k.startswith(("image_embeds.", "ff.net.")) or ".ln0." in k or ".attn.to_q" in k for k in p)


def diffusers_proj_to_original(p: dict[str, Any]) -> dict[str, Any]:
    """diffusers' projection names (`ImageProjection`, `IPAdapterFullImageProjection`,
    `IPAdapterPlusImageProjection`) -> the original ones."""
    if "image_embeds.weight" in p:
        return {k.replace("image_embeds.", "proj."): v for k, v in p.items()}
    if "ff.net.0.proj.weight" in p and "latents" not in p:
        if p["ff.net.2.weight"].shape[0] != p["norm.weight"].shape[0]:
            raise CheckpointError("IP-Adapter FaceID projections are not supported")
        names = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2.", "norm.": "proj.3."}
        return {_swap_prefix(k, names): v for k, v in p.items()}
    out: dict[str, Any] = {}
    pending: dict[str, dict[str, Any]] = {}
    for k, v in p.items():
        m = re.match(r"^layers\.(\d+)\.(.*)$", k)
        if not m:
            out[k] = v
            continue
        i, rest = m.groups()
        table = {"ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
                 "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
        if rest.startswith(("attn.to_k.", "attn.to_v.")):
            pending.setdefault(i, {})[rest.split(".")[1]] = v
            continue
        new = _swap_prefix(rest, table)
        if new == rest:
            raise CheckpointError(f"unknown key {k!r} in a diffusers IP-Adapter Plus projection")
        out[f"layers.{i}.{new}"] = v
    for i, kv in pending.items():  # the original stacks keys and values in one `to_kv`
        out[f"layers.{i}.0.to_kv.weight"] = torch.cat([kv["to_k"], kv["to_v"]], dim=0)
    return out


def _swap_prefix(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


# ------------------------------------------------------------------------------------------------ config from keys
def projection_config(image_proj: dict[str, Any]) -> dict[str, Any]:
    """The projection part of the `IPAdapter` config a checkpoint describes (no UNet needed)."""
    shape = lambda k: tuple(image_proj[k].shape)  # noqa: E731
    if "proj.weight" in image_proj:
        if "norm.weight" not in image_proj:
            raise CheckpointError("IP-Adapter base projection lacks 'norm.weight'")
        cad = shape("norm.weight")[0]
        out_f, emb = shape("proj.weight")
        if out_f % cad:
            raise CheckpointError(f"IP-Adapter projection 'proj.weight' {[out_f, emb]} is not a multiple of the "
                                  f"token width {cad}")
        cfg = dict(projection="base", image_embed_dim=emb, cross_attention_dim=cad, num_tokens=out_f // cad)
    elif "proj.3.weight" in image_proj:
        cfg = dict(projection="full", image_embed_dim=shape("proj.0.weight")[1],
                   cross_attention_dim=shape("proj.3.weight")[0], num_tokens=0)
    elif "latents" in image_proj:
        _, queries, dim = shape("latents")
        depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
        inner = shape("layers.0.0.to_q.weight")[0]
        dim_head = 64 if inner % 64 == 0 else inner  # the original files do not record it; every release uses 64
        cfg = dict(projection="plus", image_embed_dim=shape("proj_in.weight")[1],
                   cross_attention_dim=shape("proj_out.weight")[0], num_tokens=queries, resampler_dim=dim,
                   resampler_depth=depth, resampler_heads=inner // dim_head, resampler_dim_head=dim_head,
                   resampler_ff_mult=shape("layers.0.1.1.weight")[0] / dim)
    elif "perceiver_resampler.proj_in.weight" in image_proj or "proj.0.weight" in image_proj:
        raise CheckpointError("IP-Adapter FaceID checkpoints are not supported (they need InsightFace embeddings)")
    else:
        raise CheckpointError(f"unknown IP-Adapter projection with keys {sorted(image_proj)[:4]}")
    return cfg


def infer_config(image_proj: dict[str, Any], ip: dict[str, Any], unet: nn.Module) -> dict[str, Any]:
    """The `IPAdapter` config a checkpoint describes, with layer names taken from `unet` (original numbering)."""
    cfg = projection_config(image_proj)
    keys = sorted({int(_IP_KEY.match(k).group(1)) for k in ip})
    layers = cross_attention_layers(unet)
    hidden = []
    for n in keys:
        k, v = ip.get(f"{n}.to_k_ip.weight"), ip.get(f"{n}.to_v_ip.weight")
        if k is None or v is None:
            raise CheckpointError(f"IP-Adapter layer {n} lacks to_k_ip or to_v_ip")
        if k.shape != v.shape or k.ndim != 2:
            raise CheckpointError(f"IP-Adapter layer {n}: to_k_ip {list(k.shape)} and to_v_ip {list(v.shape)} differ")
        if k.shape[1] != cfg["cross_attention_dim"]:
            raise CheckpointError(f"IP-Adapter layer {n}: to_k_ip reads width {k.shape[1]}, its projection gives "
                                  f"{cfg['cross_attention_dim']}")
        hidden.append(int(k.shape[0]))
    check_cross_attention_dim(cfg["cross_attention_dim"], unet)
    expected = [2 * i + 1 for i in range(len(layers))]
    if keys != expected:
        raise IncompatibleAdapterError(
            f"IP-Adapter has {len(keys)} cross-attention layers (keys {_span(keys)}), this UNet has {len(layers)} "
            f"(expected keys {_span(expected)}): it was made for another UNet architecture")
    cfg.update(layer_names=list(layers), hidden_sizes=hidden, layer_keys=keys)
    return cfg


def _span(keys: list[int]) -> str:
    return f"{keys[0]}..{keys[-1]}" if len(keys) > 1 else str(keys)


# ------------------------------------------------------------------------------------------------ load / save
def load_ip_adapter(source: str | os.PathLike | dict[str, Any], unet: nn.Module | None = None,
                    image_encoder: Any = None, index: int = 0) -> IPAdapter:
    """An `IPAdapter` from any supported format, checked against `unet` (and the image encoder) first.

    Args:
        source: a file (`.bin`, `.safetensors`), our folder, a folder holding one IP-Adapter file, or a state dict.
        unet: the UNet it will run on (needed for the original formats' layer numbering; always checked).
        image_encoder: when given, its output width must match the projection's input.
        index: which adapter of a diffusers UNet state dict holding several.

    Raises:
        CheckpointError / IncompatibleAdapterError naming expected and found shapes. Nothing is modified on error.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        if (folder / "config.json").is_file():
            return _load_folder(folder, unet, image_encoder)
        files = [p for p in sorted(folder.iterdir()) if p.suffix in ORIGINAL_SUFFIXES]
        if len(files) != 1:
            raise CheckpointError(f"{str(folder)!r} is neither an IP-Adapter folder (config.json) nor a folder with "
                                  f"one weights file; found {[p.name for p in files]}")
        source = files[0]
    if isinstance(source, dict):
        sd = source
    elif Path(source).exists():
        sd = read_weights(source)
    else:
        try:  # a hub id: our folder format through diffusers' own resolution (cache / offline mode apply)
            return _load_folder(str(source), unet, image_encoder)
        except OSError as e:
            raise CheckpointError(f"IP-Adapter weights {str(source)!r} are neither a local file/folder nor a "
                                  f"reachable hub id: {e}") from e
    if unet is None:
        raise CheckpointError("loading an original-format IP-Adapter needs the UNet it will run on")
    image_proj, ip = split_state_dict(sd, unet, index)
    cfg = infer_config(image_proj, ip, unet)
    probe = SimpleNamespace(**{**_defaults(), **cfg})
    check_unet(probe, unet)
    check_image_encoder(probe, image_encoder)
    adapter = IPAdapter(**cfg)
    state = {f"image_proj.{k}": v for k, v in image_proj.items()}
    state.update({f"ip_adapter.{k}": v for k, v in ip.items()})
    _load_strict(adapter, state)
    return adapter.to(dtype=next(iter(image_proj.values())).dtype)


def _defaults() -> dict[str, Any]:
    return {"resampler_dim": None, "resampler_depth": 4, "resampler_heads": None, "resampler_dim_head": 64,
            "resampler_ff_mult": 4.0, "layer_keys": None}


def _load_strict(adapter: IPAdapter, state: dict[str, torch.Tensor]) -> None:
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [(k, list(own[k].shape), list(state[k].shape)) for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if extra:
            parts.append(f"unexpected {extra[:4]}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: expected {e}, found {f}" for k, e, f in wrong[:4]))
        raise CheckpointError("IP-Adapter weights do not fit their own config: " + "; ".join(parts))
    adapter.load_state_dict(state, strict=True)


def _load_folder(folder: str | Path, unet: nn.Module | None, image_encoder: Any) -> IPAdapter:
    try:
        config = IPAdapter.load_config(str(folder))
    except (OSError, json.JSONDecodeError) as e:
        raise OSError(str(e)) from e
    if config.get("_class_name") not in (None, "IPAdapter"):
        raise CheckpointError(f"{str(folder)!r} holds a {config.get('_class_name')}, not an IPAdapter")
    probe = SimpleNamespace(**{**_defaults(), **{k: v for k, v in config.items() if not k.startswith("_")}})
    if unet is not None:
        check_unet(probe, unet)
    check_image_encoder(probe, image_encoder)
    try:
        return IPAdapter.from_pretrained(str(folder))
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the IP-Adapter folder {str(folder)!r}: {e}") from e
    except OSError as e:  # a local folder diffusers cannot read (a refused pickle, a truncated file) is our error
        if not Path(folder).is_dir():
            raise  # a hub id that did not resolve: the caller says so
        raise CheckpointError(f"cannot load the IP-Adapter folder {str(folder)!r}: {str(e).splitlines()[0][:300]} "
                              "(expected config.json + diffusion_pytorch_model.safetensors, as save_pretrained "
                              "writes)") from None


def original_state_dict(adapter: IPAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}` — the original layout."""
    sd = adapter.state_dict()
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        part, rest = k.split(".", 1)
        out[part][rest] = v.detach().cpu().contiguous()
    return out


def save_original(adapter: IPAdapter, path: str | os.PathLike) -> Path:
    """Write the original single-file format: `.bin` (torch.save of the nested dict) or `.safetensors` (flattened).

    Warns when diffusers' loader would not read the file back the same way (it assumes 4 base tokens, resampler
    depth 4 and 64 channels per head).
    """
    path = Path(path)
    cfg = adapter.config
    if cfg.projection == "base" and cfg.num_tokens != 4:
        warnings.warn(f"diffusers' load_ip_adapter assumes 4 tokens for base IP-Adapters; this one has {cfg.num_tokens}")
    if cfg.projection == "plus" and (cfg.resampler_depth != 4 or cfg.resampler_dim_head != 64):
        warnings.warn("diffusers' load_ip_adapter assumes resampler depth 4 with 64 channels per head")
    nested = original_state_dict(adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
        save_file(flat, str(tmp), metadata={"format": "pt"})
    elif path.suffix in (".bin", ".pt", ".pth"):
        torch.save(nested, str(tmp))
    else:
        raise CheckpointError(f"save_original writes .bin or .safetensors, got {path.name!r}")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ inspecting
def inspect_weights(path: str | os.PathLike) -> dict[str, Any]:
    """What an IP-Adapter file or folder is, without a model: format, variant, base widths, parameters, dtype.

    Raises CheckpointError when `path` is not an IP-Adapter (`python -m adapter_studio inspect` asks every family).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _inspect_folder(path)
        files = [p for p in sorted(path.iterdir()) if p.suffix in ORIGINAL_SUFFIXES]
        if len(files) != 1:
            raise CheckpointError(f"{path} holds no IP-Adapter config.json and not exactly one weights file")
        path = files[0]
    sd = read_weights(path)
    if any(k.startswith("encoder_hid_proj.image_projection_layers.") for k in sd):
        # the layer numbering needs the UNet; the projection and the per-layer weights can be read without it
        prefix = "encoder_hid_proj.image_projection_layers.0."
        image_proj = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        ip = {k: v for k, v in sd.items() if ".to_k_ip.0." in k or ".to_v_ip.0." in k}
        fmt = "diffusers UNet state dict (encoder_hid_proj + to_k_ip/to_v_ip)"
        if _is_diffusers_proj(image_proj):
            image_proj = diffusers_proj_to_original(image_proj)
    else:
        image_proj, ip = split_state_dict(sd)
        fmt = "original nested .bin" if "image_proj" in sd else "original flat (image_proj.* / ip_adapter.*)"
    cfg = projection_config(image_proj)
    tensors = [*image_proj.values(), *ip.values()]
    return {"format": fmt, "variant": cfg["projection"],
            "base": {"cross_attention_dim": cfg["cross_attention_dim"], "cross-attention layers": len(ip) // 2,
                     "image encoder width": cfg["image_embed_dim"]},
            "image tokens": cfg["num_tokens"] or 257, "parameters": sum(t.numel() for t in tensors),
            "dtype": str(tensors[0].dtype).removeprefix("torch.")}


def _inspect_folder(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
    if config.get("_class_name") != "IPAdapter":
        raise CheckpointError(f"{folder} holds a {config.get('_class_name')!r}, not an IPAdapter")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype() if shapes else "?"
    return {"format": "folder (save_pretrained)", "variant": config.get("projection"),
            "base": {"cross_attention_dim": config.get("cross_attention_dim"),
                     "cross-attention layers": len(config.get("layer_names") or []),
                     "image encoder width": config.get("image_embed_dim")},
            "image tokens": config.get("num_tokens") or 257,
            "parameters": sum(_prod(s) for s in shapes.values()), "dtype": str(dtype).lower()}


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
