"""ComfyUI for the test suite: its own virtualenv, built once and cached outside the clone.

    python tests/comfyui_env.py          # build (or find) the cache and print its folder
    make comfyui-env                     # the same

ComfyUI 0.3.64 (the source tarball in ../shared/comfyui beside the checkout, GPL: read and run, never copied into
this repository) needs torch 2.14.1 + torchvision 0.29.1 from the registry (torchvision does not load with the project's CPU torch
2.13.0), so it runs in its own venv: torch, ComfyUI's requirements, and the third-party packages `adapter_studio`
needs that ComfyUI lacks (diffusers, opencv; versions from constraints.txt where ComfyUI allows them). The project
itself is NOT installed there: `overlay()` makes a small per-run folder for PYTHONPATH (the package as it is in
this checkout, and its entry points), so one cache serves every clone and a rerun never reinstalls anything.

Cache: `${XDG_CACHE_HOME:-~/.cache}/adapter-studio/comfyui-<key>/` holding `ComfyUI/` (the unpacked tarball, kept
pristine: tests copy what they change) and `venv/`; `<key>` is the sha256 of the tarball, the requirement lines
and the Python version, so a new tarball or pin builds a new cache. The build takes a file lock (two test runs at
once build once) and marks the folder complete only at the end (an interrupted build is redone).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TARBALL_NAME = "comfyui/ComfyUI-0.3.64.tar.gz"
# the project's shared/ folder lies beside the checkout (a developer's clone and CI's alike)
TARBALL = Path(os.environ.get("COMFYUI_TARBALL") or REPO.parent / "shared" / _TARBALL_NAME)
PYTHON = sys.executable  # `-m venv` from inside a venv makes a venv of the base interpreter

# torch first (ComfyUI's requirements name it unpinned); 2.14.1 is the registry's build that torchvision 0.29.1 loads
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# ComfyUI's requirements.txt, less what we pin above or do not need (audio nodes: torchaudio)
SKIPPED_COMFY_REQS = {"torch", "torchvision", "torchaudio"}
# what `import adapter_studio` and its families need beyond ComfyUI's own requirements
EXTRA = ["diffusers", "opencv-python-headless", "requests"]
# pins taken from constraints.txt for these (torch is ComfyUI's own, so not constrained)
CONSTRAINED = ("diffusers", "transformers", "safetensors", "huggingface_hub", "opencv-python-headless", "PyYAML",
               "pillow", "numpy")
BUILDER_VERSION = "1"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _comfy_requirements() -> list[str]:
    with tarfile.open(TARBALL) as tar:
        text = tar.extractfile("ComfyUI/requirements.txt").read().decode()
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip()
        if name.lower() not in SKIPPED_COMFY_REQS:
            out.append(line)
    return out


def _constraints() -> list[str]:
    want = {n.lower() for n in CONSTRAINED}
    lines = [ln.strip() for ln in (REPO / "constraints.txt").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#") and ln.split("==")[0].lower() in want]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adapter-studio"


def cache_key() -> str:
    if not TARBALL.is_file():
        raise FileNotFoundError(f"the ComfyUI source tarball {TARBALL} is missing (set COMFYUI_TARBALL to its path)")
    h = hashlib.sha256()
    for part in [_sha256_file(TARBALL), BUILDER_VERSION, f"{sys.version_info[:2]}", *TORCH,
                 *_comfy_requirements(), *EXTRA, *_constraints()]:
        h.update(part.encode() + b"\n")
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return cache_root() / f"comfyui-{cache_key()}"


def _run(cmd: list[str], log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def ensure(verbose: bool = True) -> Path:
    """The cache folder (`ComfyUI/`, `venv/`), built when missing. Returns at once when it is complete."""
    target = cache_dir()
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build waits here, then finds the cache complete
        if (target / ".complete").is_file():
            return target
        if target.exists():
            shutil.rmtree(target)  # an interrupted build
        target.mkdir()
        t0 = time.time()
        log_path = target / "build.log"
        if verbose:
            print(f"building the ComfyUI test environment in {target} (once; log: {log_path})", file=sys.stderr)
        with open(log_path, "w") as log:
            with tarfile.open(TARBALL) as tar:
                tar.extractall(target, filter="data")
            _run([PYTHON, "-m", "venv", str(target / "venv")], log)
            py = str(target / "venv" / "bin" / "python")
            pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
            _run([*pip, *TORCH], log)
            constraints = target / "constraints.txt"
            constraints.write_text("\n".join([*TORCH, *_constraints()]) + "\n")
            reqs = target / "requirements.txt"
            reqs.write_text("\n".join([*_comfy_requirements(), *EXTRA]) + "\n")
            _run([*pip, "-c", str(constraints), "-r", str(reqs)], log)
            # sanity: torch, torchvision and diffusers import in the venv
            _run([py, "-c", "import torch, torchvision, diffusers, transformers, cv2; print(torch.__version__)"], log)
            log.write(f"built in {time.time() - t0:.0f} s\n")
        (target / ".complete").write_text(f"{time.time() - t0:.0f}\n")
        if verbose:
            print(f"built in {time.time() - t0:.0f} s", file=sys.stderr)
    return target


def python(env: Path) -> Path:
    return env / "venv" / "bin" / "python"


def overlay(dest: Path) -> Path:
    """A folder for ComfyUI's PYTHONPATH that imports `adapter_studio` from this checkout, as installed.

    `adapter_studio/` is a tree of links reproducing the installed package layout from pyproject's `package-dir`
    (`adapter_studio` -> studio/, `adapter_studio.adapters` -> adapters/, ...), and a `.dist-info` holds the entry
    points, so the families are found exactly as in an installed distribution. Nothing is built or copied.
    """
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    dirs: dict[str, str] = meta["tool"]["setuptools"]["package-dir"]
    root = dest / "adapter_studio"
    root.mkdir(parents=True, exist_ok=True)
    core = REPO / dirs["adapter_studio"]
    for item in core.iterdir():
        if item.name != "__pycache__":
            (root / item.name).symlink_to(item)
    for pkg, folder in dirs.items():
        if pkg != "adapter_studio" and pkg.count(".") == 1:
            link = root / pkg.split(".", 1)[1]
            if not link.exists():
                link.symlink_to(REPO / folder)
    project = meta["project"]
    info = dest / f"adapter_studio-{project['version']}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = []
    for group, entries in project.get("entry-points", {}).items():
        eps.append(f"[{group}]")
        eps += [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(eps) + "\n")
    return dest


if __name__ == "__main__":
    t = time.time()
    path = ensure()
    print(path)
    print(f"({time.time() - t:.1f} s)", file=sys.stderr)
