"""The studio's named API endpoints for `gradio_client` (documented in docs/app.md; the API tab shows `API_HELP`).

Every endpoint takes and returns plain JSON text, file paths or galleries, goes through the Gradio queue (generation
shares the Generate tab's concurrency limit) and reports bad input as an `AppError` with a readable message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from adapter_studio.errors import MixError
from adapter_studio.mix import MIX_VERSION, Mix
from adapter_studio.samplers import SAMPLERS

from .engine import Engine, guidance_choices
from .export import comfy_workflow_zip, python_snippet
from .forms import families_json, parse_json_field
from .handlers import friendly_errors, session_of
from .metadata import read_mix
from .stores import PresetStore
from .training_runner import TrainingRunner

API_HELP = """
### Named endpoints (use with `gradio_client`)

| endpoint | inputs | returns |
|---|---|---|
| `/generate` | prompt, negative_prompt, seed, steps, width, height, sampler, guidance, guidance_scale, num_images, units (JSON list of mix units), images (files referenced by the units) | gallery (PNG files with the mix inside), mix JSON |
| `/generate_mix` | mix (JSON), images | gallery, mix JSON |
| `/read_settings` | file (studio PNG or mix JSON) | mix JSON |
| `/export_python` | mix (JSON) | Python script reproducing it |
| `/export_comfy` | mix (JSON) | zip: workflow.json (UI), workflow_api.json (API), input/, models/ for ComfyUI |
| `/upload_weights` | file, family | name in the models folder |
| `/families`, `/list_weights`, `/list_presets` | — / family / — | JSON |
| `/train_start`, `/train_status`, `/train_stop` | config, data_dir, output_dir, max_steps, extra_args | status JSON |
| `/train_add_to_models` | — | `{"name": ...}` of the finished run's adapter |

A unit is a mix unit: `family`, `weights` (a name in the models folder, or `{key: name}` for a family loading several
files), `scale`, `start`, `end`, `inputs`, and optionally `sample_mask` (one true/false per image of the call).

```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
gallery, mix = client.predict("a red fox", "", 7, 20, 512, 512, "DDIM", "auto", 7.5, 1,
    '[{"family": "ip", "weights": "ip/ip-adapter_sd15.safetensors", "scale": 0.7, "inputs": {"image": ["ref.png"]}}]',
    [handle_file("ref.png")], api_name="/generate")
```
Full reference: `docs/app.md`.
"""


def _int(v: Any, name: str) -> int:
    """A whole number sent as int or float (20 or 20.0); anything else is refused, never rounded."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise MixError(f"{name} must be a number, got {v!r}") from None
    if not f.is_integer():
        raise MixError(f"{name} must be a whole number, got {v!r}: this server does not round it")
    return int(f)


class Api:
    """The endpoint handlers; `register` adds them to the `gr.Blocks` being built."""

    def __init__(self, engine: Engine, runner: TrainingRunner, presets: PresetStore):
        self.engine = engine
        self.runner = runner
        self.presets = presets

    def generate(self, prompt: str, negative_prompt: str, seed: float, steps: float, width: float, height: float,
                 sampler: str, guidance: str, guidance_scale: float, num_images: float, units: str,
                 images: list[str] | None, request: gr.Request, progress: Any = gr.Progress()) -> tuple[list, str]:
        units_raw = parse_json_field(units, "units") or []
        if not isinstance(units_raw, list):
            raise MixError("units must be a JSON list of mix units")
        mix = Mix.from_dict({"version": MIX_VERSION, "model": self.engine.model, "units": units_raw, "sampling": {
            "prompt": prompt or "", "negative_prompt": negative_prompt or "", "seed": _int(seed, "seed"),
            "steps": _int(steps, "steps"), "width": _int(width, "width"), "height": _int(height, "height"),
            "sampler": sampler, "guidance": guidance, "guidance_scale": guidance_scale,
            "num_images": _int(num_images, "num_images")}})
        return self._run(mix, images, request, progress)

    def generate_mix(self, mix: str, images: list[str] | None, request: gr.Request,
                     progress: Any = gr.Progress()) -> tuple[list, str]:
        return self._run(Mix.from_json(mix or ""), images, request, progress)

    def _run(self, mix: Mix, images: list[str] | None, request: Any, progress: Any) -> tuple[list, str]:
        uploads = {Path(p).name: Path(p) for p in (images or [])}
        res = self.engine.generate(mix, uploads, session=session_of(request),
                                   progress=lambda i, n: progress((i, n), desc="Sampling", unit="steps"),
                                   status=lambda message: progress(0, desc=message))
        return res.gallery(), res.mix.to_json()

    def read_settings(self, file: str | None) -> str:
        if not file:
            raise MixError("upload a PNG made by the studio or a mix JSON")
        return read_mix(file).to_json()

    def upload_weights(self, file: str | None, family: str) -> str:
        if not file:
            raise MixError("no file uploaded")
        return self.engine.add_weights(file, family or "", Path(file).name)

    def export_python(self, mix: str) -> str:
        return python_snippet(self.engine.complete_mix(Mix.from_json(mix or "")), self.engine.models_dir)

    def export_comfy(self, mix: str) -> str:
        """The ComfyUI workflow of a mix: a zip (workflow.json, workflow_api.json, input/, models/)."""
        completed = self.engine.complete_mix(Mix.from_json(mix or ""))
        return str(comfy_workflow_zip(completed, self.engine.models_dir, self.engine.inputs_dir,
                                      self.engine.outputs_dir / "exports"))

    def register(self) -> None:
        """Add the endpoints (hidden components for the ones taking files or galleries) to the current Blocks."""
        with gr.Column(visible=False):  # integers arrive as sent (no `precision`, which rounds 2.5): `_int` refuses
            a_prompt, a_neg = gr.Textbox(), gr.Textbox()
            a_seed, a_steps = gr.Number(value=-1), gr.Number(value=20)
            a_w, a_h = gr.Number(value=self.engine.default_size), gr.Number(value=self.engine.default_size)
            a_sampler = gr.Dropdown(list(SAMPLERS), value="DDIM")
            a_guid = gr.Dropdown(guidance_choices(), value="auto")
            a_scale, a_count = gr.Number(value=7.5), gr.Number(value=1)
            a_units = gr.Textbox(value="[]")
            a_images = gr.File(file_count="multiple", type="filepath")
            a_gallery = gr.Gallery(format="png")
            a_mix_out, a_mix_in, a_family, a_text_out = gr.Textbox(), gr.Textbox(), gr.Textbox(), gr.Textbox()
            a_file = gr.File(type="filepath")
            a_btn = gr.Button()
        limit = dict(concurrency_id="generate", concurrency_limit=self.engine.max_concurrency)
        a_btn.click(friendly_errors(self.generate), [a_prompt, a_neg, a_seed, a_steps, a_w, a_h, a_sampler, a_guid,
                                                     a_scale, a_count, a_units, a_images], [a_gallery, a_mix_out],
                    api_name="generate", **limit)
        a_btn.click(friendly_errors(self.generate_mix), [a_mix_in, a_images], [a_gallery, a_mix_out],
                    api_name="generate_mix", **limit)
        a_btn.click(friendly_errors(self.read_settings), a_file, a_text_out, api_name="read_settings")
        a_btn.click(friendly_errors(self.upload_weights), [a_file, a_family], a_text_out, api_name="upload_weights")
        a_btn.click(friendly_errors(self.export_python), a_mix_in, a_text_out, api_name="export_python")
        a_btn.click(friendly_errors(self.export_comfy), a_mix_in, a_file, api_name="export_comfy")

        def families() -> str:
            """Installed adapter families: their unit forms, weights files, guidance and training entries (JSON)."""
            return json.dumps(families_json())

        def list_weights(family: str) -> str:
            """Weights in the models folder for `family`'s first weights file (JSON list of names; all if blank)."""
            return json.dumps(self.engine.list_weights(family or None))

        def list_presets() -> str:
            """Names of the saved mix presets (JSON list)."""
            return json.dumps(self.presets.names())

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
            return json.dumps({"name": self.runner.add_to_models(self.engine.models_dir)})

        for fn in (families, list_weights, list_presets, train_status, train_stop, train_start, train_add_to_models):
            gr.api(friendly_errors(fn), api_name=fn.__name__, concurrency_limit=None if fn is not train_start else 1)
