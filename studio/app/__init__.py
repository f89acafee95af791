"""The Gradio studio (`python app.py`): generate with adapter mixes, export them, train adapters.

Modules: `units` (what each adapter family's unit asks for), `engine` (mix building, validation, generation),
`metadata` (mix inside PNGs + sidecar JSON), `export` (mix JSON, runnable Python snippet), `training_runner`
(background training process + loss log), `ui` (the Gradio layout and the named API endpoints).
The engine works without Gradio installed; `build_app` imports it.
"""

from typing import Any

__all__ = ["Engine", "GenerationResult", "build_app"]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    if name == "build_app":
        from .ui import build_app

        return build_app
    raise AttributeError(name)
