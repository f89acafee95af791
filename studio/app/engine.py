"""The studio's engine: turns a mix into outputs, and says clearly why a mix cannot run.

Everything the UI and the API generate goes through one path: a `Mix` (model, sampling settings, adapter units)
is completed (random seed drawn, weights hashed, input images stored), checked (every reason it cannot run, in
one message), loaded into a pooled `StudioPipeline` with `studio.mix.apply_mix`, and sampled. Each output is
written as a PNG carrying its own mix (seed of that image) plus a sidecar JSON, so any output reproduces alone.

Concurrency: the engine holds up to `max_concurrency` pipelines (each with its own UNet and adapter stack: two
calls never share a stack); a call borrows one for its duration. The Gradio queue bounds how many calls run.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import queue
import random
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError

from studio.errors import CheckpointError, MixError, StudioError
from studio.mix import Mix, UnitSpec, apply_mix, file_sha256
from studio.presets import load_preset

from .metadata import save_png_with_mix
from .units import unit_ui

log = logging.getLogger("adapter_studio.app")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_SEED = 2**32 - 1

# sampler name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}


# Building models is not thread-safe: diffusers / transformers construct weights under global patches (meta-device
# init), so a module built in one thread while another thread builds a pipeline can end up on the meta device.
# Every construction (pipelines, adapters from weights files) holds this lock; sampling does not.
_BUILD_LOCK = threading.RLock()


class InputImageError(StudioError):
    """An uploaded file that is not an image, or an image over the size cap."""


class GenerationCancelled(StudioError):
    """The user pressed Cancel; raised from the step callback to stop sampling."""


@dataclass
class Limits:
    """Caps on what one request may ask for (keeps a shared server responsive)."""

    max_side: int = 2048  # output width/height
    max_steps: int = 150
    max_images: int = 8
    max_input_pixels: int = 4096 * 4096  # per uploaded image
    max_input_bytes: int = 32 * 1024 * 1024


@dataclass
class GenerationResult:
    """What one call produced: PNG paths (each with its mix), sidecar JSON paths, the batch mix, a video if any."""

    images: list[Path]
    sidecars: list[Path]
    mix: Mix
    seconds: float
    videos: dict[str, Path] = field(default_factory=dict)  # "gif" / "mp4" / "webm" of the first clip (video models)
    info: str = ""


@dataclass
class _Worker:
    pipeline: Any  # StudioPipeline
    scheduler_config: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)


class Engine:
    """Generation backend of the studio (also usable without Gradio).

    Args:
        model: preset name, preset YAML, hub id or local diffusers folder (`studio.presets.load_pipeline`).
        models_dir: folder of adapter weights (files or diffusers folders; a subfolder named after a family holds
            that family's weights). Uploads land in `models_dir/<family>/`.
        outputs_dir: where PNGs, sidecars and stored input images go.
        max_concurrency: most pipelines held (each runs one call at a time).
        device, dtype: where the pipelines run (default: cuda + fp16 when available, else cpu + fp32).
    """

    def __init__(self, model: str = "tiny-sd15", models_dir: str | os.PathLike = "models",
                 outputs_dir: str | os.PathLike = "outputs", max_concurrency: int = 1, device: str | None = None,
                 dtype: torch.dtype | None = None, limits: Limits | None = None):
        self.model = model
        self.preset = load_preset(model)  # fails fast (PresetError) on an unknown model
        self.models_dir = Path(models_dir).resolve()
        self.outputs_dir = Path(outputs_dir).resolve()
        self.inputs_dir = self.outputs_dir / "inputs"
        for d in (self.models_dir, self.outputs_dir, self.inputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.max_concurrency = max(1, int(max_concurrency))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.limits = limits or Limits()
        self._pool: queue.Queue[_Worker] = queue.Queue()
        self._made = 0
        self._made_lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._sha_cache: dict[tuple[str, float, int], str | None] = {}

    # ------------------------------------------------------------------ pipelines
    def _new_worker(self) -> _Worker:
        from pipelines.studio_pipeline import StudioPipeline

        with _BUILD_LOCK:
            sp = StudioPipeline.from_preset(self.model, torch_dtype=self.dtype if self.dtype != torch.float32 else None)
            sp.to(self.device)
        return _Worker(pipeline=sp, scheduler_config=dict(sp.pipe.scheduler.config))

    def warmup(self) -> None:
        """Build the first pipeline now (so a bad `--model` fails at startup, and the first call is fast)."""
        with self.worker():
            pass

    @property
    def default_size(self) -> int:
        return int(self.preset.resolution)

    @property
    def model_kind(self) -> str:
        return self.preset.kind

    def worker(self):
        """Context manager lending a pipeline worker (created on demand, at most `max_concurrency`)."""
        return _Borrow(self)

    def _acquire(self) -> _Worker:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._made_lock:
            make = self._made < self.max_concurrency
            if make:
                self._made += 1
        if make:
            try:
                return self._new_worker()
            except Exception:
                with self._made_lock:
                    self._made -= 1
                raise
        return self._pool.get()

    def unet_config(self) -> dict[str, Any]:
        with self.worker() as w:
            return dict(w.pipeline.pipe.unet.config)

    # ------------------------------------------------------------------ weights
    def list_weights(self, family: str | None = None) -> list[str]:
        """Weights under the models folder, as names relative to it.

        A file with a weights suffix or a folder with a `config.json` is one entry. Entries under a subfolder named
        after a registered family are listed only for that family; others are listed for every family.
        """
        from studio.registry import FAMILIES, _load_builtin_families

        _load_builtin_families()
        out: list[str] = []

        def walk(folder: Path, depth: int) -> None:
            for p in sorted(folder.iterdir()):
                if p.name.startswith("."):
                    continue
                if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
                    out.append(p.relative_to(self.models_dir).as_posix())
                elif p.is_dir():
                    if (p / "config.json").is_file():  # a diffusers-style folder is one entry
                        out.append(p.relative_to(self.models_dir).as_posix())
                    elif depth < 3:
                        if depth == 0 and p.name in FAMILIES and family is not None and p.name != family:
                            continue
                        walk(p, depth + 1)

        walk(self.models_dir, 0)
        return out

    def resolve_weights(self, name: str) -> Path:
        """Path of a weights entry named relative to the models folder; refuses anything outside it."""
        if not name:
            raise MixError("no weights chosen")
        p = Path(name)
        full = (p if p.is_absolute() else self.models_dir / p).resolve()
        if self.models_dir != full and self.models_dir not in full.parents:
            raise MixError(f"weights {name!r} are outside the models folder {self.models_dir}; put them there "
                           "(or upload them) and pick them by name")
        if not full.exists():
            raise MixError(f"weights {name!r} not found in the models folder {self.models_dir}; "
                           f"available: {', '.join(self.list_weights()) or 'none'}")
        return full

    def weights_sha256(self, path: Path) -> str | None:
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        if key not in self._sha_cache:
            self._sha_cache[key] = file_sha256(path)
        return self._sha_cache[key]

    def add_weights(self, upload: str | os.PathLike, family: str, filename: str | None = None) -> str:
        """Check an uploaded weights file (or a .zip of a diffusers folder) against the model, then keep it.

        The file is loaded with the family's loader and checked against this server's UNet before it is stored in
        `models_dir/<family>/`; a file for another base model raises the family's `CheckpointError` and is not kept.
        Returns the stored entry's name (relative to the models folder).
        """
        from studio.registry import get_family

        fam = get_family(family)
        src = Path(upload)
        name = _safe_name(filename or src.name)
        if not src.is_file():
            raise CheckpointError(f"upload {name!r} did not arrive")
        dest_dir = self.models_dir / family
        dest_dir.mkdir(parents=True, exist_ok=True)
        staging = self.models_dir / f".upload-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            if name.endswith(".zip"):
                candidate = staging / name[:-4]
                _extract_zip(src, candidate)
                inner = [p for p in candidate.iterdir() if not p.name.startswith(".")]
                if len(inner) == 1 and inner[0].is_dir():  # a zip of the folder itself
                    candidate = inner[0]
            elif Path(name).suffix in WEIGHT_SUFFIXES:
                candidate = staging / name
                shutil.copyfile(src, candidate)
            else:
                raise CheckpointError(f"{name!r} is not a weights file: upload {', '.join(WEIGHT_SUFFIXES)} or a .zip "
                                      "of a diffusers folder (config.json + *.safetensors)")
            with self.worker() as w, _BUILD_LOCK:
                adapter = fam.load(str(candidate), w.pipeline.pipe)
                adapter.check_compatible(w.pipeline.pipe.unet)
            dest = dest_dir / candidate.name
            if dest.exists():
                same = self.weights_sha256(dest) == file_sha256(candidate)
                if same:
                    return dest.relative_to(self.models_dir).as_posix()
                stem, suffix = (dest.stem, dest.suffix) if dest.is_file() or candidate.is_file() else (dest.name, "")
                dest = dest_dir / f"{stem}-{hashlib.sha256(str(time.time()).encode()).hexdigest()[:6]}{suffix}"
            shutil.move(str(candidate), dest)
            return dest.relative_to(self.models_dir).as_posix()
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ images
    def store_image(self, path: str | os.PathLike, what: str = "image") -> Path:
        """Check an uploaded image (is an image, under the caps) and keep a PNG copy named by its content hash.

        Mixes refer to these stored copies, so a mix (and an output's metadata) stays valid after the upload's
        temp file is gone.
        """
        src = Path(path)
        name = src.name
        if not src.is_file():
            raise InputImageError(f"{what}: file {name!r} not found")
        size = src.stat().st_size
        if size > self.limits.max_input_bytes:
            raise InputImageError(f"{what}: {name!r} is {size / 2**20:.1f} MiB; the cap is "
                                  f"{self.limits.max_input_bytes / 2**20:.0f} MiB")
        try:
            with Image.open(src) as im:
                w, h = im.size
                if w * h > self.limits.max_input_pixels:
                    raise InputImageError(f"{what}: {name!r} is {w}x{h} = {w * h / 1e6:.1f} MP; the cap is "
                                          f"{self.limits.max_input_pixels / 1e6:.1f} MP — downscale it")
                im.load()
                img = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") and "transparency" in im.info
                                 or im.mode in ("RGBA", "LA") else "RGB")
        except InputImageError:
            raise
        except Image.DecompressionBombError:
            raise InputImageError(f"{what}: {name!r} is larger than the image size cap") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputImageError(f"{what}: {name!r} is not an image PIL can read ({type(e).__name__}); upload a "
                                  "PNG, JPEG or WebP") from None
        digest = hashlib.sha256(img.tobytes() + f"{img.mode}{img.size}".encode()).hexdigest()[:20]
        dest = self.inputs_dir / f"{digest}.png"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:6]}.tmp")
            img.save(tmp, format="PNG")
            os.replace(tmp, dest)
        return dest

    def _stored_input(self, value: Any, uploads: dict[str, Path], where: str) -> str:
        """A mix image reference -> the path of a stored input image.

        Accepts an index or a file name into `uploads` (API calls), or a path already in the input store.
        """
        if isinstance(value, bool):
            raise MixError(f"{where}: {value!r} is not an image reference")
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and value not in uploads):
            files = list(uploads.values())
            i = int(value)
            if not 0 <= i < len(files):
                raise MixError(f"{where}: image index {i} but {len(files)} file(s) were uploaded")
            return str(self.store_image(files[i], where))
        if isinstance(value, str):
            if value in uploads:
                return str(self.store_image(uploads[value], where))
            p = Path(value)
            full = (p if p.is_absolute() else self.inputs_dir / p).resolve()
            if full.parent == self.inputs_dir and full.is_file():
                return str(full)
            raise MixError(f"{where}: image {value!r} is neither an uploaded file ({', '.join(uploads) or 'none'}) "
                           f"nor in the studio's input store; upload it with the request")
        raise MixError(f"{where}: image references are file names or indices, got {type(value).__name__}")

    # ------------------------------------------------------------------ mixes
    def complete_mix(self, mix: Mix, uploads: dict[str, Path] | None = None) -> Mix:
        """A copy of `mix` ready to run and to record: defaults filled, seed drawn, images stored, weights hashed.

        Disabled units are dropped (the recorded mix is what ran). Raises `MixError` listing every problem.
        """
        from studio.registry import FAMILIES, _load_builtin_families

        _load_builtin_families()
        uploads = uploads or {}
        mix = copy.deepcopy(mix)
        problems: list[str] = []
        s = dict(mix.sampling)
        s.setdefault("prompt", "")
        s.setdefault("negative_prompt", "")
        s.setdefault("steps", 20)
        s.setdefault("width", self.default_size)
        s.setdefault("height", self.default_size)
        s.setdefault("sampler", "DDIM")
        s.setdefault("guidance", "auto")
        s.setdefault("guidance_scale", 7.5)
        s.setdefault("num_images", 1)
        seed = s.get("seed", -1)
        try:
            seed = int(seed) if seed is not None else -1
        except (TypeError, ValueError):
            problems.append(f"seed must be an integer (or -1 for random), got {seed!r}")
            seed = 0
        if seed < 0:
            seed = random.randint(0, MAX_SEED)
        s["seed"] = seed % (MAX_SEED + 1)
        if mix.model != self.model:
            problems.append(f"this mix was made for model {mix.model!r}; this server runs {self.model!r} "
                            f"(start it with --model {mix.model})")

        units: list[UnitSpec] = []
        for i, unit in enumerate(mix.units):
            if not unit.enabled:
                continue
            where = f"unit {i + 1}"
            if unit.family not in FAMILIES:
                problems.append(f"{where}: adapter family {unit.family!r} is not installed "
                                f"(installed: {', '.join(FAMILIES) or 'none'})")
                continue
            ui = unit_ui(unit.family, FAMILIES[unit.family].label)
            where = f"unit {i + 1} ({ui.label})"
            if ui.model_kinds and self.model_kind not in ui.model_kinds:
                problems.append(f"{where} runs on {'/'.join(ui.model_kinds)} models; this server's model "
                                f"{self.model!r} is {self.model_kind}")
            if not unit.weights:
                problems.append(f"{where}: choose a weights file")
            else:
                try:
                    path = self.resolve_weights(unit.weights)
                    unit.sha256 = self.weights_sha256(path)
                except StudioError as e:
                    problems.append(f"{where}: {e}")
            try:
                unit.inputs = self._complete_inputs(unit, ui, uploads, where)
            except StudioError as e:
                problems.append(str(e))
            for f in ui.fields:
                if f.required and f.target == "inputs" and not unit.inputs.get(f.key):
                    problems.append(f"{where}: {f.label.lower()} required, none given")
            units.append(unit)
        mix.units = units
        problems += self._check_sampling(s, units)
        if problems:
            raise MixError("; ".join(problems))
        mix.sampling = s
        return mix

    def _complete_inputs(self, unit: UnitSpec, ui: Any, uploads: dict[str, Path], where: str) -> dict[str, Any]:
        inputs = dict(unit.inputs)
        for f in ui.fields:
            if f.target != "inputs" or f.key not in inputs or inputs[f.key] in (None, "", []):
                if f.target == "inputs" and f.key in inputs and inputs[f.key] in (None, "", []):
                    inputs.pop(f.key)
                continue
            if f.kind == "images":
                vals = inputs[f.key] if isinstance(inputs[f.key], list) else [inputs[f.key]]
                inputs[f.key] = [self._stored_input(v, uploads, f"{where} {f.label.lower()}") for v in vals]
            elif f.kind == "image":
                inputs[f.key] = self._stored_input(inputs[f.key], uploads, f"{where} {f.label.lower()}")
        return inputs

    def _check_sampling(self, s: dict[str, Any], units: list[UnitSpec]) -> list[str]:
        lim, problems = self.limits, []

        def num(key: str, lo: float, hi: float, integer: bool = True) -> None:
            v = s.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
            if not ok or not lo <= v <= hi:
                problems.append(f"{key} must be {'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}], got {v!r}")
            elif integer:
                s[key] = int(v)

        num("steps", 1, lim.max_steps)
        num("num_images", 1, lim.max_images)
        num("guidance_scale", 0.0, 50.0, integer=False)
        if self.model_kind == "video":
            s.setdefault("num_frames", 16)
            s.setdefault("fps", 8)
            num("num_frames", 1, 256)
            num("fps", 1, 60)
        for key in ("width", "height"):
            num(key, 64, lim.max_side)
            if isinstance(s.get(key), int) and s[key] % 8:
                problems.append(f"{key} must be a multiple of 8, got {s[key]}")
        if s.get("sampler") not in SAMPLERS:
            problems.append(f"sampler {s.get('sampler')!r} is not one of {', '.join(SAMPLERS)}")
        for key in ("prompt", "negative_prompt"):
            if not isinstance(s.get(key), str):
                problems.append(f"{key} must be text, got {type(s.get(key)).__name__}")
        agd = [i for i, u in enumerate(units) if unit_ui(u.family).guidance == "agd"]
        mode = str(s.get("guidance", "auto")).lower()
        if mode not in ("auto", "cfg", "agd"):
            problems.append(f"guidance must be auto, cfg or agd, got {s.get('guidance')!r}")
        elif len(agd) > 1:
            problems.append(f"{len(agd)} AGD units are enabled: AGD takes one guidance adapter per call (one UNet "
                            "pass per step with one w); disable all but one")
        elif mode == "cfg" and agd:
            problems.append("an AGD unit replaces classifier-free guidance: set guidance to AGD (or auto), or disable "
                            "the AGD unit")
        elif mode == "agd" and not agd:
            problems.append("guidance AGD needs an enabled AGD unit with weights (its w is the guidance scale); "
                            "add one or set guidance to CFG")
        else:
            s["guidance"] = "agd" if agd else "cfg"
            if agd:  # one w for the call: the unit's own if it names one, else the call's; recorded in both places
                u = units[agd[0]]
                key = next((f.key for f in unit_ui(u.family).fields if f.target == "guidance"), None)
                if key and isinstance(u.inputs.get(key), (int, float)):
                    s["guidance_scale"] = float(u.inputs[key])
                elif key:
                    u.inputs[key] = float(s["guidance_scale"])
        prompt_by_image = any(unit_ui(u.family).prompts_by_image and u.inputs.get(unit_ui(u.family).prompts_by_image)
                              for u in units)
        if isinstance(s.get("prompt"), str) and not s["prompt"].strip() and not prompt_by_image:
            problems.append("the prompt is empty: describe the image (or add an IP-Adapter unit with a reference "
                            "image to prompt by image alone)")
        return problems

    # ------------------------------------------------------------------ generation
    def cancel(self, session: str) -> bool:
        """Ask the running call of `session` to stop at its next step; True when one was running."""
        ev = self._cancel.get(session)
        if ev is None:
            return False
        ev.set()
        return True

    def generate(self, mix: Mix, uploads: dict[str, Path] | None = None, session: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Run `mix` (completed and checked first) and write its outputs. See the module docstring."""
        mix = self.complete_mix(mix, uploads)
        s = mix.sampling
        session = session or uuid.uuid4().hex
        cancel = threading.Event()
        self._cancel[session] = cancel
        t0 = time.perf_counter()
        try:
            with self.worker() as w:
                out = self._run(w, mix, cancel, progress)
        finally:
            if self._cancel.get(session) is cancel:
                del self._cancel[session]
        seconds = time.perf_counter() - t0
        return self._write_outputs(mix, out, seconds)

    def _run(self, w: _Worker, mix: Mix, cancel: threading.Event, progress: Callable[[int, int], None] | None) -> Any:
        import diffusers

        sp, s = w.pipeline, mix.sampling
        run_mix = copy.deepcopy(mix)
        # the UI-side targets (scale / guidance / sampling) are already folded into the mix; inputs go to the family
        for u in run_mix.units:
            u.weights = str(self.resolve_weights(u.weights))
        with _BUILD_LOCK:
            apply_mix(run_mix, sp)
        cls_name, extra = SAMPLERS[s["sampler"]]
        sp.pipe.scheduler = getattr(diffusers, cls_name).from_config({**w.scheduler_config, **extra})
        steps, n = s["steps"], s["num_images"]
        generators = [torch.Generator("cpu").manual_seed(s["seed"] + i) for i in range(n)]

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel.is_set():
                raise GenerationCancelled(f"cancelled after {i + 1} of {steps} steps")
            if progress is not None:
                progress(i + 1, steps)
            return kwargs

        call = dict(prompt=s["prompt"], negative_prompt=s["negative_prompt"] or None, num_inference_steps=steps,
                    height=s["height"], width=s["width"], guidance=s["guidance"],
                    guidance_scale=float(s["guidance_scale"]), generator=generators, num_images_per_prompt=n,
                    callback_on_step_end=on_step_end)
        if self.model_kind == "video":  # AnimateDiff names the batch differently and takes a frame count
            call["num_videos_per_prompt"] = n
            call["num_frames"] = int(s.get("num_frames", 16))
        for u in mix.units:  # sampling-target fields of unit forms (e.g. I2V's frame count)
            for f in unit_ui(u.family).fields:
                if f.target == "sampling" and f.key in s and f.key != "fps":
                    call[f.key] = s[f.key]
        return sp(**call)

    def _write_outputs(self, mix: Mix, out: Any, seconds: float) -> GenerationResult:
        s = mix.sampling
        day = self.outputs_dir / time.strftime("%Y-%m-%d")
        day.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%H%M%S")
        images: list[Path] = []
        sidecars: list[Path] = []
        videos: dict[str, Path] = {}
        frames = getattr(out, "frames", None)
        if frames is not None:  # video pipelines: a clip per sample; its first frame is the still carrying the mix
            from .export import write_video

            stills = [clip[0] for clip in frames]
            videos = write_video(frames[0], day / f"{stamp}-{s['seed']}-{uuid.uuid4().hex[:6]}",
                                 fps=int(s.get("fps", 8)))
        else:
            stills = out.images
        for i, img in enumerate(stills):
            one = copy.deepcopy(mix)
            one.sampling = {**s, "seed": (s["seed"] + i) % (MAX_SEED + 1), "num_images": 1}
            path = day / f"{stamp}-{one.sampling['seed']}-{uuid.uuid4().hex[:6]}.png"
            save_png_with_mix(img, path, one)
            images.append(path)
            sidecars.append(path.with_suffix(".json"))
        info = (f"{len(images)} image(s), {s['width']}x{s['height']}, {s['steps']} steps {s['sampler']}, "
                f"{s['guidance'].upper()} {s['guidance_scale']:g}, seed {s['seed']}, "
                f"{len(mix.units)} unit(s), {seconds:.2f} s")
        return GenerationResult(images=images, sidecars=sidecars, mix=mix, seconds=seconds, videos=videos, info=info)


class _Borrow:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.worker: _Worker | None = None

    def __enter__(self) -> _Worker:
        self.worker = self.engine._acquire()
        return self.worker

    def __exit__(self, *exc: Any) -> None:
        if self.worker is not None:
            self.worker.pipeline.stack.clear()
            self.engine._pool.put(self.worker)
            self.worker = None


def _safe_name(name: str) -> str:
    """A file name without folders or odd characters (uploads keep their name, but only that)."""
    base = Path(str(name).replace("\\", "/")).name
    keep = "".join(c if c.isalnum() or c in "._-+" else "_" for c in base).lstrip(".")
    return keep or "upload"


def _extract_zip(src: Path, dest: Path, max_bytes: int = 8 * 2**30) -> None:
    """Extract a zip refusing entries that escape `dest` (zip slip) or a total over `max_bytes`."""
    try:
        zf = zipfile.ZipFile(src)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{src.name} is not a valid zip archive") from None
    with zf:
        total = sum(i.file_size for i in zf.infolist())
        if total > max_bytes:
            raise CheckpointError(f"{src.name} unpacks to {total / 2**30:.1f} GiB; the cap is {max_bytes / 2**30:.0f} GiB")
        dest.mkdir(parents=True)
        root = dest.resolve()
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if root not in target.parents and target != root:
                raise CheckpointError(f"{src.name}: entry {info.filename!r} points outside the archive")
        zf.extractall(dest)


__all__ = ["Engine", "GenerationResult", "GenerationCancelled", "InputImageError", "Limits", "SAMPLERS"]
