"""The Gradio studio (`python app.py`): generate with adapter mixes, export them, train adapters.

Modules: `units` (what each adapter family's unit asks for), `engine` (mix building, validation, generation),
`metadata` (mix inside PNGs + sidecar JSON), `export` (mix JSON, runnable Python snippet), `training_runner`
(background training process + loss log), `ui` (the Gradio layout and the named API endpoints).
"""

from .engine import Engine, GenerationResult
from .ui import build_app

__all__ = ["Engine", "GenerationResult", "build_app"]
