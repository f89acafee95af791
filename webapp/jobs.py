"""The generations of each browser session, queued or running, so Cancel reaches both.

A Generate click takes a ticket at once (`queue`, outside Gradio's queue) before its generation waits in the queue
for a free pipeline; Cancel sets the cancel flag of every ticket of the session. A queued generation whose flag is
set does not run when its turn comes; a running one stops at its next step. Calls made without a ticket (the API)
get one when they start.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field


@dataclass
class Job:
    session: str
    cancel: threading.Event = field(default_factory=threading.Event)
    running: bool = False


@dataclass
class Cancelled:
    """What a Cancel reached: generations running (they stop at their next step) and queued (they will not run)."""

    running: int = 0
    queued: int = 0

    def message(self) -> str:
        parts = []
        if self.running:
            parts.append(f"stopping {self.running} running generation(s) at the next step")
        if self.queued:
            parts.append(f"{self.queued} queued generation(s) cancelled: they will not run")
        return ("; ".join(parts) or "nothing to cancel: no generation of this page is running or queued").capitalize()


class Jobs:
    """Tickets of the generations of every session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def queue(self, session: str) -> str:
        """A ticket for a generation about to wait in the queue."""
        ticket = uuid.uuid4().hex
        with self._lock:
            self._jobs[ticket] = Job(session)
        return ticket

    def start(self, ticket: str | None, session: str) -> tuple[str, Job]:
        """Mark the generation of `ticket` running (a new ticket when None); returns the ticket and its job. The
        caller checks `job.cancel` (set while it was queued) and calls `finish` in any case."""
        with self._lock:
            if ticket is None or ticket not in self._jobs:
                ticket = ticket or uuid.uuid4().hex
                self._jobs[ticket] = Job(session)
            job = self._jobs[ticket]
            job.running = True
        return ticket, job

    def finish(self, ticket: str) -> None:
        with self._lock:
            self._jobs.pop(ticket, None)

    def cancel(self, session: str) -> Cancelled:
        """Set the cancel flag of every generation of `session`; says what it reached."""
        out = Cancelled()
        with self._lock:
            for job in self._jobs.values():
                if job.session == session and not job.cancel.is_set():
                    job.cancel.set()
                    if job.running:
                        out.running += 1
                    else:
                        out.queued += 1
        return out
