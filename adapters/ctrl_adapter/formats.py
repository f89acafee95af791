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
"""

from __future__ import annotations

import json
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


__all__ = ["load_adapter_model", "load_controlnet", "load_ctrl_adapter", "load_router",
           "upstream_adapter_config"]
