"""Reading a family's training data: the JSON-lines metadata of a Hugging Face imagefolder, checked line by line.

Every family trains from `data_dir/metadata.jsonl`: one JSON object per image or clip, with its `file_name`, a caption
and any columns of the family's own. They all read it here, so a malformed line, a missing file or a caption column
that is not there gets the same `DataError` naming the file and the line, whichever family meets it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, DataError
from .loop import warn


def short(value: Any, limit: int = 120) -> str:
    """`value` on one line, cut to `limit` characters (for error messages quoting what a user wrote)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_jsonl(path: Path, missing: str) -> list[tuple[dict[str, Any], str]]:
    """`(row, "<path> line <n>")` for every non-blank line of the JSON-lines file `path`.

    Raises `ConfigError(missing)` when there is no such file, `DataError` for text that is not UTF-8 or a line that
    is not a JSON object."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{path} line {n}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{at}: not a JSON object ({short(e)})") from None
        rows.append((row, at))
    return rows


def named_path(root: Path, row: Any, key: str, at: str, what: str, folders: bool = False) -> Path:
    """`root / row[key]`, checked: `row` is a JSON object whose `key` is a non-empty string naming an existing file
    (or folder, with `folders`). `what` says in the error what the key should name ("a file name")."""
    name = row.get(key) if isinstance(row, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f"{at}: needs {key!r} ({what}), got {short(row)}")
    path = root / name
    try:
        exists = path.exists() if folders else path.is_file()
    except (OSError, ValueError):  # a name with a NUL byte or too long for the filesystem
        exists = False
    if not exists:
        raise DataError(f"{at}: {key} {path} does not exist")
    return path


class Captions:
    """The captions of a data set's rows under one key; rows without one are counted (`check`)."""

    def __init__(self, key: str, file_key: str = "file_name"):
        self.key, self.file_key = key, file_key
        self.rows: list[dict[str, Any]] = []
        self.missing = 0

    def read(self, row: dict[str, Any], at: str) -> str:
        """The caption of `row` ("" when it has none); a caption that is not text is a `DataError`."""
        self.rows.append(row)
        caption = row.get(self.key)
        if caption is None:
            self.missing += 1
            return ""
        if not isinstance(caption, (str, int, float)) or isinstance(caption, bool):
            raise DataError(f"{at}: caption {self.key!r} must be a string, got {short(caption)}")
        return str(caption)

    def check(self, source: Path, items: str, hint: str = "; set --caption_column to the right key") -> None:
        """No rows is a `DataError`, and so is no row with a caption (the key is probably another one: the others
        are named); some rows without one is a warning (they train with the empty caption)."""
        if not self.rows:
            raise DataError(f"the training data in {source} is empty")
        if self.missing == len(self.rows):
            keys = sorted({k for r in self.rows for k in r} - {self.file_key})
            raise DataError(f"{source}: no entry has a caption under {self.key!r} (other keys: "
                            f"{', '.join(keys) or 'none'}){hint}")
        if self.missing:
            warn(f"{self.missing} of {len(self.rows)} {items} in {source} have no caption under {self.key!r}: they "
                 "train with the empty caption")
