"""The Ctrl family as a ComfyUI ControlNet object (imported inside ComfyUI only).

`StudioControlNet` is a `comfy.controlnet.ControlBase`: ComfyUI asks it for `get_control(x, sigma, cond, ...)` and adds
what it returns to the UNet the way it adds any ControlNet's output (`{"output": [...], "middle": [...]}`: one tensor
per skip connection, one for the mid block). It computes the family's residuals with the family's own code
(`CtrlAdapter.residuals`: ControlNet(s), fusion, Ctrl-Adapter onto the MODEL's layout), loading the adapter for the
layout of the model it runs on. It works two ways:

* the pack's apply node (`apply_ctrl`): the unit's inputs, weight and step window, on every model call of a cloned
  MODEL (through ComfyUI's unet function wrapper, chained with any other);
* ComfyUI's own "Apply ControlNet" nodes: the image and strength they set (`set_cond_hint`), their start/end.
"""

from __future__ import annotations

from typing import Any

import comfy.controlnet
import torch

from . import glue


class StudioControlNet(comfy.controlnet.ControlBase):
    def __init__(self, weights: Any):
        super().__init__()
        self.weights = weights
        self.inputs: dict[str, Any] = {}
        self.weight, self.start, self.end = 1.0, 0.0, 1.0
        self.model_sampling_current = None
        self._adapter = None
        self._layout = None

    # -- ControlBase
    def copy(self) -> "StudioControlNet":
        c = StudioControlNet(self.weights)
        self.copy_to(c)
        c.inputs, c.weight, c.start, c.end = dict(self.inputs), self.weight, self.start, self.end
        c._adapter, c._layout = self._adapter, self._layout
        return c

    def pre_run(self, model: Any, percent_to_timestep_function: Any) -> None:
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling
        self.adapter_for(model)

    def cleanup(self) -> None:
        self.model_sampling_current = None
        super().cleanup()

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        """ComfyUI's "Apply ControlNet" path: the hint image, strength and sigma window it set."""
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return prev
        inputs = self.inputs or {"image": glue.pil_images(self.cond_hint_original.movedim(1, -1))}
        kinds = list(transformer_options.get("cond_or_uncond") or [0] * batched_number)
        out = self.residuals(x_noisy, t, cond["c_crossattn"], kinds, inputs, 1.0)  # control_merge applies strength
        return self.control_merge(out, prev, output_dtype=None)

    # -- the family's residuals
    def adapter_for(self, model: Any) -> Any:
        """The family's CtrlAdapter for `model`'s layout (loaded once per layout)."""
        key = glue.diffusers_config_of(model)
        if self._adapter is None or self._layout != key:
            self._adapter = glue.load_adapter(self.weights, model)
            self._layout = key
        return self._adapter

    def set_unit(self, inputs: dict[str, Any], weight: float, start: float, end: float) -> None:
        self.inputs, self.weight, self.start, self.end = inputs, float(weight), float(start), float(end)

    def residuals(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, kinds: list[int],
                  inputs: dict[str, Any], weight: float) -> dict[str, list[torch.Tensor]]:
        """ComfyUI's control dict for a batch of `len(kinds)` chunks (0 = conditional, 1 = unconditional)."""
        from adapter_studio.context import ForwardContext, UNetCall

        ms = self.model_sampling_current
        adapter = glue.on(self._adapter, x)
        x_in = ms.calculate_input(sigma, x)
        timestep = ms.timestep(sigma).float()
        per = x.shape[0] // len(kinds)
        guess = bool(inputs.get("guess_mode"))
        downs: list[list[torch.Tensor]] = []
        mids: list[torch.Tensor] = []
        with torch.no_grad():
            for i, kind in enumerate(kinds):
                sl = slice(i * per, (i + 1) * per)
                ts = timestep[sl] if timestep.numel() == x.shape[0] else timestep.expand(per)
                ctx = ForwardContext(batch_size=per, cfg=False, timestep=ts, progress=torch.zeros(per),
                                     latent_size=tuple(x.shape[-2:]), num_frames=1)
                call = UNetCall(sample=x_in[sl], timestep=ts, encoder_hidden_states=context[sl])
                d, m = adapter.residuals(inputs, ctx, call)
                m = torch.zeros_like(d[-1]) if m is None else m
                if kind == 1 and guess:  # guess mode: the ControlNet acts on the conditional pass only
                    d, m = [torch.zeros_like(r) for r in d], torch.zeros_like(m)
                downs.append(d)
                mids.append(m)
        down = [torch.cat(parts) * weight for parts in zip(*downs)]
        return {"input": [], "middle": [torch.cat(mids) * weight], "output": down}

    # -- the pack's apply node: on the MODEL
    def install(self, model: Any) -> None:
        self.model_sampling_current = model.get_model_object("model_sampling")
        self.adapter_for(model)
        glue.chain_unet_wrapper(model, lambda x, t, c, kinds: (x, self._with_control(x, t, c, kinds)))

    def _with_control(self, x, t, c, kinds):
        progress = glue.step_progress(c.get("transformer_options", {}), t, self.model_sampling_current)
        if not glue.in_window(progress, self.start, self.end) or self.weight == 0.0:
            return c
        ours = self.residuals(x, t, c["c_crossattn"], list(kinds), self.inputs, self.weight)
        prev = c.get("control")
        return {**c, "control": self.control_merge(ours, prev, output_dtype=None)}
