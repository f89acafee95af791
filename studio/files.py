"""Reading what users hand the studio: weights files (safely) and the files a mix's inputs name.

Every family reads these the same way, so a truncated file, a pickle that needs code, a missing path or a non-image
gets the same clear error whichever family meets it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MixError


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The dict in a `.safetensors` file (flat) or a PyTorch pickle read through `torch.load(weights_only=True)`.

    `what` names the file in errors ("IP-Adapter weights"). Raises CheckpointError for a missing, truncated or
    foreign file, a pickle that needs code to load, or one holding something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any failure to read is the file's fault: say which file and why
        raise CheckpointError(f"cannot read {what} {str(path)!r}: the file is truncated, not a safetensors / PyTorch "
                              f"checkpoint, or a pickle that needs code to load "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of {what}")
    return obj


def input_path(value: Any, base_dir: Path | None, what: str) -> Path:
    """The file a mix input names: relative paths are looked up under `base_dir` first. Raises MixError."""
    if not isinstance(value, str):
        raise MixError(f"input {what!r} must be a path string, got {type(value).__name__}")
    path = Path(value)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.is_file():
        raise MixError(f"input {what!r}: {value!r} does not exist")
    return path


def input_image(value: Any, base_dir: Path | None, what: str, mode: str = "RGB") -> Any:
    """The image a mix input names, converted to `mode` (a PIL image). Raises MixError for a non-image."""
    from PIL import Image, UnidentifiedImageError

    path = input_path(value, base_dir, what)
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MixError(f"input {what!r}: {path.name} is not an image PIL can read ({type(e).__name__}); give a PNG, "
                       "JPEG or WebP") from None
