"""How Gradio handlers report errors, so a bad input never shows a stack trace and the server keeps serving.

* `friendly_errors` (API endpoints): the error comes back to `gradio_client` as an `AppError` with a readable message.
* `toast_errors` (events of the page): the error shows as a toast and every output keeps its value. An exception
  raised from an event would also mark each of its output components with an "Error" badge that stays, and the
  settings loader's outputs are the whole form.

Either way the server log gets one line for an input error (a `StudioError`, whose message says what to fix) and the
full trace for anything unexpected; Gradio prints no trace of its own.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import gradio as gr

from adapter_studio.errors import StudioError

from .engine import GenerationCancelled
from .logs import shorten

log = logging.getLogger("adapter_studio.app")


def report(fn: Callable, e: Exception) -> tuple[str, str]:
    """`(title, message)` for the user about error `e` of handler `fn`, logged as above."""
    name = getattr(fn, "__name__", repr(fn))
    if isinstance(e, gr.Error):
        log.info("%s: %s", name, shorten(e.message, 300))
        return e.title, e.message
    if isinstance(e, GenerationCancelled):
        log.info("%s: %s", name, e)
        return "Cancelled", f"Cancelled {str(e).removeprefix('cancelled ')}"
    if isinstance(e, StudioError):
        log.info("%s refused: %s", name, shorten(str(e), 300))
        return "Cannot run this", str(e)
    log.error("handler %s failed", name, exc_info=e)
    return "Something went wrong", (f"Internal error ({type(e).__name__}: {shorten(str(e), 300)}). The server is "
                                    "still running; the full trace is in its log.")


def friendly_errors(fn: Callable) -> Callable:
    """Wrap an API endpoint: any error -> a `gr.Error` (an `AppError` for the client) with a readable message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  the server must keep serving
            title, message = report(fn, e)
            raise gr.Error(message, title=title, print_exception=False) from None

    return wrapper


def toast_errors(fn: Callable) -> Callable:
    """Wrap a page event: any error -> a warning toast, and `gr.skip()` for every output (nothing changes)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  the server must keep serving
            title, message = report(fn, e)
            gr.Warning(message, title=title)
            return gr.skip()

    return wrapper


def session_of(request: Any) -> str | None:
    """The Gradio session of a request (cancel acts on that session's calls)."""
    return getattr(request, "session_hash", None) if request is not None else None
