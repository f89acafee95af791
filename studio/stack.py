"""The adapter stack: several adapters of any family on one frozen UNet, each with its own scale, window and mask."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .adapter import AttentionAdapter, ResidualAdapter, StudioAdapter
from .block_scale import Scale, check_scale_fits, layer_scale, residual_scales, validate_scale
from .context import CallInfo, ForwardContext, UNetCall, host_to_device
from .errors import StudioError
from .processor import ComposingAttnProcessor


@dataclass
class Slot:
    """One adapter in the stack and how it is applied.

    Attributes:
        name: unique name in the stack.
        adapter: a `StudioAdapter` (an `AttentionAdapter`, a `ResidualAdapter`, or one that only pins latents).
        scale: float, or per-block dict (`adapter_studio.block_scale`).
        start, end: step window as fractions of sampling; active while `start <= progress < end` (end=1 includes the last step).
        enabled: switch without detaching.
        sample_mask: `[B]` bools, one per conditional sample of a call (None = all); lets one batch carry different mixes.
        inputs: family inputs (reference images, guidance scale w, ...), encoded per call by the adapter.
    """

    name: str
    adapter: nn.Module
    scale: Scale = 1.0
    start: float = 0.0
    end: float = 1.0
    enabled: bool = True
    sample_mask: Sequence[bool] | torch.Tensor | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    # per-call inputs (set by the pipeline from `adapter.begin_call`) and per-forward state, set by the stack
    call_inputs: dict[str, Any] | None = None
    state: Any = None
    _gate: torch.Tensor | None = None  # [N] on the CPU, this forward's scale-free gate
    _gate_uniform: float | None = None  # set when every sample has the same gate: one scalar add per layer
    _gate_on_device: dict[tuple, torch.Tensor] = field(default_factory=dict)  # per value, kept across forwards
    _layer_scales: dict[str, float] = field(default_factory=dict)
    # compiled mode: `[layers of the adapter, N]` gate x per-layer scale on the UNet's device, set every forward
    _static_gates: torch.Tensor | None = None
    _static_gate_cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "scale":
            validate_scale(value)
            if isinstance(self.adapter, AttentionAdapter):
                check_scale_fits(value, self.adapter.layer_names())
            object.__setattr__(self, "_layer_scales", {})
        elif key == "start":  # the class defaults make both ends readable from the first assignment on
            self._check_window(value, self.end)
        elif key == "end":
            self._check_window(self.start, value)
        object.__setattr__(self, key, value)

    def _check_window(self, start: float, end: float) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise StudioError(f"adapter {self.name!r}: window must satisfy 0 <= start <= end <= 1, got {start}..{end}")

    def set_window(self, start: float, end: float) -> None:
        """Set both ends of the step window at once (checked together)."""
        self._check_window(start, end)
        object.__setattr__(self, "start", float(start))
        object.__setattr__(self, "end", float(end))

    def gate_for_layer(self, layer: str) -> float | torch.Tensor | None:
        """This forward's multiplier at `layer`: None (adds nothing), a float (same for every sample) or a CPU `[N]`."""
        if self._gate is None:
            return None
        s = self._layer_scales.get(layer)
        if s is None:
            s = self._layer_scales[layer] = layer_scale(self.scale, layer)
        if s == 0.0:
            return None
        if self._gate_uniform is not None:
            return self._gate_uniform * s
        return self._gate * s

    def gate_tensor(self, gate: torch.Tensor, like: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """A per-sample gate as `[n, 1, ...]` on `like`'s device and dtype, copied there once per value: a copy
        from the host waits for the device's queue, so the steps of a call reuse it."""
        key = (tuple(gate.tolist()), like.shape[0], like.device, like.dtype, like.ndim)
        out = self._gate_on_device.get(key)
        if out is None:
            if len(self._gate_on_device) > 64:
                self._gate_on_device.clear()
            out = host_to_device(ctx.expand(gate, like.shape[0]), like.device, like.dtype)
            out = self._gate_on_device[key] = out.view(-1, *([1] * (like.ndim - 1)))
        return out


class AdapterStack:
    """Adapters of any family composed on one frozen UNet.

    `attach(unet)` installs one `ComposingAttnProcessor` per attention layer (keeping the original processors
    inside) and a forward pre-hook that builds the `ForwardContext` and the residual inputs; `detach()` puts the
    original processor objects back. Adapters can be added and removed at any time.
    """

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.unet: nn.Module | None = None
        self.context: ForwardContext | None = None
        self.cfg = False
        #: the diffusers pipeline a wrapper (StudioPipeline) runs this stack in: a plain `pipe(...)` call of it then
        #: works too (inputs encoded on its first UNet forward, CFG read from the pipeline)
        self.pipe: Any = None
        self._scheduler: Any = None
        self._sampling_depth = 0
        self._plain_call = False  # slots hold inputs a plain diffusers call encoded
        self._original: dict[str, Any] | None = None
        #: (processor name, attention module, the composing processor installed on it), in `attn_processors` order
        self._layers: list[tuple[str, nn.Module, ComposingAttnProcessor]] = []
        self._hook: Any = None
        #: a sampling call's host timesteps (the scheduler's tensor, device, {value: that step's copy on the device})
        self._device_timesteps: tuple[torch.Tensor, torch.device, dict[float, torch.Tensor]] | None = None
        self._by_layer: dict[str, list[Slot]] = {}
        self._timesteps_cache: tuple[Any, torch.Tensor | None] = (None, None)
        #: compiled mode (`compile()`): every enabled attention adapter runs at every layer it covers, multiplied by
        #: its gate as a device tensor, so that scales, windows, masks and inputs are tensor values, not branches
        self.static = False
        self._static_layers: dict[str, list[tuple[Slot, int]]] = {}
        self._compiled: Any = None
        #: compiled mode: modules adapters run outside the UNet's graph, compiled (`_compile_part`), by `id`
        self._parts: dict[int, tuple[nn.Module, Any]] = {}
        self._part_options: dict[str, Any] = {}

    # ---- attach / detach
    def attach(self, unet: nn.Module) -> "AdapterStack":
        if self.unet is not None:
            raise StudioError("this stack is already attached to a UNet; detach() it first")
        procs = unet.attn_processors
        if any(isinstance(p, ComposingAttnProcessor) for p in procs.values()):
            raise StudioError("this UNet already carries an adapter stack; detach that one first")
        for slot in self.slots.values():
            slot.adapter.check_compatible(unet)
        self._original = dict(procs)
        unet.set_attn_processor({k: ComposingAttnProcessor(v, k, self) for k, v in procs.items()})
        self._layers = [(name + ".processor", m, m.processor) for name, m in unet.named_modules()
                        if hasattr(m, "set_processor") and isinstance(getattr(m, "processor", None),
                                                                        ComposingAttnProcessor)]
        self._hook = unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.unet = unet
        self._reindex()
        return self

    def detach(self) -> None:
        if self.unet is None:
            return
        self.uncompile()
        self._hook.remove()
        self.sync_processors()  # what was set on the UNet since attach is what it gets back
        self.unet.set_attn_processor(self._original)
        self.unet, self._original, self._hook, self.context, self._layers = None, None, None, None, []

    def sync_processors(self) -> None:
        """Keep the stack in every attention layer when the UNet's processors were set after `attach`.

        diffusers' `fuse_qkv_projections()`, `enable_xformers_memory_efficient_attention()`,
        `set_default_attn_processor()` or `set_attn_processor(...)` on an attached UNet replace the composing
        processors, which would silently drop every adapter. The processor found there becomes the new `base` of a
        composing processor (and what `detach` restores); one of this stack's own put back (diffusers'
        `unfuse_qkv_projections()` restores the processors it saved, ours) is taken as it is. Run by the forward
        pre-hook (32 identity checks for SD1.5); call it directly to apply a change before the next forward.
        """
        for i, (name, attn, mine) in enumerate(self._layers):
            found = attn.processor
            if found is mine:
                continue
            if isinstance(found, ComposingAttnProcessor):
                if found.stack is not self:
                    raise StudioError(f"layer {name} carries another adapter stack's processor; detach this stack "
                                      "before attaching another one to the UNet")
                mine = found
            else:
                mine = ComposingAttnProcessor(found, name, self)
                attn.set_processor(mine)
            self._layers[i] = (name, attn, mine)
            self._original[name] = mine.base

    # ---- compiled mode
    def compile(self, backend: Any = "inductor", mode: str | None = "auto", fullgraph: bool = True,
                dynamic: bool | None = False, recompile_limit: int | None = 64, **options: Any) -> Any:
        """Compile the attached UNet's forward with the stack in it; returns the compiled callable.

        The boundary: `torch.compile` wraps `unet.forward` (set as an instance attribute), so `unet(...)` still runs
        the stack's forward pre-hook eagerly — progress, gates, `begin_call` / `prepare` (image tokens, folded K/V,
        AGD's w and t embeddings), latent pinning and residual adapters — and hands the compiled body only tensors:
        per adapter a `[layers, N]` gate (window x per-sample mask x per-layer scale) and its prepared state.
        Changing a scale, a window, a mask or an input between calls changes tensor values only: no recompilation.
        Adding, removing, enabling or disabling an adapter (or switching a mask or per-sample references on or off)
        changes the graph's structure and may recompile once.

        What an adapter runs outside the UNet (a Ctrl unit's ControlNets and Ctrl-Adapter) is compiled too, with the
        same options but without CUDA graphs (`ForwardContext.compile_part`): its outputs reach the UNet's graph
        through the stack's eager gates, and capturing them as well is not yet checked on a GPU.

        `mode="auto"`: "reduce-overhead" (CUDA graphs) with inductor on CUDA, the default elsewhere.
        `recompile_limit`: raises torch's process-wide `torch._dynamo.config.recompile_limit` (default 8) to at least
        this: every mix structure (adapters, batch size, resolution) is one cached graph, and with `fullgraph=True`
        the ninth would otherwise fail hard. None leaves torch's setting alone.
        """
        if self.unet is None:
            raise StudioError("attach the stack to a UNet before compiling it")
        self.uncompile()
        unet = self.unet
        if recompile_limit is not None and torch._dynamo.config.recompile_limit < recompile_limit:
            torch._dynamo.config.recompile_limit = recompile_limit
        if mode == "auto":
            mode = "reduce-overhead" if backend == "inductor" and unet.device.type == "cuda" else None
        kw = dict(backend=backend, fullgraph=fullgraph, dynamic=dynamic, **options)
        part_mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        self._part_options = dict(kw, mode=part_mode) if part_mode is not None else dict(kw)
        if mode is not None:
            kw["mode"] = mode
        self._compiled = torch.compile(unet.forward, **kw)
        unet.forward = self._compiled  # an instance attribute: nn.Module.__call__ runs the pre-hook, then this
        self.static = True
        return self._compiled

    def uncompile(self) -> None:
        """Back to the eager path (the compiled code is dropped)."""
        if self._compiled is not None and self.unet is not None and self.unet.__dict__.get("forward") is self._compiled:
            del self.unet.__dict__["forward"]
        self._compiled = None
        self.static = False
        self._static_layers = {}
        self._parts = {}
        for slot in self.slots.values():
            slot._static_gates = None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _compile_part(self, module: nn.Module) -> Any:
        """`module` compiled with the stack's options, kept until it leaves the stack or the stack is uncompiled."""
        hit = self._parts.get(id(module))
        if hit is None or hit[0] is not module:
            # hooks an adapter sets on its parts for a call (latent skipping on a ControlNet's conv_in) must reach
            # the graph: torch does not guard on module hooks by default
            compiled = torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)(
                torch.compile(module, **self._part_options))
            hit = self._parts[id(module)] = (module, compiled)
        return hit[1]

    def _static_prepare(self, ctx: ForwardContext, n: int, cfg: bool, device: torch.device,
                        dtype: torch.dtype) -> None:
        """Compiled mode, in the pre-hook: gates of every enabled attention adapter as `[layers, N]` device tensors
        (zeros where it is off) and its state, whatever its window and mask say this forward."""
        layers: dict[str, list[tuple[Slot, int]]] = {}
        for slot in self.slots.values():
            slot._static_gates = None
            if not slot.enabled or not isinstance(slot.adapter, AttentionAdapter):
                continue
            if slot._gate is None:  # off in this forward: prepared all the same, so the graph keeps its shape
                try:
                    slot.state = slot.adapter.prepare(self._inputs(slot), ctx)
                except StudioError:  # inputs an inactive adapter cannot take here (AGD in a CFG batch): leave it out
                    slot.state = None
                    continue
            gate = slot._gate if slot._gate is not None else torch.zeros(n, dtype=torch.float32)
            names = slot.adapter.layer_names()
            scales = tuple(float(layer_scale(slot.scale, layer)) for layer in names)
            # kept on the device per value (a call's steps reuse them), copied without waiting for the device
            key = (tuple(gate.tolist()), scales, device, dtype)
            gates = slot._static_gate_cache.get(key)
            if gates is None:
                if len(slot._static_gate_cache) > 32:
                    slot._static_gate_cache.clear()
                gates = torch.tensor(scales, dtype=torch.float32)[:, None] * gate[None, :]
                gates = slot._static_gate_cache[key] = host_to_device(gates, device, dtype)
            slot._static_gates = gates
            for i, layer in enumerate(names):
                layers.setdefault(layer, []).append((slot, i))
        self._static_layers = layers

    @property
    def attached(self) -> bool:
        return self.unet is not None

    # ---- slots
    def add(self, adapter: StudioAdapter, name: str | None = None, scale: Scale = 1.0, start: float = 0.0,
            end: float = 1.0, enabled: bool = True, sample_mask: Sequence[bool] | None = None,
            **inputs: Any) -> Slot:
        """Add an adapter; returns its `Slot` (change scale/window/inputs there). Checks it fits the UNet."""
        if not isinstance(adapter, StudioAdapter):
            raise StudioError(f"{type(adapter).__name__} is not a StudioAdapter (AttentionAdapter, ResidualAdapter, ...)")
        name = name or self._free_name(getattr(adapter, "family", "adapter"))
        if name in self.slots:
            raise StudioError(f"an adapter named {name!r} is already in the stack")
        if self.unet is not None:
            adapter.check_compatible(self.unet)
            if isinstance(adapter, AttentionAdapter):
                missing = set(adapter.layer_names()) - set(self._original)
                if missing:
                    raise StudioError(f"adapter {name!r} names attention layers this UNet lacks: {sorted(missing)[:3]}")
            if isinstance(adapter, ResidualAdapter):
                residual_scales(scale, self.unet.config)  # a per-block dict the residuals cannot take fails here
        slot = Slot(name=name, adapter=adapter, scale=scale, start=start, end=end, enabled=enabled,
                    sample_mask=sample_mask, inputs=dict(inputs))
        self.slots[name] = slot
        self._reindex()
        return slot

    def remove(self, name: str) -> nn.Module:
        slot = self.slots.pop(name)
        self._reindex()
        return slot.adapter

    def clear(self) -> None:
        self.slots.clear()
        self._reindex()

    def __getitem__(self, name: str) -> Slot:
        return self.slots[name]

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.slots.values())

    def __len__(self) -> int:
        return len(self.slots)

    def slots_for_layer(self, layer: str) -> list[Slot]:
        return self._by_layer.get(layer, ())

    def _free_name(self, base: str) -> str:
        i = 0
        while f"{base}{i}" in self.slots:
            i += 1
        return f"{base}{i}"

    def _reindex(self) -> None:
        if self._parts:  # a removed adapter's compiled parts go with it
            kept = {id(m) for slot in self.slots.values() for m in slot.adapter.modules()}
            self._parts = {k: v for k, v in self._parts.items() if k in kept}
        by_layer: dict[str, list[Slot]] = {}
        for slot in self.slots.values():
            slot._layer_scales = {}
            if isinstance(slot.adapter, AttentionAdapter):
                for layer in slot.adapter.layer_names():
                    by_layer.setdefault(layer, []).append(slot)
        self._by_layer = by_layer

    # ---- sampling
    @contextlib.contextmanager
    def sampling(self, scheduler: Any = None, cfg: bool = False) -> Iterator["AdapterStack"]:
        """Within this block UNet calls are steps of one sampling run.

        `scheduler` gives the step index of a timestep (for windows as fractions of steps); `cfg` says the batch
        is `[unconditional; conditional]`.
        """
        old = (self._scheduler, self.cfg)
        self._scheduler, self.cfg = scheduler, cfg
        self._sampling_depth += 1
        try:
            yield self
        finally:
            self._sampling_depth -= 1
            self._scheduler, self.cfg = old

    def _begin_plain_call(self, n: int, t: torch.Tensor, sample: torch.Tensor) -> tuple[bool, Any]:
        """A UNet forward of the wrapped pipeline called as plain diffusers (`pipe(...)`, not the wrapper).

        diffusers' pipelines keep `do_classifier_free_guidance` and the scheduler's timesteps for the running call;
        the first forward of a call (at the first timestep) encodes every slot's fixed inputs as the wrapper would.
        """
        pipe = self.pipe
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False)) and n % 2 == 0
        ts = getattr(pipe.scheduler, "timesteps", None)
        first = ts is not None and len(ts) and bool((t == float(ts[0])).all())
        if not first and all(s.call_inputs is not None for s in self.slots.values() if s.enabled):
            return cfg, pipe.scheduler
        factor = getattr(pipe, "vae_scale_factor", 8)
        call = CallInfo(pipe=pipe, batch_size=n // 2 if cfg else n, num_images_per_prompt=1, cfg=cfg,
                        guidance_scale=float(getattr(pipe, "guidance_scale", 1.0)), device=sample.device,
                        dtype=self.unet.dtype, num_frames=sample.shape[2] if sample.ndim == 5 else 1,
                        height=sample.shape[-2] * factor, width=sample.shape[-1] * factor,
                        num_inference_steps=len(ts) if ts is not None else None)
        for slot in self.slots.values():
            if slot.enabled:
                slot.call_inputs = slot.adapter.begin_call(dict(slot.inputs), call)
        self._plain_call = True
        return cfg, pipe.scheduler

    def _progress(self, t: torch.Tensor, sched: Any) -> torch.Tensor:
        if sched is not None and getattr(sched, "timesteps", None) is not None and len(sched.timesteps):
            if self._timesteps_cache[0] is not sched.timesteps:  # one copy to the CPU per sampling run
                self._timesteps_cache = (sched.timesteps, sched.timesteps.detach().to("cpu", torch.float64))
            ts = self._timesteps_cache[1]
            dist = (ts[None, :] - t.double()[:, None]).abs()
            best, idx = dist.min(dim=1)
            if bool((best < 1e-3).all()):
                return idx.double() / len(ts)
        num_train = getattr(getattr(self.unet, "config", None), "num_train_timesteps", None) or 1000
        return (1.0 - t.double() / num_train).clamp(0.0, 1.0)

    def _gate(self, slot: Slot, ctx: ForwardContext, n: int, cfg: bool) -> torch.Tensor | None:
        if not slot.enabled:
            return None
        if slot.start > 0.0 or slot.end < 1.0:
            progress = ctx.step_progress()
            gate = ((progress >= slot.start) & ((progress < slot.end) | (slot.end >= 1.0))).to(torch.float32)
        else:  # the whole sampling run: no need to know where in it this forward is
            gate = torch.ones(n, dtype=torch.float32)
        if slot.sample_mask is not None:
            m = torch.as_tensor(slot.sample_mask, dtype=torch.float32).detach().cpu().flatten()
            if cfg and m.numel() * 2 == n:
                m = torch.cat([m, m])
            if m.numel() != n:
                raise StudioError(f"adapter {slot.name!r}: sample_mask has {m.numel()} entries for a batch of "
                                  f"{n // 2 if cfg else n} samples")
            gate = gate * m
        if not bool(gate.any()):
            return None
        return gate

    def after_step(self, latents: torch.Tensor, step: int, timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """Give every enabled adapter the latents after scheduler step `step` (`[B, C, (F,) H, W]`); returns them
        with whatever the adapters pinned. A `StudioPipeline` calls this from diffusers' step-end callback."""
        for slot in self.slots.values():
            if not slot.enabled:
                continue
            inputs = slot.call_inputs if slot.call_inputs is not None else slot.inputs
            pinned = slot.adapter.latents_after_step(latents, inputs, step, timestep, scheduler)
            if pinned is not None:
                latents = pinned
        return latents

    def _timestep_on_device(self, timestep: Any, device: torch.device) -> Any:
        """The UNet's timestep on the latents' `device` when a sampling call keeps its scheduler's timesteps on the
        host (`StudioPipeline` does, so that DDIM's and PNDM's steps read no value back from the GPU). The call's
        timesteps are copied to the device once; each step then takes its own copy (no transfer, no wait)."""
        if (not isinstance(timestep, torch.Tensor) or timestep.device.type != "cpu" or device.type == "cpu"
                or timestep.numel() != 1):
            return timestep
        ts = getattr(self._scheduler, "timesteps", None)
        if ts is None or ts.device.type != "cpu":
            return timestep
        cache = self._device_timesteps
        if cache is None or cache[0] is not ts or cache[1] != device:
            on_device = host_to_device(ts, device)  # at the first step, behind the encoders: no wait for them
            steps = {v: on_device[i].clone() for i, v in enumerate(ts.tolist())}
            cache = self._device_timesteps = (ts, device, steps)
        return cache[2].get(timestep.item(), timestep)

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # one view of the call whether diffusers passed sample / timestep / text tokens positionally or by name
        names = ("sample", "timestep", "encoder_hidden_states")
        if len(args) > len(names):  # more given positionally (class labels, ...): name them all, in forward's order
            names = tuple(inspect.signature(type(module).forward).parameters)[1:]
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = args[len(names):]
        sample, timestep = kwargs["sample"], kwargs["timestep"]
        host_t = timestep if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" else None
        kwargs["timestep"] = timestep = self._timestep_on_device(timestep, sample.device)
        if not self.slots:
            self.context = None
            return args, kwargs
        self.sync_processors()
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).flatten().to(torch.float32)
        if t.numel() == 1:
            t = t.expand(n)
        # a plain diffusers call runs under no_grad (its __call__ is decorated so): a forward with gradients is a
        # training step or a user's own loop, whose inputs are the slots' as they are
        cfg, scheduler = self.cfg, self._scheduler
        if self.pipe is not None and not self._sampling_depth and not torch.is_grad_enabled():
            cfg, scheduler = self._begin_plain_call(n, t.detach().cpu(), sample)
        elif self._plain_call and not self._sampling_depth:  # inputs a plain call encoded are not this forward's
            for slot in self.slots.values():
                slot.call_inputs = None
            self._plain_call = False
        ctx = ForwardContext(batch_size=n, cfg=cfg, timestep=t, progress=None, latent_size=tuple(sample.shape[-2:]),
                             num_frames=sample.shape[2] if sample.ndim == 5 else 1, unet=module,
                             encoder_hidden_states=kwargs.get("encoder_hidden_states"))
        # gates are decided on the CPU, so no slot or layer waits on the GPU; the step's progress only where a window
        # or an adapter asks for it, from the host timestep of a StudioPipeline call (else read back from the device)
        ctx.progress_fn = lambda: self._progress(
            host_t.flatten().float().expand(n) if host_t is not None else t.detach().cpu(), scheduler)
        self.context = ctx
        if self.static:  # adapters then prepare what the compiled layers read as tensors (see `compile`)
            ctx.cache["static"] = True
            ctx.compile_part = self._compile_part
        active: list[Slot] = []
        for slot in self.slots.values():
            slot._gate = self._gate(slot, ctx, n, cfg)
            slot._gate_uniform = None
            slot.state = None
            if slot._gate is None:
                continue
            if bool((slot._gate == slot._gate[0]).all()):
                slot._gate_uniform = float(slot._gate[0])
            active.append(slot)
        for slot in active:  # latent pinning first: every adapter then sees the UNet's real input
            pinned = slot.adapter.latents_before_unet(kwargs["sample"], self._inputs(slot), ctx, slot._gate > 0)
            if pinned is not None:
                kwargs["sample"] = pinned
        down_res: list[torch.Tensor] | None = None
        mid_res: torch.Tensor | None = None
        call = UNetCall(sample=kwargs["sample"], timestep=t, encoder_hidden_states=kwargs.get("encoder_hidden_states"),
                        added_cond_kwargs=kwargs.get("added_cond_kwargs"), num_frames=ctx.num_frames)
        for slot in active:
            if isinstance(slot.adapter, AttentionAdapter):
                slot.state = slot.adapter.prepare(self._inputs(slot), ctx)
            if not isinstance(slot.adapter, ResidualAdapter):
                continue
            down_scales, mid_scale = residual_scales(slot.scale, module.config)
            if mid_scale == 0.0 and not any(down_scales):  # nothing would be added: do not run the ControlNet
                continue
            down, mid = slot.adapter.residuals(self._inputs(slot), ctx, call)
            if len(down) != len(down_scales):
                raise StudioError(f"adapter {slot.name!r} returned {len(down)} down residuals; this UNet takes "
                                  f"{len(down_scales)}")
            down = [slot.gate_tensor(slot._gate * s, d, ctx) * d for d, s in zip(down, down_scales)]
            # diffusers reads down residuals without a mid residual as T2I-Adapter features: always give a mid one
            mid = torch.zeros_like(down[-1]) if mid is None else slot.gate_tensor(slot._gate * mid_scale, mid, ctx) * mid
            down_res = down if down_res is None else [a + b for a, b in zip(down_res, down)]
            mid_res = mid if mid_res is None else mid_res + mid
        if self.static:
            self._static_prepare(ctx, n, cfg, kwargs["sample"].device, ctx.unet_dtype())
            if down_res is None:  # an enabled residual adapter adding nothing now: zeros keep the graph's inputs
                zeros = [s.adapter.zero_residuals(self._inputs(s), ctx, call) for s in self.slots.values()
                         if s.enabled and isinstance(s.adapter, ResidualAdapter)]
                zeros = [z for z in zeros if z is not None]
                if zeros:
                    down_res = zeros[0][0]
                    mid_res = zeros[0][1] if zeros[0][1] is not None else torch.zeros_like(down_res[-1])
        if down_res is not None:
            given = kwargs.get("down_block_additional_residuals")
            kwargs["down_block_additional_residuals"] = (
                tuple(down_res) if given is None else tuple(a + b for a, b in zip(given, down_res)))
            given = kwargs.get("mid_block_additional_residual")
            kwargs["mid_block_additional_residual"] = mid_res if given is None else given + mid_res
        return args, kwargs

    @staticmethod
    def _inputs(slot: Slot) -> dict[str, Any]:
        return slot.call_inputs if slot.call_inputs is not None else slot.inputs
