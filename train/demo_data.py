"""Demo data for the tiny configs: written into a missing `data_dir` only when the run asked for it.

A config's `make_demo_data: N` fills its own `data_dir` when that folder does not exist yet. It applies only where
`data_dir` was given in the same place (both in the YAML file, or both on the command line), so a typo'd
`--data_dir` is an error naming the folder, never a folder silently filled with demo images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError
from .loop import warn


def wants_demo_data(cfg: Any) -> bool:
    """Whether `cfg.make_demo_data` applies to `cfg.data_dir` (both given in the same place)."""
    cli = getattr(cfg, "cli_fields", frozenset())
    return bool(cfg.make_demo_data and cfg.data_dir) and (("make_demo_data" in cli) == ("data_dir" in cli))


def ensure_data_dir(cfg: Any, write: Callable[[Path], Any], what: str) -> None:
    """A missing `cfg.data_dir`: fill it with `write(folder)` when `make_demo_data` applies, else refuse it.

    `what` names the data in the messages ("demo images"). The folder is written beside and renamed, so a run
    killed while writing leaves no half-filled data folder behind.
    """
    folder = Path(cfg.data_dir)
    if folder.exists():
        return
    if not wants_demo_data(cfg):
        hint = ""
        if cfg.make_demo_data:
            hint = (f" (make_demo_data in the config file writes {what} only into the config's own data_dir; "
                    "add --make_demo_data N to write them into this one)")
        raise ConfigError(f"data_dir {folder} does not exist{hint}")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    os.replace(tmp, folder)
    warn(f"wrote {cfg.make_demo_data} generated {what} into {folder} (make_demo_data)")
