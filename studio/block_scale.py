"""Per-block scales: one adapter weight per UNet block, for attention layers and for residuals.

The dict follows diffusers' `set_ip_adapter_scale` convention (InstantStyle): keys `down`, `mid`, `up`; for down/up
a number or `{"block_i": number | [number per attention in the block]}`; for mid a number or a list. Layers not
named get 0. On a video UNet the motion modules' attentions are named apart, under `motion` with the same shape
(`{"motion": {"up": {"block_1": 0.5}}}`): a spatial per-block dict never reaches a motion layer.

Residual adapters (Ctrl-Adapter) produce one residual per down-block output plus the mid residual; for them `down`
takes a number or `{"block_i": number}` (the conv_in residual belongs to block 0) and `mid` a number.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Mapping

from .errors import StudioError

Scale = float | dict[str, Any]

# processor names: down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor, mid_block.attentions.0...,
# down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.processor (video)
_LAYER_RE = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d+)?\.(attentions|motion_modules)\.(\d+)\.")
_PARTS = ("down", "mid", "up")


def _where(layer: str) -> tuple[str, int | None, str, int] | None:
    """`(part, block, kind, index in block)` of an attention processor name; kind is `spatial` or `motion`."""
    m = _LAYER_RE.match(layer)
    if not m:
        return None
    part = m.group(1).split("_")[0]
    block = int(m.group(2)) if m.group(2) is not None else None
    kind = "motion" if m.group(3) == "motion_modules" else "spatial"
    return part, block, kind, int(m.group(4))


def layer_scale(scale: Scale, layer: str) -> float:
    """Scale of one attention layer from a number or a per-block dict (see the module docstring).

    E.g. InstantStyle's style-only on SD1.5: `{"up": {"block_1": [0.0, 1.0, 0.0]}}` (SDXL: `block_0`; SD1.5's first
    up block has no attention).
    """
    if not isinstance(scale, dict):
        return float(scale)
    w = _where(layer)
    if w is None:
        return 0.0
    part, block, kind, idx = w
    if kind == "motion":
        scale = scale.get("motion", 0.0)
        if not isinstance(scale, dict):
            return float(scale)
    val = scale.get(part, 0.0)
    if isinstance(val, dict):
        val = val.get(f"block_{block}", 0.0)
    if isinstance(val, (list, tuple)):
        if idx >= len(val):
            raise StudioError(f"per-block scale for {part}{'' if block is None else f' block_{block}'} lists "
                              f"{len(val)} values; the block has at least {idx + 1} attention layers")
        return float(val[idx])
    return float(val)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_scale(scale: Scale, _nested: bool = False) -> None:
    """Raise StudioError unless `scale` is a number or a well-formed per-block dict."""
    if _is_number(scale):
        return
    allowed = set(_PARTS) if _nested else {*_PARTS, "motion"}
    if not isinstance(scale, dict) or not set(scale) <= allowed:
        raise StudioError(f"scale must be a number or a dict with keys {'/'.join(sorted(allowed))}, got {scale!r}")
    for part, val in scale.items():
        if part == "motion":
            validate_scale(val, _nested=True)
        elif isinstance(val, dict):
            if part == "mid":
                raise StudioError("the mid block takes a number (or a list), not a per-block dict")
            for k, v in val.items():
                if not re.fullmatch(r"block_\d+", k):
                    raise StudioError(f"per-block scale key {k!r} must look like 'block_0'")
                vals = v if isinstance(v, (list, tuple)) else [v]
                if not all(_is_number(x) for x in vals):
                    raise StudioError(f"per-block scale {part}.{k} must be numbers, got {v!r}")
        elif isinstance(val, (list, tuple)):
            if not all(_is_number(x) for x in val):
                raise StudioError(f"per-block scale for {part!r} must be numbers, got {val!r}")
        elif not _is_number(val):
            raise StudioError(f"per-block scale for {part!r} must be a number, list or dict, got {val!r}")


def attention_counts(layers: Iterable[str]) -> dict[tuple[str, str, int | None], int]:
    """`(kind, part, block) -> number of attention modules` over processor names (several layers share one index)."""
    idx: dict[tuple[str, str, int | None], set[int]] = defaultdict(set)
    for layer in layers:
        w = _where(layer)
        if w is not None:
            part, block, kind, i = w
            idx[(kind, part, block)].add(i)
    return {k: max(v) + 1 for k, v in idx.items()}


def check_scale_fits(scale: Scale, layers: Iterable[str]) -> None:
    """Refuse a per-block dict that names blocks the UNet lacks or lists a number of values other than its block's
    attentions (diffusers refuses these too); `layers` are the processor names the adapter covers."""
    if not isinstance(scale, dict):
        return
    counts = attention_counts(layers)

    def check(d: dict[str, Any], kind: str) -> None:
        for part, val in d.items():
            if part == "motion":
                if isinstance(val, dict):
                    check(val, "motion")
                continue
            if part == "mid":
                blocks = {None: val}
            elif isinstance(val, dict):
                blocks = {int(k.split("_")[1]): v for k, v in val.items()}
            else:
                continue
            for block, v in blocks.items():
                name = f"{'motion ' if kind == 'motion' else ''}{part}{'' if block is None else f' block_{block}'}"
                n = counts.get((kind, part, block), 0)
                if n == 0 and (block is not None or isinstance(v, (list, tuple))):
                    have = sorted(f"block_{b}" for (k, p, b) in counts if k == kind and p == part and b is not None)
                    raise StudioError(f"per-block scale names {name}, which has no attention layer this adapter acts "
                                      f"on; {part} blocks with one: {', '.join(have) or 'none'}")
                if isinstance(v, (list, tuple)) and len(v) != n:
                    raise StudioError(f"per-block scale for {name} lists {len(v)} values; the block has {n} "
                                      f"attention layer{'s' if n != 1 else ''}: give {n} values or one number")

    check(scale, "spatial")


# ---------------------------------------------------------------------------------------------------------------
# residuals


def residual_blocks(unet_config: Mapping[str, Any]) -> list[int]:
    """Down block of each down residual, in the order diffusers' UNets return them.

    The first residual is conv_in's output (counted in block 0); each down block gives `layers_per_block` resnet
    outputs plus its downsampler's (all blocks but the last).
    """
    cfg = dict(unet_config)
    n = len(cfg.get("down_block_types", ()))
    layers = cfg.get("layers_per_block", 1)
    out = [0]
    for b in range(n):
        out += [b] * (layers if isinstance(layers, int) else layers[b])
        if b < n - 1:
            out.append(b)
    return out


def residual_scales(scale: Scale, unet_config: Mapping[str, Any]) -> tuple[list[float], float]:
    """`(scale of each down residual, scale of the mid residual)` for a residual adapter."""
    blocks = residual_blocks(unet_config)
    if not isinstance(scale, dict):
        return [float(scale)] * len(blocks), float(scale)
    bad = set(scale) - {"down", "mid"}
    if bad:
        raise StudioError(f"a residual adapter's per-block scale takes keys down and mid (its residuals reach the "
                          f"down and mid blocks only), got {sorted(bad)}")
    down, mid = scale.get("down", 0.0), scale.get("mid", 0.0)
    if not _is_number(mid):
        raise StudioError(f"a residual adapter's mid scale is one number, got {mid!r}")
    if isinstance(down, dict):
        n_blocks = max(blocks) + 1
        per_block = []
        for b in range(n_blocks):
            v = down.get(f"block_{b}", 0.0)
            if not _is_number(v):
                raise StudioError(f"a residual adapter's scale for down block_{b} is one number (its residuals share "
                                  f"it), got {v!r}")
            per_block.append(float(v))
        extra = [k for k in down if int(k.split("_")[1]) >= n_blocks]
        if extra:
            raise StudioError(f"per-block scale names {', '.join(extra)}; this UNet has down blocks 0..{n_blocks - 1}")
        return [per_block[b] for b in blocks], float(mid)
    if not _is_number(down):
        raise StudioError(f"a residual adapter's down scale is a number or {{'block_i': number}}, got {down!r}")
    return [float(down)] * len(blocks), float(mid)


# ---------------------------------------------------------------------------------------------------------------
# block presets (InstantStyle): the app's "Blocks" choice for units with a scale field

BLOCK_PRESETS = ("all blocks", "style only", "layout only", "style + layout", "custom")


def _block_attention_counts(unet_config: Any) -> tuple[list[int], list[int]]:
    """Attention layers per down block and per up block, from a UNet config (0 for blocks without attention)."""
    cfg = dict(unet_config)
    layers = cfg.get("layers_per_block", 1)
    n = len(cfg.get("down_block_types", ()))
    per_block = layers if isinstance(layers, int) else None
    down = [(per_block if per_block is not None else layers[i]) if "CrossAttn" in t else 0
            for i, t in enumerate(cfg.get("down_block_types", ()))]
    up = [((per_block if per_block is not None else layers[n - 1 - i]) + 1) if "CrossAttn" in t else 0
          for i, t in enumerate(cfg.get("up_block_types", ()))]
    return down, up


def block_preset_scale(preset: str, weight: float, unet_config: Any) -> float | dict[str, Any]:
    """The per-block scale dict of an InstantStyle-style preset for this UNet, times `weight`.

    InstantStyle (SDXL) injects style through `up_blocks.0.attentions.1` (the first up block with attention) and
    layout through `down_blocks.2.attentions.1` (the last down block with attention). The same relative positions
    are taken on any UNet: on SD1.5 style = `up_blocks.1.attentions.1`, layout = `down_blocks.2.attentions.1`.
    """
    if preset in ("all blocks", "", None):
        return float(weight)
    down, up = _block_attention_counts(unet_config)
    scale: dict[str, Any] = {}
    if preset in ("style only", "style + layout"):
        i = next((i for i, c in enumerate(up) if c), None)
        if i is not None:
            vals = [0.0] * up[i]
            vals[min(1, up[i] - 1)] = float(weight)
            scale["up"] = {f"block_{i}": vals}
    if preset in ("layout only", "style + layout"):
        i = next((i for i in reversed(range(len(down))) if down[i]), None)
        if i is not None:
            vals = [0.0] * down[i]
            vals[min(1, down[i] - 1)] = float(weight)
            scale["down"] = {f"block_{i}": vals}
    if not scale:
        raise StudioError(f"block preset {preset!r} is not one of {', '.join(BLOCK_PRESETS[:-1])}")
    return scale


def preset_of_scale(scale: Any, unet_config: Any) -> tuple[str, float]:
    """Inverse of `block_preset_scale`: `(preset, weight)`, or `("custom", max value)` when no preset matches."""
    if isinstance(scale, (int, float)):
        return "all blocks", float(scale)
    leaves = _leaves(scale)
    weight = max(leaves) if leaves else 0.0
    for name in BLOCK_PRESETS[1:-1]:
        if block_preset_scale(name, weight, unet_config) == scale:
            return name, weight
    return "custom", weight


def _leaves(d: Any) -> list[float]:
    if isinstance(d, dict):
        return [x for v in d.values() for x in _leaves(v)]
    if isinstance(d, (list, tuple)):
        return [float(x) for x in d]
    return [float(d)]
