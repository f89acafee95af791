"""The studio's files: adapter weights (the models folder), uploaded input images, and mix presets.

Mixes name weights relative to the models folder and input images by their path in the input store, so a mix (and
the metadata of an output) stays valid after an upload's temp file is gone and reads the same on another server
with the same folders. Nothing here builds a pipeline: checking an upload against the model is the engine's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from adapter_studio.errors import CheckpointError, MixError, StudioError
from adapter_studio.family import Family
from adapter_studio.mix import Mix, file_sha256
from adapter_studio.registry import families

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class InputImageError(StudioError):
    """An uploaded file that is not an image, or an image over the size cap."""


def weights_folder(family: Family, index: int = 0) -> str:
    """The models subfolder of a family's `index`-th weights file (`WeightsFile.folder`, default the family name)."""
    return family.weights[index].folder or family.name


def config_class(folder: Path) -> str | None:
    """The `_class_name` of a diffusers-style folder's `config.json` (None when it has none or does not parse)."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class WeightsStore:
    """The models folder: weights files (or diffusers-style folders) listed, resolved, hashed and added.

    A top-level subfolder claimed by a family (its name, or a `WeightsFile.folder`) is listed only for that
    family's weights files; entries anywhere else are listed for every family.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sha_cache: dict[tuple[str, int, int], str | None] = {}

    def list(self, folder: str | None = None, classes: tuple[str, ...] = ()) -> list[str]:
        """Names (relative to the models folder) listed for the weights kept in `folder`: its entries plus the shared
        ones (every entry when `folder` is None). A file with a weights suffix or a folder holding `config.json` is one
        entry; with `classes`, a folder whose config names another class is left out (the shipped `toy/` folder holds
        every family's weights side by side). A whole pipeline folder (`model_index.json`) is a model, not weights."""
        claimed = {f.name for f in families()} | {w.folder for f in families() for w in f.weights if w.folder}
        out: list[str] = []

        def walk(path: Path, depth: int) -> None:
            for p in sorted(path.iterdir()):
                if p.name.startswith("."):
                    continue
                if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
                    out.append(p.relative_to(self.root).as_posix())
                elif p.is_dir():
                    if (p / "model_index.json").is_file():
                        continue
                    if (p / "config.json").is_file():  # a diffusers-style folder is one entry
                        name = config_class(p)
                        if not classes or name is None or name in classes:
                            out.append(p.relative_to(self.root).as_posix())
                    elif depth < 3 and not (depth == 0 and folder is not None and p.name in claimed
                                            and p.name != folder):
                        walk(p, depth + 1)

        walk(self.root, 0)
        return out

    def resolve(self, name: str) -> Path:
        """Path of an entry named relative to the models folder; refuses anything outside it."""
        if not name:
            raise MixError("no weights chosen")
        p = Path(name)
        full = (p if p.is_absolute() else self.root / p).resolve()
        if self.root != full and self.root not in full.parents:
            raise MixError(f"weights {name!r} are outside the models folder {self.root}; put them there "
                           "(or upload them) and pick them by name")
        if not full.exists():
            raise MixError(f"weights {name!r} not found in the models folder {self.root}; "
                           f"available: {', '.join(self.list()) or 'none'}")
        return full

    def sha256(self, path: Path) -> str | None:
        """sha256 of a weights file or folder, cached by path, mtime and size (hashing a 1 GB file takes seconds)."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)  # a rewrite of the same size still changes the key
        if key not in self._sha_cache:
            self._sha_cache[key] = file_sha256(path)
        return self._sha_cache[key]

    def add(self, upload: str | os.PathLike, folder: str, check: Callable[[Path], None],
            filename: str | None = None) -> str:
        """Keep an uploaded weights file (or a .zip of a diffusers folder) in `models/<folder>/` once `check` passed.

        `check(path)` raises (a `StudioError` naming what is wrong) to refuse the upload; nothing is kept then.
        Returns the stored entry's name. An identical entry of the same name is reused; a different one is kept beside
        it under a suffixed name.
        """
        src = Path(upload)
        name = safe_name(filename or src.name)
        if not src.is_file():
            raise CheckpointError(f"upload {name!r} did not arrive")
        staging = self.root / f".upload-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            if name.endswith(".zip"):
                candidate = staging / name[:-4]
                extract_zip(src, candidate)
                inner = [p for p in candidate.iterdir() if not p.name.startswith(".")]
                if len(inner) == 1 and inner[0].is_dir():  # a zip of the folder itself
                    candidate = inner[0]
            elif Path(name).suffix in WEIGHT_SUFFIXES:
                candidate = staging / name
                shutil.copyfile(src, candidate)
            else:
                raise CheckpointError(f"{name!r} is not a weights file: upload {', '.join(WEIGHT_SUFFIXES)} or a .zip "
                                      "of a diffusers folder (config.json + *.safetensors)")
            try:
                check(candidate)
            except StudioError as e:  # the loader names the staging copy; the user knows the file by its own name
                raise type(e)(re.sub(rf"[^\s'\"]*{re.escape(staging.name)}/", "", str(e))) from None
            dest_dir = self.root / folder
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / candidate.name
            if dest.exists():
                if self.sha256(dest) == file_sha256(candidate):
                    return dest.relative_to(self.root).as_posix()
                stem, suffix = (dest.stem, dest.suffix) if candidate.is_file() else (dest.name, "")
                dest = dest_dir / f"{stem}-{uuid.uuid4().hex[:6]}{suffix}"
            shutil.move(str(candidate), dest)
            return dest.relative_to(self.root).as_posix()
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_readable(path: Path) -> None:
    """Refuse weights that cannot be read at all (used where a lone file cannot be loaded by its family's loader).

    A `.safetensors` file must have a readable header, a pickle checkpoint must load with `weights_only=True`, a
    folder must hold a `config.json` or a weights file.
    """
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(p.suffix in WEIGHT_SUFFIXES for p in path.rglob("*")):
            raise CheckpointError(f"{path.name}: the folder holds neither config.json nor a weights file "
                                  f"({', '.join(WEIGHT_SUFFIXES)})")
        return
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        else:
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any failure to read is the same answer: not a weights file
        raise CheckpointError(f"{path.name} is not a readable weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'})") from None


class InputStore:
    """Uploaded input images, checked (an image, under the caps) and kept as PNGs named by their content hash."""

    def __init__(self, root: str | os.PathLike, max_pixels: int, max_bytes: int):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def check(self, path: str | os.PathLike, what: str = "image") -> None:
        """Refuse (`InputImageError` naming the file) what `store` would refuse: not an image, or over the caps."""
        self._open(Path(path), what)

    def store(self, path: str | os.PathLike, what: str = "image") -> Path:
        """Check an uploaded image and keep a PNG copy; returns the stored path (the same for the same pixels)."""
        img = self._open(Path(path), what)
        digest = hashlib.sha256(img.tobytes() + f"{img.mode}{img.size}".encode()).hexdigest()[:20]
        dest = self.root / f"{digest}.png"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:6]}.tmp")
            img.save(tmp, format="PNG")
            os.replace(tmp, dest)
        return dest

    def _open(self, src: Path, what: str) -> Image.Image:
        """The uploaded image decoded (RGB, or RGBA when it has transparency), after the size and pixel caps."""
        name = src.name
        if not src.is_file():
            raise InputImageError(f"{what}: file {name!r} not found")
        size = src.stat().st_size
        if size > self.max_bytes:
            raise InputImageError(f"{what}: {name!r} is {size / 2**20:.1f} MiB; the cap is "
                                  f"{self.max_bytes / 2**20:.0f} MiB")
        try:
            with Image.open(src) as im:
                w, h = im.size
                if w * h > self.max_pixels:
                    raise InputImageError(f"{what}: {name!r} is {w}x{h} = {w * h / 1e6:.1f} MP; the cap is "
                                          f"{self.max_pixels / 1e6:.1f} MP — downscale it")
                im.load()
                alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
                img = im.convert("RGBA" if alpha else "RGB")
        except InputImageError:
            raise
        except Image.DecompressionBombError:
            raise InputImageError(f"{what}: {name!r} is larger than the image size cap") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputImageError(f"{what}: {name!r} is not an image PIL can read ({type(e).__name__}); upload a "
                                  "PNG, JPEG or WebP") from None
        return img

    def resolve(self, value: Any, uploads: dict[str, Path], where: str) -> str:
        """A mix's image reference -> the path of a stored input image.

        Accepts an index or a file name into `uploads` (API calls), or a path already in the input store.
        """
        if isinstance(value, bool):
            raise MixError(f"{where}: {value!r} is not an image reference")
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and value not in uploads):
            files = list(uploads.values())
            i = int(value)
            if not 0 <= i < len(files):
                raise MixError(f"{where}: image index {i} but {len(files)} file(s) were uploaded")
            return str(self.store(files[i], where))
        if isinstance(value, str):
            if value in uploads:
                return str(self.store(uploads[value], where))
            p = Path(value)
            full = (p if p.is_absolute() else self.root / p).resolve()
            if full.parent == self.root and full.is_file():
                return str(full)
            raise MixError(f"{where}: image {value!r} is neither an uploaded file ({', '.join(uploads) or 'none'}) "
                           f"nor in the studio's input store; upload it with the request")
        raise MixError(f"{where}: image references are file names or indices, got {type(value).__name__}")


class PresetStore:
    """Mix presets: `<folder>/<name>.json`, saved and loaded by name."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []

    def save(self, name: str, mix: Mix) -> str:
        """Save `mix` under a cleaned-up `name`; returns the name used."""
        clean = re.sub(r"[^A-Za-z0-9_.+-]+", "-", (name or "").strip()).strip("-.")
        if not clean:
            raise MixError("give the preset a name (letters, digits, _ . + -)")
        self.root.mkdir(parents=True, exist_ok=True)
        mix.save(self.root / f"{clean}.json")
        return clean

    def load(self, name: str) -> Mix:
        if not name:
            raise MixError("choose a preset")
        path = self.root / f"{Path(name).name}.json"
        if not path.is_file():
            raise MixError(f"preset {name!r} not found in {self.root}; available: {', '.join(self.names()) or 'none'}")
        return Mix.load(path)


def safe_name(name: str) -> str:
    """A file name without folders or odd characters (uploads keep their name, but only that)."""
    base = Path(str(name).replace("\\", "/")).name
    keep = "".join(c if c.isalnum() or c in "._-+" else "_" for c in base).lstrip(".")
    return keep or "upload"


def extract_zip(src: Path, dest: Path, max_bytes: int = 8 * 2**30) -> None:
    """Extract a zip refusing entries that escape `dest` (zip slip) or a total over `max_bytes`."""
    try:
        zf = zipfile.ZipFile(src)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{src.name} is not a valid zip archive") from None
    with zf:
        total = sum(i.file_size for i in zf.infolist())
        if total > max_bytes:
            raise CheckpointError(f"{src.name} unpacks to {total / 2**30:.1f} GiB; the cap is "
                                  f"{max_bytes / 2**30:.0f} GiB")
        dest.mkdir(parents=True)
        root = dest.resolve()
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if root not in target.parents and target != root:
                raise CheckpointError(f"{src.name}: entry {info.filename!r} points outside the archive")
        zf.extractall(dest)
