"""Adapter families known to the studio: how to load one from a weights file and read its mix inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .errors import MixError


def _identity_inputs(inputs: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    return dict(inputs)


@dataclass(frozen=True)
class Family:
    """One adapter family.

    Attributes:
        name: short id used in mixes ("ip", "agd", "ctrl", "i2v").
        label: what the UI shows.
        load: `(weights, pipe) -> adapter`; weights is a file, folder or hub id; `pipe` the diffusers pipeline.
        inputs_from_json: turns a mix unit's JSON inputs (paths, numbers) into the adapter's call inputs.
    """

    name: str
    label: str
    load: Callable[[str, Any], nn.Module]
    inputs_from_json: Callable[[dict[str, Any], Path | None], dict[str, Any]] = _identity_inputs


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    _load_builtin_families()
    if name not in FAMILIES:
        raise MixError(f"unknown adapter family {name!r}; known: {', '.join(sorted(FAMILIES)) or 'none'}")
    return FAMILIES[name]


def _load_builtin_families() -> None:
    import adapters  # noqa: F401  (each family module registers itself on import)
