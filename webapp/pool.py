"""The pipelines the studio samples with: a pool of up to `max_concurrency` `StudioPipeline`s, and the build lock.

Each pooled pipeline has its own UNet and adapter stack, so two calls never share a stack; a call borrows one for
its duration and gives it back as it found it (no adapters, the model's own scheduler).

With `compile`, the pool also remembers, per pipeline, the compile keys (`engine.compile_key`: the shapes of mix)
its compiled UNet has already run, so the engine can say when a call is about to compile (`first_run` / `ran`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Iterator

import torch

from adapter_studio.pipelines.studio_pipeline import StudioPipeline

# Building models is not thread-safe: diffusers / transformers construct weights under global patches (meta-device
# init), so a module built in one thread while another thread builds a pipeline can end up on the meta device.
# Every construction (pipelines, adapters from weights files) holds this lock; sampling does not.
BUILD_LOCK = threading.RLock()


class PipelinePool:
    """Up to `max_concurrency` pipelines of one model, made on demand.

    Args:
        model: preset name, preset YAML, hub id or local diffusers folder.
        device, dtype: where the pipelines run.
        max_concurrency: most pipelines held; a borrower waits while all are lent.
    """

    def __init__(self, model: str, device: str, dtype: torch.dtype, max_concurrency: int = 1,
                 compile: bool | dict[str, Any] = False):
        self.model = model
        self.device = device
        self.dtype = dtype
        # each pipeline's UNet compiled with its stack (the first call per mix shape compiles): True, or a dict of
        # `StudioPipeline.compile` / `torch.compile` options ({"backend": "aot_eager"} compiles fast on a CPU)
        self.compile = compile
        self.max_concurrency = max(1, int(max_concurrency))
        self.made = 0
        self._idle: queue.Queue[tuple[StudioPipeline, Any]] = queue.Queue()
        self._made_lock = threading.Lock()
        self._ran: dict[int, set[Any]] = {}  # id(pipeline) -> compile keys it has run (pooled pipelines live on)

    def _build(self) -> tuple[StudioPipeline, Any]:
        with BUILD_LOCK:
            sp = StudioPipeline.from_preset(self.model, torch_dtype=self.dtype if self.dtype != torch.float32 else None)
            sp.to(self.device)
            if self.compile:
                sp.compile(**(self.compile if isinstance(self.compile, dict) else {}))
        return sp, sp.pipe.scheduler

    def _acquire(self) -> tuple[StudioPipeline, Any]:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._made_lock:
            make = self.made < self.max_concurrency
            if make:
                self.made += 1
        if not make:
            return self._idle.get()
        try:
            return self._build()
        except Exception:
            with self._made_lock:
                self.made -= 1
            raise

    @contextlib.contextmanager
    def borrow(self) -> Iterator[StudioPipeline]:
        """Lend a pipeline for the `with` block (built on first need); it comes back without adapters and with the
        model's own scheduler, so a sampler chosen by one call never leaks into the next."""
        sp, scheduler = self._acquire()
        try:
            yield sp
        finally:
            sp.stack.clear()
            sp.pipe.scheduler = scheduler
            self._idle.put((sp, scheduler))

    # ---- compiled pipelines: which shapes of mix each has run (only its borrower reads or writes its own set)
    def first_run(self, sp: StudioPipeline, key: Any) -> bool:
        """True when `sp` runs compiled and has not yet run a call of compile key `key`: that call compiles."""
        return bool(getattr(sp.stack, "compiled", False)) and key not in self._ran.get(id(sp), ())

    def ran(self, sp: StudioPipeline, key: Any) -> None:
        """Remember that `sp` ran a call of compile key `key` (its compiled graph exists now)."""
        if getattr(sp.stack, "compiled", False):
            self._ran.setdefault(id(sp), set()).add(key)
