"""What each family's apply node does with ComfyUI's objects: the one place the pack names families.

The sockets of every node come from the family contract (`adapter_studio.comfy_workflow.node_specs`); a binding turns
the socket values into the studio adapter's inputs and installs it on a clone of the MODEL:

* IP-Adapter: IMAGE encoded by the CLIP_VISION input (pooled `image_embeds` for the base projection, penultimate
  hidden states for plus/full; the unconditional pass gets the projection of zeros / of a black image, as the studio
  does), optional MASK, per-block scales; `AttentionPatch` on every attn2.
* AGD: w on every attn2 of the conditional pass; run the KSampler with cfg 1 (one model pass per step).
* Ctrl-Adapter / ControlNet: a ComfyUI ControlNet object (`StudioControlNet`) computing the family's residuals for the
  MODEL's own layout, added through ComfyUI's `control` mechanism on every model call.
* I2V-Adapter: attn1 patch over the latent batch as one clip (frame 0 = the image), the first frame pinned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import glue
from .glue import Weights, load_adapter, pil_images


def _scale_for(family: Any, values: dict[str, Any], model: Any) -> Any:
    """A per-layer scale function from the family's scale fields (block presets / per-block JSON), or None."""
    from adapter_studio.block_scale import block_preset_scale, layer_scale, validate_scale
    from adapter_studio.errors import StudioError

    preset, custom = None, None
    for f in family.fields:
        if f.target != "scale" or f.key not in values:
            continue
        if f.kind == "choice":
            preset = values[f.key]
        elif f.kind == "json" and str(values[f.key]).strip():
            custom = values[f.key]
    if preset in (None, "all blocks") and custom is None:
        return None
    if preset == "custom" or (preset is None and custom is not None):
        if custom is None:
            raise StudioError(f"{family.label}: blocks 'custom' needs a per-block scale (JSON)")
        try:
            scale = json.loads(custom)
        except json.JSONDecodeError as e:
            raise StudioError(f"{family.label}: the per-block scale is not JSON: {e}") from None
    else:
        scale = block_preset_scale(preset, 1.0, glue.diffusers_config_of(model))
    validate_scale(scale)
    return lambda layer: layer_scale(scale, layer)


# ----------------------------------------------------------------------------------------------------------
# IP-Adapter


def apply_ip(family: Any, model: Any, weights: Weights, values: dict[str, Any]) -> tuple:
    from adapter_studio.adapters.ip_adapter.projection import uses_hidden_states

    adapter = load_adapter(weights, model)
    clip_vision = values["clip_vision"]
    image = values["image"]
    hidden = uses_hidden_states(adapter.config.projection)
    out = clip_vision.encode_image(image)
    pos = (out["penultimate_hidden_states"] if hidden else out["image_embeds"]).float()[None]  # [1, I, (S,) D]
    if hidden:
        neg = clip_vision.encode_image(torch.zeros_like(image[:1]))["penultimate_hidden_states"].float()[None]
        neg = neg.expand(1, pos.shape[1], *neg.shape[2:])
    else:
        neg = torch.zeros_like(pos)
    combine = values.get("combine", "concat")
    base = {"combine": combine}
    if values.get("mask") is not None:
        base["mask"] = values["mask"].float()
    inputs = {0: {**base, "image_embeds": pos}, 1: {**base, "image_embeds": neg}}
    if pos.shape[-1] != adapter.config.image_embed_dim:
        from adapter_studio.errors import IncompatibleAdapterError

        raise IncompatibleAdapterError(
            f"this IP-Adapter ({adapter.config.projection}) reads image embeddings of size "
            f"{adapter.config.image_embed_dim}; the CLIP vision model gives {pos.shape[-1]}: load the image encoder "
            f"the adapter was trained with")
    m = model.clone()
    glue.AttentionPatch(m, adapter, lambda kind: inputs[1 if kind == 1 else 0], values["weight"], values["start_at"],
                        values["end_at"], scale_for=_scale_for(family, values, model)).install(m)
    return (m,)


# ----------------------------------------------------------------------------------------------------------
# AGD


def apply_agd(family: Any, model: Any, weights: Weights, values: dict[str, Any]) -> tuple:
    adapter = load_adapter(weights, model)
    w_key = next((f.key for f in family.fields if f.target == "guidance"), "guidance_scale")
    inputs = {"guidance_scale": float(values[w_key])}
    m = model.clone()
    # the conditional pass only: AGD is the guidance (cfg 1); under cfg > 1 the unconditional pass stays plain
    glue.AttentionPatch(m, adapter, lambda kind: inputs if kind == 0 else None, values["weight"], values["start_at"],
                        values["end_at"]).install(m)
    return (m,)


# ----------------------------------------------------------------------------------------------------------
# Ctrl-Adapter / ControlNet


def control_net(weights: Weights) -> Any:
    """The Ctrl loader's output: a ComfyUI ControlNet object running the family's ControlNet(s) and adapter."""
    from .control import StudioControlNet

    return StudioControlNet(weights)


def apply_ctrl(family: Any, model: Any, control: Any, values: dict[str, Any]) -> tuple:
    """The unit's conditions (images, preprocessors, scales; latent skipping, guess mode, fusion) on a copy of the
    ControlNet object, added to every model call of a clone of the MODEL within the unit's window."""
    inputs: dict[str, Any] = {}
    paths = control.weights.paths
    for f in family.fields:
        if f.target != "inputs" or values.get(f.key) is None:
            continue
        k = f.key.rsplit("_", 1)[-1]
        if k.isdigit() and not paths.get(f"controlnet_{k}"):  # a condition without its ControlNet: not in the unit
            continue
        v = values[f.key]
        if f.kind in ("images", "image"):
            imgs = pil_images(v)
            inputs[f.key] = imgs[0] if len(imgs) == 1 else imgs
        elif f.kind == "choice" and set(f.choices) == {"on", "off"}:
            inputs[f.key] = v == "on"
        else:
            inputs[f.key] = v
    c = control.copy()
    c.set_unit(inputs, values["weight"], values["start_at"], values["end_at"])
    m = model.clone()
    c.install(m)
    return (m,)


# ----------------------------------------------------------------------------------------------------------
# I2V-Adapter


def first_frame_latent(vae: Any, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The first frame `[1, H, W, 3]` resized to the video's size and encoded by ComfyUI's VAE: `[1, C, h, w]`."""
    import comfy.utils

    pixels = comfy.utils.common_upscale(image[:1, :, :, :3].movedim(-1, 1), width, height, "bilinear", "center")
    with torch.no_grad():
        return vae.encode(pixels.movedim(1, -1))


def i2v_latent(first: torch.Tensor, num_frames: int, sharp_ratio: float, blur_sigma: float,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The clip's LATENT: every frame the first frame's latent, each element kept sharp with probability
    `sharp_ratio` and otherwise taken from its Gaussian blur (the studio's Frame Similarity Prior, before noise: the
    sampler adds it); frame 0 exact and held by the noise mask."""
    from adapter_studio.adapters.i2v_adapter.first_frame import check_prior, gaussian_blur

    sharp_ratio, blur_sigma = check_prior(sharp_ratio, blur_sigma)
    g = torch.Generator().manual_seed(seed)
    shape = (num_frames, *first.shape[1:])
    sharp = torch.rand(shape, generator=g) >= 1.0 - sharp_ratio
    frames = torch.where(sharp, first.expand(shape), gaussian_blur(first, blur_sigma).expand(shape))
    frames[0] = first[0]
    mask = torch.ones(num_frames, 1, *first.shape[2:])
    mask[0] = 0.0
    return {"samples": frames, "noise_mask": mask}


def apply_i2v(family: Any, model: Any, weights: Weights, values: dict[str, Any]) -> tuple:
    """attn1 patch over the latent batch as one clip; frame 0 pinned to the clean first frame at the model's input
    (as the studio pins it) and held by the LATENT's noise mask; the LATENT starts every frame from the image."""
    adapter = load_adapter(weights, model)
    frames = int(values["num_frames"])
    first = first_frame_latent(values["vae"], values["image"], int(values["width"]), int(values["height"]))
    latent = i2v_latent(first, frames, values["fsp_sharp_ratio"], values["fsp_blur_sigma"])
    m = model.clone()
    ms = m.get_model_object("model_sampling")
    latent_format = m.get_model_object("latent_format")
    clean = latent_format.process_in(first)  # the UNet's latent space
    start, end = float(values["start_at"]), float(values["end_at"])

    def pin(x, sigma, c, kinds):
        progress = glue.step_progress(c.get("transformer_options", {}), sigma, ms)
        if not glue.in_window(progress, start, end) or x.shape[0] % frames:
            return x, c
        x = x.clone()
        s = sigma.flatten()[0]
        for i in range(0, x.shape[0], frames):  # the model divides its input by sqrt(sigma^2 + 1)
            x[i] = clean[0].to(x) * torch.sqrt(s ** 2 + 1.0)
        return x, c

    glue.chain_unet_wrapper(m, pin)
    glue.AttentionPatch(m, adapter, lambda kind: {}, values["weight"], start, end, num_frames=frames).install(m)
    return (m, latent)


BINDINGS = {"ip": apply_ip, "agd": apply_agd, "ctrl": apply_ctrl, "i2v": apply_i2v}


def resolve_weights(folder: str, name: str) -> str:
    """A file picked in a loader -> the path the family loader takes (a save_pretrained folder for its weights)."""
    import folder_paths

    path = Path(folder_paths.get_full_path_or_raise(folder, name))
    if path.name.startswith(("diffusion_pytorch_model.", "model.")) and (path.parent / "config.json").is_file():
        return str(path.parent)
    return str(path)
