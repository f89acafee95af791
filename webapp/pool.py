"""The pipelines the studio samples with: a pool of up to `max_concurrency` `StudioPipeline`s, and the build lock.

Each pooled pipeline has its own UNet and adapter stack, so two calls never share a stack; a call borrows one for
its duration and gives it back as it found it (no adapters, the model's own scheduler).
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

    def __init__(self, model: str, device: str, dtype: torch.dtype, max_concurrency: int = 1, compile: bool = False):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.compile = compile  # each pipeline's UNet compiled with its stack (the first call per mix shape compiles)
        self.max_concurrency = max(1, int(max_concurrency))
        self.made = 0
        self._idle: queue.Queue[tuple[StudioPipeline, Any]] = queue.Queue()
        self._made_lock = threading.Lock()

    def _build(self) -> tuple[StudioPipeline, Any]:
        with BUILD_LOCK:
            sp = StudioPipeline.from_preset(self.model, torch_dtype=self.dtype if self.dtype != torch.float32 else None)
            sp.to(self.device)
            if self.compile:
                sp.compile()
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
