"""The Generate tab: prompt and sampling settings, the adapter units (tabs "Unit 1..N"), results with the mix, its
Python export and the files, and settings loaded from an output PNG or a preset.

`forms_to_mix` reads every widget into a `Mix`; `mix_to_updates` is its inverse (used by "Load settings from image"
and presets). What a unit's form means in a mix is `forms.form_to_unit` / `forms.unit_to_form`. Generate takes a
ticket (`Engine.queue`) before it waits in the queue, so Cancel reaches a queued generation too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gradio as gr

from adapter_studio.errors import MixError, StudioError
from adapter_studio.mix import VIDEO_DEFAULTS, Mix, Sampling
from adapter_studio.registry import families, get_family, guidance_families
from adapter_studio.samplers import SAMPLERS

from .engine import Engine, GenerationCancelled
from .export import comfy_workflow_zip, python_snippet
from .forms import field_visible, form_to_unit, unit_to_form
from .handlers import session_of, toast_errors
from .metadata import read_mix
from .outputs import GenerationResult
from .stores import PresetStore
from .tokens import tokens_markdown
from .widgets import UnitWidgets, build_unit, gallery_paths, tab_label, weights_updates

MAX_UNITS = 6
DEFAULT_UNITS = 3


def guidance_radio_choices() -> list[tuple[str, str]]:
    """Auto, CFG, then each installed guidance family by its label."""
    return [("Auto", "auto"), ("CFG", "cfg"), *[(f.label, mode) for mode, f in guidance_families().items()]]


class GenerateTab:
    """Builds the Generate tab (inside a `gr.Blocks`) and holds its widgets and handlers."""

    def __init__(self, engine: Engine, presets: PresetStore):
        self.engine = engine
        self.presets = presets
        self.families = families()
        self.slots = max([len(f.weights) for f in self.families] + [1])
        self.units: list[UnitWidgets] = []
        self._unet_config: dict[str, Any] | None = None

    @property
    def unet_config(self) -> dict[str, Any]:
        if self._unet_config is None:
            self._unet_config = self.engine.unet_config()
        return self._unet_config

    # ---- forms <-> mix
    def forms_to_mix(self, v: dict[Any, Any], n_units: int) -> Mix:
        """Widget values -> a `Mix` (images stored in the input store; guidance and sampling fields folded in)."""
        video = self.engine.model_kind == "video"
        sampling = Sampling(
            prompt=v[self.prompt] or "", negative_prompt=v[self.negative] or "",
            seed=int(v[self.seed]) if v[self.seed] is not None else -1, steps=int(v[self.steps]),
            width=int(v[self.width]), height=int(v[self.height]), sampler=v[self.sampler], guidance=v[self.guidance],
            guidance_scale=float(v[self.cfg_scale]), num_images=int(v[self.count]),
            num_frames=int(v[self.frames]) if video else None, fps=int(v[self.fps]) if video else None)
        units = []
        for u in self.units[:n_units]:
            if not v[u.enabled]:
                continue
            if not v[u.family]:
                raise MixError(f"unit {u.index + 1}: choose an adapter family")
            fam = get_family(v[u.family])
            values = {f.key: v.get(u.fields.get((fam.name, f.key))) for f in fam.fields}
            values.update({f.key: gallery_paths(values[f.key]) for f in fam.fields if f.kind == "images"})
            units.append(form_to_unit(
                fam, weights={w.key: v[u.weights[j]] or None for j, w in enumerate(fam.weights)},
                weight=float(v[u.weight]), start=float(v[u.start]), end=float(v[u.end]), values=values,
                sampling=sampling, unet_config=self.unet_config, store_image=self.engine.inputs.store,
                where=f"unit {u.index + 1} ({fam.label})"))
        return Mix(model=self.engine.model, units=units, sampling=sampling)

    def mix_to_updates(self, mix: Mix,
                       families_now: list[str | None] | None = None) -> tuple[dict[Any, Any], list[str]]:
        """A mix -> updates for every widget (the inverse of `forms_to_mix`), plus warnings to show.

        Every unit's tab label is set here; `families_now` (the units' current families) labels the units the mix
        leaves off, which keep their family and are switched off."""
        warnings: list[str] = []
        s = mix.sampling
        if mix.model != self.engine.model:
            warnings.append(f"this mix was made with model {mix.model!r}; the server runs {self.engine.model!r}")
        size = self.engine.default_size
        upd: dict[Any, Any] = {
            self.prompt: s.prompt, self.negative: s.negative_prompt, self.seed: s.seed, self.steps: s.steps,
            self.width: s.width or size, self.height: s.height or size, self.sampler: s.sampler,
            self.guidance: s.guidance, self.count: s.num_images,
            self.frames: s.num_frames or VIDEO_DEFAULTS["num_frames"], self.fps: s.fps or VIDEO_DEFAULTS["fps"],
        }
        if s.guidance not in guidance_families():  # under a guidance family the scale is that unit's w, not CFG's
            upd[self.cfg_scale] = s.guidance_scale
        n = min(MAX_UNITS, max(DEFAULT_UNITS, len(mix.units)))
        if len(mix.units) > MAX_UNITS:
            warnings.append(f"the mix has {len(mix.units)} units; the UI shows the first {MAX_UNITS}")
        known = {f.name: f for f in self.families}
        for i, u in enumerate(self.units):
            if i >= len(mix.units):  # unused units: off, with their own family
                upd[u.tab] = gr.update(visible=i < n, **({"label": tab_label(i, families_now[i], False)}
                                                         if families_now is not None else {}))
                upd[u.enabled] = False
                continue
            spec = mix.units[i]
            upd[u.tab] = gr.update(visible=i < n, label=tab_label(i, spec.family, spec.enabled))
            fam = known.get(spec.family)
            if fam is None:
                warnings.append(f"unit {i + 1}: family {spec.family!r} is not installed here")
                upd[u.enabled] = False
                continue
            where = f"unit {i + 1}"
            upd[u.enabled] = spec.enabled
            upd[u.family] = spec.family
            weights = fam.weights_dict(spec.weights)
            weight_ups, weight_warnings = weights_updates(self.engine, fam, self.slots, weights)
            upd.update(zip(u.weights, weight_ups))
            warnings += [f"{where}: {w}" for w in weight_warnings]
            # sha256 has the shape of weights: a string (version 1) names the first weights file
            warnings += self._changed_weights(weights, fam.weights_dict(spec.sha256), where)
            if spec.sample_mask is not None:
                warnings.append(f"{where}: its sample_mask (on for some images of a batch only) has no place in the "
                                "UI; the unit acts on every image here")
            weight, values, unit_warnings = unit_to_form(fam, spec, s, self.unet_config, where)
            warnings += unit_warnings
            upd[u.weight] = weight
            upd[u.start], upd[u.end] = spec.start, spec.end
            upd.update({grp: gr.update(visible=name == spec.family) for name, grp in u.groups.items()})
            upd[u.help] = fam.help
            for f in fam.fields:
                comp = u.fields[(fam.name, f.key)]
                upd[comp] = gr.update(value=values[f.key], visible=field_visible(f, values)) if f.visible_when \
                    else values[f.key]
        upd[self.n_units] = n
        return upd, warnings

    def _changed_weights(self, weights: dict[str, str | None], sha: dict[str, str | None], where: str) -> list[str]:
        """Warnings for weights whose file changed since the mix recorded its sha256."""
        out = []
        for key, name in weights.items():
            if not name or not sha.get(key):
                continue
            try:
                now = self.engine.weights.sha256(self.engine.weights.resolve(name))
            except StudioError:  # missing: weights_updates says so
                continue
            if now != sha[key]:
                out.append(f"{where}: {name} changed since this mix was made (sha256 {sha[key][:12]}… then, "
                           f"{str(now)[:12]}… now)")
        return out

    # ---- handlers
    def all_inputs(self) -> set[Any]:
        comps = {self.prompt, self.negative, self.seed, self.steps, self.width, self.height, self.sampler,
                 self.guidance, self.cfg_scale, self.count, self.frames, self.fps, self.n_units}
        for u in self.units:
            comps.update(u.components())
        return comps

    def outputs(self) -> list[Any]:
        return [self.gallery, self.video, self.files, self.info, self.mix_code, self.snippet_code, self.seed_used]

    def result_updates(self, res: GenerationResult) -> list[Any]:
        video = res.videos.get("mp4") or res.videos.get("webm")
        files = [str(p) for pair in zip(res.images, res.sidecars) for p in pair] + [str(p) for p in res.videos.values()]
        return [res.gallery(), gr.update(value=str(video) if video else None, visible=bool(video)), files,
                f"**Done** · {res.info}", res.mix.to_json(), python_snippet(res.mix, self.engine.models_dir),
                res.mix.sampling.seed]

    def export_comfy_ui(self, mix_json: str) -> str:
        """The last run's mix as a ComfyUI workflow zip (the mix shown in the Mix tab: completed, seed drawn). Named
        apart from the API's `export_comfy`: Gradio names a page event after its handler."""
        if not mix_json:
            raise MixError("generate first: the export takes the last run's mix")
        return str(comfy_workflow_zip(Mix.from_json(mix_json), self.engine.models_dir, self.engine.inputs_dir,
                                      self.engine.outputs_dir / "exports"))

    def queue_job(self, request: gr.Request) -> str:
        """Generate's first step, outside the queue: the ticket Cancel reaches while the generation waits."""
        return self.engine.queue(session_of(request))

    def generate_ui(self, v: dict[Any, Any], request: gr.Request, progress: Any = gr.Progress()) -> Any:
        """The Generate button (named apart from `generate`: Gradio names an event after its handler, and the public
        `/generate` endpoint must keep its name)."""
        try:
            mix = self.forms_to_mix(v, int(v[self.n_units]))
        except Exception:
            self.engine.jobs.finish(v[self.ticket])  # it never reaches the engine
            raise
        progress(0, desc="Loading adapters")
        try:
            res = self.engine.generate(mix, session=session_of(request), ticket=v[self.ticket],
                                       progress=lambda i, n: progress((i, n), desc="Sampling", unit="steps"),
                                       status=lambda message: progress(0, desc=message))
        except GenerationCancelled as e:  # not an error: keep the last result on screen
            if e.before_start:  # Cancel said so when it was pressed
                return gr.skip()
            gr.Warning(f"Cancelled {str(e).removeprefix('cancelled ')}")
            return [gr.skip()] * 3 + [f"**Cancelled** {str(e).removeprefix('cancelled ')}"] + [gr.skip()] * 3
        return self.result_updates(res)

    def cancel(self, request: gr.Request) -> Any:
        """Cancel this page's generations, running or queued, and say what was cancelled."""
        what = self.engine.cancel(session_of(request))
        gr.Info(what.message())
        return f"**{what.message()}**" if what.running or what.queued else gr.skip()

    def count_tokens(self, prompt: str, negative: str) -> str:
        return tokens_markdown(self.engine.prompt_tokens(prompt or ""), self.engine.prompt_tokens(negative or ""))

    def save_preset(self, name: str, v: dict[Any, Any]) -> Any:
        mix = self.forms_to_mix(v, int(v[self.n_units]))
        saved = self.presets.save(name, mix)
        gr.Info(f"Saved preset {saved!r} ({len(mix.units)} unit(s))")
        return gr.update(choices=self.presets.names(), value=saved)

    def load_preset(self, name: str, *families_now: str | None) -> dict[Any, Any]:
        return self._load_mix(self.stored_inputs(self.presets.load(name)), list(families_now))

    def stored_inputs(self, mix: Mix) -> Mix:
        """A preset's input images named relative to the models folder (as its weights are; the example pictures of
        the toy models, say) copied into the input store, so the form shows them and Generate takes them."""
        def store(value: Any, what: str) -> Any:
            if isinstance(value, list):
                return [store(v, what) for v in value]
            root = self.engine.models_dir
            full = (root / value).resolve() if isinstance(value, str) and not Path(value).is_absolute() else None
            if full is not None and root in full.parents and full.is_file():
                return str(self.engine.inputs.store(full, what))
            return value

        known = {f.name: f for f in self.families}
        mix = copy.deepcopy(mix)
        for i, unit in enumerate(mix.units):
            fam = known.get(unit.family)
            for f in fam.fields if fam else ():
                if f.target == "inputs" and f.kind in ("image", "images") and f.key in unit.inputs:
                    unit.inputs[f.key] = store(unit.inputs[f.key], f"unit {i + 1} {f.label.lower()}")
        return mix

    def load_from_file(self, file: str | None, *families_now: str | None) -> dict[Any, Any]:
        return self._load_mix(read_mix(file), list(families_now)) if file else {}

    def _load_mix(self, mix: Mix, families_now: list[str | None]) -> dict[Any, Any]:
        upd, warnings = self.mix_to_updates(mix, families_now)
        for w in warnings:
            gr.Warning(w)
        gr.Info(f"Settings loaded: {len(mix.units)} unit(s), seed {mix.sampling.seed}")
        return upd

    # ---- layout
    def build(self) -> None:
        size, lim = self.engine.default_size, self.engine.limits
        guiding = [f.label for f in guidance_families().values()]
        self.n_units = gr.State(DEFAULT_UNITS)
        self.ticket = gr.State(None)
        budget = self.engine.pixel_step_budget
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                # a preset's `prompt_example:` (a caption of the world a small trained model knows) as the hint
                example = self.engine.preset.config.get("prompt_example") or "a watercolor fox in a misty forest"
                self.prompt = gr.Textbox(label="Prompt", lines=3, placeholder=example, elem_id="prompt")
                self.negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="blurry, low quality",
                                           elem_id="negative-prompt")
                self.tokens = gr.Markdown(self.count_tokens("", ""), elem_id="prompt-tokens")
                with gr.Row(elem_classes=["tight-row"]):
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=4)
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", scale=1)
                with gr.Accordion("Sampling", open=True):
                    with gr.Row(elem_classes=["tight-row"], equal_height=True):
                        self.seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, scale=3,
                                              elem_id="seed")
                        dice = gr.Button("⚄", elem_classes=["icon-btn"], scale=0, min_width=46)
                        reuse = gr.Button("♻", elem_classes=["icon-btn"], scale=0, min_width=46)
                        self.count = gr.Slider(1, lim.max_images, value=1, step=1, label="Images", scale=3)
                    with gr.Row(elem_classes=["tight-row"]):
                        self.sampler = gr.Dropdown(list(SAMPLERS), value=Sampling.sampler, label="Sampler", scale=2)
                        self.steps = gr.Slider(1, lim.max_steps, value=Sampling.steps, step=1, label="Steps", scale=3,
                                               info=f"this server takes up to {budget / 1e6:.1f} M pixel-steps per "
                                                    "request (width × height × steps × images)" if budget else None)
                    with gr.Row(elem_classes=["tight-row"]):
                        self.width = gr.Slider(lim.min_side, lim.max_side, value=size, step=8, label="Width")
                        self.height = gr.Slider(lim.min_side, lim.max_side, value=size, step=8, label="Height")
                    video = self.engine.model_kind == "video"
                    with gr.Row(elem_classes=["tight-row"], visible=video):
                        self.frames = gr.Slider(2, 64, value=VIDEO_DEFAULTS["num_frames"], step=1, label="Frames",
                                                visible=video)
                        self.fps = gr.Slider(1, 30, value=VIDEO_DEFAULTS["fps"], step=1, label="FPS", visible=video)
                    with gr.Row(elem_classes=["tight-row"]):
                        self.guidance = gr.Radio(guidance_radio_choices(), value=Sampling.guidance, label="Guidance",
                                                 scale=2)
                        replaced = f"; a {' / '.join(guiding)} unit replaces it" if guiding else ""
                        self.cfg_scale = gr.Slider(1.0, 20.0, value=Sampling.guidance_scale, step=0.5,
                                                   label="CFG scale", scale=3,
                                                   info=f"two UNet passes per step{replaced}")
                gr.Markdown("### Adapter units")
                with gr.Tabs():
                    for i in range(MAX_UNITS):
                        self.units.append(build_unit(i, self.families, self.engine, self.slots, i < DEFAULT_UNITS))
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
                    with gr.Tab("ComfyUI"):
                        self.comfy_btn = gr.Button("Export the last run as a ComfyUI workflow (.zip)", size="sm",
                                                   elem_id="comfy-export")
                        self.comfy_file = gr.File(label="workflow.json (UI) + workflow_api.json (API) + input/ + "
                                                  "models/ — see docs/comfyui.md", interactive=False,
                                                  elem_id="comfy-file")
                    with gr.Tab("Files"):
                        self.files = gr.File(label="PNG + JSON sidecars (+ GIF/MP4/WebM for video)",
                                             file_count="multiple", interactive=False)
                with gr.Accordion("Settings & presets", open=True):
                    with gr.Row(elem_classes=["tight-row"]):
                        settings_file = gr.File(label="Load settings from image (PNG) or mix JSON",
                                                file_types=[".png", ".json"], height=110, scale=3,
                                                elem_id="settings-file")
                        with gr.Column(scale=2):
                            presets = gr.Dropdown(self.presets.names(), label="Mix presets", value=None,
                                                  allow_custom_value=False)
                            load_preset_btn = gr.Button("Load preset", size="sm")
                    with gr.Row(elem_classes=["tight-row"]):
                        preset_name = gr.Textbox(label="Save current settings as preset", placeholder="my-style-mix",
                                                 scale=3)
                        save_preset_btn = gr.Button("Save preset", size="sm", scale=1)
        self._wire(gen_btn, cancel_btn, dice, reuse, add_btn, rm_btn, settings_file, presets, load_preset_btn,
                   preset_name, save_preset_btn)

    def _wire(self, gen_btn: Any, cancel_btn: Any, dice: Any, reuse: Any, add_btn: Any, rm_btn: Any,
              settings_file: Any, presets: Any, load_preset_btn: Any, preset_name: Any, save_preset_btn: Any) -> None:
        inputs = self.all_inputs() | {self.ticket}
        limit = dict(concurrency_id="generate", concurrency_limit=self.engine.max_concurrency)
        for trigger in (gen_btn.click, self.prompt.submit):
            trigger(self.queue_job, None, self.ticket, queue=False, api_visibility="private").success(
                toast_errors(self.generate_ui), inputs=inputs, outputs=self.outputs(), api_visibility="private",
                show_progress_on=[self.gallery], **limit)
        # through the queue (its own concurrency group, so it never waits for a generation): Gradio shows no toast
        # from an event outside it
        cancel_btn.click(toast_errors(self.cancel), None, self.info, show_progress="hidden", api_visibility="private")
        self.comfy_btn.click(toast_errors(self.export_comfy_ui), self.mix_code, self.comfy_file, api_visibility="private")
        for box in (self.prompt, self.negative):  # as the user types: the last change wins, earlier ones are dropped
            box.change(toast_errors(self.count_tokens), [self.prompt, self.negative], self.tokens, queue=False,
                       show_progress="hidden", trigger_mode="always_last", api_visibility="private")
        dice.click(lambda: -1, None, self.seed, queue=False, api_visibility="private")
        reuse.click(lambda s: s if s is not None else -1, self.seed_used, self.seed, queue=False,
                    api_visibility="private")

        tabs = [u.tab for u in self.units]

        def set_units(n: int) -> list[Any]:
            return [n, *[gr.update(visible=i < n) for i in range(MAX_UNITS)]]

        add_btn.click(lambda n: set_units(min(MAX_UNITS, n + 1)), self.n_units, [self.n_units, *tabs], queue=False,
                      api_visibility="private")
        rm_btn.click(lambda n: set_units(max(1, n - 1)), self.n_units, [self.n_units, *tabs], queue=False,
                     api_visibility="private")
        unit_comps = [c for u in self.units for c in [u.tab, *u.components(), *u.groups.values(), u.help]]
        load_outputs = list(dict.fromkeys([self.prompt, self.negative, self.seed, self.steps, self.width, self.height,
                                           self.sampler, self.guidance, self.cfg_scale, self.count, self.frames,
                                           self.fps, self.n_units, *unit_comps]))
        families_now = [u.family for u in self.units]  # label the units a loaded mix leaves off
        settings_file.upload(toast_errors(self.load_from_file), [settings_file, *families_now], load_outputs,
                             api_visibility="private")
        load_preset_btn.click(toast_errors(self.load_preset), [presets, *families_now], load_outputs,
                              api_visibility="private")
        save_preset_btn.click(toast_errors(lambda v: self.save_preset(v[preset_name], v)),
                              self.all_inputs() | {preset_name}, presets, api_visibility="private")

