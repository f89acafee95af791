"""The installed adapter families, found through the entry point group `adapter_studio.families`.

Each entry point names a `Family` object (`name = "package.module:FAMILY"`); the core never imports a family by
name. `register_family` adds one at run time (a family defined in a script or a test).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from .errors import MixError
from .family import Family

ENTRY_POINT_GROUP = "adapter_studio.families"

log = logging.getLogger("adapter_studio")

FAMILIES: dict[str, Family] = {}
_BROKEN: dict[str, str] = {}  # entry point name -> why it did not load
_discovered = False


def register_family(family: Family) -> Family:
    """Add (or replace) a family; returns it."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes an adapter_studio.Family, got {type(family).__name__}")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> Family | None:
    """Remove a family registered at run time (or discovered); returns it, or None when it was not there."""
    return FAMILIES.pop(name, None)


def discover_families() -> dict[str, Family]:
    """Load every family named in the entry point group (once); returns all registered families."""
    global _discovered
    if not _discovered:
        _discovered = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                fam = ep.load()
            except Exception as e:  # noqa: BLE001  one broken family must not take the others down
                _BROKEN[ep.name] = f"{type(e).__name__}: {e}"
                log.warning("adapter family %r (%s) did not load: %s", ep.name, ep.value, _BROKEN[ep.name])
                continue
            if not isinstance(fam, Family):
                _BROKEN[ep.name] = f"{ep.value} is a {type(fam).__name__}, not a Family"
                continue
            FAMILIES.setdefault(fam.name, fam)
    return FAMILIES


def families() -> list[Family]:
    """Every installed family, in display order (`Family.order`, then name)."""
    return sorted(discover_families().values(), key=lambda f: (f.order, f.name))


def get_family(name: str) -> Family:
    discover_families()
    if name not in FAMILIES:
        broken = f"; failed to load: {', '.join(f'{k} ({v})' for k, v in _BROKEN.items())}" if _BROKEN else ""
        raise MixError(f"unknown adapter family {name!r}; installed: {', '.join(sorted(FAMILIES)) or 'none'}{broken}")
    return FAMILIES[name]


def guidance_families() -> dict[str, Family]:
    """Guidance mode name -> the family that provides it in place of classifier-free guidance (AGD: "agd")."""
    return {f.guidance: f for f in families() if f.guidance}
