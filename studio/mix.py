"""A mix: a serialisable, versioned description of which adapters run, with which weights, scales, windows and inputs."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import MixError
from .stack import validate_scale

MIX_FORMAT = "adapter-studio/mix"
MIX_VERSION = 1


@dataclass
class UnitSpec:
    """One adapter unit of a mix.

    `weights` is a file, folder or hub id; `sha256` the hash of the weights file when it is one (for reproducibility);
    `inputs` the family's inputs in JSON form (image paths, guidance scale w, ...).
    """

    family: str
    weights: str | None = None
    name: str | None = None
    enabled: bool = True
    scale: float | dict[str, Any] = 1.0
    start: float = 0.0
    end: float = 1.0
    inputs: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    def validate(self, where: str) -> None:
        if not isinstance(self.family, str) or not self.family:
            raise MixError(f"{where}: 'family' must be a non-empty string")
        try:
            validate_scale(self.scale)
        except ValueError as e:
            raise MixError(f"{where}: {e}") from None
        for key in ("start", "end"):
            if not isinstance(getattr(self, key), (int, float)):
                raise MixError(f"{where}: {key!r} must be a number in [0, 1], got {getattr(self, key)!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise MixError(f"{where}: the window must satisfy 0 <= start <= end <= 1, got {self.start}..{self.end}")
        if not isinstance(self.inputs, dict):
            raise MixError(f"{where}: 'inputs' must be an object, got {type(self.inputs).__name__}")


@dataclass
class Mix:
    """Everything needed to reproduce an output: model, sampling settings and adapter units."""

    model: str = "tiny-sd15"
    units: list[UnitSpec] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    version: int = MIX_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {"format": MIX_FORMAT, "version": self.version, "model": self.model, "sampling": dict(self.sampling),
             "units": [asdict(u) for u in self.units]}
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: Any) -> "Mix":
        if not isinstance(d, dict):
            raise MixError(f"a mix is a JSON object, got {type(d).__name__}")
        if d.get("format", MIX_FORMAT) != MIX_FORMAT:
            raise MixError(f"not a mix: format is {d.get('format')!r}, expected {MIX_FORMAT!r}")
        version = d.get("version")
        if version != MIX_VERSION:
            raise MixError(f"mix version {version!r} is not supported: this studio reads version {MIX_VERSION}")
        unknown = set(d) - {"format", "version", "model", "units", "sampling"}
        if unknown:
            raise MixError(f"unknown mix keys {sorted(unknown)}; allowed: format, version, model, sampling, units")
        units_raw = d.get("units", [])
        if not isinstance(units_raw, list):
            raise MixError(f"'units' must be a list, got {type(units_raw).__name__}")
        allowed = {f.name for f in fields(UnitSpec)}
        units = []
        for i, u in enumerate(units_raw):
            where = f"mix unit {i}"
            if not isinstance(u, dict):
                raise MixError(f"{where} must be an object, got {type(u).__name__}")
            bad = set(u) - allowed
            if bad:
                raise MixError(f"{where}: unknown keys {sorted(bad)}; allowed: {', '.join(sorted(allowed))}")
            if "family" not in u:
                raise MixError(f"{where}: 'family' is required")
            spec = UnitSpec(**u)
            spec.validate(where)
            units.append(spec)
        sampling = d.get("sampling", {})
        if not isinstance(sampling, dict):
            raise MixError(f"'sampling' must be an object, got {type(sampling).__name__}")
        model = d.get("model", "tiny-sd15")
        if not isinstance(model, str):
            raise MixError(f"'model' must be a string, got {model!r}")
        return cls(model=model, units=units, sampling=sampling, version=version)

    @classmethod
    def from_json(cls, text: str) -> "Mix":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MixError(f"a mix must be JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mix":
        return cls.from_json(Path(path).read_text())


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a weights file (of every file, in order, for a folder); None for hub ids."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def apply_mix(mix: Mix, pipeline: Any, base_dir: str | os.PathLike | None = None) -> list[str]:
    """Load every unit of `mix` into `pipeline` (a `StudioPipeline`), replacing its current adapters.

    Returns the slot names. On any error the pipeline's stack is left as it was.
    """
    from .registry import get_family

    base = Path(base_dir) if base_dir else None
    loaded = []
    for i, unit in enumerate(mix.units):
        fam = get_family(unit.family)
        weights = unit.weights
        if weights and base is not None and not Path(weights).is_absolute() and (base / weights).exists():
            weights = str(base / weights)
        adapter = fam.load(weights, pipeline.pipe)
        inputs = fam.inputs_from_json(unit.inputs, base)
        loaded.append((unit.name or f"{unit.family}{i}", adapter, unit, inputs))
    stack = pipeline.stack
    old = dict(stack.slots)
    stack.clear()
    try:
        unet = pipeline.pipe.unet
        for name, adapter, unit, inputs in loaded:
            adapter.to(device=unet.device, dtype=unet.dtype)  # loaders read onto the CPU; the UNet may be on a GPU
            stack.add(adapter, name=name, scale=unit.scale, start=unit.start, end=unit.end, enabled=unit.enabled,
                      **inputs)
    except Exception:
        stack.clear()
        stack.slots.update(old)
        stack._reindex()
        raise
    return [name for name, *_ in loaded]
