"""How every Gradio handler reports errors: input errors as readable toasts, anything unexpected as a short message
(full trace in the server log), so a bad input never shows a stack trace and the server keeps serving."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import gradio as gr

from adapter_studio.errors import StudioError

from .engine import GenerationCancelled

log = logging.getLogger("adapter_studio.app")


def friendly_errors(fn: Callable) -> Callable:
    """Wrap a handler: `StudioError` -> a `gr.Error` toast with its message; other errors -> a short message."""

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


def session_of(request: Any) -> str | None:
    """The Gradio session of a request (cancel acts on that session's running call)."""
    return getattr(request, "session_hash", None) if request is not None else None
