"""`I2VAdapter`: image-to-video through first-frame attention on every spatial self-attention of a video UNet.

I2V-Adapter (Guo et al., 2024) adds to each spatial self-attention (`attn1`) of an AnimateDiff UNet a parallel
branch: the queries of every frame, through a new projection `to_q_ff` (initialised as a copy of the layer's `to_q`),
attend to the keys and values of frame 0 (computed by the layer's own frozen `to_k` / `to_v`); a new output
projection `to_out_ff` (initialised to zero) maps the result back, and it is added to the self-attention's output.
Frame 0 is the input image, held clean through sampling (`latents_before_unet` / `latents_after_step`), so every
frame reads the image's unnoised features.

The module holds only `to_q_ff` / `to_out_ff`, placed under the UNet's own module paths, so its state dict carries
the original release's key names (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q_ff.weight`, ...). As a
diffusers `ModelMixin` it saves and loads as a folder (`config.json` + `diffusion_pytorch_model.safetensors`);
`formats.py` reads the original files.

Inputs (slot inputs or `adapter_inputs` per call):

* `image`: the first frame: a PIL image, an `[H, W, 3]` array (uint8, or float in [0, 1]) or a `[3, H, W]` /
  `[1, 3, H, W]` tensor in [0, 1]. Encoded once per call with the pipeline's VAE in `begin_call`, at the call's size
  (resized, with a warning, when its size differs);
* `image_latents`: the first frame already encoded, `[C, h, w]` or one per sample `[B, C, h, w]` (scaled by the
  VAE's `scaling_factor`), instead of `image`: what a training step or a bare UNet call passes;
* `frame_similarity_prior` (default True): a `StudioPipeline` call starts from the Frame Similarity Prior
  (`initial_latents`), else from the pipeline's own noise;
* `fsp_sharp_ratio` (0.5), `fsp_blur_sigma` (18.0): the prior's two coefficients (`first_frame.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from adapter_studio.adapter import AttentionAdapter
from adapter_studio.context import CallInfo, ForwardContext, host_to_device
from adapter_studio.errors import IncompatibleAdapterError, StudioError

from .first_frame import (FSP_BLUR_SIGMA, FSP_SHARP_RATIO, check_prior, encode_first_frame, first_frame_pixels,
                          frame_similarity_prior_latents, per_sample)

_PROC = ".processor"
#: the inputs an I2V-Adapter slot takes (see the module docstring)
INPUTS = ("image", "image_latents", "frame_similarity_prior", "fsp_sharp_ratio", "fsp_blur_sigma")
#: the parameters the adapter adds to each layer, as named in the original release
PARAMS = ("to_q_ff.weight", "to_out_ff.weight", "to_out_ff.bias")


def check_video_unet(unet: nn.Module) -> None:
    """Raise `IncompatibleAdapterError` unless `unet` is a video UNet (AnimateDiff: spatial layers + motion modules)."""
    if not any(".motion_modules." in name for name in unet.attn_processors):
        raise IncompatibleAdapterError(
            f"the I2V-Adapter needs a video UNet (AnimateDiff's UNetMotionModel, with motion modules); this "
            f"{type(unet).__name__} has none. Load a video model (preset tiny-video or animatediff-sd15).")


def spatial_self_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """`{module path: Attention}` of every spatial self-attention (`attn1`) of `unet`, in `attn_processors` order.

    Motion modules are skipped: their `attn1` attends across frames, not across the pixels of one frame.
    """
    out = {}
    for name in unet.attn_processors:
        if name.endswith(".attn1" + _PROC) and ".motion_modules." not in name:
            path = name[: -len(_PROC)]
            out[path] = unet.get_submodule(path)
    return out


def param_shapes(attn: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes `to_q_ff` / `to_out_ff` must have on the diffusers `Attention` layer `attn`."""
    inner, query = attn.to_q.out_features, attn.to_q.in_features
    out = attn.to_out[0].out_features
    return {"to_q_ff.weight": (inner, query), "to_out_ff.weight": (out, inner), "to_out_ff.bias": (out,)}


def check_fits(shapes: dict[str, dict[str, tuple[int, ...]]], unet: nn.Module) -> None:
    """Raise `IncompatibleAdapterError` (expected vs found) unless every layer of `shapes` (module path ->
    parameter name -> shape) is a spatial self-attention of the video UNet `unet` with exactly those shapes."""
    check_video_unet(unet)
    layers = spatial_self_attention_layers(unet)
    unknown = [p for p in shapes if p not in layers]
    if unknown:
        raise IncompatibleAdapterError(
            f"the I2V-Adapter weights cover {len(shapes)} self-attention layers, {len(unknown)} of which this UNet "
            f"lacks (first: {unknown[0]!r}); its spatial attn1 layers are {list(layers)[:2]}... ({len(layers)} in "
            "all). They were made for a UNet of another layout.")
    wrong = []
    for path, found in shapes.items():
        for name, shape in param_shapes(layers[path]).items():
            if tuple(found[name]) != shape:
                wrong.append(f"{path}.{name}: expected {list(shape)}, found {list(found[name])}")
    if wrong:
        raise IncompatibleAdapterError(
            f"the I2V-Adapter weights do not fit this UNet ({len(wrong)} shapes differ; made for another base "
            f"model): " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))


class FirstFrameAttention(nn.Module):
    """The branch I2V-Adapter adds to one spatial self-attention layer.

    Args:
        query_dim: width C of the layer's input (`to_q.in_features`).
        inner_dim: width of its queries, heads x head dim (`to_q.out_features`).
        out_dim: width of its output (`to_out[0].out_features`).
    """

    def __init__(self, query_dim: int, inner_dim: int, out_dim: int):
        super().__init__()
        self.to_q_ff = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_out_ff = nn.Linear(inner_dim, out_dim, bias=True)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Every frame's queries attend to frame 0 of its own video.

        Args:
            attn: the layer's diffusers `Attention` (its frozen `to_k` / `to_v`, `heads` and `scale` are used).
            hidden_states: the layer's input `[(b f), L, C]`, frames of one video contiguous (diffusers' order).
            num_frames: f.

        Returns:
            `[(b f), L, out_dim]`, to be added to the layer's output.
        """
        n, length, _ = hidden_states.shape
        b, heads = n // num_frames, attn.heads
        # keys and values only for frame 0: every frame of a video shares them, so all f * L queries of a video
        # attend to one set of L keys in a single attention call
        first = hidden_states.view(b, num_frames, length, -1)[:, 0]  # [b, L, C]
        query = self.to_q_ff(hidden_states)  # [(b f), L, inner]
        inner = query.shape[-1]
        head_dim = inner // heads
        query = query.view(b, num_frames * length, heads, head_dim).transpose(1, 2)  # [b, heads, f*L, d]
        key = attn.to_k(first).view(b, length, heads, head_dim).transpose(1, 2)  # [b, heads, L, d]
        value = attn.to_v(first).view(b, length, heads, head_dim).transpose(1, 2)  # [b, heads, L, d]
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)  # [b, heads, f*L, d]
        out = self.to_out_ff(out.transpose(1, 2).reshape(n, length, inner))
        # the base processor divides its output by this factor (1 in every diffusers UNet's attn1): so does the branch
        return out / attn.rescale_output_factor


class I2VAdapter(AttentionAdapter, ModelMixin, ConfigMixin):
    """I2V-Adapter weights for one video UNet (see the module docstring for inputs).

    Args:
        layer_paths: module paths of the spatial self-attention layers it covers (e.g.
            `down_blocks.0.attentions.0.transformer_blocks.0.attn1`), in the UNet's processor order.
        query_dims: each layer's input width (`to_q.in_features`).
        inner_dims: each layer's query width (`to_q.out_features`).
        out_dims: each layer's output width (`to_out[0].out_features`).
        base_model: free-form note of the model it was made for (e.g. "tiny-video").
    """

    family: ClassVar[str] = "i2v"
    target: ClassVar[str] = "attn1"
    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_paths: Sequence[str] = (), query_dims: Sequence[int] = (),
                 inner_dims: Sequence[int] = (), out_dims: Sequence[int] = (), base_model: str | None = None):
        super().__init__()
        if not layer_paths or not len(layer_paths) == len(query_dims) == len(inner_dims) == len(out_dims):
            raise StudioError(f"I2VAdapter needs one query, inner and output width per layer: got {len(layer_paths)} "
                              f"layers, {len(query_dims)} / {len(inner_dims)} / {len(out_dims)} widths")
        self._layers: dict[str, FirstFrameAttention] = {}
        for path, q, i, o in zip(layer_paths, query_dims, inner_dims, out_dims):
            layer = FirstFrameAttention(int(q), int(i), int(o))
            _add_submodule(self, path, layer)  # under the UNet's path: the state dict keys are the original names
            self._layers[path + _PROC] = layer

    # ---- construction
    @classmethod
    def from_unet(cls, unet: nn.Module, base_model: str | None = None) -> "I2VAdapter":
        """A new adapter on every spatial `attn1` of the video UNet `unet`: `to_q_ff` a copy of each layer's `to_q`,
        `to_out_ff` zero (the paper's initialisation: the UNet's output is unchanged until it is trained)."""
        check_video_unet(unet)
        layers = spatial_self_attention_layers(unet)
        adapter = cls(layer_paths=list(layers), query_dims=[a.to_q.in_features for a in layers.values()],
                      inner_dims=[a.to_q.out_features for a in layers.values()],
                      out_dims=[a.to_out[0].out_features for a in layers.values()], base_model=base_model)
        with torch.no_grad():
            for path, attn in layers.items():
                layer = adapter._layers[path + _PROC]
                layer.to_q_ff.weight.copy_(attn.to_q.weight)
                nn.init.zeros_(layer.to_out_ff.weight)
                nn.init.zeros_(layer.to_out_ff.bias)
        return adapter.to(device=unet.device, dtype=unet.dtype)

    def to(self, *args: Any, **kwargs: Any) -> "I2VAdapter":
        # plain nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast (it has none)
        return nn.Module.to(self, *args, **kwargs)

    # ---- AttentionAdapter
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def check_compatible(self, unet: nn.Module) -> None:
        shapes = {name[: -len(_PROC)]: {p: tuple(t.shape) for p, t in layer.state_dict().items()}
                  for name, layer in self._layers.items()}
        check_fits(shapes, unet)

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        """Check the inputs and encode the first frame once for this call, at the call's size.

        A plain diffusers call of a wrapped pipeline does not say its size (`call.height` is None): the image is
        then encoded at the call's first UNet forward, where the latent size shows.
        """
        unknown = set(inputs) - set(INPUTS)
        if unknown:
            raise StudioError(f"I2V-Adapter inputs: unknown keys {sorted(unknown)}; allowed: {', '.join(INPUTS)}")
        check_prior(inputs.get("fsp_sharp_ratio", FSP_SHARP_RATIO), inputs.get("fsp_blur_sigma", FSP_BLUR_SIGMA))
        vae = getattr(call.pipe, "vae", None)
        state: dict[str, Any] = {"vae": vae, "active": None, "latents": None, "pixels": None,
                                 "scale_factor": getattr(call.pipe, "vae_scale_factor", 8)}
        if inputs.get("image_latents") is not None:
            state["latents"] = _as_latents(inputs["image_latents"]).to(device=call.device, dtype=call.dtype)
        elif inputs.get("image") is not None:
            if vae is None:
                raise StudioError("the I2V-Adapter encodes its first frame with the pipeline's VAE; this pipeline has "
                                  "none: pass image_latents instead")
            pixels = first_frame_pixels(inputs["image"])
            if call.height and call.width:
                state["latents"] = encode_first_frame(vae, pixels, call.height, call.width).to(call.device, call.dtype)
            else:
                state["pixels"] = pixels
        else:
            raise StudioError("the I2V-Adapter needs its first frame: give image=... (or image_latents=...)")
        return {**inputs, "_call": state}

    def initial_latents(self, inputs: dict[str, Any], call: CallInfo, scheduler: Any) -> torch.Tensor | None:
        """The Frame Similarity Prior `[B, C, F, h, w]` at the first timestep (frame 0 the clean first frame), drawn
        from the call's generator; None with `frame_similarity_prior=False` (the pipeline's own noise)."""
        if not inputs.get("frame_similarity_prior", True):
            return None
        first = per_sample(inputs["_call"]["latents"], call.batch_size, cfg=False)  # [B, C, h, w]
        latents = frame_similarity_prior_latents(first, call.num_frames, scheduler, call.generator,
                                                 inputs.get("fsp_sharp_ratio", FSP_SHARP_RATIO),
                                                 inputs.get("fsp_blur_sigma", FSP_BLUR_SIGMA))
        return latents.to(call.dtype)

    def latents_before_unet(self, sample: torch.Tensor, inputs: dict[str, Any], ctx: ForwardContext,
                            active: torch.Tensor) -> torch.Tensor:
        """The UNet's input `[N, C, F, h, w]` with frame 0 of every active sample set to the clean first frame."""
        if sample.ndim != 5:
            raise StudioError(f"the I2V-Adapter pins frame 0 of video latents [N, C, F, h, w]; got "
                              f"{list(sample.shape)}")
        first = per_sample(self._first_frame(inputs, sample), sample.shape[0], ctx.cfg)  # [N, C, h, w]
        state = inputs.get("_call")
        if state is not None:  # the conditional samples that `latents_after_step` pins after this step
            state["active"] = active
        return _pin(sample, first, active)

    def latents_after_step(self, latents: torch.Tensor, inputs: dict[str, Any], step: int, timestep: torch.Tensor,
                           scheduler: Any) -> torch.Tensor | None:
        """The latents `[B, C, F, h, w]` after a scheduler step with frame 0 back at the clean first frame (held
        clean, as the reference inference does), for the samples the adapter acted on in the step's UNet forward."""
        state = inputs.get("_call")
        if state is None or state["active"] is None:
            return None
        b = latents.shape[0]
        first = per_sample(state["latents"], b, cfg=False)
        return _pin(latents, first, state["active"][-b:])  # under CFG the conditional half comes last

    def contribution(self, layer: str, attn: nn.Module, hidden_states: torch.Tensor,
                     encoder_hidden_states: torch.Tensor | None, state: Any, ctx: ForwardContext) -> torch.Tensor:
        """`[(N f), L, C]` added to the output of the self-attention `layer`."""
        return self._layers[layer](attn, hidden_states, ctx.num_frames)

    # ---- helpers
    def _first_frame(self, inputs: dict[str, Any], sample: torch.Tensor) -> torch.Tensor:
        """The first frame's latent `[1 or B, C, h, w]` at `sample`'s size, encoded at the call's first forward."""
        size = tuple(sample.shape[-2:])
        state = inputs.get("_call")
        if state is not None:
            if state["latents"] is None:
                h, w = (s * state["scale_factor"] for s in size)
                state["latents"] = encode_first_frame(state["vae"], state["pixels"], h, w)
            latents = state["latents"]
        elif inputs.get("image_latents") is not None:  # outside a pipeline call: a training step, a bare UNet call
            latents = _as_latents(inputs["image_latents"])
        else:
            raise StudioError("outside a pipeline call the I2V-Adapter takes its first frame as image_latents "
                              "[B, C, h, w] (there is no VAE to encode an image)")
        if tuple(latents.shape[-2:]) != size or latents.shape[1] != sample.shape[1]:
            raise StudioError(f"the first frame's latent is {list(latents.shape[1:])}; the video's latents are "
                              f"{[sample.shape[1], *size]} per frame")
        return latents.to(device=sample.device, dtype=sample.dtype)


def _as_latents(x: Any) -> torch.Tensor:
    """`image_latents` as `[1 or B, C, h, w]`."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
        raise StudioError(f"I2V-Adapter image_latents must be a [C, h, w] or [B, C, h, w] tensor, got "
                          f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x[None] if x.ndim == 3 else x


def _pin(latents: torch.Tensor, first: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """`latents` `[N, C, F, h, w]` with frame 0 set to `first` `[N, C, h, w]` where `active` (`[N]` bools)."""
    out = latents.clone()
    rows = host_to_device(active, latents.device).view(-1, 1, 1, 1)  # twice a step: no wait for the device
    out[:, :, 0] = torch.where(rows, first.to(latents.dtype), latents[:, :, 0])
    return out


def _add_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted `path` under `root`, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    for name in parents:
        child = root._modules.get(name)
        if child is None:
            child = nn.Module()
            root.add_module(name, child)
        root = child
    root.add_module(leaf, module)
