"""A mix: the whole truth of an output, as versioned JSON — model, sampling settings and every adapter unit.

A mix alone is enough to reproduce an output (the studio's Python export) or to turn it into another tool's graph
(the ComfyUI export): sampling settings are typed, with their defaults here in the schema, and every unit names its
family, its weights files with their sha256, its scale, window, per-sample switch and inputs in JSON form.

Version history: 1 (sampling an untyped object, one weights file per unit) is read and migrated; 2 is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .block_scale import validate_scale
from .errors import MixError, StudioError
from .family import Family
from .samplers import SAMPLERS

MIX_FORMAT = "adapter-studio/mix"
MIX_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: video models: frames and fps when a mix leaves them unset
VIDEO_DEFAULTS = {"num_frames": 16, "fps": 8}


@dataclass
class Sampling:
    """How an output is sampled; every field has its default here.

    Attributes:
        prompt, negative_prompt: the texts.
        seed: seed of the first image (image i uses seed + i); -1 = drawn when the mix runs (the recorded mix
            holds the drawn seed).
        steps: sampling steps.
        width, height: output size in pixels (multiples of 8); None = the model's default resolution.
        sampler: a name in `adapter_studio.samplers.SAMPLERS`.
        guidance: "cfg", "auto" (a unit's guidance mode when one is enabled, else CFG) or a family's guidance
            mode (AGD: "agd", one UNet pass per step).
        guidance_scale: CFG scale, or the guidance family's w.
        num_images: images (clips on a video model) per call.
        num_frames, fps: video models only (None = `VIDEO_DEFAULTS`).
    """

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int | None = None
    height: int | None = None
    sampler: str = "DDIM"
    guidance: str = "auto"
    guidance_scale: float = 7.5
    num_images: int = 1
    num_frames: int | None = None
    fps: int | None = None

    def problems(self) -> list[str]:
        """Every reason these settings are malformed (types, ranges, names), empty when they are fine."""
        out = []
        for key in ("prompt", "negative_prompt", "sampler", "guidance"):
            if not isinstance(getattr(self, key), str):
                out.append(f"{key} must be text, got {type(getattr(self, key)).__name__}")
        ints = {"seed": (-1, 2**32 - 1), "steps": (1, 10_000), "num_images": (1, 10_000), "width": (8, 65_536),
                "height": (8, 65_536), "num_frames": (1, 10_000), "fps": (1, 1_000)}
        for key, (lo, hi) in ints.items():
            v = getattr(self, key)
            if v is None and key in ("width", "height", "num_frames", "fps"):
                continue
            if not _is_int(v) or not lo <= v <= hi:
                out.append(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
        for key in ("width", "height"):
            v = getattr(self, key)
            if _is_int(v) and v % 8:
                out.append(f"{key} must be a multiple of 8, got {v}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0.0 <= g <= 100.0:
            out.append(f"guidance_scale must be a number in [0, 100], got {g!r}")
        if isinstance(self.sampler, str) and self.sampler not in SAMPLERS:
            out.append(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str = "sampling", strict: bool = True) -> "Sampling":
        """`strict`: unknown keys are an error (version 2); else dropped (migrating version 1)."""
        if not isinstance(d, dict):
            raise MixError(f"'{where}' must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown and strict:
            raise MixError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
        s = cls(**{k: v for k, v in d.items() if k in known})
        if isinstance(s.guidance_scale, int) and not isinstance(s.guidance_scale, bool):
            s.guidance_scale = float(s.guidance_scale)
        for key in ("seed", "steps", "num_images", "width", "height", "num_frames", "fps"):  # 20.0 from JSON is 20
            v = getattr(s, key)
            if isinstance(v, float) and v.is_integer():
                setattr(s, key, int(v))
        return s


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class UnitSpec:
    """One adapter unit of a mix.

    Attributes:
        family: the family's name (`adapter_studio.registry`).
        weights: `{WeightsFile.key: file, folder or hub id}`; a plain string names the family's first weights file.
        name: the unit's slot name in the stack (default: family + index).
        enabled: a disabled unit is kept in the mix but not loaded.
        scale: a number or a per-block dict (`adapter_studio.block_scale`).
        start, end: the step window, fractions of sampling.
        inputs: the family's inputs in JSON form (image paths, guidance w, ...; per-sample inputs as lists).
        sample_mask: one bool per sample of the call (None = every sample): lets one batch carry several mixes.
        sha256: `{WeightsFile.key: sha256}` of the weights as they were when the output was made.
    """

    family: str
    weights: str | dict[str, str | None] | None = None
    name: str | None = None
    enabled: bool = True
    scale: float | dict[str, Any] = 1.0
    start: float = 0.0
    end: float = 1.0
    inputs: dict[str, Any] = field(default_factory=dict)
    sample_mask: list[bool] | None = None
    sha256: str | dict[str, str | None] | None = None

    def validate(self, where: str) -> None:
        if not isinstance(self.family, str) or not self.family:
            raise MixError(f"{where}: 'family' must be a non-empty string")
        try:
            validate_scale(self.scale)
        except StudioError as e:
            raise MixError(f"{where}: {e}") from None
        for key in ("start", "end"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise MixError(f"{where}: {key!r} must be a number in [0, 1], got {v!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise MixError(f"{where}: the window must satisfy 0 <= start <= end <= 1, got {self.start}..{self.end}")
        if not isinstance(self.enabled, bool):
            raise MixError(f"{where}: 'enabled' must be true or false, got {self.enabled!r}")
        if not isinstance(self.inputs, dict):
            raise MixError(f"{where}: 'inputs' must be an object, got {type(self.inputs).__name__}")
        for key in ("weights", "sha256"):
            v = getattr(self, key)
            if v is None or isinstance(v, str):
                continue
            if not isinstance(v, dict) or not all(isinstance(k, str) and (x is None or isinstance(x, str))
                                                  for k, x in v.items()):
                raise MixError(f"{where}: {key!r} must be a path or an object of paths by name, got {v!r}")
        m = self.sample_mask
        if m is not None and (not isinstance(m, list) or not m or not all(isinstance(x, bool) for x in m)):
            raise MixError(f"{where}: 'sample_mask' must be a non-empty list of true/false (one per sample), got {m!r}")

    def weights_paths(self) -> dict[str, str]:
        """The weights entries that are set, by key (a plain string is keyed "weights")."""
        if isinstance(self.weights, str):
            return {"weights": self.weights} if self.weights else {}
        return {k: v for k, v in (self.weights or {}).items() if v}


@dataclass
class Mix:
    """Everything needed to reproduce an output: model, sampling settings and adapter units."""

    model: str = "tiny-sd15"
    units: list[UnitSpec] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    version: int = MIX_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):  # `Mix(sampling={"seed": 3})` reads like the JSON it writes
            self.sampling = Sampling.from_dict(self.sampling)

    def to_dict(self) -> dict[str, Any]:
        return {"format": MIX_FORMAT, "version": MIX_VERSION, "model": self.model, "sampling": self.sampling.to_dict(),
                "units": [{k: v for k, v in asdict(u).items() if v is not None} for u in self.units]}

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
        """Read a mix of any readable version (a version 1 mix is migrated; see the module docstring)."""
        if not isinstance(d, dict):
            raise MixError(f"a mix is a JSON object, got {type(d).__name__}")
        if d.get("format", MIX_FORMAT) != MIX_FORMAT:
            raise MixError(f"not a mix: format is {d.get('format')!r}, expected {MIX_FORMAT!r}")
        version = d.get("version")
        if version not in READABLE_VERSIONS:
            raise MixError(f"mix version {version!r} is not supported: this studio reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
        unknown = set(d) - {"format", "version", "model", "units", "sampling"}
        if unknown:
            raise MixError(f"unknown mix keys {sorted(unknown)}; allowed: format, version, model, sampling, units")
        units_raw = d.get("units", [])
        if not isinstance(units_raw, list):
            raise MixError(f"'units' must be a list, got {type(units_raw).__name__}")
        allowed = {f.name for f in fields(UnitSpec)} - ({"sample_mask"} if version == 1 else set())
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
        # version 1's sampling was an untyped object written by the app: its known keys carry over
        sampling = Sampling.from_dict(d.get("sampling", {}), strict=version != 1)
        problems = sampling.problems()
        if problems:
            raise MixError("sampling: " + "; ".join(problems))
        model = d.get("model", "tiny-sd15")
        if not isinstance(model, str):
            raise MixError(f"'model' must be a string, got {model!r}")
        return cls(model=model, units=units, sampling=sampling)

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


def _resolve(path: str | None, base: Path | None) -> str | None:
    if path and base is not None and not Path(path).is_absolute() and (base / path).exists():
        return str(base / path)
    return path


#: `(family, unit, weights by key with paths resolved, diffusers pipeline) -> adapter`: how `apply_mix` loads a unit
UnitLoader = Callable[[Family, UnitSpec, dict[str, "str | None"], Any], Any]


def _load_unit(family: Family, unit: UnitSpec, weights: dict[str, str | None], pipe: Any) -> Any:
    return family.load(weights, pipe)


def apply_mix(mix: Mix, pipeline: Any, base_dir: str | os.PathLike | None = None,
              load: UnitLoader = _load_unit) -> list[str]:
    """Load every enabled unit of `mix` into `pipeline` (a `StudioPipeline`), replacing its current adapters.

    Weights and input paths that are relative are looked up under `base_dir` first. `load` loads one unit's adapter
    (default: the family's loader; the studio app passes one that goes through its cache of loaded adapters).
    Returns the slot names. On any error the pipeline's stack is left exactly as it was.
    """
    from .registry import get_family

    base = Path(base_dir) if base_dir else None
    loaded = []
    for i, unit in enumerate(mix.units):
        if not unit.enabled:
            continue
        fam = get_family(unit.family)
        weights = {k: _resolve(v, base) for k, v in fam.weights_dict(unit.weights).items()}
        adapter = load(fam, unit, weights, pipeline.pipe)
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
                      sample_mask=unit.sample_mask, **inputs)
    except Exception:
        stack.clear()
        stack.slots.update(old)
        stack._reindex()
        raise
    return [name for name, *_ in loaded]
