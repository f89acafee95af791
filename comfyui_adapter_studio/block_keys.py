"""The one mapping between the studio's diffusers UNet names and ComfyUI's (ldm) UNet: layers, blocks, weights, configs.

Everything the pack needs to address a ComfyUI UNet with the studio's names is here, in plain Python (no torch, no
ComfyUI), so it is tested without ComfyUI:

* `block_key(layer, config)`: a studio attention layer name (`down_blocks.1.attentions.0.transformer_blocks.0.attn2`,
  with or without `.processor`) -> ComfyUI's patch key `(block, number, transformer_index)`, e.g. `("input", 4, 0)`;
  ComfyUI passes `block = ("input", 4)` and `block_index = 0` in `extra_options` to every attention patch and keys
  `set_model_attn2_replace(fn, "input", 4, 0)` the same way. `("middle", 0)` is the mid block, `("output", n)` the
  decoder's blocks.
* `attention_layers(config)`: every studio attention layer of a UNet with its ComfyUI key, and back (`layer_for_key`).
* `unet_key_map(config)`: diffusers parameter name -> ldm parameter name (`input_blocks.4.1.proj_in.weight`), for
  single-file checkpoints and for building ComfyUI's `UNetModel` from diffusers weights.
* `diffusers_config(unet_config)`: ComfyUI's `unet_config` dict (as `model_detection` finds it) -> the diffusers
  `UNet2DConditionModel` config of the same layout, the shape the studio's loaders check adapters against.

Layout of ComfyUI's UNet (original Stable Diffusion, `openaimodel.UNetModel`): `input_blocks[0]` is `conv_in`; level i
of the encoder contributes `layers_per_block[i]` blocks `[ResBlock, SpatialTransformer?]` then (except the last
level) one `[Downsample]`; `middle_block` is `[ResBlock, SpatialTransformer, ResBlock]`; decoder level i contributes
`layers_per_block[-1 - i] + 1` blocks `[ResBlock, SpatialTransformer?, Upsample?]`. SD1.5 and SDXL differ only in the
counts (SDXL: no attention in level 0, 2 and 10 transformer blocks deep), which the config carries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

BlockKey = tuple[str, int, int]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2"}
_LAYER = re.compile(r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn[12])"
                    r"(?:\.processor)?$")


def _per_level(value: Any, levels: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"expected one value per UNet level ({levels}), got {list(value)}")
        return [int(v) for v in value]
    return [int(value)] * levels


@dataclass(frozen=True)
class Layout:
    """The block structure of a UNet2DConditionModel config (what both naming schemes are computed from)."""

    down_types: tuple[str, ...]
    up_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # per encoder level
    transformer_depth_up: tuple[int, ...]  # per decoder level
    mid_depth: int  # transformer blocks in the mid block; -1: a mid block without attention; -2: no mid block

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Layout":
        down = tuple(config.get("down_block_types") or ())
        up = tuple(config.get("up_block_types") or ())
        levels = len(down)
        lpb = _per_level(config.get("layers_per_block", 2), levels)
        depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
        rev = config.get("reverse_transformer_layers_per_block")
        depth_up = _per_level(rev, levels) if rev is not None else list(reversed(depth))
        depth = [d if "CrossAttn" in t else 0 for d, t in zip(depth, down)]
        depth_up = [d if "CrossAttn" in t else 0 for d, t in zip(depth_up, up)]
        mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type is None:
            mid = -2
        elif "CrossAttn" in mid_type:
            mid = _per_level(config.get("transformer_layers_per_block", 1), levels)[-1]
        else:
            mid = -1
        return cls(down, up, tuple(lpb), tuple(depth), tuple(depth_up), mid)

    @property
    def levels(self) -> int:
        return len(self.down_types)

    def input_id(self, level: int, j: int) -> int:
        """ComfyUI's input block number of encoder level `level`, resnet `j`."""
        return 1 + sum(self.layers_per_block[k] + 1 for k in range(level)) + j

    def downsample_id(self, level: int) -> int:
        return self.input_id(level, self.layers_per_block[level])

    def output_id(self, level: int, j: int) -> int:
        """ComfyUI's output block number of decoder level `level`, resnet `j`."""
        up_lpb = list(reversed(self.layers_per_block))
        return sum(up_lpb[k] + 1 for k in range(level)) + j

    def up_resnets(self, level: int) -> int:
        return list(reversed(self.layers_per_block))[level] + 1


def layout(config: Mapping[str, Any]) -> Layout:
    return Layout.from_config(config)


def block_key(layer: str, config: Mapping[str, Any]) -> BlockKey:
    """Studio attention layer name -> ComfyUI's `(block, number, transformer_index)`; ValueError if it is none."""
    m = _LAYER.match(layer)
    if m is None:
        raise ValueError(f"{layer!r} is not a spatial attention layer of a UNet (down/mid/up_blocks...attentions."
                         f"N.transformer_blocks.T.attn1/attn2)")
    kind, level, j, t = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    lay = Layout.from_config(config)
    if kind is None:
        if j != 0 or lay.mid_depth < 0 or t >= lay.mid_depth:
            raise ValueError(f"{layer!r}: this UNet's mid block has {max(lay.mid_depth, 0)} transformer blocks")
        return ("middle", 0, t)
    level = int(level)
    if level >= lay.levels:
        raise ValueError(f"{layer!r}: this UNet has {lay.levels} levels")
    if kind == "down":
        if j >= lay.layers_per_block[level] or t >= lay.transformer_depth[level]:
            raise ValueError(f"{layer!r}: down level {level} has {lay.layers_per_block[level]} attention blocks of "
                             f"{lay.transformer_depth[level]} transformer blocks")
        return ("input", lay.input_id(level, j), t)
    if j >= lay.up_resnets(level) or t >= lay.transformer_depth_up[level]:
        raise ValueError(f"{layer!r}: up level {level} has {lay.up_resnets(level)} attention blocks of "
                         f"{lay.transformer_depth_up[level]} transformer blocks")
    return ("output", lay.output_id(level, j), t)


def attention_layers(config: Mapping[str, Any], target: str = "attn2") -> dict[str, BlockKey]:
    """Every spatial `target` attention layer (module path, diffusers order: down, up, mid) -> its ComfyUI key."""
    lay = Layout.from_config(config)
    names = []
    for i in range(lay.levels):
        for j in range(lay.layers_per_block[i] if lay.transformer_depth[i] else 0):
            names += [f"down_blocks.{i}.attentions.{j}.transformer_blocks.{t}.{target}"
                      for t in range(lay.transformer_depth[i])]
    for i in range(lay.levels):
        for j in range(lay.up_resnets(i) if lay.transformer_depth_up[i] else 0):
            names += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.{t}.{target}"
                      for t in range(lay.transformer_depth_up[i])]
    names += [f"mid_block.attentions.0.transformer_blocks.{t}.{target}" for t in range(max(lay.mid_depth, 0))]
    return {n: block_key(n, config) for n in names}


def layer_for_key(key: tuple, config: Mapping[str, Any], target: str = "attn2") -> str:
    """ComfyUI's `(block, number, transformer_index)` -> the studio's module path of that attention layer."""
    for name, k in attention_layers(config, target).items():
        if k == tuple(key):
            return name
    raise KeyError(f"no {target} layer at ComfyUI block {tuple(key)}")


def unet_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers parameter prefix -> ldm parameter prefix, for every module of the UNet (append `.weight`/`.bias`).

    Use `convert_unet_state_dict` to rename a whole state dict.
    """
    lay = Layout.from_config(config)
    out = dict(_TOP)
    for i in range(lay.levels):
        for j in range(lay.layers_per_block[i]):
            n = lay.input_id(i, j)
            for d, o in _RESNET.items():
                out[f"down_blocks.{i}.resnets.{j}.{d}"] = f"input_blocks.{n}.0.{o}"
            if lay.transformer_depth[i]:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < lay.levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{lay.downsample_id(i)}.0.op"
    if lay.mid_depth != -2:
        for r, n in ((0, 0), (1, 2 if lay.mid_depth >= 0 else 1)):
            for d, o in _RESNET.items():
                out[f"mid_block.resnets.{r}.{d}"] = f"middle_block.{n}.{o}"
        if lay.mid_depth >= 0:
            out["mid_block.attentions.0"] = "middle_block.1"
    for i in range(lay.levels):
        for j in range(lay.up_resnets(i)):
            n = lay.output_id(i, j)
            for d, o in _RESNET.items():
                out[f"up_blocks.{i}.resnets.{j}.{d}"] = f"output_blocks.{n}.0.{o}"
            sub = 1
            if lay.transformer_depth_up[i]:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
                sub = 2
            if i < lay.levels - 1 and j == lay.up_resnets(i) - 1:
                out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{sub}.conv"
    return out


def convert_unet_state_dict(state_dict: Mapping[str, Any], config: Mapping[str, Any],
                            prefix: str = "") -> dict[str, Any]:
    """A diffusers UNet state dict with ldm names (`prefix` + name, e.g. `model.diffusion_model.`).

    Raises KeyError naming the first parameter the layout does not place (another architecture).
    """
    mapping = unet_key_map(config)
    # longest prefix first: "down_blocks.0.attentions.0" must not swallow a resnet's name
    prefixes = sorted(mapping, key=len, reverse=True)
    out = {}
    for name, value in state_dict.items():
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                out[prefix + mapping[p] + name[len(p):]] = value
                break
        else:
            raise KeyError(f"the UNet parameter {name!r} has no place in the ldm layout of this config")
    return out


def diffusers_config(unet_config: Mapping[str, Any], norm_num_groups: int = 32) -> dict[str, Any]:
    """ComfyUI's `unet_config` (model_channels, channel_mult, num_res_blocks, transformer_depth, ...) -> the
    diffusers `UNet2DConditionModel` config with the same modules and names (SD1.x/2.x/SDXL layouts)."""
    mc = int(unet_config["model_channels"])
    mult = list(unet_config["channel_mult"])
    levels = len(mult)
    nrb = _per_level(unet_config["num_res_blocks"], levels)
    td = list(unet_config.get("transformer_depth") or [0] * sum(nrb))
    # model_detection lists the decoder's depths from its last block to its first
    tdo = list(reversed(unet_config.get("transformer_depth_output") or [0] * sum(r + 1 for r in nrb)))
    per_level, pos = [], 0
    for r in nrb:
        per_level.append(max(td[pos:pos + r] or [0]))
        pos += r
    per_level_up, pos = [], 0
    for r in reversed(nrb):
        per_level_up.append(max(tdo[pos:pos + r + 1] or [0]))
        pos += r + 1
    channels = [mc * m for m in mult]
    heads = int(unet_config.get("num_heads", -1) or -1)
    head_ch = int(unet_config.get("num_head_channels", -1) or -1)
    attention_head_dim = [heads] * levels if heads > 0 else [max(1, c // head_ch) for c in channels]
    mid = unet_config.get("transformer_depth_middle", per_level[-1])
    mid = -1 if mid is None else int(mid)
    cfg: dict[str, Any] = {
        "in_channels": int(unet_config.get("in_channels", 4)),
        "out_channels": int(unet_config.get("out_channels", 4)),
        "block_out_channels": channels,
        "layers_per_block": nrb if len(set(nrb)) > 1 else nrb[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in per_level_up],
        "mid_block_type": None if mid == -2 else "UNetMidBlock2D" if mid == -1 else "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": [max(d, 1) for d in per_level[:-1]] + [max(mid, per_level[-1], 1)],
        "reverse_transformer_layers_per_block": [max(d, 1) for d in per_level_up],
        "cross_attention_dim": int(unet_config.get("context_dim") or 768),
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": bool(unet_config.get("use_linear_in_transformer", False)),
        "norm_num_groups": norm_num_groups,
    }
    adm = unet_config.get("adm_in_channels")
    if adm:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=int(adm))
    return cfg


def comfy_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `diffusers_config`: a diffusers UNet config -> ComfyUI's `unet_config` (as model_detection finds
    it in a checkpoint of that UNet), plus `num_heads` / `num_head_channels`."""
    lay = Layout.from_config(config)
    channels = list(config["block_out_channels"])
    mc = channels[0]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    heads = _per_level(heads, lay.levels)
    widths = {c // h for c, h, d in zip(channels, heads, lay.transformer_depth) if d} or {channels[0] // heads[0]}
    td, tdo = [], []
    for i in range(lay.levels):
        td += [lay.transformer_depth[i]] * lay.layers_per_block[i]
    for i in range(lay.levels):
        tdo += [lay.transformer_depth_up[i]] * lay.up_resnets(i)
    out: dict[str, Any] = {
        "in_channels": int(config.get("in_channels", 4)), "out_channels": int(config.get("out_channels", 4)),
        "model_channels": mc, "num_res_blocks": list(lay.layers_per_block),
        "channel_mult": [c // mc for c in channels], "transformer_depth": td,
        "transformer_depth_output": list(reversed(tdo)), "transformer_depth_middle": lay.mid_depth,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "context_dim": int(config.get("cross_attention_dim") or 768),
        "adm_in_channels": config.get("projection_class_embeddings_input_dim") if config.get("addition_embed_type")
        else None,
    }
    if len(set(heads)) == 1:
        out.update(num_heads=heads[0], num_head_channels=-1)
    elif len(widths) == 1:
        out.update(num_heads=-1, num_head_channels=widths.pop())
    else:
        raise ValueError(f"ComfyUI's UNet takes one head count or one head width; this config has heads {heads} "
                         f"for channels {channels}")
    return out
