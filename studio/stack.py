"""The adapter stack: several adapters of any family on one frozen UNet, each with its own scale, window and mask."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .adapter import AttentionAdapter, ResidualAdapter
from .context import ForwardContext
from .errors import StudioError
from .processor import ComposingAttnProcessor

Scale = float | dict[str, Any]

_LAYER_RE = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d+)?\.(?:attentions|motion_modules)\.(\d+)\.")


def layer_scale(scale: Scale, layer: str) -> float:
    """Scale of one attention layer from a float or a per-block dict.

    The dict follows diffusers' `set_ip_adapter_scale` convention (InstantStyle): keys `down`, `mid`, `up`; for
    down/up a float or `{"block_i": float | [float per attention in the block]}`. Layers not named get 0.
    E.g. InstantStyle's style-only on SD1.5: `{"up": {"block_1": [0.0, 1.0, 0.0]}}` (SDXL: `block_0`; SD1.5's first
    up block has no attention).
    """
    if not isinstance(scale, dict):
        return float(scale)
    m = _LAYER_RE.match(layer)
    if not m:
        return 0.0
    part, block, attn_idx = m.group(1).split("_")[0], m.group(2), int(m.group(3))
    val = scale.get(part, 0.0)
    if part == "mid" or not isinstance(val, dict):
        return float(val[attn_idx] if isinstance(val, (list, tuple)) else val)
    val = val.get(f"block_{block}", 0.0)
    if isinstance(val, (list, tuple)):
        if attn_idx >= len(val):
            raise StudioError(f"per-block scale for {part} block_{block} lists {len(val)} values; "
                              f"the block has at least {attn_idx + 1} attention layers")
        return float(val[attn_idx])
    return float(val)


def validate_scale(scale: Scale) -> None:
    """Raise StudioError unless `scale` is a number or a well-formed per-block dict."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return
    if not isinstance(scale, dict) or not set(scale) <= {"down", "mid", "up"}:
        raise StudioError(f"scale must be a number or a dict with keys down/mid/up, got {scale!r}")
    for part, val in scale.items():
        if isinstance(val, dict):
            if part == "mid":
                raise StudioError("the mid block takes a number (or a list), not a per-block dict")
            for k, v in val.items():
                if not re.fullmatch(r"block_\d+", k):
                    raise StudioError(f"per-block scale key {k!r} must look like 'block_0'")
                vals = v if isinstance(v, (list, tuple)) else [v]
                if not all(isinstance(x, (int, float)) for x in vals):
                    raise StudioError(f"per-block scale {part}.{k} must be numbers, got {v!r}")
        elif not isinstance(val, (int, float, list, tuple)):
            raise StudioError(f"per-block scale for {part!r} must be a number, list or dict, got {val!r}")


@dataclass
class Slot:
    """One adapter in the stack and how it is applied.

    Attributes:
        name: unique name in the stack.
        adapter: an `AttentionAdapter` or `ResidualAdapter`.
        scale: float, or per-block dict (see `layer_scale`).
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
    _gate_on_device: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _layer_scales: dict[str, float] = field(default_factory=dict)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "scale":
            validate_scale(value)
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
        """A per-sample gate as `[n, 1, ...]` on `like`'s device and dtype, copied there once per forward."""
        key = (tuple(gate.tolist()), like.shape[0], like.device, like.dtype, like.ndim)
        out = self._gate_on_device.get(key)
        if out is None:
            out = ctx.expand(gate, like.shape[0]).to(device=like.device, dtype=like.dtype)
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
        self._scheduler: Any = None
        self._original: dict[str, Any] | None = None
        self._hook: Any = None
        self._by_layer: dict[str, list[Slot]] = {}
        self._timesteps_cache: tuple[Any, torch.Tensor | None] = (None, None)

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
        self._hook = unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.unet = unet
        self._reindex()
        return self

    def detach(self) -> None:
        if self.unet is None:
            return
        self._hook.remove()
        self.unet.set_attn_processor(self._original)
        self.unet, self._original, self._hook, self.context = None, None, None, None

    @property
    def attached(self) -> bool:
        return self.unet is not None

    # ---- slots
    def add(self, adapter: nn.Module, name: str | None = None, scale: Scale = 1.0, start: float = 0.0,
            end: float = 1.0, enabled: bool = True, sample_mask: Sequence[bool] | None = None,
            **inputs: Any) -> Slot:
        """Add an adapter; returns its `Slot` (change scale/window/inputs there). Checks it fits the UNet."""
        if not isinstance(adapter, (AttentionAdapter, ResidualAdapter)):
            raise StudioError(f"{type(adapter).__name__} is not an AttentionAdapter or ResidualAdapter")
        name = name or self._free_name(getattr(adapter, "family", "adapter"))
        if name in self.slots:
            raise StudioError(f"an adapter named {name!r} is already in the stack")
        if self.unet is not None:
            adapter.check_compatible(self.unet)
            if isinstance(adapter, AttentionAdapter):
                missing = set(adapter.layer_names()) - set(self._original)
                if missing:
                    raise StudioError(f"adapter {name!r} names attention layers this UNet lacks: {sorted(missing)[:3]}")
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
        try:
            yield self
        finally:
            self._scheduler, self.cfg = old

    def _progress(self, t: torch.Tensor) -> torch.Tensor:
        sched = self._scheduler
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

    def _gate(self, slot: Slot, progress: torch.Tensor, n: int) -> torch.Tensor | None:
        if not slot.enabled:
            return None
        active = (progress >= slot.start) & ((progress < slot.end) | (slot.end >= 1.0))
        gate = active.to(torch.float32)
        if slot.sample_mask is not None:
            m = torch.as_tensor(slot.sample_mask, dtype=torch.float32).detach().cpu().flatten()
            if self.cfg and m.numel() * 2 == n:
                m = torch.cat([m, m])
            if m.numel() != n:
                raise StudioError(f"adapter {slot.name!r}: sample_mask has {m.numel()} entries for a batch of "
                                  f"{n // 2 if self.cfg else n} samples")
            gate = gate * m
        if not bool(gate.any()):
            return None
        return gate

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        n = sample.shape[0]
        if not self.slots:
            self.context = None
            return args, kwargs
        t = torch.as_tensor(timestep, device=sample.device).flatten().to(torch.float32)
        if t.numel() == 1:
            t = t.expand(n)
        # gates are decided on the CPU (one small copy per forward) so no slot or layer waits on the GPU
        t_cpu = t.detach().cpu()
        ctx = ForwardContext(batch_size=n, cfg=self.cfg, timestep=t, progress=None, latent_size=tuple(sample.shape[-2:]),
                             num_frames=sample.shape[2] if sample.ndim == 5 else 1, unet=module)
        ctx.progress = self._progress(t_cpu)
        self.context = ctx
        down_res: list[torch.Tensor] | None = None
        mid_res: torch.Tensor | None = None
        for slot in self.slots.values():
            slot._gate = self._gate(slot, ctx.progress, n)
            slot._gate_on_device = {}
            slot._gate_uniform = None
            if slot._gate is not None and bool((slot._gate == slot._gate[0]).all()):
                slot._gate_uniform = float(slot._gate[0])
            slot.state = None
            if slot._gate is None:
                continue
            inputs = slot.call_inputs if slot.call_inputs is not None else slot.inputs
            if isinstance(slot.adapter, AttentionAdapter):
                slot.state = slot.adapter.prepare(inputs, ctx)
                continue
            ehs = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            down, mid = slot.adapter.residuals(inputs, ctx, sample, t, ehs)
            g = slot._gate * float(slot.scale if not isinstance(slot.scale, dict) else 1.0)
            down = [slot.gate_tensor(g, d, ctx) * d for d in down]
            down_res = down if down_res is None else [a + b for a, b in zip(down_res, down)]
            if mid is not None:
                mid = slot.gate_tensor(g, mid, ctx) * mid
                mid_res = mid if mid_res is None else mid_res + mid
        if down_res is not None or mid_res is not None:
            kwargs = dict(kwargs)
            if down_res is not None:
                given = kwargs.get("down_block_additional_residuals")
                kwargs["down_block_additional_residuals"] = (
                    tuple(down_res) if given is None else tuple(a + b for a, b in zip(given, down_res)))
            if mid_res is not None:
                given = kwargs.get("mid_block_additional_residual")
                kwargs["mid_block_additional_residual"] = mid_res if given is None else given + mid_res
        return args, kwargs
