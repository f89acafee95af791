"""`AGDAdapter`: classifier-free guidance distilled into adapters on every cross-attention of a frozen UNet.

With the adapter, sampling takes ONE UNet pass per step: the conditional prediction plus the adapter's
contributions approximates `eps_uncond + w * (eps_cond - eps_uncond)` for the guidance scale w it is given.

The adapter is a diffusers `ModelMixin`/`ConfigMixin`: `save_pretrained(folder)` writes `config.json` +
`diffusion_pytorch_model.safetensors`, `AGDAdapter.from_pretrained(folder)` reads them back. Upstream AGD
checkpoints (`.pt`, `{"model": {module_path: state_dict}}`) load through `adapters.agd.upstream`.

Timestep conditioning uses the base UNet's own frozen time embedding (`unet.time_proj` then `unet.time_embedding`),
computed once per UNet forward and shared through `ForwardContext.cache`. On SDXL-shaped UNets this is the plain
timestep embedding, WITHOUT the added text/time-id conditioning (`add_embedding`) that the UNet sums onto it:
the adapter gets the prompt through its own prompt tokens, and upstream AGD conditions on the plain embedding too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from adapter_studio.adapter import AttentionAdapter
from adapter_studio.context import CallInfo, ForwardContext
from adapter_studio.errors import IncompatibleAdapterError, StudioError

from .batched import StackedBlocks, set_timestep, timestep_keys_values
from .layers import GuidanceAdditive, GuidanceCrossAttention

ARCHS = ("attention", "additive")
_PROC = ".processor"


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """`{module path: Attention}` of every spatial cross-attention (`attn2`) of `unet`, in `attn_processors` order.

    Down, mid and up blocks alike; motion modules (AnimateDiff) are skipped: their attn2 is temporal self-attention.
    """
    out = {}
    for name in unet.attn_processors:
        if not name.endswith(".attn2" + _PROC) or "motion_modules" in name:
            continue
        path = name[: -len(_PROC)]
        attn = unet.get_submodule(path)
        if getattr(attn, "is_cross_attention", True):
            out[path] = attn
    return out


@dataclass
class AGDForwardState:
    """What `AGDAdapter.prepare` hands to every layer of one UNet forward.

    Attributes:
        kv: "attention" arch: every layer's keys and values side by side, `[L, N, K, 2H]`, of the tokens
            `[w, t, prompt...]` (`adapters.agd.batched`); without the forward's text tokens in the context, only
            `[w, t]` (K = 1 or 2) and each layer adds its prompt's from the `encoder_hidden_states` it is given.
        prompt_in_keys: whether `kv` holds the prompt tokens already.
        t_weight: compiled mode: the folded timestep weight (`StackedBlocks.timestep_weight`); the layers then make
            the timestep's keys/values inside the graph (slot 1 of `kv` is stale), else None (slot 1 is this forward's).
        embeds: "additive" arch: per layer the embedded `(w, t)` `[N, H]` (t None without timestep conditioning).
    """

    kv: torch.Tensor | None = None
    prompt_in_keys: bool = False
    t_weight: tuple[torch.Tensor, torch.Tensor] | None = None
    embeds: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None


class AGDAdapter(ModelMixin, AttentionAdapter, ConfigMixin):
    """Adapter guidance distillation on every `attn2` of a UNet.

    Args:
        layer_paths: module paths of the attn2 layers it covers (e.g.
            `down_blocks.1.attentions.0.transformer_blocks.0.attn2`), in the UNet's processor order.
        input_dims: width of each layer's input/output (the attn2 query dim).
        hidden_dim: width of the adapter's tokens (upstream default 320).
        arch: "attention" (cross-attention onto `[w, t, prompt...]`, the paper's adapter) or "additive"
            (token-independent vector from `w + t + mean(prompt)`).
        timestep_dim: width of the UNet's time embedding; None = no timestep conditioning.
        prompt_dim: the UNet's `cross_attention_dim`; None = no prompt conditioning.
        num_heads, qkv_bias, max_len: cross-attention heads, biases of q/k/v, positional table length.
        mlp_ratio: hidden width of the w encoder's MLP, as a multiple of `hidden_dim`.
        dropout: dropout inside the adapter while training.
        guidance_scale_mult: w is multiplied by this before its Fourier features; default 1 for "attention",
            1000 for "additive" (the values the upstream checkpoints were trained with).
        base_model: free-form note of the base model it was trained for (e.g. "tiny-sd15").
    """

    config_name = "config.json"
    family = "agd"
    guidance_mode = "agd"  # replaces classifier-free guidance: one UNet pass per step, w from the call
    target = "attn2"

    @register_to_config
    def __init__(
        self,
        layer_paths: Sequence[str] = (),
        input_dims: Sequence[int] = (),
        hidden_dim: int = 320,
        arch: str = "attention",
        timestep_dim: int | None = None,
        prompt_dim: int | None = None,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        dropout: float = 0.0,
        max_len: int = 250,
        guidance_scale_mult: float | None = None,
        base_model: str | None = None,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise StudioError(f"AGD arch must be one of {ARCHS}, got {arch!r}")
        if len(layer_paths) != len(input_dims) or not layer_paths:
            raise StudioError(f"AGD needs one input dim per layer: got {len(layer_paths)} layers, "
                              f"{len(input_dims)} dims")
        self.layer_paths = list(layer_paths)
        self._t_cache_key = f"agd.timestep_kv.{id(self)}"  # this adapter's entry in a forward's context cache
        self._index = {p + _PROC: i for i, p in enumerate(self.layer_paths)}
        mult = guidance_scale_mult if guidance_scale_mult is not None else (1.0 if arch == "attention" else 1000.0)
        self.w_mult = float(mult)
        blocks = []
        for dim in input_dims:
            if arch == "attention":
                blocks.append(GuidanceCrossAttention(int(dim), hidden_dim, timestep_dim, prompt_dim, num_heads,
                                                     mlp_ratio, qkv_bias, dropout, max_len))
            else:
                blocks.append(GuidanceAdditive(int(dim), hidden_dim, timestep_dim, prompt_dim, mlp_ratio, dropout,
                                               guidance_scale_mult=mult))
        self.blocks = nn.ModuleList(blocks)

    # ---- construction
    @classmethod
    def from_unet(cls, unet: nn.Module, hidden_dim: int = 320, arch: str = "attention", use_timestep: bool = True,
                  use_prompt: bool = True, base_model: str | None = None, **kwargs: Any) -> "AGDAdapter":
        """A fresh (zero-output) adapter on every attn2 of `unet` (down, mid and up blocks)."""
        layers = cross_attention_layers(unet)
        if not layers:
            raise IncompatibleAdapterError("this UNet has no cross-attention (attn2) layers for AGD to attach to")
        first = next(iter(layers.values()))
        return cls(
            layer_paths=list(layers), input_dims=[a.to_q.in_features for a in layers.values()], hidden_dim=hidden_dim,
            arch=arch, timestep_dim=unet.time_embedding.linear_2.out_features if use_timestep else None,
            prompt_dim=first.to_k.in_features if use_prompt else None, base_model=base_model, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "AGDAdapter":
        # plain nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast (it has none)
        return nn.Module.to(self, *args, **kwargs)

    # ---- AttentionAdapter interface
    def layer_names(self) -> list[str]:
        return list(self._index)

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise `IncompatibleAdapterError` naming the first layer / width that does not fit `unet`."""
        layers = cross_attention_layers(unet)
        missing = [p for p in self.layer_paths if p not in layers]
        if missing:
            raise IncompatibleAdapterError(
                f"AGD adapter covers {len(self.layer_paths)} attn2 layers, {len(missing)} of which this UNet lacks "
                f"(first: {missing[0]!r}); the UNet's attn2 layers are {list(layers)[:4]}... ({len(layers)} in all). "
                "It was made for another base model.")
        for path, dim in zip(self.layer_paths, self.config.input_dims):
            attn = layers[path]
            if attn.to_q.in_features != dim or attn.to_out[0].out_features != dim:
                raise IncompatibleAdapterError(
                    f"AGD layer {path}: expected width {dim}, the UNet's attn2 there has query dim "
                    f"{attn.to_q.in_features} and output dim {attn.to_out[0].out_features}")
            if self.config.prompt_dim and attn.to_k.in_features != self.config.prompt_dim:
                raise IncompatibleAdapterError(
                    f"AGD adapter expects prompt tokens of width {self.config.prompt_dim} (cross_attention_dim), "
                    f"the UNet's {path} takes {attn.to_k.in_features}")
        if self.config.timestep_dim:
            found = unet.time_embedding.linear_2.out_features
            if found != self.config.timestep_dim:
                raise IncompatibleAdapterError(
                    f"AGD adapter expects a time embedding of width {self.config.timestep_dim}, the UNet's is {found}")

    def begin_call(self, inputs: dict[str, Any], call: CallInfo) -> dict[str, Any]:
        """Fix w for the call: `inputs["guidance_scale"]` if given (number or one per sample), else the call's scale.
        `_cache` keeps what is fixed over the call (stacked weights, the keys/values of w and of the prompt)."""
        w = inputs.get("guidance_scale", call.guidance_scale)
        return {**inputs, "guidance_scale": self._as_w(w, call.batch_size, call.device), "_cache": {}}

    def prepare(self, inputs: dict[str, Any], ctx: ForwardContext) -> AGDForwardState:
        """Every layer's keys/values of `[w, t, prompt...]` for this forward ("attention"), or the embedded `(w, t)`
        per layer ("additive")."""
        if ctx.cfg:
            raise StudioError("the AGD adapter replaces classifier-free guidance: run it with one conditional batch "
                              "(StudioPipeline guidance='agd'), not inside a CFG batch")
        if "guidance_scale" not in inputs:
            raise StudioError("the AGD adapter needs its guidance scale: give guidance_scale=w (slot input or call)")
        device = ctx.timestep.device

        def w() -> torch.Tensor:  # made when used; `begin_call` checked the call's w already (no read from the GPU)
            return self._as_w(inputs["guidance_scale"], ctx.batch_size, device, check="_cache" not in inputs)

        def t_emb() -> torch.Tensor | None:
            if not self.config.timestep_dim:
                return None
            with torch.no_grad():  # the base embedding is frozen: no graph needed through it
                return ctx.time_embedding()

        if self.config.arch == "additive":
            w_, t_ = w(), t_emb()
            return AGDForwardState(embeds=[(blk.embed_w(w_), blk.embed_t(t_) if t_ is not None else None)
                                           for blk in self.blocks])
        prompt = self._prompt(ctx)
        cache = inputs.get("_cache")
        if cache is None or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            # a training step (or a direct call): weights may change between forwards, nothing is kept
            kv = StackedBlocks(self.blocks).all_keys_values(w(), t_emb(), prompt)
            return AGDForwardState(kv=kv, prompt_in_keys=prompt is not None and self.config.prompt_dim is not None)
        stacked = cache.get("stacked")
        if stacked is None:
            stacked = cache["stacked"] = StackedBlocks(self.blocks)
        # kept over the call's steps, keyed by the very objects (and their in-place version) each step hands over
        key = tuple((x, getattr(x, "_version", None)) for x in (inputs["guidance_scale"], prompt))
        fixed = cache.get("fixed")
        if (fixed is None or fixed[1].shape[1] != ctx.batch_size
                or any(a is not b or va != vb for (a, va), (b, vb) in zip(fixed[0], key))):
            fixed = cache["fixed"] = (key, stacked.call_keys_values(w(), prompt))
        state = AGDForwardState(kv=fixed[1], prompt_in_keys=prompt is not None and self.config.prompt_dim is not None)
        if self.config.timestep_dim:
            if ctx.cache.get("static"):  # compiled: the timestep's keys/values are made inside the graph
                state.t_weight = stacked.timestep_weight()
            else:
                set_timestep(state.kv, timestep_keys_values(stacked.timestep_weight(), t_emb(), len(self.blocks)))
        return state

    def contribution(self, layer: str, attn: nn.Module, hidden_states: torch.Tensor,
                     encoder_hidden_states: torch.Tensor | None, state: AGDForwardState,
                     ctx: ForwardContext) -> torch.Tensor:
        """`[n, L, C]` added to the attn2 output of `layer` (`n = N * frames` for video)."""
        i = self._index[layer]
        blk = self.blocks[i]
        n = hidden_states.shape[0]
        prompt = encoder_hidden_states if blk.prompt_proj is not None else None
        if state.embeds is not None:  # additive
            w_tok, t_tok = state.embeds[i]
            w_tok = ctx.expand(w_tok, n)
            t_tok = ctx.expand(t_tok, n) if t_tok is not None else None
            return blk(hidden_states, blk.vector(w_tok, t_tok, prompt)).to(hidden_states.dtype)
        kv = state.kv[i]
        if state.t_weight is not None:  # compiled mode: this forward's timestep row, once for every layer
            kv_t = ctx.cache.get(self._t_cache_key)
            if kv_t is None:
                kv_t = ctx.cache[self._t_cache_key] = timestep_keys_values(state.t_weight, ctx.time_embedding(),
                                                                           len(self.blocks))
            kv = torch.cat([kv[:, :1], kv_t[:, i, None], kv[:, 2:]], dim=1)
        kv = ctx.expand(kv, n)
        h = kv.shape[-1] // 2
        keys, values = kv[..., :h], kv[..., h:]
        if not state.prompt_in_keys and prompt is not None:  # the layer's own text tokens (no context prompt)
            x = blk.pos_enc.pe[keys.shape[1]:keys.shape[1] + prompt.shape[1]]
            x = blk.embed_prompt(prompt) + x.to(keys.dtype)
            keys = torch.cat([keys, blk.k_proj(x)], dim=1)
            values = torch.cat([values, blk.v_proj(x)], dim=1)
        return blk.attend(hidden_states, keys, values).to(hidden_states.dtype)

    def _prompt(self, ctx: ForwardContext) -> torch.Tensor | None:
        """The forward's text tokens `[N, S, C]` when they are what every attn2 layer sees (a UNet that projects
        them first, `encoder_hid_proj`, hands its layers other tokens: each layer then takes its own)."""
        prompt = ctx.encoder_hidden_states
        if (prompt is None or not self.config.prompt_dim or prompt.ndim != 3 or prompt.shape[0] != ctx.batch_size
                or getattr(ctx.unet, "encoder_hid_proj", None) is not None):
            return None
        if prompt.shape[1] + 2 > self.config.max_len:
            raise StudioError(f"{prompt.shape[1]} prompt tokens exceed the AGD adapter's {self.config.max_len - 2} "
                              "(its positional table's max_len)")
        return prompt

    # ---- helpers
    @staticmethod
    def _as_w(w: Any, n: int, device: torch.device | str, check: bool = True) -> torch.Tensor:
        """w as a float32 tensor `[n]` from a number, a list or a tensor of 1 or n values; `check`: that it is
        finite (reads a tensor given on the GPU back from it)."""
        try:
            t = torch.as_tensor(w, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise StudioError(f"AGD guidance_scale must be a number or one number per sample, got {w!r}") from None
        if check and not bool(torch.isfinite(t).all()):  # where it was given: a number is checked on the host
            raise StudioError(f"AGD guidance_scale must be finite, got {w!r}")
        t = t.to(device)
        if t.numel() == 1:
            return t.expand(n)
        if t.numel() != n:
            raise StudioError(f"AGD guidance_scale has {t.numel()} values for a batch of {n} samples; give one or {n}")
        return t
