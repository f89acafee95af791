"""The studio's page: header, the Generate / Train / API tabs and the named endpoints, with its theme and CSS.

`build_app(engine, runner, mixes_dir)` returns the `gr.Blocks`; `app.py` queues and launches it with `theme()` and
`CSS`. The tabs live in `generate_tab` and `train_tab`, the endpoints in `api`.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from adapter_studio.registry import families

from .api import API_HELP, Api
from .engine import Engine
from .generate_tab import GenerateTab
from .stores import PresetStore
from .train_tab import TrainTab
from .training_runner import REPO_ROOT, TrainingRunner

CSS = """
#studio-header {display:flex; align-items:baseline; gap:14px; padding:6px 2px 0 2px}
#studio-header h1 {margin:0; font-size:1.55rem; letter-spacing:-0.01em}
#studio-header .sub {opacity:0.7; font-size:0.92rem}
#studio-header code {font-size:0.85rem}
#model-notice {border-left:3px solid var(--color-accent); padding:2px 10px; font-size:0.9rem}
#prompt-tokens p {margin:0; font-size:0.82rem; opacity:0.8}
#generate-btn {min-height:52px; font-size:1.05rem}
#cancel-btn {min-height:52px}
.unit-help p {margin:2px 0 4px 0; opacity:0.75; font-size:0.88rem}
#result-gallery {min-height:420px}
#run-info p {margin:4px 0; font-size:0.9rem; opacity:0.85}
.tight-row {gap:8px}
.icon-btn {max-width:46px; min-width:46px !important}
footer {opacity:0.6}
"""


REAL_MODEL_HINT = ("`python app.py --model sd15` (Stable Diffusion 1.5 from the hub; `--model sdxl` likewise) or "
                   "`python app.py --model /path/to/a/diffusers-folder`")


def model_notice(engine: Engine) -> str | None:
    """What the page says about a small model, and how to run a real one: a `tiny-*` preset has random weights; a
    preset with a `description:` (the trained toy models) is described, with its `prompt_example:` to try."""
    preset = engine.preset
    if preset.source == "tiny":
        return (f"**`{engine.model}` has random weights**: a tiny test model built from configs, so its outputs are "
                "noise, not pictures (it runs in seconds and tests the whole studio). For real images start the studio "
                f"with a real model: {REAL_MODEL_HINT}.")
    config = getattr(preset, "config", None) or {}
    if not config.get("description"):
        return None
    example = config.get("prompt_example")
    try_it = f" Try the prompt *{example}*, or load an example mix (Mix presets)." if example else ""
    return (f"**`{engine.model}` is {config['description']}**.{try_it} For real images start the studio with a real "
            f"model: {REAL_MODEL_HINT}.")


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate", radius_size="md")


class StudioApp:
    """The whole page; after `build()`, `generate` and `train` hold the tabs (their widgets and handlers).

    Args:
        engine: the generation backend.
        runner: the training runner (default: configs/train of the checkout, runs in `runs/`).
        mixes_dir: the mix presets folder (default: configs/mixes of the checkout).
    """

    def __init__(self, engine: Engine, runner: TrainingRunner | None = None, mixes_dir: str | Path | None = None):
        self.engine = engine
        self.runner = runner or TrainingRunner()
        self.presets = PresetStore(mixes_dir or REPO_ROOT / "configs" / "mixes")
        self.generate = GenerateTab(engine, self.presets)
        self.train = TrainTab(engine, self.runner)

    def build(self) -> gr.Blocks:
        labels = " · ".join(html.escape(f.label) for f in families()) or "no adapter family installed"
        with gr.Blocks(title="Adapter Studio", analytics_enabled=False) as demo:
            gr.HTML(f"<div id='studio-header'><h1>Adapter Studio</h1><span class='sub'>mix {labels} on one frozen "
                    f"diffusion model — model <code>{html.escape(self.engine.model)}</code> on "
                    f"<code>{self.engine.device}</code></span></div>")
            notice = model_notice(self.engine)
            if notice:
                gr.Markdown(notice, elem_id="model-notice")
            with gr.Tabs():
                with gr.Tab("Generate", id="generate"):
                    self.generate.build()
                with gr.Tab("Train", id="train"):
                    self.train.build()
                with gr.Tab("API", id="api"):
                    gr.Markdown(API_HELP)
            Api(self.engine, self.runner, self.presets).register()
        return demo


def build_app(engine: Engine, runner: TrainingRunner | None = None, mixes_dir: str | Path | None = None) -> gr.Blocks:
    """The studio's `gr.Blocks` (call `.queue(...)` and `.launch(theme=theme(), css=CSS)` on it)."""
    return StudioApp(engine, runner, mixes_dir).build()
