"""Reading ControlNets, Ctrl-Adapters and routers in every supported format, with shape checks before anything runs.

ControlNets (through diffusers' own readers):

* a diffusers folder (`config.json` + weights) or hub id: `ControlNetModel.from_pretrained`;
* a single file (`.safetensors`, `.ckpt`, `.pth`, `.bin`: the original lllyasviel releases, or diffusers-named keys):
  `ControlNetModel.from_single_file`, its config from `config=` (a diffusers ControlNet folder or hub id), a
  `config.json` beside the file, or diffusers' lookup (the hub or its cache). Pickles load with `weights_only=True`.

Ctrl-Adapters:

* our folder: `CtrlAdapterModel.save_pretrained` (`config.json` + `diffusion_pytorch_model.safetensors`), with the
  router in `router/` (`CtrlRouter.save_pretrained`);
* the released Ctrl-Adapter folders (`ControlNetAdapter` config: `backbone_model_name`, `add_adapter_location_*`,
  `num_adapters_per_location`, ...; weights `down_blocks_adapter.{i}...`, `mid_block_adapter...`), their router
  (`ControlNetRouter`, `down_blocks_router.{i}.wg.weight`) in `router/` or given apart. Their state dicts are our
  module's, key for key; the config is translated against the actual ControlNet and UNet, and every shape is checked.

`inspect_ctrl` describes any of them without building a model (`python -m adapter_studio inspect`): a ControlNet by
its prompt width and block widths (from its config, or from the tensor shapes of a single file in diffusers' or the
original key layout), an adapter by the residuals it reads and writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from adapter_studio.errors import CheckpointError, IncompatibleAdapterError

from .adapter import CtrlAdapter
from .modeling_ctrl_adapter import CtrlAdapterModel
from .residuals import ResidualLayout, select_residuals
from .router import CtrlRouter

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# ------------------------------------------------------------------------------------------------ ControlNets
def load_controlnet(source: str | os.PathLike | nn.Module, config: str | None = None,
                    torch_dtype: torch.dtype | None = None) -> nn.Module:
    """A diffusers `ControlNetModel` from a folder, a hub id or a single file (see the module docstring)."""
    from diffusers import ControlNetModel

    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"ControlNet {str(path)!r}: a single file must be one of "
                                  f"{', '.join(SINGLE_FILE_SUFFIXES)}")
        if config is None and (path.parent / "config.json").is_file():
            config = str(path.parent)
        try:
            return ControlNetModel.from_single_file(str(path), config=config, **kwargs).eval()
        except Exception as e:  # noqa: BLE001  diffusers raises several kinds; name the file and the way out
            hint = "" if config else (" — diffusers looks its config up on the hub (or its cache); give config= a "
                                      "diffusers ControlNet folder or hub id, or put a config.json beside the file")
            raise CheckpointError(f"cannot read the ControlNet {str(path)!r}: {type(e).__name__}: {e}{hint}") from e
    if path.is_dir():
        cfg = _read_config(path)
        if cfg is None:
            files = [p.name for p in path.iterdir() if p.suffix in SINGLE_FILE_SUFFIXES]
            if len(files) == 1:
                return load_controlnet(path / files[0], config, torch_dtype)
            raise CheckpointError(f"{str(path)!r} is neither a diffusers ControlNet folder (config.json) nor a folder "
                                  f"with one weights file; found {files}")
        if cfg.get("_class_name") in ("CtrlAdapterModel", "ControlNetAdapter"):
            raise CheckpointError(f"{str(path)!r} is a Ctrl-Adapter, not a ControlNet: give it as the unit's "
                                  "'adapter', with the ControlNet it reads as 'controlnet'")
        if cfg.get("_class_name") not in (None, "ControlNetModel"):
            raise CheckpointError(f"{str(path)!r} holds a {cfg.get('_class_name')}, not a ControlNetModel")
    try:
        return ControlNetModel.from_pretrained(str(source), **kwargs).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the ControlNet {str(source)!r} (a diffusers folder, a hub id or a single "
                              f"file): {e}") from e


# ------------------------------------------------------------------------------------------------ adapters
def _read_config(folder: Path) -> dict[str, Any] | None:
    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(f)!r} is not valid JSON: {e}") from e


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        f = folder / name
        if f.is_file():
            try:
                if f.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    return load_file(str(f))
                return torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot read {str(f)!r}: {e}") from e
    raise CheckpointError(f"{str(folder)!r} has no {' or '.join(WEIGHT_NAMES)}")


def upstream_adapter_config(cfg: dict[str, Any], controlnet_config: Any, unet_config: Any) -> dict[str, Any]:
    """Our `CtrlAdapterModel` config for a released `ControlNetAdapter` config, against the actual ControlNet and
    target UNet (the release sizes its blocks from SD1.5's channels; they must be the ControlNet's and the target's)."""
    if cfg.get("num_repeats", 1) != 1:
        raise CheckpointError("Ctrl-Adapter checkpoints with num_repeats > 1 (experimental in the release) are not "
                              "supported")
    if cfg.get("adapter_type", "spatial_temporal_resnet_transformer") != "spatial_temporal_resnet_transformer":
        raise CheckpointError(f"unknown Ctrl-Adapter adapter_type {cfg['adapter_type']!r}")
    src, tgt = ResidualLayout.from_config(controlnet_config), ResidualLayout.from_config(unet_config)
    locations = "".join(x for x in "ABCDM" if cfg.get(f"add_adapter_location_{x}"))
    if any(lv > 3 for lv in src.levels) or len(set(src.levels)) != 4:
        raise IncompatibleAdapterError(f"released Ctrl-Adapters read an SD1.5-shaped ControlNet (4 resolution levels, "
                                       f"12 residuals); this ControlNet has {src.describe()}")
    down_ids, add_mid = select_residuals(src.levels, locations, int(cfg.get("num_adapters_per_location", 3)))
    if down_ids and max(down_ids) >= len(tgt):
        raise IncompatibleAdapterError(f"this Ctrl-Adapter writes residuals {down_ids} (locations {locations}); this "
                                       f"UNet takes {len(tgt)}: it was made for another target model")
    for i in down_ids:  # the release keeps channels: source and target must agree
        if src.channels[i] != tgt.channels[i]:
            raise IncompatibleAdapterError(f"this Ctrl-Adapter keeps residual {i} at {src.channels[i]} channels; this "
                                           f"UNet's residual {i} has {tgt.channels[i]}: made for another target")
    return dict(source_channels=list(src.channels), source_mid_channels=src.mid_channels,
                target_channels=list(tgt.channels), target_levels=list(tgt.levels),
                target_mid_channels=tgt.mid_channels, target_mid_level=tgt.mid_level, down_ids=down_ids,
                add_mid=add_mid, cross_attention_dim=cfg.get("cross_attention_dim") or 1024,
                num_blocks=int(cfg.get("num_blocks", 2)),
                add_spatial_resnet=bool(cfg.get("add_spatial_resnet", True)),
                add_temporal_resnet=bool(cfg.get("add_temporal_resnet", False)),
                add_spatial_transformer=bool(cfg.get("add_spatial_transformer", True)),
                add_temporal_transformer=bool(cfg.get("add_temporal_transformer", False)),
                # not in the released configs (fixed at 8 x 64 there); read when a config carries them
                num_attention_heads=int(cfg.get("num_attention_heads", 8)),
                attention_head_dim=int(cfg.get("attention_head_dim", 64)),
                # the release runs the SD1.5 ControlNet at 512 px under SDXL at 1024 px and upsamples 2x
                source_scale=0.5 if cfg.get("backbone_model_name") == "sdxl" else 1.0)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [(k, list(own[k].shape), list(state[k].shape))
             for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append("shapes: " + ", ".join(f"{k} expected {e}, found {f}" for k, e, f in wrong[:4]))
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
        raise IncompatibleAdapterError(f"{what} does not fit this ControlNet and UNet: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_adapter_model(source: str | os.PathLike, controlnet_config: Any, unet_config: Any) -> CtrlAdapterModel:
    """A `CtrlAdapterModel` from our folder, a released folder, or a hub id (our format), checked against the
    ControlNet and the target UNet."""
    folder = Path(source)
    if not folder.is_dir():
        try:  # a hub id: our format through diffusers' own resolution (cache / offline mode apply)
            model = CtrlAdapterModel.from_pretrained(str(source))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"Ctrl-Adapter {str(source)!r} is neither a local folder nor a reachable hub id: "
                                  f"{e}") from e
        model.check_fits(controlnet_config, unet_config)
        return model
    cfg = _read_config(folder)
    if cfg is None:
        raise CheckpointError(f"{str(folder)!r} is not a Ctrl-Adapter folder: no config.json")
    kind = cfg.get("_class_name")
    if kind == "CtrlAdapterModel":
        init = {k: v for k, v in cfg.items() if not k.startswith("_")}
    elif kind == "ControlNetAdapter" or "add_adapter_location_A" in cfg:
        init = upstream_adapter_config(cfg, controlnet_config, unet_config)
    else:
        raise CheckpointError(f"{str(folder)!r} holds a {kind}, not a Ctrl-Adapter (CtrlAdapterModel, or the "
                              "release's ControlNetAdapter)")
    try:
        model = CtrlAdapterModel(**init)
    except TypeError as e:
        raise CheckpointError(f"{str(folder)!r}: config.json does not describe a CtrlAdapterModel: {e}") from e
    model.check_fits(controlnet_config, unet_config)  # before reading weights: the clearer message
    _load_strict(model, _read_weights(folder), f"the Ctrl-Adapter in {str(folder)!r}")
    return model.eval()


def load_router(source: str | os.PathLike) -> CtrlRouter | None:
    """A `CtrlRouter` from our folder or a released `ControlNetRouter` folder; None for the release's
    `equal_weights` router (it has no weights: fusion `equal` does the same)."""
    folder = Path(source)
    cfg = _read_config(folder) if folder.is_dir() else None
    if cfg is None:
        raise CheckpointError(f"{str(folder)!r} is not a router folder: no config.json")
    if cfg.get("_class_name") == "CtrlRouter":
        init = {k: v for k, v in cfg.items() if not k.startswith("_")}
    elif cfg.get("_class_name") == "ControlNetRouter":
        kind = cfg.get("router_type", "simple_weights")
        if kind == "equal_weights":
            return None
        if kind != "simple_weights":
            raise CheckpointError(f"Ctrl-Adapter router_type {kind!r} is not supported (simple_weights and "
                                  "equal_weights are)")
        init = dict(num_experts=int(cfg.get("num_experts", 2)), num_routers=int(cfg.get("num_routers", 12)),
                    add_mid_block_router=bool(cfg.get("add_mid_block_router", True)))
    else:
        raise CheckpointError(f"{str(folder)!r} holds a {cfg.get('_class_name')}, not a Ctrl-Adapter router")
    router = CtrlRouter(**init)
    _load_strict(router, _read_weights(folder), f"the router in {str(folder)!r}")
    return router.eval()


def load_ctrl_adapter(controlnets: str | os.PathLike | nn.Module | Sequence[str | os.PathLike | nn.Module],
                      adapter: str | os.PathLike | None = None, unet: nn.Module | None = None,
                      router: str | os.PathLike | None = None, controlnet_config: str | None = None) -> CtrlAdapter:
    """A `CtrlAdapter` ready for `pipe.add`: ControlNet(s) + optional Ctrl-Adapter (+ its router), checked against
    `unet` (required with an adapter). Raises `CheckpointError` / `IncompatibleAdapterError`; `unet` is never touched.

    Args:
        controlnets: one ControlNet (folder, hub id, single file, or a loaded model) or a list, one per condition.
        adapter: a Ctrl-Adapter folder (ours or released) or hub id; None = plain ControlNet.
        unet: the UNet it will run on.
        router: the router folder; default: `router/` inside the adapter folder when there is one.
        controlnet_config: config for single-file ControlNets (see `load_controlnet`).
    """
    items = [controlnets] if isinstance(controlnets, (str, os.PathLike, nn.Module)) else list(controlnets)
    nets = [load_controlnet(c, controlnet_config) for c in items]
    model = routing = None
    if adapter is not None:
        if unet is None:
            raise CheckpointError("loading a Ctrl-Adapter needs the UNet it will run on")
        model = load_adapter_model(adapter, nets[0].config, unet.config)
        if router is None and Path(adapter, "router").is_dir():
            router = Path(adapter, "router")
    if router is not None:
        routing = load_router(router)
    ctrl = CtrlAdapter(nets, model, routing)
    if unet is not None:
        ctrl.check_compatible(unet)
    return ctrl


# ------------------------------------------------------------------------------------------------ inspect
def _shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    """`({key: shape}, dtype)` of a weights file: the safetensors header only, else the pickle read with
    `weights_only=True` (a checkpoint's `state_dict` unwrapped, the original `control_model.` prefix dropped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                dtype = SAFETENSORS_DTYPES.get(str(f.get_slice(keys[0]).get_dtype()), "?") if keys else "?"
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            if not isinstance(sd, dict):
                raise CheckpointError(f"{str(path)!r} holds a {type(sd).__name__}, not a state dict")
            tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else "?"
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  safetensors and pickles fail in several ways: one answer, naming the file
        raise CheckpointError(f"cannot read {str(path)!r} as weights: {type(e).__name__}: {e}") from None
    return {k.removeprefix("control_model."): v for k, v in shapes.items()}, dtype


def _controlnet_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, list[int], int, bool]:
    """`(cross_attention_dim, block widths, layers per block, SDXL added conditions)` of a ControlNet state dict, in
    diffusers' key layout or the original one (`input_blocks.{i}`, `zero_convs.{i}`, `input_hint_block`)."""
    cross = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if "controlnet_cond_embedding.conv_in.weight" in shapes:  # diffusers
        widths, b = [], 0
        while f"down_blocks.{b}.resnets.0.conv1.weight" in shapes:
            widths.append(shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0])
            b += 1
        layers = len({k.split(".")[3] for k in shapes if k.startswith("down_blocks.0.resnets.")})
        return cross, widths, layers, "add_embedding.linear_1.weight" in shapes
    if "input_hint_block.0.weight" in shapes and "zero_convs.0.0.weight" in shapes:  # the original (lllyasviel)
        blocks: list[list[int]] = [[]]
        i = 1
        while any(k.startswith(f"input_blocks.{i}.") for k in shapes):
            if f"input_blocks.{i}.0.op.weight" in shapes:  # a downsampler closes a resolution level
                blocks.append([])
            else:
                blocks[-1].append(shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0])
            i += 1
        return cross, [b[0] for b in blocks if b], len(blocks[0]), "label_emb.0.0.weight" in shapes
    raise CheckpointError("no ControlNet keys (controlnet_cond_embedding.*, or the original input_hint_block.* and "
                          "zero_convs.*)")


def _controlnet_base(cross: int | None, widths: list[int], layers: int) -> str:
    return (f"ControlNet for cross_attention_dim {cross if cross is not None else '?'}, block widths "
            f"{', '.join(map(str, widths))} ({layers} layer{'s' if layers != 1 else ''} per block)")


def _controlnet_variant(sdxl: bool) -> str:
    return "ControlNet (SDXL: added time ids and pooled text)" if sdxl else "ControlNet"


def _inspect_controlnet_file(path: Path) -> dict[str, Any]:
    shapes, dtype = _shapes(path)
    try:
        cross, widths, layers, sdxl = _controlnet_from_shapes(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{str(path)!r} is not a ControlNet or a Ctrl-Adapter: {e}") from None
    original = "input_hint_block.0.weight" in shapes
    return {"format": f"single-file ControlNet ({'original key layout' if original else 'diffusers keys'})",
            "variant": _controlnet_variant(sdxl), "base": _controlnet_base(cross, widths, layers),
            "parameters": sum(math.prod(s) for s in shapes.values()), "dtype": dtype}


def _folder_weights(folder: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return _shapes(folder / name)
    raise CheckpointError(f"{str(folder)!r} has no {' or '.join(WEIGHT_NAMES)}")


def inspect_ctrl(path: str | os.PathLike) -> dict[str, Any]:
    """What a ControlNet (diffusers folder or single file) or a Ctrl-Adapter folder (ours or released) is, without
    building a model: format, variant, the base it was made for, parameters, dtype (`python -m adapter_studio
    inspect`). Raises `CheckpointError` for anything else."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"{str(path)!r}: a ControlNet file is one of {', '.join(SINGLE_FILE_SUFFIXES)}")
        return _inspect_controlnet_file(path)
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} does not exist")
    cfg = _read_config(path)
    if cfg is None:
        files = [p for p in path.iterdir() if p.suffix in SINGLE_FILE_SUFFIXES]
        if len(files) != 1:
            raise CheckpointError(f"{str(path)!r} holds no config.json and not exactly one weights file")
        return _inspect_controlnet_file(files[0])
    kind = cfg.get("_class_name")
    if kind == "ControlNetModel":
        shapes, dtype = _folder_weights(path)
        layers = cfg.get("layers_per_block", 2)
        return {"format": "diffusers ControlNet folder",
                "variant": _controlnet_variant(cfg.get("addition_embed_type") == "text_time"),
                "base": _controlnet_base(cfg.get("cross_attention_dim"), list(cfg.get("block_out_channels", [])),
                                         layers if isinstance(layers, int) else layers[0]),
                "parameters": sum(math.prod(s) for s in shapes.values()), "dtype": dtype}
    if kind == "CtrlAdapterModel":
        shapes, dtype = _folder_weights(path)
        target = ResidualLayout(tuple(cfg["target_channels"]), tuple(cfg["target_levels"]),
                                cfg["target_mid_channels"], cfg["target_mid_level"])
        temporal = cfg.get("add_temporal_resnet") or cfg.get("add_temporal_transformer")
        desc: dict[str, Any] = {
            "format": "Ctrl-Adapter folder (save_pretrained)",
            "variant": f"{'spatial + temporal' if temporal else 'spatial'}, {len(cfg['down_ids'])} of {len(target)} "
                       f"residuals{' + mid' if cfg.get('add_mid') else ''}, {cfg.get('num_blocks')} block(s) each",
            "base": {"ControlNet residual channels": " ".join(map(str, cfg["source_channels"]))
                                                     + f", mid {cfg['source_mid_channels']}",
                     "target": target.describe(), "cross_attention_dim": cfg.get("cross_attention_dim"),
                     "ControlNet latent scale": cfg.get("source_scale", 1.0)},
            "parameters": sum(math.prod(s) for s in shapes.values()), "dtype": dtype}
    elif kind == "ControlNetAdapter" or "add_adapter_location_A" in cfg:
        shapes, dtype = _folder_weights(path)
        locations = "".join(x for x in "ABCDM" if cfg.get(f"add_adapter_location_{x}"))
        desc = {"format": "released Ctrl-Adapter folder (ControlNetAdapter)",
                "variant": f"locations {locations}, {cfg.get('num_adapters_per_location', 3)} per location, "
                           f"{cfg.get('num_blocks', 2)} block(s) each",
                "base": {"target": cfg.get("backbone_model_name", "?"),
                         "cross_attention_dim": cfg.get("cross_attention_dim"),
                         "ControlNet": "SD1.5-shaped (12 down residuals)"},
                "parameters": sum(math.prod(s) for s in shapes.values()), "dtype": dtype}
    else:
        raise CheckpointError(f"{str(path)!r} holds a {kind!r}, not a ControlNet or a Ctrl-Adapter")
    router = _read_config(path / "router") if (path / "router").is_dir() else None
    if router is not None:
        simple = router.get("router_type", "simple_weights") == "simple_weights"
        desc["router"] = (f"{router.get('num_experts', 2)} conditions over {router.get('num_routers', 12)} residuals"
                          if simple else "equal weights")
        if simple:
            desc["parameters"] += sum(math.prod(s) for s in _folder_weights(path / "router")[0].values())
    return desc


__all__ = ["inspect_ctrl", "load_adapter_model", "load_controlnet", "load_ctrl_adapter", "load_router",
           "upstream_adapter_config"]
