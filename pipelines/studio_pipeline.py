"""`StudioPipeline`: a diffusers SD1.5 / SDXL / AnimateDiff pipeline with an adapter stack on its UNet."""

from __future__ import annotations

from typing import Any

import inspect

import torch
from torch import nn

from studio.context import CallInfo
from studio.errors import StudioError
from studio.stack import AdapterStack, Scale, Slot


class StudioPipeline:
    """Wraps a diffusers pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `AnimateDiffPipeline`).

    The call takes the usual diffusers arguments and returns the usual outputs. On top:

    * `guidance`: "cfg" (two UNet passes per step, scale `guidance_scale`), "agd" (one pass per step, the AGD
      adapter gets `guidance_scale` as its w) or "auto" (agd when an enabled AGD adapter is in the stack).
    * `adapter_inputs={slot_name: {...}}`: per-call inputs for adapters (reference images, masks, ...) that
      override the inputs stored in the slot; the key `sample_mask` switches an adapter per sample.
    """

    def __init__(self, pipe: Any, stack: AdapterStack | None = None):
        self.pipe = pipe
        self.stack = stack or AdapterStack()
        if not self.stack.attached:
            self.stack.attach(pipe.unet)
        elif self.stack.unet is not pipe.unet:
            raise StudioError("the given stack is attached to another UNet")
        pipe.unet.requires_grad_(False)

    @classmethod
    def from_preset(cls, model: str = "tiny-sd15", torch_dtype: torch.dtype | None = None, **overrides: Any) -> "StudioPipeline":
        """Build the diffusers pipeline of a preset / hub id / local folder and wrap it."""
        from studio.presets import load_pipeline

        return cls(load_pipeline(model, torch_dtype=torch_dtype, **overrides))

    # ---- adapters
    def add(self, adapter: nn.Module, name: str | None = None, scale: Scale = 1.0, start: float = 0.0,
            end: float = 1.0, **inputs: Any) -> Slot:
        """Attach an adapter to the UNet (moved to the UNet's device and dtype); see `AdapterStack.add`."""
        adapter.to(device=self.pipe.unet.device, dtype=self.pipe.unet.dtype)
        return self.stack.add(adapter, name=name, scale=scale, start=start, end=end, **inputs)

    def remove(self, name: str) -> nn.Module:
        return self.stack.remove(name)

    def to(self, *args: Any, **kwargs: Any) -> "StudioPipeline":
        self.pipe.to(*args, **kwargs)
        for slot in self.stack:
            slot.adapter.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def guidance_mode(self, guidance: str = "auto") -> str:
        agd = [s for s in self.stack if s.enabled and getattr(s.adapter, "family", "") == "agd"]
        if guidance == "auto":
            return "agd" if agd else "cfg"
        if guidance == "agd" and not agd:
            raise StudioError("guidance='agd' needs an enabled AGD adapter in the stack; add one or use guidance='cfg'")
        if guidance == "cfg" and agd:
            raise StudioError("an AGD adapter replaces classifier-free guidance: use guidance='agd' or disable the AGD unit")
        if guidance not in ("cfg", "agd"):
            raise StudioError(f"guidance must be 'cfg', 'agd' or 'auto', got {guidance!r}")
        return guidance

    # ---- call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, guidance: str = "auto", guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, adapter_inputs: dict[str, dict[str, Any]] | None = None,
                 **kwargs: Any) -> Any:
        mode = self.guidance_mode(guidance)
        if guidance_scale is None:  # the wrapped pipeline's own default (7.5 for SD1.5, 5.0 for SDXL)
            guidance_scale = inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default
        cfg = mode == "cfg" and guidance_scale > 1.0
        adapter_inputs = adapter_inputs or {}
        unknown = set(adapter_inputs) - set(self.stack.slots)
        if unknown:
            raise StudioError(f"adapter_inputs name adapters not in the stack: {sorted(unknown)}")
        if prompt is not None:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        elif kwargs.get("prompt_embeds") is not None:
            n_prompts = kwargs["prompt_embeds"].shape[0]
        else:
            raise StudioError("give a prompt or prompt_embeds")
        call = CallInfo(pipe=self.pipe, batch_size=n_prompts * num_images_per_prompt,
                        num_images_per_prompt=num_images_per_prompt, cfg=cfg, guidance_scale=float(guidance_scale),
                        device=self.pipe.unet.device, dtype=self.pipe.unet.dtype,
                        num_frames=int(kwargs.get("num_frames", 1)))
        masks = {}
        try:
            for slot in self.stack:
                extra = dict(adapter_inputs.get(slot.name, {}))
                if "sample_mask" in extra:
                    masks[slot.name] = slot.sample_mask
                    slot.sample_mask = extra.pop("sample_mask")
                if slot.enabled:
                    slot.call_inputs = slot.adapter.begin_call({**slot.inputs, **extra}, call)
            with self.stack.sampling(self.pipe.scheduler, cfg=cfg):
                return self.pipe(prompt=prompt, guidance_scale=guidance_scale if cfg else 1.0,
                                 num_images_per_prompt=num_images_per_prompt, **kwargs)
        finally:
            for slot in self.stack:
                slot.call_inputs = None
                slot.state = None
                if slot.name in masks:
                    slot.sample_mask = masks[slot.name]
