"""The server log stays readable: long texts (a 20k-character prompt, diffusers' "this part was truncated" notice
quoting the whole cut) are shortened in every log line, and user errors take one line each (`handlers`)."""

from __future__ import annotations

import logging

MAX_LOG_CHARS = 500  # a log line longer than this is cut: prompts are user text of any length


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters, saying how long it was (for logs and messages quoting user text)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


class ShortenLongMessages(logging.Filter):
    """Cuts a record's message (format arguments applied) to `max_chars`; keeps the record."""

    def __init__(self, max_chars: int = MAX_LOG_CHARS):
        super().__init__()
        self.max_chars = max_chars

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > self.max_chars:
            record.msg, record.args = shorten(message, self.max_chars), None
        return True


def limit_log_lines(max_chars: int = MAX_LOG_CHARS,
                    loggers: tuple[str, ...] = ("", "diffusers", "transformers")) -> None:
    """Shorten long messages on every handler of `loggers` (the root and the libraries that log through handlers of
    their own: diffusers and transformers do not propagate to the root). Call once logging is configured."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ShortenLongMessages) for f in handler.filters):
                handler.addFilter(ShortenLongMessages(max_chars))
