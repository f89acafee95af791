"""Reproducibility metadata: the full mix of an output inside its PNG (a text chunk) and in a sidecar JSON.

The PNG text chunk `adapter-studio-mix` holds `Mix.to_json()`; `parameters` holds a one-line human summary in the
style other UIs use, so image viewers show something readable. The sidecar `name.json` holds the same mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from adapter_studio.errors import MixError, StudioError
from adapter_studio.mix import Mix

MIX_CHUNK = "adapter-studio-mix"
SUMMARY_CHUNK = "parameters"


def summary_line(mix: Mix) -> str:
    """`prompt` / `Negative prompt: ...` / `Steps: 4, Sampler: DDIM, ...` in the familiar A1111 layout."""
    s = mix.sampling
    parts = [f"Steps: {s.steps}", f"Sampler: {s.sampler}", f"Guidance: {s.guidance}", f"Scale: {s.guidance_scale}",
             f"Seed: {s.seed}", f"Size: {s.width}x{s.height}", f"Model: {mix.model}"]
    for i, u in enumerate(mix.units):
        names = " + ".join(Path(p).name for p in u.weights_paths().values()) or "-"
        parts.append(f"Unit {i}: {u.family} {names} x{_scale_text(u.scale)} [{u.start:g}-{u.end:g}]")
    lines = [s.prompt]
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def _scale_text(scale: Any) -> str:
    return f"{scale:g}" if isinstance(scale, (int, float)) else "per-block"


def save_png_with_mix(image: Image.Image, path: str | os.PathLike, mix: Mix) -> Path:
    """Write `image` as PNG carrying `mix` in a text chunk, plus the sidecar `path.json`. Returns the PNG path."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(MIX_CHUNK, mix.to_json(indent=None))
    info.add_text(SUMMARY_CHUNK, summary_line(mix))
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    mix.save(sidecar_path(path))
    return path


def sidecar_path(png: str | os.PathLike) -> Path:
    return Path(png).with_suffix(".json")


def read_mix(path: str | os.PathLike) -> Mix:
    """The mix of an output: from a PNG's text chunk, or from a mix / sidecar JSON file (any readable mix version;
    a version 1 mix is migrated by `Mix.from_dict`).

    Raises `MixError` (a `StudioError`) when the file carries no mix, saying what was found instead.
    """
    path = Path(path)
    if not path.is_file():
        raise MixError(f"{path.name}: no such file")
    head = path.read_bytes()[:8]
    if head.startswith(b"\x89PNG"):
        try:
            with Image.open(path) as im:
                text = dict(getattr(im, "text", {}) or {})
        except (OSError, SyntaxError, ValueError) as e:
            raise MixError(f"{path.name} is not a readable PNG: {e}") from None
        if MIX_CHUNK not in text:
            raise MixError(f"{path.name} carries no Adapter Studio settings (PNG text chunks found: "
                           f"{', '.join(sorted(text)) or 'none'}); load a PNG the studio wrote or its .json sidecar")
        return Mix.from_json(text[MIX_CHUNK])
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise MixError(f"{path.name} is neither a studio PNG nor a mix JSON file") from None
    try:
        json.loads(text)
    except json.JSONDecodeError:
        raise MixError(f"{path.name} is neither a studio PNG nor a mix JSON file") from None
    try:
        return Mix.from_json(text)
    except StudioError as e:
        raise MixError(f"{path.name}: {e}") from None
