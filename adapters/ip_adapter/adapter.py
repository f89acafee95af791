"""`IPAdapter`: image prompts through decoupled cross-attention, as a studio attention adapter.

The module holds only IP-Adapter's own weights: the image projection (`image_proj`) and, per cross-attention
layer, `to_k_ip` / `to_v_ip` (`ip_adapter.{n}`, n the layer's key in the original checkpoints). Its state dict is
therefore the original single-file format flattened (`image_proj.*`, `ip_adapter.{n}.to_k_ip.weight`), and as a
diffusers `ModelMixin` it saves and loads as a folder (`config.json` + `diffusion_pytorch_model.safetensors`).

Inputs (slot inputs or `adapter_inputs` per call):

* `image`: one reference image or a list, shared by every sample of the call;
* `sample_images`: one entry per sample (or per prompt): sample i is conditioned on its own image(s) only;
* `image_embeds` / `negative_image_embeds`: precomputed encoder outputs (see `inputs.py` for shapes) instead of images;
* `combine`: "concat" (each image's tokens side by side, diffusers' behaviour) or "average" (mean of the encoder
  outputs, then one projection);
* `mask`: `[H, W]` or per sample `[B, H, W]` — the adapter acts only inside it (area-downsampled per layer).

Under classifier-free guidance the unconditional half gets negative tokens: the projection of zero embeddings
(`base`) or of the encoder's output on a zero image (`plus`, `full`), as diffusers computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from adapter_studio.adapter import AttentionAdapter
from adapter_studio.context import CallInfo, ForwardContext
from adapter_studio.errors import IncompatibleAdapterError, StudioError

from . import attention as ipa
from .inputs import (downsample_mask, encode_pixels, expand_batch, image_list, normalize_embeds, pixel_values,
                     to_mask)
from .projection import build_projection, uses_hidden_states

INPUT_KEYS = ("image", "sample_images", "image_embeds", "negative_image_embeds", "combine", "mask")


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """`{processor name: Attention}` of the UNet's cross-attention layers, in `unet.attn_processors` order — the
    order the original checkpoints number them in (n = 1, 3, 5, ...). Motion modules are not cross-attention."""
    out = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor") and "motion_modules" not in name:
            out[name] = unet.get_submodule(name[: -len(".processor")])
    return out


class IPAttnWeights(nn.Module):
    """The two projections IP-Adapter adds to one cross-attention layer: image tokens `[.., C_cross]` -> `[.., inner]`."""

    def __init__(self, cross_attention_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


@dataclass
class IPForwardState:
    """What `prepare` hands to every layer of one UNet forward.

    Attributes:
        tokens: `[G, T, C_cross]` image tokens; G = 1 (one set for the whole batch), 2 (CFG: negative, positive) or
            the UNet batch N (per-sample references). Group g applies to the g-th contiguous slice of the batch.
        mask: `[M, H, W]` region mask (M = 1 or N) or None.
        cache: per-call cache of folded keys/values and downsampled masks (None outside a pipeline call, e.g. while
            training, where the weights change between forwards).
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    cache: dict[Any, Any] | None = None
    local: dict[Any, Any] = field(default_factory=dict)
    #: compiled mode: `{layer: (k_fold, k_bias, v_fold) or (k, v)}` computed in the stack's pre-hook, outside the graph
    layers: dict[str, tuple] | None = None

    def memo(self, key: Any, make: Any) -> Any:
        store = self.cache if self.cache is not None else self.local
        val = store.get(key)
        if val is None:
            val = make()
            # A value with autograd history (keys/values from the trained to_k_ip/to_v_ip) is never reused: under
            # gradient checkpointing a block's recomputation must record the same ops as its first run, and a memo
            # hit would skip them (torch: "A different number of tensors was saved"). Each layer's key is asked
            # once per forward, so this costs nothing outside the recomputation.
            tensors = val if isinstance(val, tuple) else (val,)
            if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
                store[key] = val
        return val


class IPAdapter(AttentionAdapter, ModelMixin, ConfigMixin):
    """IP-Adapter weights for one UNet (see the module docstring for inputs).

    Args:
        projection: "base", "plus" or "full" (see `projection.py`).
        image_embed_dim: width D of what the projection reads (encoder `projection_dim` for base, `hidden_size` else).
        cross_attention_dim: the UNet's `cross_attention_dim`.
        num_tokens: tokens per image (base: N, plus: number of queries; ignored for full, one token per patch).
        layer_names: processor names of the UNet's cross-attention layers, in order.
        hidden_sizes: output width of `to_k_ip` / `to_v_ip` per layer (= the layer's `to_k` width).
        layer_keys: the layers' numbers in the original format (default 1, 3, 5, ...).
        resampler_*: Perceiver Resampler settings of the plus variant.
    """

    family: ClassVar[str] = "ip"
    target: ClassVar[str] = "attn2"
    config_name = "config.json"

    @register_to_config
    def __init__(self, projection: str = "base", image_embed_dim: int = 1024, cross_attention_dim: int = 768,
                 num_tokens: int = 4, layer_names: list[str] | tuple[str, ...] = (),
                 hidden_sizes: list[int] | tuple[int, ...] = (), layer_keys: list[int] | tuple[int, ...] | None = None,
                 resampler_dim: int | None = None, resampler_depth: int = 4, resampler_heads: int | None = None,
                 resampler_dim_head: int = 64, resampler_ff_mult: float = 4.0):
        super().__init__()
        if len(layer_names) != len(hidden_sizes):
            raise StudioError(f"IPAdapter: {len(layer_names)} layer names but {len(hidden_sizes)} hidden sizes")
        keys = list(layer_keys) if layer_keys is not None else [2 * i + 1 for i in range(len(layer_names))]
        if len(keys) != len(layer_names):
            raise StudioError(f"IPAdapter: {len(layer_names)} layer names but {len(keys)} layer keys")
        self.image_proj = build_projection(projection, image_embed_dim, cross_attention_dim, num_tokens,
                                           resampler_dim, resampler_depth, resampler_heads, resampler_dim_head,
                                           resampler_ff_mult)
        self.ip_adapter = nn.ModuleDict(
            {str(k): IPAttnWeights(cross_attention_dim, h) for k, h in zip(keys, hidden_sizes)})
        self._key_of = {name: str(k) for name, k in zip(layer_names, keys)}

    # ---- construction
    @classmethod
    def from_unet(cls, unet: nn.Module, image_embed_dim: int, projection: str = "base", num_tokens: int | None = None,
                 init_from_unet: bool = True, **resampler: Any) -> "IPAdapter":
        """A new IP-Adapter shaped for `unet`; `to_k_ip`/`to_v_ip` start as copies of each layer's `to_k`/`to_v`
        (the paper's initialisation) unless `init_from_unet=False`."""
        layers = cross_attention_layers(unet)
        if num_tokens is None:
            num_tokens = {"base": 4, "plus": 16}.get(projection, 0)
        adapter = cls(projection=projection, image_embed_dim=image_embed_dim,
                      cross_attention_dim=_unet_cross_dim(unet), num_tokens=num_tokens, layer_names=list(layers),
                      hidden_sizes=[a.to_k.out_features for a in layers.values()], **resampler)
        if init_from_unet:
            with torch.no_grad():
                for name, attn in layers.items():
                    w = adapter.ip_adapter[adapter._key_of[name]]
                    w.to_k_ip.weight.copy_(attn.to_k.weight)
                    w.to_v_ip.weight.copy_(attn.to_v.weight)
        return adapter

    def to(self, *args: Any, **kwargs: Any) -> "IPAdapter":
        # plain nn.Module.to: ModelMixin.to warns about fp32-kept modules on every dtype cast, and this model has none
        return nn.Module.to(self, *args, **kwargs)

    # ---- AttentionAdapter
    def layer_names(self) -> list[str]:
        return list(self._key_of)

    @property
    def projection_kind(self) -> str:
        return self.config.projection

    def check_compatible(self, unet: nn.Module) -> None:
        check_unet(self.config, unet)

    def check_image_encoder(self, image_encoder: Any) -> None:
        check_image_encoder(self.config, image_encoder)

    def project(self, embeds: torch.Tensor, combine: str = "concat") -> torch.Tensor:
        """Encoder outputs `[G, I, D]` / `[G, I, S, D]` -> tokens `[G, T, C]` (T = I * tokens per image for concat)."""
        if combine == "average":
            embeds = embeds.mean(dim=1, keepdim=True)
        elif combine != "concat":
            raise StudioError(f"IP-Adapter combine must be 'concat' or 'average', got {combine!r}")
        g, i = embeds.shape[:2]
        expected = self.config.image_embed_dim
        if embeds.shape[-1] != expected:
            raise IncompatibleAdapterError(
                f"IP-Adapter ({self.config.projection}) expects image embeddings of size {expected}, got "
                f"{embeds.shape[-1]} (shape {list(embeds.shape)}): the embeddings come from another image encoder")
        tokens = self.image_proj(embeds.flatten(0, 1).to(device=self.device, dtype=self.dtype))
        return tokens.reshape(g, i * tokens.shape[1], tokens.shape[2])

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        """Encode and project the reference images once per pipeline call."""
        pos, neg, combine = self._embeddings(inputs, call.batch_size, call.num_images_per_prompt, call.cfg,
                                             pipe=call.pipe, device=call.device)
        b, nipp = call.batch_size, call.num_images_per_prompt
        with torch.no_grad():
            pos_t = expand_batch(self.project(pos, combine), b, nipp, "image_embeds")
            neg_t = expand_batch(self.project(neg, combine), b, nipp, "negative_image_embeds") if neg is not None else None
        mask = self._mask(inputs, b, nipp)
        return {"_tokens": (pos_t, neg_t), "_mask": mask, "_cache": {}}

    def prepare(self, inputs: dict[str, Any], ctx: ForwardContext) -> IPForwardState:
        n = ctx.batch_size
        b = n // 2 if ctx.cfg else n
        if "_tokens" in inputs:
            (pos, neg), mask, cache = inputs["_tokens"], inputs["_mask"], inputs["_cache"]
        else:  # used outside a pipeline call (training, direct UNet calls): embeddings only, nothing cached
            pos_e, neg_e, combine = self._embeddings(inputs, b, 1, ctx.cfg)
            pos = expand_batch(self.project(pos_e, combine), b, 1, "image_embeds")
            neg = expand_batch(self.project(neg_e, combine), b, 1, "negative_image_embeds") if neg_e is not None else None
            mask, cache = self._mask(inputs, b, 1), None
        if ctx.cfg:
            if neg is None:
                raise StudioError("IP-Adapter under classifier-free guidance needs negative image embeddings")
            if pos.shape[0] == 1 and neg.shape[0] == 1:
                tokens = torch.cat([neg, pos])
            else:
                tokens = torch.cat([neg.expand(b, -1, -1), pos.expand(b, -1, -1)])
        else:
            tokens = pos
        if tokens.shape[0] not in (1, 2 if ctx.cfg else 1, n):
            raise StudioError(f"IP-Adapter has image tokens for {tokens.shape[0]} samples, the UNet batch is {n}")
        if mask is not None and ctx.cfg and mask.shape[0] == b and b > 1:
            mask = torch.cat([mask, mask])
        elif mask is not None and mask.shape[0] not in (1, n):
            raise StudioError(f"IP-Adapter mask has {mask.shape[0]} entries for a batch of {b} samples")
        state = IPForwardState(tokens=tokens, mask=mask, cache=cache)
        if ctx.cache.get("static"):
            state.layers = self.layer_keys_values(state, ctx.unet, ctx.unet_dtype())
        return state

    def layer_keys_values(self, state: IPForwardState, unet: nn.Module, dtype: torch.dtype) -> dict[str, tuple]:
        """Compiled mode: every layer's image keys/values (folded where cheaper) for this forward, at once.

        The `to_k_ip` / `to_v_ip` of all layers sharing a width run as one batched product per forward (and not at
        all while the per-call cache holds them), so the compiled layers only read tensors."""
        tokens = state.tokens
        g, t = tokens.shape[:2]
        device = tokens.device
        names = self.layer_names()
        out: dict[str, tuple] = {}
        todo = [name for name in names if (state.cache or {}).get(("static", name, g, dtype, device)) is None]
        groups: dict[tuple, list[str]] = {}
        for name in todo:
            w = self.ip_adapter[self._key_of[name]]
            groups.setdefault((tuple(w.to_k_ip.weight.shape), w.to_k_ip.weight.dtype), []).append(name)
        for (_, wdtype), group in groups.items():
            wk = torch.stack([self.ip_adapter[self._key_of[n]].to_k_ip.weight for n in group])  # [Lg, inner, C]
            wv = torch.stack([self.ip_adapter[self._key_of[n]].to_v_ip.weight for n in group])
            x = tokens.to(wdtype)
            ks = torch.einsum("gtc,lic->lgti", x, wk).to(dtype)
            vs = torch.einsum("gtc,lic->lgti", x, wv).to(dtype)
            for j, name in enumerate(group):
                attn = unet.get_submodule(name[: -len(".processor")])
                k, v = ks[j], vs[j]
                val = ipa.fold(attn, k, v) if ipa.use_folded(attn, t) else (k, v)
                if state.cache is not None and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in val):
                    state.cache[("static", name, g, dtype, device)] = val
                out[name] = val
        for name in names:
            if name not in out:
                out[name] = state.cache[("static", name, g, dtype, device)]
        return out

    def contribution(self, layer: str, attn: nn.Module, hidden_states: torch.Tensor,
                     encoder_hidden_states: torch.Tensor | None, state: IPForwardState,
                     ctx: ForwardContext) -> torch.Tensor:
        x = hidden_states
        spatial = x.ndim == 4
        if spatial:  # [n, C, h, w] -> [n, h*w, C]
            n_, c_, h_, w_ = x.shape
            x = x.view(n_, c_, h_ * w_).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        n, length, c_in = x.shape
        tokens = state.tokens
        g = tokens.shape[0]
        if n % g:
            raise StudioError(f"IP-Adapter: {g} token groups do not divide the attention batch {n}")
        weights = self.ip_adapter[self._key_of[layer]]
        xg = x.reshape(g, (n // g) * length, c_in)
        key = (layer, g, x.dtype, x.device)
        if state.layers is not None:  # compiled mode: keys/values from the pre-hook, no memo in the graph
            kv = state.layers[layer]
            out = ipa.folded_attention(xg, *kv, attn.heads) if len(kv) == 3 else ipa.standard_attention(attn, xg, *kv)
            return self._finish(out, state, attn, ctx, n, length, x, spatial, (n_, h_, w_) if spatial else None,
                                memo=False)

        def keys_values() -> tuple[torch.Tensor, torch.Tensor]:
            # in the adapter's dtype (it may train in fp32 on a half-precision UNet), then the layer's
            k, v = ipa.image_keys_values(tokens.to(weights.to_k_ip.weight.dtype), weights.to_k_ip, weights.to_v_ip)
            return k.to(x.dtype), v.to(x.dtype)

        if ipa.use_folded(attn, tokens.shape[1]):
            k_fold, k_bias, v_fold = state.memo(("fold",) + key, lambda: ipa.fold(attn, *keys_values()))
            out = ipa.folded_attention(xg, k_fold, k_bias, v_fold, attn.heads)
        else:
            k, v = state.memo(("kv",) + key, keys_values)
            out = ipa.standard_attention(attn, xg, k, v)
        return self._finish(out, state, attn, ctx, n, length, x, spatial, (n_, h_, w_) if spatial else None)

    @staticmethod
    def _finish(out: torch.Tensor, state: IPForwardState, attn: nn.Module, ctx: ForwardContext, n: int, length: int,
                x: torch.Tensor, spatial: bool, shape: tuple[int, int, int] | None, memo: bool = True) -> torch.Tensor:
        out = out.reshape(n, length, -1)
        if state.mask is not None:
            def layer_mask() -> torch.Tensor:  # [1 or n, length, 1]
                m = downsample_mask(state.mask.to(device=x.device, dtype=x.dtype), ctx.spatial_size(length))
                return ctx.expand(m, n) if m.shape[0] > 1 else m

            out = out * (state.memo(("mask", length, n), layer_mask) if memo else layer_mask())
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        if spatial:
            n_, h_, w_ = shape
            out = out.transpose(1, 2).reshape(n_, -1, h_, w_)
        return out

    # ---- inputs
    def _embeddings(self, inputs: dict[str, Any], batch: int, nipp: int, cfg: bool, pipe: Any = None,
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """Positive and negative encoder outputs `[G, I, ...]` from images or precomputed embeddings."""
        unknown = set(inputs) - set(INPUT_KEYS)
        if unknown:
            raise StudioError(f"unknown IP-Adapter inputs {sorted(unknown)}; known: {', '.join(INPUT_KEYS)}")
        combine = inputs.get("combine", "concat")
        if combine not in ("concat", "average"):
            raise StudioError(f"IP-Adapter combine must be 'concat' or 'average', got {combine!r}")
        hidden = uses_hidden_states(self.config.projection)
        sources = [k for k in ("image", "sample_images", "image_embeds") if inputs.get(k) is not None]
        if len(sources) != 1:
            raise StudioError("an IP-Adapter needs exactly one of `image`, `sample_images` or `image_embeds`"
                              + (f"; got {', '.join(sources)}" if sources else ""))
        encoder = getattr(pipe, "image_encoder", None) if pipe is not None else None
        zero_pixels = None
        if sources[0] == "image_embeds":
            pos = normalize_embeds(inputs["image_embeds"], hidden)
        else:
            if pipe is None:
                raise StudioError("IP-Adapter reference images need a pipeline with an image encoder; outside a "
                                  "pipeline call pass `image_embeds`")
            if encoder is None:
                raise StudioError("the pipeline has no image_encoder to encode IP-Adapter images; load one "
                                  "(CLIPVisionModelWithProjection) or pass `image_embeds`")
            check_image_encoder(self.config, encoder)
            enc_dtype = next(encoder.parameters()).dtype
            if sources[0] == "image":
                groups = [image_list(inputs["image"])]
            else:
                groups = [image_list(x) for x in inputs["sample_images"]]
            if not groups or not all(groups):
                raise StudioError("IP-Adapter got an empty list of reference images")
            flat = [img for grp in groups for img in grp]
            pixels = pixel_values(pipe, flat, device or encoder.device, enc_dtype)
            enc = encode_pixels(encoder, pixels, hidden)
            per = list(enc.split([len(grp) for grp in groups]))
            if combine == "average":
                per = [p.mean(dim=0, keepdim=True) for p in per]
            if len({p.shape[0] for p in per}) != 1:
                raise StudioError("with combine='concat' every sample needs the same number of reference images, got "
                                  f"{[len(grp) for grp in groups]}; use combine='average' or equal counts")
            pos = torch.stack(per)
            zero_pixels = torch.zeros_like(pixels[:1])
        if pos.shape[-1] != self.config.image_embed_dim:
            raise IncompatibleAdapterError(
                f"IP-Adapter ({self.config.projection}) expects image embeddings of size {self.config.image_embed_dim}, "
                f"got {pos.shape[-1]} (shape {list(pos.shape)}): the embeddings come from another image encoder")
        neg = None
        if cfg:
            if inputs.get("negative_image_embeds") is not None:
                neg = normalize_embeds(inputs["negative_image_embeds"], hidden, "negative_image_embeds")
            elif not hidden:  # base: the projection of zero embeddings
                neg = torch.zeros_like(pos[:1])
            elif encoder is not None:  # plus / full: the encoder's output on a zero image
                if zero_pixels is None:
                    size = encoder.config.image_size
                    zero_pixels = torch.zeros(1, 3, size, size, device=device or encoder.device,
                                              dtype=next(encoder.parameters()).dtype)
                neg = encode_pixels(encoder, zero_pixels, True)[:, None].expand(1, pos.shape[1], -1, -1)
            else:
                raise StudioError(f"IP-Adapter {self.config.projection} under classifier-free guidance needs "
                                  "`negative_image_embeds` when no image encoder is available")
            if neg.shape[2:] != pos.shape[2:] or neg.shape[1] not in (1, pos.shape[1]):
                raise StudioError(f"negative_image_embeds of shape {list(neg.shape)} do not match image_embeds "
                                  f"{list(pos.shape)}")
            if neg.shape[1] != pos.shape[1]:
                neg = neg.expand(-1, pos.shape[1], *neg.shape[2:])
        return pos, neg, combine

    def _mask(self, inputs: dict[str, Any], batch: int, nipp: int) -> torch.Tensor | None:
        if inputs.get("mask") is None:
            return None
        return expand_batch(to_mask(inputs["mask"]), batch, nipp, "mask")


def _unet_cross_dim(unet: nn.Module) -> int:
    cad = unet.config.cross_attention_dim
    return int(cad[0] if isinstance(cad, (list, tuple)) else cad)


def check_cross_attention_dim(found: int, unet: nn.Module) -> None:
    """Raise `IncompatibleAdapterError` unless image tokens of width `found` fit the UNet's cross-attention."""
    cad = _unet_cross_dim(unet)
    if found != cad:
        raise IncompatibleAdapterError(
            f"IP-Adapter was made for cross_attention_dim {found}, this UNet has cross_attention_dim {cad} "
            "(e.g. SD1.5 = 768, SD2 = 1024, SDXL = 2048): it belongs to another base model")


def check_unet(config: Any, unet: nn.Module) -> None:
    """Raise `IncompatibleAdapterError` (expected vs found) unless an IP-Adapter with `config` fits `unet`."""
    check_cross_attention_dim(config.cross_attention_dim, unet)
    cad = _unet_cross_dim(unet)
    layers = cross_attention_layers(unet)
    if len(layers) != len(config.layer_names):
        raise IncompatibleAdapterError(
            f"IP-Adapter has {len(config.layer_names)} cross-attention layers, this UNet has {len(layers)}: "
            "it was made for another UNet architecture")
    for name, hidden in zip(config.layer_names, config.hidden_sizes):
        attn = layers.get(name)
        if attn is None:
            raise IncompatibleAdapterError(f"IP-Adapter names a cross-attention layer this UNet lacks: {name}")
        if attn.to_k.out_features != hidden:
            raise IncompatibleAdapterError(
                f"IP-Adapter layer {name}: to_k_ip/to_v_ip give width {hidden}, this UNet's layer expects "
                f"{attn.to_k.out_features} (shape [{attn.to_k.out_features}, {cad}] expected, "
                f"[{hidden}, {config.cross_attention_dim}] found)")


def check_image_encoder(config: Any, image_encoder: Any) -> None:
    """Raise `IncompatibleAdapterError` unless the image encoder gives what the projection reads."""
    if image_encoder is None:
        return
    enc = image_encoder.config
    if uses_hidden_states(config.projection):
        found, what = getattr(enc, "hidden_size", None), "hidden_size (penultimate hidden states)"
    else:
        found, what = getattr(enc, "projection_dim", None), "projection_dim (image_embeds)"
    if found is not None and found != config.image_embed_dim:
        raise IncompatibleAdapterError(
            f"IP-Adapter ({config.projection}) reads image embeddings of size {config.image_embed_dim}, the "
            f"pipeline's image encoder gives {what} {found}: use the image encoder the adapter was trained with")
