"""The Gradio layout of the studio and its named API endpoints.

Generate tab: prompt + sampling settings on the left, adapter units below them (tabs "Unit 1..N", like the
ControlNet units of other UIs; each unit's family form comes from `studio.app.units`), results on the right with
the mix, a Python export and the files. Train tab: one background run with a live loss plot. Every handler
turns `StudioError`s into `gr.Error` toasts (and anything unexpected into a short message, logged in full), so a
bad input never shows a stack trace and the server keeps serving.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from studio.errors import MixError, StudioError
from studio.mix import MIX_VERSION, Mix, UnitSpec

from .engine import SAMPLERS, Engine, GenerationCancelled
from .export import python_snippet
from .metadata import read_mix
from .training_runner import TrainingRunner
from .units import BLOCK_PRESETS, PREVIEWS, Field, block_preset_scale, families_for_ui, input_spec_json, \
    preset_of_scale, unit_ui

log = logging.getLogger("adapter_studio.app")

MAX_UNITS = 6
DEFAULT_UNITS = 3
GUIDANCE_CHOICES = [("Auto", "auto"), ("CFG", "cfg"), ("AGD", "agd")]

CSS = """
#studio-header {display:flex; align-items:baseline; gap:14px; padding:6px 2px 0 2px}
#studio-header h1 {margin:0; font-size:1.55rem; letter-spacing:-0.01em}
#studio-header .sub {opacity:0.7; font-size:0.92rem}
#studio-header code {font-size:0.85rem}
#generate-btn {min-height:52px; font-size:1.05rem}
#cancel-btn {min-height:52px}
.unit-help p {margin:2px 0 4px 0; opacity:0.75; font-size:0.88rem}
#result-gallery {min-height:420px}
#run-info p {margin:4px 0; font-size:0.9rem; opacity:0.85}
.tight-row {gap:8px}
.icon-btn {max-width:46px; min-width:46px !important}
footer {opacity:0.6}
"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate", radius_size="md")


# ----------------------------------------------------------------------------------------------------------
# error handling


def friendly_errors(fn: Callable) -> Callable:
    """Run a handler; input errors become readable toasts, unexpected ones a short message (full trace in the log)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except GenerationCancelled as e:
            raise gr.Error(f"Cancelled: {e}", title="Cancelled") from None
        except StudioError as e:
            raise gr.Error(str(e), title="Cannot run this") from None
        except Exception as e:  # noqa: BLE001  the server must keep serving
            log.exception("handler %s failed", getattr(fn, "__name__", fn))
            raise gr.Error(f"Internal error ({type(e).__name__}: {str(e)[:300]}). The server is still running; the "
                           "full trace is in its log.", title="Something went wrong") from None

    return wrapper


# ----------------------------------------------------------------------------------------------------------
# unit widgets


@dataclass
class UnitWidgets:
    """The components of one adapter unit (all families' forms are built; the chosen family's is shown)."""

    index: int
    tab: Any
    enabled: Any
    family: Any
    weights: Any
    refresh: Any
    upload: Any
    help: Any
    weight: Any
    start: Any
    end: Any
    groups: dict[str, Any] = field(default_factory=dict)
    fields: dict[tuple[str, str], Any] = field(default_factory=dict)
    previews: dict[tuple[str, str], Any] = field(default_factory=dict)

    def components(self) -> list[Any]:
        return [self.enabled, self.family, self.weights, self.weight, self.start, self.end, *self.fields.values()]


def _field_component(f: Field, visible: bool = True) -> Any:
    if f.kind == "images":
        return gr.Gallery(label=f.label, type="filepath", interactive=True, columns=4, height=150,
                          object_fit="contain", file_types=["image"], show_label=True, elem_classes=["unit-images"])
    if f.kind == "image":
        return gr.Image(label=f.label, type="filepath", sources=["upload", "clipboard"], height=150,
                        image_mode=None)
    if f.kind in ("number", "int"):
        return gr.Slider(f.minimum if f.minimum is not None else 0, f.maximum if f.maximum is not None else 1,
                         value=f.default, step=f.step or (1 if f.kind == "int" else 0.05), label=f.label, info=f.info)
    if f.kind == "choice":
        return gr.Dropdown(choices=list(f.choices), value=f.default, label=f.label, info=f.info)
    return gr.Code(value=f.default or "", language="json", label=f.label, lines=2, visible=visible)


def _gallery_paths(value: Any) -> list[str]:
    """Gallery input values (tuples / dicts / paths, depending on the Gradio version) -> file paths."""
    out = []
    for item in value or []:
        if isinstance(item, (list, tuple)):
            item = item[0]
        if isinstance(item, dict):
            item = item.get("path") or (item.get("image") or {}).get("path")
        if hasattr(item, "path"):
            item = item.path
        if item:
            out.append(str(item))
    return out


def _parse_json_field(text: Any, where: str) -> Any:
    if text in (None, ""):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MixError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} col {e.colno})") from None


# ----------------------------------------------------------------------------------------------------------
# the app


class StudioApp:
    """Builds the Blocks and holds what the handlers share (engine, training runner, presets folder)."""

    def __init__(self, engine: Engine, runner: TrainingRunner | None = None, mixes_dir: str | Path | None = None):
        self.engine = engine
        self.runner = runner or TrainingRunner()
        self.mixes_dir = Path(mixes_dir) if mixes_dir else Path(__file__).resolve().parents[2] / "configs" / "mixes"
        self.families = families_for_ui()  # [(label, name)]
        self.units: list[UnitWidgets] = []
        self._unet_config: dict[str, Any] | None = None

    @property
    def unet_config(self) -> dict[str, Any]:
        if self._unet_config is None:
            self._unet_config = self.engine.unet_config()
        return self._unet_config

    # ---- forms <-> mix
    def forms_to_mix(self, v: dict[Any, Any], n_units: int) -> Mix:
        """Widget values -> a `Mix` (images stored in the input store; AGD's w and I2V's frames folded in)."""
        sampling: dict[str, Any] = {
            "prompt": v[self.prompt] or "", "negative_prompt": v[self.negative] or "",
            "seed": int(v[self.seed]) if v[self.seed] is not None else -1, "steps": int(v[self.steps]),
            "width": int(v[self.width]), "height": int(v[self.height]), "sampler": v[self.sampler],
            "guidance": v[self.guidance], "guidance_scale": float(v[self.cfg_scale]), "num_images": int(v[self.count]),
        }
        if self.engine.model_kind == "video":
            sampling.update(num_frames=int(v[self.frames]), fps=int(v[self.fps]))
        units: list[UnitSpec] = []
        for u in self.units[:n_units]:
            if not v[u.enabled]:
                continue
            fam = v[u.family]
            if not fam:
                raise MixError(f"unit {u.index + 1}: choose an adapter family")
            ui = unit_ui(fam)
            where = f"unit {u.index + 1} ({ui.label})"
            weight = float(v[u.weight])
            spec = UnitSpec(family=fam, weights=v[u.weights] or None, scale=weight, start=float(v[u.start]),
                            end=float(v[u.end]))
            if spec.start > spec.end:
                raise MixError(f"{where}: start {spec.start:g} is after end {spec.end:g}")
            blocks = None
            for f in ui.fields:
                val = v.get(u.fields.get((fam, f.key)))
                if f.target == "inputs":
                    if f.kind == "images":
                        paths = _gallery_paths(val)
                        if paths:
                            spec.inputs[f.key] = [str(self.engine.store_image(p, f"{where} {f.label.lower()}"))
                                                  for p in paths]
                    elif f.kind == "image":
                        if val:
                            spec.inputs[f.key] = str(self.engine.store_image(val, f"{where} {f.label.lower()}"))
                    elif f.kind == "json":
                        parsed = _parse_json_field(val, f"{where} {f.label}")
                        if parsed is not None and not isinstance(parsed, dict):
                            raise MixError(f"{where}: {f.label} must be a JSON object")
                        spec.inputs.update(parsed or {})
                    elif val is not None:
                        spec.inputs[f.key] = val
                elif f.target == "scale":
                    if f.kind == "choice":
                        blocks = val or "all blocks"
                    elif blocks == "custom":
                        custom = _parse_json_field(val, f"{where} {f.label}")
                        if custom is None:
                            raise MixError(f"{where}: Blocks is 'custom' but the per-block scale JSON is empty")
                        spec.scale = custom
                elif f.target == "guidance":  # AGD's w: the call's guidance scale, kept in the unit's inputs too
                    spec.inputs[f.key] = float(val)
                    if sampling["guidance"] != "cfg":
                        sampling["guidance_scale"] = float(val)
                elif f.target == "sampling" and val is not None:
                    sampling[f.key] = val
            if blocks and blocks != "custom":
                spec.scale = block_preset_scale(blocks, weight, self.unet_config)
            units.append(spec)
        return Mix(model=self.engine.model, units=units, sampling=sampling)

    def mix_to_updates(self, mix: Mix) -> tuple[dict[Any, Any], list[str]]:
        """A mix -> updates for every widget (the inverse of `forms_to_mix`), plus warnings to show."""
        warnings: list[str] = []
        s = mix.sampling
        if mix.model != self.engine.model:
            warnings.append(f"this mix was made with model {mix.model!r}; the server runs {self.engine.model!r}")
        agd_w = float(s["guidance_scale"]) if s.get("guidance") == "agd" and "guidance_scale" in s else None
        upd: dict[Any, Any] = {
            self.prompt: s.get("prompt", ""), self.negative: s.get("negative_prompt", ""),
            self.seed: s.get("seed", -1), self.steps: s.get("steps", 20),
            self.width: s.get("width", self.engine.default_size), self.height: s.get("height", self.engine.default_size),
            self.sampler: s.get("sampler", "DDIM"), self.guidance: s.get("guidance", "auto"),
            self.count: s.get("num_images", 1), self.frames: s.get("num_frames", 16), self.fps: s.get("fps", 8),
        }
        if agd_w is None and "guidance_scale" in s:
            upd[self.cfg_scale] = s["guidance_scale"]
        n = min(MAX_UNITS, max(DEFAULT_UNITS, len(mix.units)))
        if len(mix.units) > MAX_UNITS:
            warnings.append(f"the mix has {len(mix.units)} units; the UI shows the first {MAX_UNITS}")
        known = {name for _, name in self.families}
        for i, u in enumerate(self.units):
            if i >= len(mix.units):  # unused units: off (their tab label follows through enabled.change)
                upd[u.tab] = gr.update(visible=i < n)
                upd[u.enabled] = False
                continue
            spec = mix.units[i]
            upd[u.tab] = gr.update(visible=i < n, label=_tab_label(i, spec.family, spec.enabled))
            if spec.family not in known:
                warnings.append(f"unit {i + 1}: family {spec.family!r} is not installed here")
                upd[u.enabled] = False
                continue
            ui = unit_ui(spec.family)
            upd[u.enabled] = spec.enabled
            upd[u.family] = spec.family
            choices = self.engine.list_weights(spec.family)
            if spec.weights and spec.weights not in choices:
                warnings.append(f"unit {i + 1}: weights {spec.weights!r} are not in the models folder")
                choices = [spec.weights, *choices]
            elif spec.weights and spec.sha256:
                now = self.engine.weights_sha256(self.engine.resolve_weights(spec.weights))
                if now != spec.sha256:
                    warnings.append(f"unit {i + 1}: {spec.weights} changed since this mix was made "
                                    f"(sha256 {spec.sha256[:12]}… then, {str(now)[:12]}… now)")
            upd[u.weights] = gr.update(choices=choices, value=spec.weights)
            preset, weight = preset_of_scale(spec.scale, self.unet_config)
            upd[u.weight] = weight
            upd[u.start], upd[u.end] = spec.start, spec.end
            for fam, _ in self._family_names():
                upd[u.groups[fam]] = gr.update(visible=fam == spec.family)
            upd[u.help] = ui.help
            for f in ui.fields:
                comp = u.fields.get((spec.family, f.key))
                if comp is None:
                    continue
                if f.target == "inputs":
                    val = spec.inputs.get(f.key)
                    if f.kind == "images":
                        paths = [p for p in (val or []) if Path(p).is_file()]
                        if len(paths) < len(val or []):
                            warnings.append(f"unit {i + 1}: {len(val) - len(paths)} reference image(s) are no longer "
                                            "on the server")
                        upd[comp] = paths or None
                    elif f.kind == "image":
                        upd[comp] = val if val and Path(val).is_file() else None
                    elif f.kind == "json":
                        upd[comp] = json.dumps(spec.inputs, indent=1)
                    else:
                        upd[comp] = val if val is not None else f.default
                elif f.target == "scale":
                    if f.kind == "choice":
                        upd[comp] = preset if preset in BLOCK_PRESETS else "custom"
                    else:
                        upd[comp] = gr.update(value=json.dumps(spec.scale) if preset == "custom" else "",
                                              visible=preset == "custom")
                elif f.target == "guidance":
                    w = spec.inputs.get(f.key, agd_w)
                    upd[comp] = w if w is not None else f.default
                elif f.target == "sampling":
                    upd[comp] = s.get(f.key, f.default)
        upd[self.n_units] = n
        return upd, warnings

    def _family_names(self) -> list[tuple[str, str]]:
        return [(name, label) for label, name in self.families]

    # ---- handlers
    def all_inputs(self) -> set[Any]:
        comps = {self.prompt, self.negative, self.seed, self.steps, self.width, self.height, self.sampler,
                 self.guidance, self.cfg_scale, self.count, self.frames, self.fps, self.n_units}
        for u in self.units:
            comps.update(u.components())
        return comps

    def ui_outputs(self) -> list[Any]:
        return [self.gallery, self.video, self.files, self.info, self.mix_code, self.snippet_code, self.last_mix,
                self.seed_used]

    @staticmethod
    def _gallery(res: Any) -> list[tuple[str, str]]:
        """(png, "seed N") per output: each image's own seed, from its sidecar."""
        return [(str(p), f"seed {json.loads(s.read_text())['sampling']['seed']}")
                for p, s in zip(res.images, res.sidecars)]

    def _result_updates(self, res: Any) -> list[Any]:
        video = res.videos.get("webm") or res.videos.get("mp4")
        gallery = self._gallery(res)
        files = [str(p) for pair in zip(res.images, res.sidecars) for p in pair] + [str(p) for p in res.videos.values()]
        return [gallery, gr.update(value=str(video) if video else None, visible=bool(video)), files,
                f"**Done** · {res.info}", res.mix.to_json(), python_snippet(res.mix, self.engine.models_dir),
                res.mix.to_dict(), res.mix.sampling["seed"]]

    def generate_ui(self, v: dict[Any, Any], request: gr.Request, progress=gr.Progress()) -> list[Any]:
        mix = self.forms_to_mix(v, int(v[self.n_units]))
        progress(0, desc="Loading adapters")
        try:
            res = self.engine.generate(mix, session=_session(request),
                                       progress=lambda i, n: progress((i, n), desc="Sampling", unit="steps"))
        except GenerationCancelled as e:  # not an error: keep the last result on screen
            gr.Warning(f"Cancelled {str(e).removeprefix('cancelled ')}")
            return [gr.skip()] * 3 + [f"**Cancelled** {str(e).removeprefix('cancelled ')}"] + [gr.skip()] * 4
        return self._result_updates(res)

    def cancel(self, request: gr.Request) -> None:
        if self.engine.cancel(_session(request)):
            gr.Info("Cancelling at the next step…")

    # ---- API handlers (named endpoints; see docs/app.md)
    def api_generate(self, prompt: str, negative_prompt: str, seed: float, steps: float, width: float, height: float,
                     sampler: str, guidance: str, guidance_scale: float, num_images: float, units: str,
                     images: list[str] | None, request: gr.Request, progress=gr.Progress()) -> tuple[list, str]:
        units_raw = _parse_json_field(units, "units") or []
        if not isinstance(units_raw, list):
            raise MixError("units must be a JSON list of mix units")
        mix = Mix.from_dict({"version": MIX_VERSION, "model": self.engine.model, "units": units_raw, "sampling": {
            "prompt": prompt or "", "negative_prompt": negative_prompt or "", "seed": _int(seed, "seed"),
            "steps": _int(steps, "steps"), "width": _int(width, "width"), "height": _int(height, "height"),
            "sampler": sampler, "guidance": guidance, "guidance_scale": guidance_scale,
            "num_images": _int(num_images, "num_images")}})
        return self._api_run(mix, images, request, progress)

    def api_generate_mix(self, mix: str, images: list[str] | None, request: gr.Request,
                         progress=gr.Progress()) -> tuple[list, str]:
        parsed = Mix.from_json(mix or "")
        return self._api_run(parsed, images, request, progress)

    def _api_run(self, mix: Mix, images: list[str] | None, request: Any, progress: Any) -> tuple[list, str]:
        uploads = {Path(p).name: Path(p) for p in (images or [])}
        res = self.engine.generate(mix, uploads, session=_session(request),
                                   progress=lambda i, n: progress((i, n), desc="Sampling", unit="steps"))
        return self._gallery(res), res.mix.to_json()

    def api_read_settings(self, file: str | None) -> str:
        if not file:
            raise MixError("upload a PNG made by the studio or a mix JSON")
        return read_mix(file).to_json()

    def api_upload_weights(self, file: str | None, family: str) -> str:
        if not file:
            raise StudioError("no file uploaded")
        return self.engine.add_weights(file, family or "", Path(file).name)

    # ---- presets
    def preset_names(self) -> list[str]:
        return sorted(p.stem for p in self.mixes_dir.glob("*.json")) if self.mixes_dir.is_dir() else []

    def save_preset(self, name: str, v: dict[Any, Any]) -> Any:
        name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", (name or "").strip()).strip("-.")
        if not name:
            raise MixError("give the preset a name")
        mix = self.forms_to_mix(v, int(v[self.n_units]))
        self.mixes_dir.mkdir(parents=True, exist_ok=True)
        mix.save(self.mixes_dir / f"{name}.json")
        gr.Info(f"Saved preset {name!r} ({len(mix.units)} unit(s))")
        return gr.update(choices=self.preset_names(), value=name)

    def load_preset(self, name: str) -> dict[Any, Any]:
        if not name:
            raise MixError("choose a preset")
        path = self.mixes_dir / f"{Path(name).name}.json"
        if not path.is_file():
            raise MixError(f"preset {name!r} not found in {self.mixes_dir}")
        return self._load_mix(Mix.load(path))

    def load_from_file(self, file: str | None) -> dict[Any, Any]:
        if not file:
            return {}
        return self._load_mix(read_mix(file))

    def _load_mix(self, mix: Mix) -> dict[Any, Any]:
        upd, warnings = self.mix_to_updates(mix)
        for w in warnings:
            gr.Warning(w)
        gr.Info(f"Settings loaded: {len(mix.units)} unit(s), seed {mix.sampling.get('seed')}")
        return upd

    # ---- unit events
    def on_family(self, u: UnitWidgets, fam: str, enabled: bool) -> list[Any]:
        ui = unit_ui(fam) if fam else None
        ups = [gr.update(visible=f == fam) for f, _ in self._family_names()]
        choices = self.engine.list_weights(fam) if fam else []
        return [*ups, gr.update(choices=choices, value=choices[0] if choices else None),
                ui.help if ui else "", gr.update(value=ui.default_weight if ui else 1.0),
                gr.update(label=_tab_label(u.index, fam, enabled))]

    def on_upload(self, fam: str, file: Any) -> Any:
        if not fam:
            raise StudioError("choose the unit's adapter family before uploading its weights")
        path = file if isinstance(file, str) else getattr(file, "name", None)
        name = self.engine.add_weights(path, fam, Path(path).name)
        gr.Info(f"Weights checked against the model and added: {name}")
        return gr.update(choices=self.engine.list_weights(fam), value=name)

    # ---- training
    def ui_train_start(self, config: str, data_dir: str, output_dir: str, max_steps: float | None, extra: str) -> str:
        run = self.runner.start(config, data_dir or "", output_dir or "", int(max_steps) if max_steps else None,
                                extra or "")
        return _status_md({**self.runner.status(), "output_dir": str(run.output_dir)})

    def train_refresh(self) -> list[Any]:
        import pandas as pd

        st = self.runner.status()
        rows = self.runner.losses()
        df = pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]})
        if len(df):
            df["series"] = "loss"
            ema = df["loss"].ewm(alpha=0.1).mean()
            df = pd.concat([df, pd.DataFrame({"step": df["step"], "loss": ema, "series": "smoothed"})])
        val = self.runner.latest_validation()
        return [_status_md(st), df if len(df) else None, str(val) if val else None, self.runner.log_tail()]

    def train_add_to_models(self) -> str:
        """Copy the finished run's final adapter into `models/<family>/<run name>`; returns its weights name."""
        st = self.runner.status()
        if not st.get("final"):
            raise StudioError("the run has no final adapter yet (it is written when training finishes)")
        import shutil

        run = self.runner.run
        fam = _family_of_script(run.script.stem)
        dest = self.engine.models_dir / fam / Path(st["output_dir"]).name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(st["final"], dest)
        return dest.relative_to(self.engine.models_dir).as_posix()

    # ---- layout
    def build(self) -> gr.Blocks:
        fam_names = self._family_names()
        size = self.engine.default_size
        with gr.Blocks(title="Adapter Studio", analytics_enabled=False) as demo:
            gr.HTML(f"<div id='studio-header'><h1>Adapter Studio</h1><span class='sub'>mix IP-Adapter · AGD · "
                    f"more adapters on one frozen diffusion model — model <code>{self.engine.model}</code> on "
                    f"<code>{self.engine.device}</code></span></div>")
            self.last_mix = gr.State(None)
            self.n_units = gr.State(DEFAULT_UNITS)
            with gr.Tabs():
                with gr.Tab("Generate", id="generate"):
                    self._build_generate(fam_names, size)
                with gr.Tab("Train", id="train"):
                    self._build_train()
                with gr.Tab("API", id="api"):
                    gr.Markdown(_API_HELP)
            self._build_api()
        return demo

    def _build_generate(self, fam_names: list[tuple[str, str]], size: int) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                self.prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a watercolor fox in a misty forest",
                                         elem_id="prompt")
                self.negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="blurry, low quality")
                with gr.Row(elem_classes=["tight-row"]):
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=4)
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", scale=1)
                with gr.Accordion("Sampling", open=True):
                    with gr.Row(elem_classes=["tight-row"], equal_height=True):
                        self.seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, scale=3,
                                              elem_id="seed")
                        dice = gr.Button("⚄", elem_classes=["icon-btn"], scale=0, min_width=46)
                        reuse = gr.Button("♻", elem_classes=["icon-btn"], scale=0, min_width=46)
                        self.count = gr.Slider(1, self.engine.limits.max_images, value=1, step=1, label="Images",
                                               scale=3)
                    with gr.Row(elem_classes=["tight-row"]):
                        self.sampler = gr.Dropdown(list(SAMPLERS), value="DDIM", label="Sampler", scale=2)
                        self.steps = gr.Slider(1, self.engine.limits.max_steps, value=20, step=1, label="Steps",
                                               scale=3)
                    with gr.Row(elem_classes=["tight-row"]):
                        self.width = gr.Slider(64, self.engine.limits.max_side, value=size, step=8, label="Width")
                        self.height = gr.Slider(64, self.engine.limits.max_side, value=size, step=8, label="Height")
                    video = self.engine.model_kind == "video"
                    with gr.Row(elem_classes=["tight-row"], visible=video):
                        self.frames = gr.Slider(2, 64, value=16, step=1, label="Frames", visible=video)
                        self.fps = gr.Slider(1, 30, value=8, step=1, label="FPS", visible=video)
                    with gr.Row(elem_classes=["tight-row"]):
                        self.guidance = gr.Radio(GUIDANCE_CHOICES, value="auto", label="Guidance", scale=2)
                        self.cfg_scale = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="CFG scale", scale=3,
                                                   info="two UNet passes per step; an AGD unit replaces it")
                gr.Markdown("### Adapter units")
                with gr.Tabs():
                    for i in range(MAX_UNITS):
                        self.units.append(self._build_unit(i, fam_names))
                with gr.Row(elem_classes=["tight-row"]):
                    add_btn = gr.Button("+ Add unit", size="sm")
                    rm_btn = gr.Button("− Remove last unit", size="sm")
            with gr.Column(scale=6, min_width=420):
                self.gallery = gr.Gallery(label="Result", columns=2, height=440, object_fit="contain",
                                          elem_id="result-gallery", format="png", interactive=False,
                                          buttons=["download", "fullscreen"])
                self.video = gr.Video(label="Video", visible=False, autoplay=True, loop=True, elem_id="result-video")
                self.info = gr.Markdown("Ready. Outputs carry their full mix (PNG text chunk + JSON sidecar).",
                                        elem_id="run-info")
                self.seed_used = gr.Number(visible=False, precision=0)
                with gr.Tabs():
                    with gr.Tab("Mix"):
                        self.mix_code = gr.Code(language="json", label="Mix of the last run", lines=12, max_lines=22,
                                                interactive=False)
                    with gr.Tab("Python"):
                        self.snippet_code = gr.Code(language="python", label="Reproduce with diffusers + the studio",
                                                    lines=12, max_lines=22, interactive=False)
                    with gr.Tab("Files"):
                        self.files = gr.File(label="PNG + JSON sidecars (+ GIF/MP4 for video)", file_count="multiple",
                                             interactive=False)
                with gr.Accordion("Settings & presets", open=True):
                    with gr.Row(elem_classes=["tight-row"]):
                        settings_file = gr.File(label="Load settings from image (PNG) or mix JSON",
                                                file_types=[".png", ".json"], height=110, scale=3,
                                                elem_id="settings-file")
                        with gr.Column(scale=2):
                            presets = gr.Dropdown(self.preset_names(), label="Mix presets", value=None,
                                                  allow_custom_value=False)
                            load_preset_btn = gr.Button("Load preset", size="sm")
                    with gr.Row(elem_classes=["tight-row"]):
                        preset_name = gr.Textbox(label="Save current settings as preset", placeholder="my-style-mix",
                                                 scale=3)
                        save_preset_btn = gr.Button("Save preset", size="sm", scale=1)

        inputs = self.all_inputs()
        unit_comps = [c for u in self.units for c in [u.tab, *u.components(), *u.groups.values(), u.help]]
        load_outputs = list(dict.fromkeys([self.prompt, self.negative, self.seed, self.steps, self.width, self.height,
                                           self.sampler, self.guidance, self.cfg_scale, self.count, self.frames,
                                           self.fps, self.n_units,
                                           *unit_comps]))
        gen_event = gen_btn.click(friendly_errors(self.generate_ui), inputs=inputs, outputs=self.ui_outputs(),
                                  api_visibility="private", concurrency_id="generate",
                                  concurrency_limit=self.engine.max_concurrency, show_progress_on=[self.gallery])
        self.prompt.submit(friendly_errors(self.generate_ui), inputs=inputs, outputs=self.ui_outputs(),
                           api_visibility="private", concurrency_id="generate",
                           concurrency_limit=self.engine.max_concurrency, show_progress_on=[self.gallery])
        cancel_btn.click(friendly_errors(self.cancel), None, None, queue=False, api_visibility="private")
        dice.click(lambda: -1, None, self.seed, queue=False, api_visibility="private")
        reuse.click(lambda s: s if s is not None else -1, self.seed_used, self.seed, queue=False,
                    api_visibility="private")

        def set_units(n: int) -> list[Any]:
            return [n, *[gr.update(visible=i < n) for i in range(MAX_UNITS)]]

        tabs = [u.tab for u in self.units]
        add_btn.click(lambda n: set_units(min(MAX_UNITS, n + 1)), self.n_units, [self.n_units, *tabs], queue=False,
                      api_visibility="private")
        rm_btn.click(lambda n: set_units(max(1, n - 1)), self.n_units, [self.n_units, *tabs], queue=False,
                     api_visibility="private")
        settings_file.upload(friendly_errors(self.load_from_file), settings_file, load_outputs,
                             api_visibility="private")
        load_preset_btn.click(friendly_errors(self.load_preset), presets, load_outputs, api_visibility="private")
        save_inputs = inputs | {preset_name}
        save_preset_btn.click(friendly_errors(lambda v: self.save_preset(v[preset_name], v)),
                              save_inputs, presets, api_visibility="private")
        self._gen_event = gen_event

    def _build_unit(self, i: int, fam_names: list[tuple[str, str]]) -> UnitWidgets:
        default_fam = fam_names[0][0] if fam_names else None
        with gr.Tab(_tab_label(i, default_fam, False), visible=i < DEFAULT_UNITS, id=f"unit-{i}") as tab:
            ui0 = unit_ui(default_fam) if default_fam else None
            with gr.Row(elem_classes=["tight-row"], equal_height=True):
                enabled = gr.Checkbox(label="Enable", value=False, scale=0, min_width=110,
                                      elem_id=f"unit-{i}-enable")
                help_md = gr.Markdown(ui0.help if ui0 else "No adapter family is installed.",
                                      elem_classes=["unit-help"])
            with gr.Row(elem_classes=["tight-row"], equal_height=True):
                family = gr.Dropdown([(label, name) for name, label in fam_names], value=default_fam, label="Family",
                                     scale=3, min_width=160, elem_id=f"unit-{i}-family")
                choices = self.engine.list_weights(default_fam) if default_fam else []
                weights = gr.Dropdown(choices, value=choices[0] if choices else None, label="Weights (models folder)",
                                      scale=4, allow_custom_value=False, elem_id=f"unit-{i}-weights")
                refresh = gr.Button("↻", elem_classes=["icon-btn"], scale=0, min_width=46)
                upload = gr.UploadButton("Upload", file_types=[".safetensors", ".bin", ".pt", ".pth", ".zip"],
                                         scale=0, min_width=90)
            with gr.Row(elem_classes=["tight-row"]):
                weight = gr.Slider(0.0, 2.0, value=ui0.default_weight if ui0 else 1.0, step=0.05, label="Weight",
                                   elem_id=f"unit-{i}-weight")
                start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Start")
                end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="End")
            u = UnitWidgets(index=i, tab=tab, enabled=enabled, family=family, weights=weights, refresh=refresh,
                            upload=upload, help=help_md, weight=weight, start=start, end=end)
            for fam, _ in fam_names:
                ui = unit_ui(fam)
                with gr.Group(visible=fam == default_fam) as grp:
                    with gr.Row():
                        for f in ui.fields:
                            if f.kind in ("images", "image"):
                                u.fields[(fam, f.key)] = _field_component(f)
                                if f.preview:
                                    u.previews[(fam, f.key)] = gr.Image(label=f"{f.label} — preview", height=150,
                                                                        interactive=False)
                    with gr.Row():
                        for f in ui.fields:
                            if f.kind in ("choice", "number", "int"):
                                u.fields[(fam, f.key)] = _field_component(f)
                    for f in ui.fields:
                        if f.kind == "json":
                            shown = f.visible_when is None or f.visible_when[1] == next(
                                (g.default for g in ui.fields if g.key == f.visible_when[0]), None)
                            u.fields[(fam, f.key)] = _field_component(f, visible=shown)
                u.groups[fam] = grp
        # .input (the user's choice), not .change: loading a mix sets the family and its weights together
        family.input(friendly_errors(lambda fam, on, _u=u: self.on_family(_u, fam, on)), [family, enabled],
                     [*u.groups.values(), weights, help_md, weight, tab], queue=False, api_visibility="private")
        enabled.change(lambda on, fam, _i=i: gr.update(label=_tab_label(_i, fam, on)), [enabled, family], tab,
                       queue=False, api_visibility="private")
        refresh.click(lambda fam, cur: gr.update(choices=self.engine.list_weights(fam) if fam else [], value=cur),
                      [family, weights], weights, queue=False, api_visibility="private")
        upload.upload(friendly_errors(self.on_upload), [family, upload], weights, api_visibility="private")
        for (fam, key), comp in u.fields.items():  # widgets shown only for some value of another field
            f = unit_ui(fam).field(key)
            if f.visible_when and (fam, f.visible_when[0]) in u.fields:
                u.fields[(fam, f.visible_when[0])].change(lambda val, _want=f.visible_when[1]: gr.update(
                    visible=val == _want), u.fields[(fam, f.visible_when[0])], comp, queue=False,
                    api_visibility="private")
        for (fam, key), prev in u.previews.items():  # e.g. Ctrl-Adapter: the preprocessed control image
            keys = [k for (fm, k) in u.fields if fm == fam]
            deps = [u.fields[(fam, k)] for k in keys]

            def run_preview(*vals: Any, _name: str = unit_ui(fam).field(key).preview, _keys: list = keys) -> Any:
                return PREVIEWS[_name](dict(zip(_keys, vals)))

            for dep in deps:
                dep.change(friendly_errors(run_preview), deps, prev, api_visibility="private")
        return u

    def _data_label(self, config: str | None) -> str:
        if not config:
            return "Data folder"
        return f"Data folder (passed as --{self.runner.data_key(self.runner.config_path(config))})"

    def _build_train(self) -> None:
        configs = self.runner.configs()
        gr.Markdown("Start one training config as a background process (`accelerate launch`); the plot reads "
                    "`output_dir/logs/loss.jsonl`, the image is the latest validation grid.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                config = gr.Dropdown(configs, value=configs[0] if configs else None, label="Training config")
                config_view = gr.Code(self.runner.config_text(configs[0]) if configs else "", language="yaml",
                                      label="Config", lines=8, interactive=False)
                data_dir = gr.Textbox(label=self._data_label(configs[0] if configs else None),
                                      placeholder="a folder (blank = the config's)")
                with gr.Row(elem_classes=["tight-row"]):
                    output_dir = gr.Textbox(label="Output folder", placeholder="runs/<config>-<time> (default)")
                    max_steps = gr.Number(label="Max steps (0 = the config's)", value=0, precision=0, minimum=0)
                extra = gr.Textbox(label="Extra arguments", placeholder="--learning_rate 1e-4 --validation_steps 10")
                with gr.Row(elem_classes=["tight-row"]):
                    start_btn = gr.Button("Start training", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                    add_btn = gr.Button("Add to models")
                status = gr.Markdown(_status_md(self.runner.status()))
            with gr.Column(scale=5):
                plot = gr.LinePlot(x="step", y="loss", color="series", title="Training loss", height=300,
                                   x_title="step", y_title="loss")
                val_img = gr.Image(label="Latest validation grid", interactive=False, height=280)
                log_box = gr.Textbox(label="Console (tail)", lines=8, max_lines=8, autoscroll=True,
                                     interactive=False)
        timer = gr.Timer(2.0)
        config.change(lambda c: [self.runner.config_text(c) if c else "", gr.update(label=self._data_label(c))],
                      config, [config_view, data_dir], queue=False, api_visibility="private")
        start_btn.click(friendly_errors(self.ui_train_start), [config, data_dir, output_dir, max_steps, extra], status,
                        api_visibility="private")
        stop_btn.click(friendly_errors(lambda: _status_md({**self.runner.status(), "note": self.runner.stop()})),
                       None, status, api_visibility="private")
        add_btn.click(friendly_errors(lambda: f"Added to the models folder as `{self.train_add_to_models()}` — pick it "
                                          "in a unit's weights (↻)"), None, status, api_visibility="private")
        timer.tick(self.train_refresh, None, [status, plot, val_img, log_box], queue=False, show_progress="hidden",
                   api_visibility="private")

    def _build_api(self) -> None:
        """Endpoints for `gradio_client` (hidden components; documented in docs/app.md)."""
        with gr.Column(visible=False):
            a_prompt = gr.Textbox()
            a_neg = gr.Textbox()
            a_seed = gr.Number(value=-1, precision=0)
            a_steps = gr.Number(value=20, precision=0)
            a_w = gr.Number(value=self.engine.default_size, precision=0)
            a_h = gr.Number(value=self.engine.default_size, precision=0)
            a_sampler = gr.Dropdown(list(SAMPLERS), value="DDIM")
            a_guid = gr.Dropdown(["auto", "cfg", "agd"], value="auto")
            a_scale = gr.Number(value=7.5)
            a_count = gr.Number(value=1, precision=0)
            a_units = gr.Textbox(value="[]")
            a_images = gr.File(file_count="multiple", type="filepath")
            a_gallery = gr.Gallery(format="png")
            a_mix_out = gr.Textbox()
            a_mix_in = gr.Textbox()
            a_file = gr.File(type="filepath")
            a_family = gr.Textbox()
            a_text_out = gr.Textbox()
            a_btn = gr.Button()
        limit = dict(concurrency_id="generate", concurrency_limit=self.engine.max_concurrency)
        a_btn.click(friendly_errors(self.api_generate),
                    [a_prompt, a_neg, a_seed, a_steps, a_w, a_h, a_sampler, a_guid, a_scale, a_count, a_units,
                     a_images], [a_gallery, a_mix_out], api_name="generate", **limit)
        a_btn.click(friendly_errors(self.api_generate_mix), [a_mix_in, a_images], [a_gallery, a_mix_out],
                    api_name="generate_mix", **limit)
        a_btn.click(friendly_errors(self.api_read_settings), a_file, a_text_out, api_name="read_settings")
        a_btn.click(friendly_errors(self.api_upload_weights), [a_file, a_family], a_text_out,
                    api_name="upload_weights")
        a_btn.click(friendly_errors(lambda m: python_snippet(self.engine.complete_mix(Mix.from_json(m or "")),
                                                             self.engine.models_dir)),
                    a_mix_in, a_text_out, api_name="export_python")

        def families() -> str:
            """Installed adapter families and their unit inputs (JSON)."""
            return json.dumps(input_spec_json())

        def list_weights(family: str) -> str:
            """Weights in the models folder usable by `family` (JSON list of names)."""
            return json.dumps(self.engine.list_weights(family or None))

        def list_presets() -> str:
            """Names of the saved mix presets (JSON list)."""
            return json.dumps(self.preset_names())

        def train_start(config: str, data_dir: str, output_dir: str = "", max_steps: int = 0,
                        extra_args: str = "") -> str:
            """Start a training run in the background; returns its status (JSON)."""
            self.runner.start(config, data_dir, output_dir, max_steps or None, extra_args)
            return json.dumps(self.runner.status())

        def train_status() -> str:
            """Status of the current training run (JSON: state, step, loss, output_dir, ...)."""
            return json.dumps(self.runner.status())

        def train_stop() -> str:
            """Stop the current training run; returns its status (JSON)."""
            self.runner.stop()
            return json.dumps(self.runner.status())

        def train_add_to_models() -> str:
            """Copy the finished run's final adapter into the models folder; returns {"name": weights name} (JSON)."""
            return json.dumps({"name": self.train_add_to_models()})

        for fn in (families, list_weights, list_presets, train_status, train_stop, train_start, train_add_to_models):
            gr.api(friendly_errors(fn), api_name=fn.__name__, concurrency_limit=None if fn is not train_start else 1)


def _tab_label(i: int, fam: str | None, enabled: bool) -> str:
    label = unit_ui(fam).label.split(" ")[0] if fam else "—"
    return f"{'●' if enabled else '○'} Unit {i + 1} · {label}"


def _session(request: Any) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _int(v: Any, name: str) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise MixError(f"{name} must be a number, got {v!r}") from None
    if not f.is_integer():
        raise MixError(f"{name} must be an integer, got {v!r}")
    return int(f)


def _family_of_script(stem: str) -> str:
    return {"ip_adapter": "ip", "agd": "agd", "ctrl_adapter": "ctrl", "i2v_adapter": "i2v"}.get(stem, stem)


def _status_md(st: dict[str, Any]) -> str:
    if st.get("state") == "idle":
        return "**No run.** Pick a config and a data folder, then Start."
    parts = [f"**{st['state'].capitalize()}** · `{st.get('config')}`",
             f"step {st.get('step', 0)}" + (f" / {st['max_steps']}" if st.get("max_steps") else "")]
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    parts.append(f"{st.get('elapsed_s', 0):.0f} s")
    text = " · ".join(parts) + f"\n\nOutput: `{st.get('output_dir')}`"
    if st.get("final"):
        text += f" · final adapter: `{st['final']}`"
    if st.get("returncode") not in (None, 0) and st.get("state") == "failed":
        text += f"\n\nThe process exited with code {st['returncode']}; see the console below."
    if st.get("note"):
        text += f"\n\n{st['note']}"
    return text


_API_HELP = """
### Named endpoints (use with `gradio_client`)

| endpoint | inputs | returns |
|---|---|---|
| `/generate` | prompt, negative_prompt, seed, steps, width, height, sampler, guidance, guidance_scale, num_images, units (JSON list of mix units), images (files referenced by the units) | gallery (PNG files with the mix inside), mix JSON |
| `/generate_mix` | mix (JSON), images | gallery, mix JSON |
| `/read_settings` | file (studio PNG or mix JSON) | mix JSON |
| `/export_python` | mix (JSON) | Python script reproducing it |
| `/upload_weights` | file, family | name in the models folder |
| `/families`, `/list_weights`, `/list_presets` | — / family / — | JSON |
| `/train_start`, `/train_status`, `/train_stop` | config, data_dir, output_dir, max_steps, extra_args | status JSON |
| `/train_add_to_models` | — | `{"name": ...}` of the finished run's adapter |

```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
gallery, mix = client.predict("a red fox", "", 7, 20, 512, 512, "DDIM", "auto", 7.5, 1,
    '[{"family": "ip", "weights": "ip/ip-adapter_sd15.safetensors", "scale": 0.7, "inputs": {"image": ["ref.png"]}}]',
    [handle_file("ref.png")], api_name="/generate")
```
Full reference: `docs/app.md`.
"""


def build_app(engine: Engine, runner: TrainingRunner | None = None, mixes_dir: str | Path | None = None) -> gr.Blocks:
    """The studio's `gr.Blocks` (call `.queue(...)` and `.launch(theme=theme(), css=CSS)` on it)."""
    return StudioApp(engine, runner, mixes_dir).build()
