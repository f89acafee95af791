"""`StudioPipeline`: a diffusers SD1.5 / SDXL / AnimateDiff pipeline with an adapter stack on its UNet."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import torch

from adapter_studio.adapter import StudioAdapter
from adapter_studio.block_scale import Scale
from adapter_studio.context import CallInfo
from adapter_studio.errors import StudioError
from adapter_studio.samplers import make_scheduler
from adapter_studio.stack import AdapterStack, Slot


class StudioPipeline:
    """Wraps a diffusers pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `AnimateDiffPipeline`).

    The call takes the usual diffusers arguments and returns the usual outputs. On top:

    * `guidance`: "cfg" (two UNet passes per step, scale `guidance_scale`), the guidance mode of an enabled
      adapter that replaces CFG (AGD: "agd", one pass per step, the adapter gets `guidance_scale` as its w), or
      "auto" (that adapter's mode when one is enabled, else cfg).
    * `adapter_inputs={slot_name: {...}}`: per-call inputs for adapters (reference images, masks, ...) that
      override the inputs stored in the slot; the key `sample_mask` switches an adapter per sample.
    * adapters that pin latents (`StudioAdapter.latents_after_step`) see the latents after every scheduler step,
      through diffusers' `callback_on_step_end` (a callback you pass runs after them).
    """

    def __init__(self, pipe: Any, stack: AdapterStack | None = None, compile: bool | dict[str, Any] = False):
        """Wrap `pipe`. Without `stack` a new one is attached to `pipe.unet` and owned by this wrapper: plain
        `pipe(...)` calls then run it too. A given `stack` (a training task's, for validation) stays the caller's:
        plain calls of `pipe` leave it alone.

        `compile=True` (or a dict of `torch.compile` options: backend, mode, fullgraph, ...) runs the UNet compiled
        with the stack in it (`AdapterStack.compile`: fullgraph, CUDA graphs on CUDA); see docs/performance.md."""
        self.pipe = pipe
        own = stack is None
        self.stack = stack if stack is not None else AdapterStack()  # an empty stack is falsy (len 0)
        if not self.stack.attached:
            self.stack.attach(pipe.unet)
        elif self.stack.unet is not pipe.unet:
            raise StudioError("the given stack is attached to another UNet")
        if own:
            self.stack.pipe = pipe  # so that a plain `pipe(...)` call runs the stack with its inputs encoded too
        pipe.unet.requires_grad_(False)
        # samplers are built from the model's own scheduler config, not from the last sampler's (which may carry
        # Karras sigmas or another solver's settings into the next)
        self._scheduler_config = dict(pipe.scheduler.config)
        self._compile_options: dict[str, Any] | None = None
        if compile:
            self.compile(**(compile if isinstance(compile, dict) else {}))

    def compile(self, **options: Any) -> "StudioPipeline":
        """Compile the UNet with the stack attached (`AdapterStack.compile` options); the first call then compiles."""
        self.stack.compile(**options)
        self._compile_options = dict(options)
        return self

    @classmethod
    def from_preset(cls, model: str = "tiny-sd15", torch_dtype: torch.dtype | None = None,
                    compile: bool | dict[str, Any] = False, **overrides: Any) -> "StudioPipeline":
        """Build the diffusers pipeline of a preset / hub id / local folder and wrap it (`compile`: see `__init__`)."""
        from adapter_studio.presets import load_pipeline

        return cls(load_pipeline(model, torch_dtype=torch_dtype, **overrides), compile=compile)

    # ---- adapters
    def add(self, adapter: StudioAdapter, name: str | None = None, scale: Scale = 1.0, start: float = 0.0,
            end: float = 1.0, **inputs: Any) -> Slot:
        """Attach an adapter to the UNet (moved to the UNet's device and dtype); see `AdapterStack.add`."""
        adapter.to(device=self.pipe.unet.device, dtype=self.pipe.unet.dtype)
        return self.stack.add(adapter, name=name, scale=scale, start=start, end=end, **inputs)

    def remove(self, name: str) -> StudioAdapter:
        return self.stack.remove(name)

    def to(self, *args: Any, **kwargs: Any) -> "StudioPipeline":
        self.pipe.to(*args, **kwargs)
        for slot in self.stack:
            slot.adapter.to(*args, **kwargs)
        if self._compile_options is not None and self.stack.compiled:  # mode "auto" depends on the device
            self.stack.compile(**self._compile_options)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def set_sampler(self, name: str) -> None:
        """Use sampler `name` (`adapter_studio.samplers.SAMPLERS`), built from the model's scheduler config."""
        self.pipe.scheduler = make_scheduler(name, self._scheduler_config)

    def guidance_mode(self, guidance: str = "auto") -> str:
        """The guidance the call runs: "cfg" or the mode of the enabled adapter that replaces CFG."""
        modes = {s.adapter.guidance_mode: s.name for s in self.stack if s.enabled and s.adapter.guidance_mode}
        if len(modes) > 1 or sum(bool(s.enabled and s.adapter.guidance_mode) for s in self.stack) > 1:
            names = [s.name for s in self.stack if s.enabled and s.adapter.guidance_mode]
            raise StudioError(f"adapters {names} each replace classifier-free guidance; enable one of them")
        if guidance == "auto":
            return next(iter(modes), "cfg")
        if guidance == "cfg":
            if modes:
                mode, name = next(iter(modes.items()))
                raise StudioError(f"adapter {name!r} replaces classifier-free guidance: use guidance={mode!r} or "
                                  f"disable it")
            return "cfg"
        if guidance not in modes:
            raise StudioError(f"guidance={guidance!r} needs an enabled adapter providing it (enabled: "
                              f"{sorted(modes) or 'none'}); add one or use guidance='cfg'")
        return guidance

    # ---- call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, guidance: str = "auto", guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, adapter_inputs: dict[str, dict[str, Any]] | None = None,
                 **kwargs: Any) -> Any:
        """Call the wrapped pipeline with the stack acting; takes the wrapped pipeline's arguments.

        `num_images_per_prompt` is the batch per prompt for every pipeline (`num_videos_per_prompt` is the same):
        diffusers' AnimateDiff pipeline ignores its own per-prompt count, so there each prompt is repeated instead,
        in diffusers' order (p0, p0, p1, p1).
        """
        mode = self.guidance_mode(guidance)
        params = inspect.signature(self.pipe.__call__).parameters
        if guidance_scale is None:  # the wrapped pipeline's own default (7.5 for SD1.5, 5.0 for SDXL)
            guidance_scale = params["guidance_scale"].default
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
        per_prompt = int(kwargs.pop("num_videos_per_prompt", num_images_per_prompt))
        if "num_images_per_prompt" in params:
            kwargs["num_images_per_prompt"] = per_prompt
        elif per_prompt > 1:  # AnimateDiffPipeline sets num_videos_per_prompt = 1 whatever it is given
            prompt, kwargs = _repeat_prompts(prompt, kwargs, per_prompt)
        user_callback = kwargs.get("callback_on_step_end")
        if getattr(user_callback, "tensor_inputs", None):  # diffusers' PipelineCallback objects name their tensors
            kwargs.setdefault("callback_on_step_end_tensor_inputs", list(user_callback.tensor_inputs))
        if "latents" not in kwargs.setdefault("callback_on_step_end_tensor_inputs", ["latents"]):
            kwargs["callback_on_step_end_tensor_inputs"] = [*kwargs["callback_on_step_end_tensor_inputs"], "latents"]
        kwargs["callback_on_step_end"] = self._step_end_callback(user_callback)
        size = self.default_size()
        call = CallInfo(pipe=self.pipe, batch_size=n_prompts * per_prompt, num_images_per_prompt=per_prompt, cfg=cfg,
                        guidance_scale=float(guidance_scale), device=self.pipe.unet.device, dtype=self.pipe.unet.dtype,
                        num_frames=int(kwargs.get("num_frames", params["num_frames"].default
                                                  if "num_frames" in params else 1)),
                        height=int(kwargs.get("height") or size), width=int(kwargs.get("width") or size),
                        prompt=prompt, negative_prompt=kwargs.get("negative_prompt"),
                        num_inference_steps=int(kwargs.get("num_inference_steps",
                                                           params["num_inference_steps"].default)),
                        generator=kwargs.get("generator"))
        masks = {}
        try:
            for slot in self.stack:
                extra = dict(adapter_inputs.get(slot.name, {}))
                if "sample_mask" in extra:
                    masks[slot.name] = slot.sample_mask
                    slot.sample_mask = extra.pop("sample_mask")
                if slot.enabled:
                    slot.call_inputs = slot.adapter.begin_call({**slot.inputs, **extra}, call)
            with _timesteps_on_host(self.pipe.scheduler):
                if kwargs.get("latents") is None:
                    latents = self._initial_latents(call)
                    if latents is not None:
                        kwargs["latents"] = latents
                with self.stack.sampling(self.pipe.scheduler, cfg=cfg):
                    return self.pipe(prompt=prompt, guidance_scale=guidance_scale if cfg else 1.0, **kwargs)
        finally:
            for slot in self.stack:
                slot.call_inputs = None
                slot.state = None
                if slot.name in masks:
                    slot.sample_mask = masks[slot.name]

    def default_size(self) -> int:
        """The output side in pixels when a call gives none (the UNet's sample size times the VAE's factor)."""
        factor = getattr(self.pipe, "vae_scale_factor", 8)
        return int(self.pipe.unet.config.sample_size * factor)

    def _initial_latents(self, call: CallInfo) -> torch.Tensor | None:
        """The starting latents of the one enabled adapter that gives them (I2V's Frame Similarity Prior), divided
        by the scheduler's `init_noise_sigma` (which diffusers multiplies into given latents), or None."""
        givers = [s for s in self.stack if s.enabled
                  and type(s.adapter).initial_latents is not StudioAdapter.initial_latents]
        if not givers:
            return None
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(call.num_inference_steps, device=call.device)  # the pipeline sets the same again
        out = [(s.name, s.adapter.initial_latents(s.call_inputs, call, scheduler)) for s in givers]
        out = [(name, x) for name, x in out if x is not None]
        if len(out) > 1:
            raise StudioError(f"adapters {[n for n, _ in out]} each give the starting latents; enable one of them")
        return out[0][1] / scheduler.init_noise_sigma if out else None

    def _step_end_callback(self, user_callback: Any) -> Any:
        """diffusers' `callback_on_step_end`: the stack's latent pinning, then the caller's callback (if any)."""
        stack = self.stack

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if "latents" in callback_kwargs:
                callback_kwargs["latents"] = stack.after_step(callback_kwargs["latents"], step, timestep,
                                                              pipe.scheduler)
            if user_callback is not None:
                callback_kwargs = user_callback(pipe, step, timestep, callback_kwargs)
            return callback_kwargs

        return on_step_end


@contextlib.contextmanager
def _timesteps_on_host(scheduler: Any) -> Iterator[None]:
    """Within the block, `scheduler.set_timesteps(..., device=...)` keeps the timesteps on the host.

    diffusers' pipelines put them on the UNet's device, and DDIM's and PNDM's `step` then index their host tables
    with that step's device timestep, which waits for the GPU every step: the CPU cannot queue the next step while
    the last one runs. On the host nothing waits; the stack's pre-hook hands the UNet each step's timestep from one
    copy made per call (`AdapterStack._timestep_on_device`). The values, and so the images, are the same.
    """
    set_timesteps = scheduler.set_timesteps
    if "device" not in inspect.signature(set_timesteps).parameters:  # a scheduler of its own kind: left as it is
        yield
        return

    @functools.wraps(set_timesteps)  # pipelines read its signature (does it take `timesteps=` / `sigmas=`?)
    def on_host(*args: Any, device: Any = None, **kwargs: Any) -> Any:
        return set_timesteps(*args, device="cpu", **kwargs)

    own = scheduler.__dict__.get("set_timesteps")  # already patched by a call further out: put that back
    scheduler.set_timesteps = on_host
    try:
        yield
    finally:
        if own is None:
            del scheduler.set_timesteps
        else:
            scheduler.set_timesteps = own


def _repeat_prompts(prompt: str | list[str] | None, kwargs: dict[str, Any],
                    n: int) -> tuple[list[str] | None, dict[str, Any]]:
    """Each prompt (and negative prompt / prompt embeddings) `n` times in a row, as a batch of single prompts."""
    def rep(p: Any) -> Any:
        if p is None:
            return None
        if isinstance(p, torch.Tensor):
            return p.repeat_interleave(n, dim=0)
        return [q for q in ([p] if isinstance(p, str) else p) for _ in range(n)]

    kwargs = dict(kwargs)
    for key in ("negative_prompt", "prompt_embeds", "negative_prompt_embeds"):
        if key in kwargs and not isinstance(kwargs[key], str):  # one negative text applies to every prompt as is
            kwargs[key] = rep(kwargs[key])
    return rep(prompt), kwargs
