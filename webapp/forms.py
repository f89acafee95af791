"""A family's unit form <-> a mix unit, without Gradio: what the Generate tab's widgets mean in a mix and back.

The form of a unit is its family's `Field`s (`adapter_studio.family`) plus the parts every unit has (weights files,
weight, start/end). `form_to_unit` turns the form's values (by field key) into a `UnitSpec`, folding `scale`,
`guidance` and `sampling` targets into the unit's scale and the mix's sampling settings; `unit_to_form` is its
inverse. `families_json` is what the `/families` endpoint serves.
"""

from __future__ import annotations

import json
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable

from adapter_studio.block_scale import block_preset_scale, preset_of_scale
from adapter_studio.errors import MixError
from adapter_studio.family import Family, Field
from adapter_studio.mix import Sampling, UnitSpec
from adapter_studio.registry import families

SAMPLING_KEYS = {f.name for f in dataclass_fields(Sampling)}


def families_json() -> list[dict[str, Any]]:
    """Every installed family's unit form (`Family.to_json`), in display order."""
    return [f.to_json() for f in families()]


def parse_json_field(text: Any, where: str) -> Any:
    """A JSON box's text -> its value (None when blank); a readable error naming the box otherwise."""
    if text in (None, ""):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MixError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} col {e.colno})") from None


def field_visible(f: Field, values: dict[str, Any]) -> bool:
    """Whether a field shows, given the unit's current values (`Field.visible_when`)."""
    return f.visible_when is None or values.get(f.visible_when[0]) == f.visible_when[1]


def form_to_unit(fam: Family, *, weights: dict[str, str | None], weight: float, start: float, end: float,
                 values: dict[str, Any], sampling: Sampling, unet_config: dict[str, Any],
                 store_image: Callable[[str, str], Path], where: str) -> UnitSpec:
    """One unit's form values -> a `UnitSpec`; `guidance` and `sampling` targets are written into `sampling`.

    Args:
        weights: `{WeightsFile.key: name}` from the weights dropdowns.
        values: by field key; `images` fields as lists of file paths, `image` fields as a path or None.
        store_image: `(path, what) -> stored path` (the input store), so the mix outlives the upload.
        where: how errors name the unit ("unit 1 (<family label>)").
    """
    spec = UnitSpec(family=fam.name, weights=weights, scale=float(weight), start=float(start), end=float(end))
    if spec.start > spec.end:
        raise MixError(f"{where}: start {spec.start:g} is after end {spec.end:g}")
    preset = "all blocks"
    custom = None
    for f in fam.fields:
        val = values.get(f.key)
        what = f"{where} {f.label.lower()}"
        if f.target == "inputs":
            if f.kind == "images":
                if val:
                    spec.inputs[f.key] = [str(store_image(p, what)) for p in val]
            elif f.kind == "image":
                if val:
                    spec.inputs[f.key] = str(store_image(val, what))
            elif f.kind == "json":
                parsed = parse_json_field(val, what)
                if parsed is not None:
                    spec.inputs[f.key] = parsed
            elif val not in (None, ""):
                spec.inputs[f.key] = int(val) if f.kind == "int" else val
        elif f.target == "scale":
            if f.kind == "choice":
                preset = val or "all blocks"
            elif field_visible(f, values):
                custom = parse_json_field(val, what)
        elif f.target == "guidance":  # e.g. a guidance adapter's w: the call's guidance scale, kept in the unit too
            spec.inputs[f.key] = float(val if val is not None else f.default)
            if sampling.guidance != "cfg":
                sampling.guidance_scale = float(spec.inputs[f.key])
        elif f.target == "sampling" and val is not None:
            if f.key not in SAMPLING_KEYS:
                raise MixError(f"{where}: field {f.key!r} targets sampling, which has no such setting; "
                               f"settings: {', '.join(sorted(SAMPLING_KEYS))}")
            setattr(sampling, f.key, int(val) if f.kind == "int" else val)
    if preset == "custom":
        if custom is None:
            raise MixError(f"{where}: Blocks is 'custom' but the per-block scale JSON is empty")
        spec.scale = custom
    elif preset != "all blocks":
        spec.scale = block_preset_scale(preset, weight, unet_config)
    elif custom is not None:  # a per-block JSON field without a preset choice
        spec.scale = custom
    return spec


def unit_to_form(fam: Family, spec: UnitSpec, sampling: Sampling, unet_config: dict[str, Any],
                 where: str) -> tuple[float, dict[str, Any], list[str]]:
    """A mix unit -> `(weight, values by field key, warnings)`: the inverse of `form_to_unit`."""
    warnings: list[str] = []
    preset, weight = preset_of_scale(spec.scale, unet_config)
    has_scale_field = any(f.target == "scale" for f in fam.fields)
    if isinstance(spec.scale, dict) and not has_scale_field:
        warnings.append(f"{where}: its per-block scale has no place in the form; the weight shows its largest value")
    values: dict[str, Any] = {}
    for f in fam.fields:
        if f.target == "inputs":
            val = spec.inputs.get(f.key)
            if f.kind == "images":
                listed = val if isinstance(val, list) else [val] if val else []
                paths = [p for p in listed if isinstance(p, str) and Path(p).is_file()]
                if len(paths) < len(listed):
                    warnings.append(f"{where}: {len(listed) - len(paths)} of its {f.label.lower()} are no longer on "
                                    "the server")
                values[f.key] = paths or None
            elif f.kind == "image":
                values[f.key] = val if isinstance(val, str) and Path(val).is_file() else None
                if val and values[f.key] is None:
                    warnings.append(f"{where}: its {f.label.lower()} is no longer on the server")
            elif f.kind == "json":
                values[f.key] = json.dumps(val) if val is not None else (f.default or "")
            else:
                values[f.key] = val if val is not None else f.default
        elif f.target == "scale":
            if f.kind == "choice":
                values[f.key] = preset if preset in f.choices else "custom"
            else:
                values[f.key] = json.dumps(spec.scale) if preset == "custom" else (f.default or "")
        elif f.target == "guidance":
            w = spec.inputs.get(f.key)
            if w is None and sampling.guidance == fam.guidance:
                w = sampling.guidance_scale
            values[f.key] = w if w is not None else f.default
        elif f.target == "sampling":
            val = getattr(sampling, f.key, None)
            values[f.key] = val if val is not None else f.default
    return weight, values, warnings

