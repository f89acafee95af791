"""The Gradio studio (`python app.py`): generate with adapter mixes, export them, train adapters.

It knows no adapter family: families, their unit forms, weights files, guidance modes and training scripts come
from `adapter_studio.registry`. Nothing in the core, the families or the pipelines imports this package.

Modules, each one concept (each imports only modules listed before it):
`logs` (short log lines) · `stores` (models folder, input images, mix presets) · `pool` (pooled pipelines, build
lock) · `adapter_cache` (loaded adapters kept by weights hash) · `jobs` (each page's queued and running generations)
· `limits` (caps on a request, the pixel×step budget) · `tokens` (a prompt's token count) · `metadata` (the mix
inside PNGs + sidecar JSON) · `outputs` (writing PNGs and video files) · `export` (the pipeline call of a mix and the
Python script reproducing it) · `engine` (complete, check and run a mix) · `training_runner` (one background
training run) · `forms` (a family's form <-> a mix unit) · `handlers` (errors as toasts or API errors) · `widgets`
(one unit's widgets) · `generate_tab`, `train_tab` (the tabs) · `api` (the named endpoints) · `ui` (the page:
`build_app`). The modules before `handlers` work without Gradio.
"""

from typing import Any

__all__ = ["Engine", "GenerationResult", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "GenerationResult":
        from .outputs import GenerationResult

        return GenerationResult
    if name == "build_app":
        from .ui import build_app

        return build_app
    raise AttributeError(name)
