"""How a studio adapter runs inside ComfyUI: its model as the studio's loaders see it, and its attention patch.

The studio's attention adapters (IP-Adapter, AGD, I2V-Adapter) compute a term added to an attention layer's output
from that layer's input (`AttentionAdapter.contribution`). ComfyUI hands a patch exactly that pair: an `attn2_patch`
(`attn1_patch`) sees the layer's normalised input and context before the attention, an `attn2_output_patch`
(`attn1_output_patch`) its output after `to_out`; `extra_options` says which block (`("input", 4)`, `("middle", 0)`,
`("output", 7)`) and which transformer block in it (`block_index`). `AttentionPatch` stores the input in the first and
adds `weight x contribution` in the second, on a **clone** of the MODEL, for the layers `block_keys` maps. The family's
own code computes the term (no re-implementation); ComfyUI's attention runs as it always does.

`standin_unet(model)`: the studio's loaders check adapter files against a diffusers UNet; this builds one with the
ComfyUI model's layout on the meta device (no memory), so every family loader and its checks run unchanged.
`load_adapter(weights, model)` runs a loader node's `Weights` through that family loader, once per file and layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import block_keys

#: safetensors key of the studio's tiny checkpoints: the preset's config as JSON bytes (see tiny_models.py)
TINY_KEY = "adapter_studio.tiny_config"


def model_unet_config(model: Any) -> dict[str, Any]:
    """ComfyUI's `unet_config` of a MODEL (a ModelPatcher, or its BaseModel), with the studio's tiny settings."""
    base = model if hasattr(model, "model_config") else model.model
    cfg = dict(base.model_config.unet_config)
    cfg["_norm_num_groups"] = getattr(base, "adapter_studio_norm_groups", 32)
    return cfg


def diffusers_config_of(model: Any) -> dict[str, Any]:
    cfg = model_unet_config(model)
    return block_keys.diffusers_config(cfg, norm_num_groups=cfg["_norm_num_groups"])


_STANDINS: dict[str, Any] = {}


def _reporting_cpu_float32(base: type) -> type:
    """`base` (a diffusers UNet class) reporting the CPU and float32 whatever its meta-device weights say: what the
    family loaders move adapters to."""

    class StandIn(base):
        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        @property
        def dtype(self) -> torch.dtype:
            return torch.float32

    StandIn.__name__ = f"StandIn{base.__name__}"
    return StandIn


def standin_unet(model: Any) -> Any:
    """A diffusers `UNet2DConditionModel` with the layout of ComfyUI's `model`, on the meta device, reporting the CPU
    and float32; cached per layout."""
    cfg = diffusers_config_of(model)
    key = json.dumps(cfg, sort_keys=True)
    unet = _STANDINS.get(key)
    if unet is None:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = _STANDINS[key] = _reporting_cpu_float32(UNet2DConditionModel)(**cfg)
    return unet


def standin_video_unet(model: Any) -> Any:
    """The AnimateDiff UNet (`UNetMotionModel`) the ComfyUI image model becomes with motion modules, on the meta
    device: what video families check their weights against (motion comes from elsewhere in ComfyUI, or not at all)."""
    cfg = diffusers_config_of(model)
    key = "video:" + json.dumps(cfg, sort_keys=True)
    unet = _STANDINS.get(key)
    if unet is None:
        from diffusers import UNetMotionModel

        with torch.device("meta"):
            unet = _STANDINS[key] = _reporting_cpu_float32(UNetMotionModel).from_unet2d(standin_unet(model),
                                                                                         load_weights=False)
    return unet


class StandInPipe:
    """The `pipe` a family loader is given: the stand-in UNet (a video one for video families), no image encoder
    (ComfyUI's CLIP_VISION encodes)."""

    def __init__(self, model: Any, video: bool = False):
        self.unet = standin_video_unet(model) if video else standin_unet(model)
        self.image_encoder = None
        self.vae = None


@dataclass
class Weights:
    """What a loader node outputs: the family and its files (resolved paths), checked to be the family's."""

    family: Any
    paths: dict[str, str | None]
    description: str = ""

    def key(self) -> tuple:
        return (self.family.name, tuple(sorted((k, v or "") for k, v in self.paths.items())))


_ADAPTERS: dict[tuple, Any] = {}


def load_adapter(weights: Weights, model: Any) -> Any:
    """The family's adapter for `model`'s layout, through the family's own loader (cached per file and layout)."""
    cfg = diffusers_config_of(model)
    key = weights.key() + (json.dumps(cfg, sort_keys=True),)
    adapter = _ADAPTERS.get(key)
    if adapter is None:
        pipe = StandInPipe(model, video=weights.family.output == "video")
        adapter = weights.family.load(weights.paths, pipe)
        adapter.eval().requires_grad_(False)
        _ADAPTERS[key] = adapter
    return adapter


def pil_images(image: torch.Tensor) -> list[Any]:
    """ComfyUI's IMAGE `[B, H, W, C]` in 0..1 -> RGB PIL images (what the studio's preprocessors take)."""
    from PIL import Image

    arr = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class AttentionView:
    """ComfyUI's `CrossAttention` with the attributes a studio adapter reads of a diffusers `Attention`."""

    def __init__(self, attn: torch.nn.Module):
        self.module = attn
        self.heads = attn.heads
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        self.scale = attn.dim_head ** -0.5
        self.group_norm = None
        self.rescale_output_factor = 1.0
        self.is_cross_attention = True


def on(module: torch.nn.Module, like: torch.Tensor) -> torch.nn.Module:
    """`module` moved to `like`'s device and dtype when it is elsewhere (ComfyUI moves its models between devices)."""
    p = next(module.parameters(), None)
    if p is not None and (p.device != like.device or p.dtype != like.dtype):
        module.to(device=like.device, dtype=like.dtype)
    return module


def comfy_attention(diffusion_model: torch.nn.Module, key: tuple, target: str) -> torch.nn.Module:
    """The `attn1` / `attn2` module of ComfyUI's UNet at `(block, number, transformer_index)`."""
    block, number, index = key
    seq = {"input": lambda: diffusion_model.input_blocks[number], "middle": lambda: diffusion_model.middle_block,
           "output": lambda: diffusion_model.output_blocks[number]}[block]()
    for module in seq:
        if hasattr(module, "transformer_blocks"):
            return getattr(module.transformer_blocks[index], target)
    raise KeyError(f"ComfyUI block {key} has no transformer")


def step_progress(extra_options: dict[str, Any], sigma: torch.Tensor, model_sampling: Any) -> float:
    """The studio's progress (step index / steps) of this call's sigma, from the sampler's schedule when ComfyUI
    gives it (`sample_sigmas`), else ComfyUI's own percent of the noise schedule."""
    sched = extra_options.get("sample_sigmas")
    s = float(sigma.flatten()[0])
    if sched is not None and len(sched) > 1:
        sched = sched.flatten().float().cpu()
        i = int((sched - s).abs().argmin())
        if abs(float(sched[i]) - s) <= 1e-4 * max(1.0, s):
            return i / (len(sched) - 1)
    t = float(model_sampling.timestep(sigma.flatten()[:1].float().cpu())[0])
    return max(0.0, min(1.0, 1.0 - t / 999.0))


def in_window(progress: float, start: float, end: float) -> bool:
    return start <= progress and (progress < end or end >= 1.0)


class AttentionPatch:
    """One studio attention adapter on a cloned ComfyUI MODEL.

    Args:
        model: the ModelPatcher clone it is installed on (`install`).
        adapter: the studio `AttentionAdapter` (already loaded and checked against the model's layout).
        inputs_for: `(cond_or_uncond) -> slot inputs` for a chunk of the batch (0 = conditional, 1 = unconditional),
            or None to leave that chunk unchanged (AGD adds nothing to an unconditional pass).
        weight, start, end: the gate (a number, or `scale_for(layer)` per layer) and the window (fractions of steps).
        num_frames: frames per video in the batch (I2V: the latent batch is one clip), else 1.
    """

    def __init__(self, model: Any, adapter: Any, inputs_for: Callable[[int], dict[str, Any] | None], weight: float,
                 start: float = 0.0, end: float = 1.0, scale_for: Callable[[str], float] | None = None,
                 num_frames: int = 1):
        self.adapter = adapter
        self.inputs_for = inputs_for
        self.weight, self.start, self.end = float(weight), float(start), float(end)
        self.scale_for = scale_for
        self.num_frames = num_frames
        self.target = adapter.target
        cfg = diffusers_config_of(model)
        self.layers = {}  # ComfyUI key -> the studio's processor name
        for path, key in block_keys.attention_layers(cfg, self.target).items():
            if path + ".processor" in set(adapter.layer_names()):
                self.layers[key] = path + ".processor"
        self.diffusion_model = model.model.diffusion_model
        self.model_sampling = model.model.model_sampling
        self.model_channels = model_unet_config(model)["model_channels"]
        self._views: dict[tuple, AttentionView] = {}
        self._pending: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._forward_key: Any = None
        self._forward: dict[str, Any] = {}

    def install(self, model: Any) -> Any:
        if self.target == "attn2":
            model.set_model_attn2_patch(self.capture)
            model.set_model_attn2_output_patch(self.add)
        else:
            model.set_model_attn1_patch(self.capture)
            model.set_model_attn1_output_patch(self.add)
        return model

    # -- ComfyUI's patch callbacks
    def capture(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict[str, Any]):
        key = self._key(extra_options)
        if key in self.layers:
            self._pending[key] = (n, context if self.target == "attn2" else None)
        return n, context, value

    def add(self, out: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
        key = self._key(extra_options)
        got = self._pending.pop(key, None)
        if got is None:
            return out
        layer = self.layers[key]
        gate = self.weight * (self.scale_for(layer) if self.scale_for else 1.0)
        if gate == 0.0:
            return out
        fwd = self._state(extra_options, out)
        if fwd is None:
            return out
        hidden, context = got
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = AttentionView(comfy_attention(self.diffusion_model, key, self.target))
        chunks = fwd["chunks"]
        size = out.shape[0] // len(chunks)
        parts = []
        for i, (state, ctx) in enumerate(chunks):
            sl = slice(i * size, (i + 1) * size)
            if state is None:
                parts.append(out[sl])
                continue
            contrib = self.adapter.contribution(layer, view, hidden[sl], None if context is None else context[sl],
                                                state, ctx)
            parts.append(out[sl] + gate * contrib.to(out.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # -- helpers
    @staticmethod
    def _key(extra_options: dict[str, Any]) -> tuple:
        block = extra_options.get("block")
        return (block[0], block[1], extra_options.get("block_index", 0)) if block else ()

    def _state(self, extra_options: dict[str, Any], out: torch.Tensor) -> dict[str, Any] | None:
        """Per UNet forward (same sigmas, same batch): each chunk's adapter state and context, or None outside the
        window."""
        from adapter_studio.context import ForwardContext

        sigmas = extra_options["sigmas"]
        cond_or_uncond = tuple(extra_options.get("cond_or_uncond") or (0,))
        shape = tuple(extra_options.get("original_shape") or out.shape)
        fkey = (tuple(float(s) for s in sigmas.flatten().tolist()), cond_or_uncond, shape)
        if fkey == self._forward_key:
            return self._forward.get("value")
        self._forward_key = fkey
        on(self.adapter, out)
        progress = step_progress(extra_options, sigmas, self.model_sampling)
        if not in_window(progress, self.start, self.end):
            self._forward = {"value": None}
            return None
        n = shape[0]
        per = n // len(cond_or_uncond)
        sig = sigmas.flatten()
        timestep = self.model_sampling.timestep(sig.float().cpu()).float()
        chunks = []
        with torch.no_grad():
            for i, kind in enumerate(cond_or_uncond):
                inputs = self.inputs_for(kind)
                t = timestep[i * per:(i + 1) * per] if timestep.numel() == n else timestep.expand(per)
                ctx = ForwardContext(batch_size=per // self.num_frames if self.num_frames > 1 else per, cfg=False,
                                     timestep=t.to(out.device),
                                     progress=torch.full((per,), progress, dtype=torch.float64),
                                     latent_size=tuple(shape[-2:]), num_frames=self.num_frames, unet=None)
                if inputs is None:
                    chunks.append((None, ctx))
                    continue
                ctx.cache["time_embedding"] = self._time_embedding(t.to(out.device), out.dtype)
                chunks.append((self.adapter.prepare(inputs, ctx), ctx))
        self._forward = {"value": {"chunks": chunks}}
        return self._forward["value"]

    def _time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The UNet's own timestep embedding (`time_embed(timestep_embedding(t))`), as `ctx.time_embedding()`."""
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        emb = timestep_embedding(t, self.model_channels, repeat_only=False).to(dtype)
        return self.diffusion_model.time_embed(emb)


def chain_unet_wrapper(model: Any, edit: Callable[[torch.Tensor, torch.Tensor, dict, list], tuple]) -> None:
    """Install a unet function wrapper on `model` (a clone) that lets `edit(x, sigma, c, cond_or_uncond)` change the
    model call's input and conditioning, then calls through any wrapper already there."""
    previous = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        def run(x, t, **c):
            x, c = edit(x, t, c, list(args.get("cond_or_uncond") or [0]))
            return apply_model(x, t, **c)

        if previous is not None:
            return previous(run, args)
        return run(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
