"""`CtrlAdapter`: frozen ControlNets (one per condition), optional router, optional Ctrl-Adapter, as a studio residual
adapter.

Per UNet forward, for each condition present somewhere in the batch: its ControlNet runs on the rows (samples, or
samples x frames on a video target) where the condition is present — the noisy latent (or zeros: latent skipping),
the timestep, prompt tokens and the control image — and gives its down + mid residuals, times its conditioning scale.
The residuals of all conditions are fused per residual (`router.py`), then the Ctrl-Adapter maps them onto the target
UNet's residual inputs (`CtrlAdapterModel`); without an adapter (a plain ControlNet on its own backbone) they are the
residuals. Rows where no condition is present get exact zeros. The stack then applies the unit's weight, window and
per-sample mask.

For training, only `adapter` and `router` are trainable (`trainable_parameters()`); the ControlNets stay frozen and in
eval mode whatever `train()` is called with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapter_studio.adapter import ResidualAdapter
from adapter_studio.context import CallInfo, ForwardContext, UNetCall, host_to_device
from adapter_studio.errors import IncompatibleAdapterError, StudioError

from .conditions import Condition, check_unit, parse_conditions
from .modeling_ctrl_adapter import CtrlAdapterModel, is_video_unet
from .residuals import ResidualLayout
from .router import CtrlRouter, fusion_weights


@dataclass
class CallState:
    """What `begin_call` prepares once per pipeline call (conditions parsed, images preprocessed)."""

    conditions: list[Condition]
    guess_mode: bool
    fusion: str
    per_prompt: int
    text: tuple[torch.Tensor, torch.Tensor | None] | None


@contextlib.contextmanager
def _latents_skipped(controlnet: nn.Module, skip: bool) -> Iterator[None]:
    """Latent skipping (Ctrl-Adapter, sec. 3.2): the ControlNet's conv_in output is replaced by zeros, so only the
    control image (and the timestep, the prompt) reach its blocks."""
    if not skip:
        yield
        return
    handle = controlnet.conv_in.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        yield
    finally:
        handle.remove()


def _rows(t: torch.Tensor, frames: int) -> torch.Tensor:
    """A per-sample tensor `[N, ...]` as per-row `[N * frames, ...]` (`(b f)` order)."""
    return t if frames == 1 else t.repeat_interleave(frames, dim=0)


class CtrlAdapter(ResidualAdapter):
    """ControlNet(s) + optional Ctrl-Adapter + optional router.

    Args:
        controlnets: one frozen diffusers `ControlNetModel` per condition (all made for the same source backbone).
        adapter: the `CtrlAdapterModel` mapping their residuals onto the target UNet; None = plain ControlNet (the
            source backbone is the target).
        router: a `CtrlRouter` for `fusion="router"`.
    """

    family: ClassVar[str] = "ctrl"

    def __init__(self, controlnets: nn.Module | Sequence[nn.Module], adapter: CtrlAdapterModel | None = None,
                 router: CtrlRouter | None = None):
        super().__init__()
        nets = [controlnets] if isinstance(controlnets, nn.Module) else list(controlnets)
        if not nets:
            raise StudioError("a Ctrl unit needs at least one ControlNet")
        layouts = {ResidualLayout.from_config(cn.config) for cn in nets}
        if len(layouts) > 1:
            raise IncompatibleAdapterError("the ControlNets of one Ctrl unit must share a backbone (their residuals "
                                           "are fused); found " + "; ".join(sorted(lo.describe() for lo in layouts)))
        self.controlnets = nn.ModuleList(nets).requires_grad_(False).eval()
        self.adapter = adapter
        self.router = router
        self.source = layouts.pop()
        if router is not None and (router.config.num_experts != len(nets) or
                                   router.config.num_routers != len(self.source)):
            raise IncompatibleAdapterError(
                f"the router weighs {router.config.num_experts} conditions over {router.config.num_routers} "
                f"residuals; this unit has {len(nets)} ControlNets giving {len(self.source)} residuals")
        self._bare: tuple[Any, CallState] | None = None

    # ---- training support
    def train(self, mode: bool = True) -> "CtrlAdapter":
        super().train(mode)
        self.controlnets.eval()  # frozen: no dropout, whatever the adapter's mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's and the router's parameters (the ControlNets are frozen)."""
        return [p for m in (self.adapter, self.router) if m is not None for p in m.parameters()]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the adapter (`config.json` + safetensors) and the router (in `router/`) to `folder`."""
        if self.adapter is None:
            raise StudioError("a plain ControlNet unit has no adapter weights to save (its ControlNet is saved with "
                              "controlnet.save_pretrained, or `python -m adapter_studio convert ... --to diffusers`)")
        folder = Path(folder)
        self.adapter.save_pretrained(folder)
        if self.router is not None:
            self.router.save_pretrained(folder / "router")
        return folder

    # ---- the studio contract
    def check_compatible(self, unet: nn.Module) -> None:
        cn = self.controlnets[0]
        if self.adapter is not None:
            self.adapter.check_fits(cn.config, unet.config)
            return
        target = ResidualLayout.from_config(unet.config)
        if target != self.source:
            raise IncompatibleAdapterError(
                f"this ControlNet was made for a UNet with {self.source.describe()}; this UNet takes "
                f"{target.describe()} (channels@downsampling): it is a ControlNet for another backbone. Use one made "
                "for this model, or add a Ctrl-Adapter trained from its backbone to this one (weights 'adapter')")
        if cn.config.addition_embed_type == "text_time" and unet.config.get("addition_embed_type") != "text_time":
            raise IncompatibleAdapterError("this ControlNet reads SDXL's added time ids and pooled text; this UNet "
                                           "has none: it is a ControlNet for another backbone")

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        video = call.num_frames > 1 or is_video_unet(call.pipe.unet)
        return {**inputs, "_prepared": self._prepare(inputs, video, call.num_images_per_prompt)}

    def _prepare(self, inputs: dict[str, Any], video: bool, per_prompt: int) -> CallState:
        guess_mode, fusion = check_unit(inputs)
        if fusion == "auto":
            fusion = "router" if self.router is not None else ("sum" if self.adapter is None else "equal")
        text = None
        if inputs.get("controlnet_prompt_embeds") is not None:
            text = (torch.as_tensor(inputs["controlnet_prompt_embeds"]),
                    inputs.get("controlnet_negative_prompt_embeds"))
        guess_mode = guess_mode or bool(self.controlnets[0].config.global_pool_conditions)  # as diffusers does
        return CallState(parse_conditions(inputs, len(self.controlnets), video), guess_mode, fusion, per_prompt, text)

    def _state(self, inputs: dict[str, Any], call: UNetCall) -> CallState:
        state = inputs.get("_prepared")
        if state is None:  # a UNet call outside a pipeline call (a user's loop, training): prepare once per inputs
            key = tuple((k, id(v)) for k, v in inputs.items())  # a value replaced in the same dict is new inputs
            if self._bare is None or self._bare[0] != key:
                self._bare = (key, self._prepare(inputs, call.sample.ndim == 5, 1))
            state = self._bare[1]
        return state

    def residuals(self, inputs: dict[str, Any], ctx: ForwardContext,
                  call: UNetCall) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Target residuals for this forward: `[R, C_i, h_i, w_i]` per down residual and the mid one, `R = N * frames`
        rows in `(b f)` order (N = the UNet batch)."""
        state = self._state(inputs, call)
        sample = call.sample
        n, frames = sample.shape[0], ctx.num_frames
        batch = _Batch(n=n, frames=frames, cfg=ctx.cfg and n % 2 == 0, per_prompt=state.per_prompt)
        latents = sample.permute(0, 2, 1, 3, 4).flatten(0, 1) if sample.ndim == 5 else sample  # [R, C, H, W]
        rows = latents.shape[0]
        size = tuple(latents.shape[-2:])
        present = self._presence(state, ctx, batch)  # [K, R] bools on the CPU
        if not bool(present.any()):
            return self._zeros(rows, size, latents), None
        any_rows = present.any(dim=0)
        text = self._target_text(call.encoder_hidden_states, n, rows)
        down, mid = self._fused_controlnet_residuals(state, present, any_rows, latents, call, text, batch, ctx)
        sel = None if bool(any_rows.all()) else host_to_device(any_rows.nonzero()[:, 0], latents.device)
        if self.adapter is not None:
            timestep = _rows(call.timestep, frames)
            per_sample = 1
            if self.adapter.temporal:
                counts = any_rows.view(n, frames).sum(dim=1)
                counts = counts[counts > 0]
                if bool((counts != counts[0]).any()):
                    raise StudioError("with a temporal Ctrl-Adapter every controlled video must have the same number "
                                      f"of frames with a control image; got {counts.tolist()}")
                per_sample = int(counts[0])
            adapter = self.adapter if ctx.compile_part is None else ctx.compile_part(self.adapter)
            down, mid = adapter(
                [d.to(self.adapter.dtype) for d in down], None if mid is None else mid.to(self.adapter.dtype),
                timestep if sel is None else timestep[sel], text if sel is None else text[sel], size, per_sample)
        down = [d.to(latents.dtype) for d in down]
        mid = None if mid is None else mid.to(latents.dtype)
        if sel is None:
            return down, mid
        scatter = lambda t: t.new_zeros(rows, *t.shape[1:]).index_copy_(0, sel, t)  # noqa: E731
        return [scatter(d) for d in down], None if mid is None else scatter(mid)

    def zero_residuals(self, inputs: dict[str, Any], ctx: ForwardContext,
                       call: UNetCall) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Zero target residuals `[R, C_i, h_i, w_i]` from the target's layout alone (no ControlNet run)."""
        sample = call.sample
        latents = sample.permute(0, 2, 1, 3, 4).flatten(0, 1) if sample.ndim == 5 else sample
        return self._zeros(latents.shape[0], tuple(latents.shape[-2:]), latents), None

    # ---- the pieces
    def _presence(self, state: CallState, ctx: ForwardContext, batch: "_Batch") -> torch.Tensor:
        """`[K, R]` bools: condition k has a control image at row r, r's step is in its window, its scale is not 0,
        and r is not an unconditional sample in guess mode."""
        n, frames = batch.n, batch.frames
        out = torch.zeros(len(state.conditions), n, frames, dtype=torch.bool)
        progress = ctx.step_progress().detach().cpu()
        for k, cond in enumerate(state.conditions):
            if cond.images is None or cond.conditioning_scale == 0.0:
                continue
            active = (progress >= cond.start) & ((progress < cond.end) | (cond.end >= 1.0))
            if state.guess_mode and batch.cfg:
                active = active & (torch.arange(n) >= batch.b)
            has = torch.tensor([[x is not None for x in per] for per in cond.images], dtype=torch.bool)
            out[k] = active[:, None] & self._frames(has, frames, k)[batch.image_rows(len(cond.images), k)]
        return out.flatten(1)

    @staticmethod
    def _frames(x: torch.Tensor, frames: int, k: int) -> torch.Tensor:
        """`[M, F_i, ...]` broadcast to `[M, frames, ...]`."""
        if x.shape[1] == frames:
            return x
        if x.shape[1] == 1:
            return x.expand(x.shape[0], frames, *x.shape[2:])
        raise StudioError(f"control image{'' if k == 0 else f' {k + 1}'}: {x.shape[1]} frames for a video of {frames}; "
                          "give one image for every frame or one per frame")

    def _zeros(self, rows: int, size: tuple[int, int], like: torch.Tensor) -> list[torch.Tensor]:
        layout = self.adapter.target_layout if self.adapter is not None else self.source
        return [like.new_zeros(rows, c, *s) for c, s in zip(layout.channels, layout.down_sizes(size))]

    @staticmethod
    def _target_text(tokens: torch.Tensor, n: int, rows: int) -> torch.Tensor:
        """The target's prompt tokens per row `[R, S, D]` (AnimateDiff already repeats them per frame)."""
        return tokens if tokens.shape[0] == rows else _rows(tokens, rows // n)

    def _controlnet_text(self, cn: nn.Module, state: CallState, text: torch.Tensor, batch: "_Batch") -> torch.Tensor:
        """Prompt tokens the ControlNet reads, per row: the given `controlnet_prompt_embeds`, else the target's, or
        their first D channels when the target's are wider (SDXL: the CLIP ViT-L part)."""
        width = cn.config.cross_attention_dim
        if state.text is not None:
            pos, neg = state.text
            pos = pos.to(text.device, text.dtype)
            pos = pos.expand(batch.b, -1, -1) if pos.shape[0] == 1 else pos
            if pos.shape[0] != batch.b or pos.shape[-1] != width:
                raise StudioError(f"controlnet_prompt_embeds must be [1 or {batch.b}, S, {width}], got "
                                  f"{list(pos.shape)}")
            if batch.cfg:
                neg = torch.zeros_like(pos) if neg is None else torch.as_tensor(neg).to(pos).expand_as(pos)
                pos = torch.cat([neg, pos])
            return _rows(pos, batch.frames)
        if text.shape[-1] == width:
            return text
        if text.shape[-1] > width:
            return text[..., :width]
        raise StudioError(f"the ControlNet reads prompt tokens of width {width}; this model's are {text.shape[-1]} "
                          "wide: give controlnet_prompt_embeds (the prompt through the ControlNet's text encoder)")

    def _fused_controlnet_residuals(self, state: CallState, present: torch.Tensor, any_rows: torch.Tensor,
                                    latents: torch.Tensor, call: UNetCall, text: torch.Tensor,
                                    batch: "_Batch", ctx: ForwardContext) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet residuals of every present condition, fused, on the rows where any is present.

        Compiled mode runs each ControlNet compiled (`ctx.compile_part`) at conditioning scale 1 and scales its
        residuals here: diffusers multiplies by a Python float, which a compiled graph keeps as a constant (one
        graph per value)."""
        device = latents.device
        pos = torch.cumsum(any_rows.long(), 0) - 1  # row -> position among the rows with a condition
        n_any = int(any_rows.sum())
        on = present[:, any_rows]  # [K, n_any]
        w_down, w_mid = fusion_weights(on.T, len(self.source), state.fusion, self.router, dtype=latents.dtype)
        w_down, w_mid = host_to_device(w_down, device), host_to_device(w_mid, device)  # every step: no wait
        # weights are exactly 1 when summing, or where a single condition is present: skip those products
        single = on.sum(dim=0) == 1
        scale = self.adapter.config.source_scale if self.adapter is not None else 1.0
        src_size = tuple(max(1, round(s * scale)) for s in latents.shape[-2:])
        cn_latents = latents if scale == 1.0 else F.adaptive_avg_pool2d(latents, src_size)
        timestep = _rows(call.timestep, batch.frames)
        down: list[torch.Tensor | None] = [None] * len(self.source)
        mid: torch.Tensor | None = None
        for k, (cond, cn) in enumerate(zip(state.conditions, self.controlnets)):
            mask = present[k]
            if not bool(mask.any()):
                continue
            idx = None if bool(mask.all()) else host_to_device(mask.nonzero()[:, 0], device)
            pick = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))  # noqa: E731
            images = self._control_rows(cond, k, src_size, tuple(latents.shape[-2:]), cn, batch, device)
            added = None
            if cn.config.addition_embed_type == "text_time":
                added = {key: pick(_rows(v, batch.frames)) for key, v in (call.added_cond_kwargs or {}).items()}
            cn_text = self._controlnet_text(cn, state, text, batch)
            dtype = cn.dtype
            net, cs = cn, cond.conditioning_scale
            if ctx.compile_part is not None:
                net, cs = ctx.compile_part(cn), 1.0
            with torch.no_grad(), _latents_skipped(cn, cond.skip_latents):
                d, md = net(pick(cn_latents).to(dtype), pick(timestep), encoder_hidden_states=pick(cn_text).to(dtype),
                            controlnet_cond=pick(images).to(dtype), conditioning_scale=cs,
                            guess_mode=state.guess_mode, added_cond_kwargs=added, return_dict=False)
            if cs != cond.conditioning_scale:
                d, md = [r * cond.conditioning_scale for r in d], md * cond.conditioning_scale
            mine = mask[any_rows]
            where = host_to_device(pos[mask], device)
            unit = state.fusion == "sum" or bool(single[mine].all())
            everywhere = bool(mine.all())
            down = [self._add(acc, r.to(latents.dtype), None if unit else w_down[i, where, k], where, n_any,
                              everywhere) for i, (acc, r) in enumerate(zip(down, d))]
            mid = self._add(mid, md.to(latents.dtype), None if unit else w_mid[where, k], where, n_any, everywhere)
        return down, mid

    def _control_rows(self, cond: Condition, k: int, src_size: tuple[int, int], out_size: tuple[int, int],
                      cn: nn.Module, batch: "_Batch", device: torch.device) -> torch.Tensor:
        """Condition k's control image for every row `[R, 3, H_px, W_px]` on `device` (cached per call); `src_size`
        is the latent size the ControlNet runs at, `out_size` the target's."""
        factor = 2 ** (len(cn.config.conditioning_embedding_out_channels) - 1)  # the ControlNet's own downsampling
        px = (src_size[0] * factor, src_size[1] * factor)
        key = ("rows", px, batch.n, batch.frames, batch.cfg, device)
        hit = cond.cache.get(key)
        if hit is None:
            label = f"control image {k + 1}" if len(self.controlnets) > 1 else "control image"
            images = cond.tensors(px, factor, label, expected=(out_size[0] * factor, out_size[1] * factor))
            m = batch.image_rows(images.shape[0], k)
            # made at the first step the condition acts in, which may be mid-call: copied without a wait
            hit = cond.cache[key] = host_to_device(self._frames(images, batch.frames, k)[m].flatten(0, 1), device)
        return hit

    @staticmethod
    def _add(acc: torch.Tensor | None, res: torch.Tensor, weight: torch.Tensor | None, where: torch.Tensor,
             n_any: int, everywhere: bool) -> torch.Tensor:
        """`acc + weight * res`, `res` placed at `where` among the `n_any` rows (weight None = exactly 1)."""
        if weight is not None:
            res = res * weight.view(-1, *([1] * (res.ndim - 1)))
        if not everywhere:
            res = res.new_zeros(n_any, *res.shape[1:]).index_copy_(0, where, res)
        return res if acc is None else acc + res


@dataclass
class _Batch:
    """The UNet batch of one forward: `n` samples (`[uncond; cond]` halves when `cfg`), `frames` each."""

    n: int
    frames: int
    cfg: bool
    per_prompt: int

    @property
    def b(self) -> int:
        """Conditional samples of the call."""
        return self.n // 2 if self.cfg else self.n

    def image_rows(self, m: int, k: int) -> torch.Tensor:
        """`[n]`: the control image row each UNet sample reads (shared, per prompt as diffusers, or per sample)."""
        sample = torch.arange(self.n) % self.b
        if m == 1:
            return torch.zeros_like(sample)
        if m == self.b:
            return sample
        if self.per_prompt > 1 and m * self.per_prompt == self.b:
            return sample // self.per_prompt
        raise StudioError(f"control image{'' if k == 0 else f' {k + 1}'}: {m} images for a call of {self.b} samples; "
                          f"give one (shared), one per prompt ({self.b // self.per_prompt}) or one per sample "
                          f"({self.b})")
