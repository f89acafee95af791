"""The studio's engine: turns a mix into outputs, and says clearly why a mix cannot run.

Everything the UI and the API generate goes through one path: a `Mix` (model, sampling settings, adapter units)
is completed (seed drawn, the model's size filled in, weights resolved and hashed, input images stored), checked
(every reason it cannot run, in one message), loaded into a pooled `StudioPipeline` as
`adapter_studio.mix.apply_mix` would, and sampled; `outputs.write_outputs` writes each image with its own mix.

The engine knows no family: what a unit needs comes from its `Family` (weights files, fields, guidance mode, model
kinds). The sampling defaults live in the mix schema (`adapter_studio.mix.Sampling`); the engine adds only this
server's limits (`limits.Limits`: largest side, steps, images per call, input sizes, the pixel×step budget). Adapters
load through `adapter_cache` (a weights file is read once), generations are tracked per session by `jobs` (Cancel
reaches queued ones too). It works without Gradio.

With `compile`, a call whose `compile_key` (the shape of its mix) the borrowed pipeline has not run yet compiles its
UNet first: the engine says so through `status` (`COMPILING`) before the first step, and in the result's info.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from adapter_studio.errors import MixError, StudioError
from adapter_studio.mix import VIDEO_DEFAULTS, Mix, UnitSpec, apply_mix
from adapter_studio.presets import load_preset
from adapter_studio.registry import families, get_family, guidance_families

from .adapter_cache import AdapterCache
from .export import call_arguments
from .jobs import Cancelled, Jobs
from .limits import Limits, budget_problem
from .logs import shorten
from .outputs import MAX_SEED, GenerationResult, write_outputs
from .pool import BUILD_LOCK, PipelinePool
from .stores import InputStore, WeightsStore, check_readable, weights_folder
from .tokens import PromptTokens, count_tokens

GUIDANCE_FIXED = ("auto", "cfg")
COMPILING = "Compiling the UNet for this mix (first run of this shape: may take a minute; later runs reuse it)"
ADAPTER_CACHE_BYTES = 2 * 2**30  # loaded adapters kept in memory (`--adapter-cache-mb`)

log = logging.getLogger("adapter_studio.app")


class GenerationCancelled(StudioError):
    """The user pressed Cancel: raised from the step callback to stop sampling, or before a queued generation starts
    (`before_start`)."""

    def __init__(self, message: str, before_start: bool = False):
        super().__init__(message)
        self.before_start = before_start


def compile_key(mix: Mix, sp: Any) -> tuple:
    """What decides whether a call of a compiled pipeline compiles: a key its pipeline has not run yet means a new
    graph. A guess (a wrong one only mis-states the "compiling" message), after docs/performance.md: the graph
    follows the stack's structure and the tensors' shapes and dtypes, not their values.

    `mix` is completed (its units the enabled ones, in the order of `sp.stack`, already loaded with them). Per unit:
    its family, its adapter's size (tensors and parameters: another weights file may be bigger), whether it has a
    per-sample mask, and per input field the shape it gives — the number of images of an images field, whether an
    image field is set, the value of a choice / text / JSON field (IP's "combine" may change the token count);
    numbers (scales, AGD's w) and windows are values and left out (a residual adapter out of its window hands the
    compiled UNet zero residuals: the same graph). Per call: the images, whether CFG doubles the UNet's batch, the
    guidance mode, height, width, frames, and whether the sampler's timesteps are floats (Euler's) or integers.
    """
    s = mix.sampling
    units = []
    for unit, slot in zip(mix.units, list(sp.stack)):
        fields = []
        for f in get_family(unit.family).fields:
            if f.target != "inputs":
                continue
            v = unit.inputs.get(f.key, f.default)
            if f.kind == "images":
                fields.append(len(v) if isinstance(v, list) else int(v not in (None, "")))
            elif f.kind == "image":
                fields.append(v not in (None, ""))
            elif f.kind in ("choice", "text", "json"):
                fields.append(v if isinstance(v, (str, int, float, bool, type(None))) else repr(v))
        params = list(slot.adapter.parameters())
        size = (len(params), sum(p.numel() for p in params))
        units.append((unit.family, size, unit.sample_mask is not None, tuple(fields)))
    cfg = s.guidance == "cfg" and float(s.guidance_scale) > 1.0
    return (tuple(units), s.num_images, cfg, s.guidance, s.height, s.width, s.num_frames,
            _float_timesteps(sp.pipe.scheduler, s.steps))


def _float_timesteps(scheduler: Any, steps: int) -> bool | None:
    """Whether `scheduler` hands the UNet float timesteps for a call of `steps` (on a copy; None: it cannot tell)."""
    try:
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(steps, device="cpu")
        return bool(torch.is_floating_point(probe.timesteps))
    except Exception:  # a scheduler that cannot make these steps: the call itself will say why
        return None


def guidance_choices() -> list[str]:
    """The guidance modes a mix may ask for: auto, cfg and each installed guidance family's mode."""
    return [*GUIDANCE_FIXED, *guidance_families()]


class Engine:
    """Generation backend of the studio.

    Args:
        model: preset name, preset YAML, hub id or local diffusers folder (`adapter_studio.presets.load_pipeline`).
        models_dir: folder of adapter weights (`stores.WeightsStore`); uploads land in `models_dir/<folder>/`.
        outputs_dir: where PNGs, sidecars and stored input images (`outputs_dir/inputs/`) go.
        max_concurrency: most pipelines held (each runs one call at a time).
        device, dtype: where the pipelines run (default: cuda + fp16 when available, else cpu + fp32).
        limits: this server's caps (the pixel×step budget by default by device).
        adapter_cache_bytes: most bytes of adapter parameters kept loaded (`adapter_cache.AdapterCache`; 0 = none).
        compile: run every pipeline's UNet compiled with its stack (`StudioPipeline.compile`, docs/performance.md):
            True, or a dict of its `torch.compile` options (`{"backend": "aot_eager"}`: a fast compile on a CPU, for
            tests). The first call of each mix structure, batch size or resolution compiles, and says so
            (`COMPILING`, `compile_key`).
    """

    def __init__(self, model: str = "tiny-sd15", models_dir: str | Path = "models", outputs_dir: str | Path = "outputs",
                 max_concurrency: int = 1, device: str | None = None, dtype: torch.dtype | None = None,
                 limits: Limits | None = None, adapter_cache_bytes: int = ADAPTER_CACHE_BYTES,
                 compile: bool | dict[str, Any] = False):
        self.model = model
        self.preset = load_preset(model)  # fails fast (PresetError) on an unknown model
        self.limits = limits or Limits()
        self.weights = WeightsStore(models_dir)
        self.models_dir = self.weights.root
        self.outputs_dir = Path(outputs_dir).resolve()
        self.inputs = InputStore(self.outputs_dir / "inputs", self.limits.max_input_pixels, self.limits.max_input_bytes)
        self.inputs_dir = self.inputs.root
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.pixel_step_budget = self.limits.pixel_step_budget(self.device)
        self.pool = PipelinePool(model, self.device, dtype, max_concurrency, compile=compile)
        self.max_concurrency = self.pool.max_concurrency
        self.adapters = AdapterCache(adapter_cache_bytes)
        self.jobs = Jobs()
        self._tokenizer: Any = None

    @property
    def default_size(self) -> int:
        return int(self.preset.resolution)

    @property
    def model_kind(self) -> str:
        return self.preset.kind

    def warmup(self) -> None:
        """Build the first pipeline now (so a bad `--model` fails at startup, and the first call is fast)."""
        with self.pool.borrow():
            pass

    def unet_config(self) -> dict[str, Any]:
        with self.pool.borrow() as sp:
            return dict(sp.pipe.unet.config)

    def prompt_tokens(self, text: str) -> PromptTokens:
        """Tokens of `text` in the model's (first) text encoder, and the part it cuts."""
        if self._tokenizer is None:  # kept from the first pipeline: counting must not wait for a free one
            with self.pool.borrow() as sp:
                self._tokenizer = sp.pipe.tokenizer
        return count_tokens(self._tokenizer, text)

    # ------------------------------------------------------------------ weights
    def list_weights(self, family: str | None, index: int = 0) -> list[str]:
        """Weights names listed for the `index`-th weights file of `family` (its folder plus the shared entries);
        every entry for no family."""
        if not family:
            return self.weights.list()
        fam = get_family(family)
        return self.weights.list(weights_folder(fam, index), fam.weights[index].config_classes)

    def add_weights(self, upload: str | Path, family: str, filename: str | None = None, key: str | None = None) -> str:
        """Check an uploaded weights file (or a .zip of a diffusers folder), then keep it in the models folder.

        It goes to the folder of the family's weights file `key` (default: the first). A family with a single
        weights file loads it with its loader against this server's model first, so a file for another base model
        raises the family's `CheckpointError` and is not kept; for a family loading several files a lone upload is
        only checked to be readable. Returns the stored entry's name (relative to the models folder).
        """
        fam = get_family(family)
        keys = [w.key for w in fam.weights]
        if key is None:
            key = keys[0]
        if key not in keys:
            raise MixError(f"{fam.label} has no weights file {key!r}; it loads {', '.join(keys)}")

        def check(path: Path) -> None:
            if len(fam.weights) > 1:
                check_readable(path)
                return
            with self.pool.borrow() as sp, BUILD_LOCK:
                fam.load({key: str(path)}, sp.pipe).check_compatible(sp.pipe.unet)

        return self.weights.add(upload, weights_folder(fam, keys.index(key)), check, filename)

    # ------------------------------------------------------------------ mixes
    def complete_mix(self, mix: Mix, uploads: dict[str, Path] | None = None) -> Mix:
        """A copy of `mix` ready to run and to record: seed drawn, size and video settings filled in, images stored,
        weights resolved to `{key: name}` and hashed.

        Disabled units are dropped (the recorded mix is what ran). Raises `MixError` listing every problem.
        """
        uploads = uploads or {}
        mix = copy.deepcopy(mix)
        s = mix.sampling
        problems = s.problems()
        if mix.model != self.model:
            problems.append(f"this mix was made for model {mix.model!r}; this server runs {self.model!r} "
                            f"(start it with --model {mix.model})")
        if isinstance(s.seed, int) and s.seed < 0:
            s.seed = random.randint(0, MAX_SEED)
        s.width = self.default_size if s.width is None else s.width
        s.height = self.default_size if s.height is None else s.height
        if self.model_kind == "video":
            s.num_frames = VIDEO_DEFAULTS["num_frames"] if s.num_frames is None else s.num_frames
            s.fps = VIDEO_DEFAULTS["fps"] if s.fps is None else s.fps
        else:  # an image model makes no clip: the recorded mix says what ran
            s.num_frames = s.fps = None
        problems += self._check_limits(mix)
        units: list[UnitSpec] = []
        for i, unit in enumerate(mix.units):
            if unit.enabled:
                problems += self._complete_unit(unit, i, uploads)
                units.append(unit)
        mix.units = units
        problems += self._check_guidance(mix)
        if problems:
            raise MixError("; ".join(problems))
        return mix

    def _check_limits(self, mix: Mix) -> list[str]:
        """This server's caps (the schema's own ranges are `Sampling.problems`)."""
        s, lim, out = mix.sampling, self.limits, []
        caps = {"steps": (1, lim.max_steps), "num_images": (1, lim.max_images), "width": (lim.min_side, lim.max_side),
                "height": (lim.min_side, lim.max_side)}
        for key, (lo, hi) in caps.items():
            v = getattr(s, key)
            if isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:
                out.append(f"{key} must be an integer in [{lo}, {hi}] on this server, got {v}")
        if not out and not s.problems():
            over = budget_problem(s, self.pixel_step_budget, self.device, lim.min_side)
            out += [over] if over else []
        for i, u in enumerate(mix.units):
            if u.enabled and u.sample_mask is not None and len(u.sample_mask) != s.num_images:
                out.append(f"unit {i + 1}: sample_mask has {len(u.sample_mask)} entries; the call makes "
                           f"{s.num_images} image(s), one entry each")
        return out

    def _complete_unit(self, unit: UnitSpec, i: int, uploads: dict[str, Path]) -> list[str]:
        """Fill in one enabled unit in place (weights dict + sha256, stored images); returns its problems."""
        try:
            fam = get_family(unit.family)
        except MixError:
            return [f"unit {i + 1}: adapter family {unit.family!r} is not installed "
                    f"(installed: {', '.join(f.name for f in families()) or 'none'})"]
        where = f"unit {i + 1} ({fam.label})"
        problems = []
        if fam.model_kinds and self.model_kind not in fam.model_kinds:
            problems.append(f"{where} runs on {'/'.join(fam.model_kinds)} models; this server's model "
                            f"{self.model!r} is {self.model_kind}")
        try:
            weights = fam.weights_dict(unit.weights)
        except MixError as e:
            return [*problems, f"{where}: {e}"]
        unit.weights, unit.sha256 = weights, {}
        for wf in fam.weights:
            name = weights[wf.key]
            if not name:
                unit.sha256[wf.key] = None
                if wf.required:
                    problems.append(f"{where}: choose {wf.label.lower()}")
                continue
            try:
                unit.sha256[wf.key] = self.weights.sha256(self.weights.resolve(name))
            except StudioError as e:
                problems.append(f"{where}: {e}")
        inputs = {k: v for k, v in unit.inputs.items() if v not in (None, "", [])}
        for f in fam.fields:
            if f.target != "inputs":
                continue
            what = f"{where} {f.label.lower()}"
            try:
                if f.kind == "images" and f.key in inputs:
                    vals = inputs[f.key] if isinstance(inputs[f.key], list) else [inputs[f.key]]
                    inputs[f.key] = [self.inputs.resolve(v, uploads, what) for v in vals]
                elif f.kind == "image" and f.key in inputs:
                    inputs[f.key] = self.inputs.resolve(inputs[f.key], uploads, what)
            except StudioError as e:
                problems.append(str(e))
            if f.required and f.key not in inputs:
                problems.append(f"{where}: {f.label.lower()} required, none given")
        unit.inputs = inputs
        return problems

    def _check_guidance(self, mix: Mix) -> list[str]:
        """At most one unit replacing classifier-free guidance, a guidance mode that fits the units, and a prompt (or an
        image prompt). Resolves "auto" and records one guidance scale for the call: a guidance unit's own w when it
        names one, else the call's, written into the unit too."""
        s, problems = mix.sampling, []
        installed = {f.name: f for f in families()}
        unit_families = [(u, installed[u.family]) for u in mix.units if u.family in installed]
        guiding = [(u, f) for u, f in unit_families if f.guidance]
        choices = guidance_choices()
        if s.guidance not in choices:
            problems.append(f"guidance must be one of {', '.join(choices)}, got {s.guidance!r}")
        elif len(guiding) > 1:
            problems.append(f"{len(guiding)} guidance units are enabled ({', '.join(f.label for _, f in guiding)}): "
                            "each replaces classifier-free guidance and a call takes one; disable all but one")
        elif s.guidance == "cfg" and guiding:
            fam = guiding[0][1]
            problems.append(f"{fam.label} replaces classifier-free guidance: set guidance to {fam.guidance} (or auto), "
                            f"or disable the {fam.label} unit")
        elif s.guidance not in GUIDANCE_FIXED and (not guiding or guiding[0][1].guidance != s.guidance):
            fam = guidance_families()[s.guidance]
            problems.append(f"guidance {s.guidance!r} needs an enabled {fam.label} unit with weights (its w is the "
                            "guidance scale); add one or set guidance to cfg")
        elif guiding:
            unit, fam = guiding[0]
            s.guidance = fam.guidance
            key = next((f.key for f in fam.fields if f.target == "guidance"), None)
            w = unit.inputs.get(key) if key else None
            if isinstance(w, (int, float)) and not isinstance(w, bool):
                s.guidance_scale = float(w)
            elif key:
                unit.inputs[key] = float(s.guidance_scale)
        else:
            s.guidance = "cfg"
        by_image = any(f.prompts_by_image and u.inputs.get(f.prompts_by_image) for u, f in unit_families)
        if isinstance(s.prompt, str) and not s.prompt.strip() and not by_image:
            hints = [f"fill {f.field(f.prompts_by_image).label.lower()} of an enabled {f.label} unit"
                     for f in installed.values() if f.prompts_by_image and f.field(f.prompts_by_image)]
            problems.append("the prompt is empty: describe the image"
                            + (f" (or {' or '.join(hints)} to prompt by image alone)" if hints else ""))
        return problems

    # ------------------------------------------------------------------ generation
    def queue(self, session: str | None) -> str:
        """A ticket for a generation of `session` about to wait in the queue (`jobs`); pass it to `generate`."""
        return self.jobs.queue(session or "")

    def cancel(self, session: str | None) -> Cancelled:
        """Cancel every generation of `session`: running ones stop at their next step, queued ones will not run."""
        return self.jobs.cancel(session or "")

    def generate(self, mix: Mix, uploads: dict[str, Path] | None = None, session: str | None = None,
                 progress: Callable[[int, int], None] | None = None, ticket: str | None = None,
                 status: Callable[[str], None] | None = None) -> GenerationResult:
        """Run `mix` (completed and checked first) and write its outputs. See the module docstring.

        `progress(step, steps)` is called after each sampling step; `status(message)` with a message for the user
        before sampling when there is one: `COMPILING` when this call compiles the UNet (a compiled pipeline's first
        call of this `compile_key`; the result's info says so too).
        `ticket` (from `queue`) is the generation's place among its session's; raises `GenerationCancelled` when it
        was cancelled while queued, before anything runs."""
        ticket, job = self.jobs.start(ticket, session or "")
        try:
            if job.cancel.is_set():
                raise GenerationCancelled("cancelled before it started", before_start=True)
            mix = self.complete_mix(mix, uploads)
            tokens = self.prompt_tokens(mix.sampling.prompt)
            log.info("generate: %s", self._describe(mix, tokens))
            t0 = time.perf_counter()
            with self.pool.borrow() as sp:
                if job.cancel.is_set():  # cancelled while waiting for a free pipeline
                    raise GenerationCancelled("cancelled before it started", before_start=True)
                out, compiled = self._run(sp, mix, job.cancel, progress, status)
        finally:
            self.jobs.finish(ticket)
        res = write_outputs(mix, out, self.outputs_dir, time.perf_counter() - t0)
        if compiled:
            res.info += " · compiled the UNet for this mix shape (first run; the next ones reuse it)"
        if tokens.over:
            res.info += f" · prompt cut to its first {tokens.limit} tokens"
        return res

    @staticmethod
    def _describe(mix: Mix, tokens: PromptTokens) -> str:
        """One log line of a generation (the prompt shortened: it may be thousands of characters)."""
        s = mix.sampling
        cut = f", cut at {tokens.limit}" if tokens.over else ""
        return (f"{s.num_images} image(s) {s.width}x{s.height}, {s.steps} steps {s.sampler}, "
                f"{len(mix.units)} unit(s), prompt {shorten(s.prompt)!r} ({tokens.count} tokens{cut})")

    def _load_units(self, sp: Any, mix: Mix) -> None:
        """Put the completed mix's units into the borrowed pipeline's stack with `apply_mix` (what the Python export
        runs), each adapter a copy from the adapter cache rather than a fresh read of its weights files."""

        def load(fam: Any, unit: Any, weights: dict[str, str | None], pipe: Any) -> Any:
            paths = {k: str(self.weights.resolve(v)) if v else None for k, v in weights.items()}
            return self.adapters.get(fam, paths, fam.weights_dict(unit.sha256), self.model, pipe)

        apply_mix(mix, sp, base_dir=self.models_dir, load=load)

    def _run(self, sp: Any, mix: Mix, cancel: threading.Event, progress: Callable[[int, int], None] | None,
             status: Callable[[str], None] | None = None) -> tuple[Any, bool]:
        """Sample `mix` with the borrowed pipeline; returns the pipeline's output and whether the call compiled."""
        s = mix.sampling
        with BUILD_LOCK:
            self._load_units(sp, mix)
        sp.set_sampler(s.sampler)
        key = compile_key(mix, sp) if sp.stack.compiled else None
        compiling = key is not None and self.pool.first_run(sp, key)
        if compiling:
            log.info("compiling the UNet for a new mix shape: %d unit(s) %s, %d image(s) %dx%d", len(mix.units),
                     [u.family for u in mix.units], s.num_images, s.width, s.height)
            if status is not None:
                status(COMPILING)
        generators = [torch.Generator("cpu").manual_seed(s.seed + i) for i in range(s.num_images)]

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel.is_set():
                raise GenerationCancelled(f"cancelled after {i + 1} of {s.steps} steps")
            if progress is not None:
                progress(i + 1, s.steps)
            return kwargs

        out = sp(**call_arguments(s), generator=generators, callback_on_step_end=on_step_end)
        if key is not None:  # remembered once the call succeeded (a cancelled one may not have compiled every graph)
            self.pool.ran(sp, key)
        return out, compiling

