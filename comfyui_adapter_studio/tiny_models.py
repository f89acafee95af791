"""The studio's tiny SD1.5-shaped presets (tiny-sd15) as single-file checkpoints ComfyUI's CheckpointLoaderSimple reads.

ComfyUI recognises a checkpoint by matching its UNet against a fixed list of known models (SD1.5 = 320 channels,
context 768, ...); a tiny model matches none. The pack therefore registers one more entry in that list
(`comfy.supported_models.models`), `StudioTinyModel`, which matches only checkpoints written by `write_checkpoint`
(they carry the key `adapter_studio.tiny_config`: the preset's config as JSON) and builds, with ComfyUI's own classes:

* the UNet: ComfyUI's `UNetModel` at the preset's size; its GroupNorms use the preset's group count (ComfyUI's
  layers hard-code 32 groups, the tiny preset has 16), so it computes exactly the studio's UNet;
* the text encoder: ComfyUI's CLIP text model at the preset's size, with the studio's tiny tokenizer;
* the VAE: ComfyUI has no VAE architecture at the tiny preset's size (its KL VAE is fixed at 128 channels and 32
  groups), so the checkpoint carries a TAESD-layout VAE (random, deterministic): latents equal the studio's, decoded
  images do not.

    python comfyui_adapter_studio/tiny_models.py tiny-sd15 ComfyUI/models   # checkpoint + image encoder

writes `models/checkpoints/tiny-sd15.safetensors` and `models/clip_vision/tiny-sd15-image-encoder.safetensors` (its
config in the metadata, read by the pack's CLIP vision loader). Runs with the project's Python (no ComfyUI needed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

try:
    from . import block_keys
    from .glue import TINY_KEY
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from comfyui_adapter_studio import block_keys
    from comfyui_adapter_studio.glue import TINY_KEY

TAESD_SEED = 1234
CLIP_VOCAB = 49408


def _tensor_json(obj: Any):
    import torch

    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)


def _taesd_state_dict() -> dict[str, Any]:
    """A TAESD VAE (diffusers' AutoencoderTiny, random but seeded) in ComfyUI's TAESD key layout."""
    import torch
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TAESD_SEED)
        vae = AutoencoderTiny().eval()
    out = {}
    for k, v in vae.state_dict().items():
        part, _, rest = k.partition(".layers.")
        i, _, tail = rest.partition(".")
        if part == "encoder":
            out[f"first_stage_model.taesd_encoder.{i}.{tail}"] = v
        elif part == "decoder":  # ComfyUI's decoder starts with a Clamp module: indices shift by one
            out[f"first_stage_model.taesd_decoder.{int(i) + 1}.{tail}"] = v
    out["first_stage_model.vae_scale"] = torch.tensor(1.0)
    out["first_stage_model.vae_shift"] = torch.tensor(0.0)
    return out


def checkpoint_state_dict(preset: str = "tiny-sd15") -> dict[str, Any]:
    """The single-file checkpoint of a tiny SD1.5-kind preset: ldm UNet keys, CLIP text keys, a TAESD VAE and the
    preset's config under `adapter_studio.tiny_config`."""
    import torch

    from adapter_studio.presets import build_tiny_components, load_preset

    p = load_preset(preset)
    if p.kind != "sd15" or p.source != "tiny":
        raise ValueError(f"{preset!r} is not a tiny SD1.5-kind preset (kind {p.kind}, source {p.source})")
    comps = build_tiny_components(p)
    unet, te = comps["unet"], comps["text_encoder"]
    sd = block_keys.convert_unet_state_dict(unet.state_dict(), unet.config, "model.diffusion_model.")
    # CLIP-L's layout in SD1.5 checkpoints (transformers 5 names the text model's parameters without `text_model.`)
    sd.update({f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
               for k, v in te.state_dict().items()})
    # ComfyUI's CLIP text model has CLIP-L's 49408-token table whatever its config: pad ours (rows never read)
    emb = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    if sd[emb].shape[0] < CLIP_VOCAB:
        sd[emb] = torch.cat([sd[emb], sd[emb].new_zeros(CLIP_VOCAB - sd[emb].shape[0], sd[emb].shape[1])])
    sd.update(_taesd_state_dict())
    te_cfg = te.config.to_dict()
    meta = {"preset": p.name, "unet": dict(unet.config),
            "text_encoder": {k: te_cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "max_position_embeddings", "vocab_size",
                                                     "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                                                     "pad_token_id", "projection_dim") if k in te_cfg}}
    sd[TINY_KEY] = _tensor_json(meta)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_checkpoint(preset: str, models_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `checkpoints/<preset>.safetensors` and (when the preset has one) `clip_vision/<preset>-image-encoder.
    safetensors` under `models_dir`; returns the paths."""
    from safetensors.torch import save_file

    from adapter_studio.presets import build_tiny_components, load_preset

    models = Path(models_dir)
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    out = {"checkpoint": models / "checkpoints" / f"{preset}.safetensors"}
    save_file(checkpoint_state_dict(preset), str(out["checkpoint"]))
    enc = build_tiny_components(load_preset(preset)).get("image_encoder")
    if enc is not None:
        (models / "clip_vision").mkdir(parents=True, exist_ok=True)
        out["clip_vision"] = models / "clip_vision" / f"{preset}-image-encoder.safetensors"
        save_file({k: v.detach().contiguous() for k, v in enc.state_dict().items()}, str(out["clip_vision"]),
                  metadata={"config": json.dumps(enc.config.to_dict(), default=str)})
    return out


def _tokenizer_folder() -> str:
    from adapter_studio.tokenizer import write_tiny_clip_tokenizer

    root = Path(os.environ.get("ADAPTER_STUDIO_CACHE", Path.home() / ".cache" / "adapter-studio"))
    folder = root / "tiny-clip-tokenizer"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_tiny_clip_tokenizer(folder)
    return str(folder)


def read_config(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    t = state_dict.get(TINY_KEY)
    return None if t is None else json.loads(bytes(t.tolist()).decode())


def set_norm_groups(diffusion_model: Any, groups: int) -> None:
    """ComfyUI's UNet layers are built with GroupNorm(32, C); the studio's tiny UNet uses `groups`."""
    import torch

    for m in diffusion_model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.num_groups = groups


_REGISTERED = False


def register() -> None:
    """Put `StudioTinyModel` first in ComfyUI's list of known models (it matches only our tiny checkpoints)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import comfy.supported_models as sm
    from comfy import sd1_clip, supported_models_base

    class StudioTinyModel(sm.SD15):
        """An Adapter Studio tiny SD1.5-kind preset (see comfyui_adapter_studio/tiny_models.py)."""

        unet_config: dict[str, Any] = {}
        required_keys = {"model.diffusion_model.input_blocks.0.0.weight": None, TINY_KEY: None}

        def _studio(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            cfg = read_config(state_dict) if state_dict else None
            if cfg is not None:
                self.studio_config = cfg
            return self.studio_config

        def get_model(self, state_dict, prefix="", device=None):
            cfg = self._studio(state_dict)
            heads = cfg["unet"].get("num_attention_heads") or cfg["unet"].get("attention_head_dim") or 8
            channels = cfg["unet"]["block_out_channels"]
            if isinstance(heads, (list, tuple)):
                per_head = {c // h for c, h in zip(channels, heads)}
                if len(per_head) != 1:
                    raise ValueError(f"ComfyUI's UNet needs one head count or one head width; got heads {heads} for "
                                     f"channels {channels}")
                self.unet_config.update(num_heads=-1, num_head_channels=per_head.pop())
            else:
                self.unet_config.update(num_heads=int(heads), num_head_channels=-1)
            out = super().get_model(state_dict, prefix, device)
            groups = int(cfg["unet"].get("norm_num_groups", 32))
            set_norm_groups(out.diffusion_model, groups)
            out.adapter_studio_norm_groups = groups
            return out

        def clip_target(self, state_dict={}):
            cfg = self._studio(state_dict)["text_encoder"]
            folder = _tokenizer_folder()
            text_config = {**cfg, "model_type": "clip_text_model"}
            tokens = {"start": cfg["bos_token_id"], "end": cfg["eos_token_id"], "pad": cfg["eos_token_id"]}
            width = cfg["hidden_size"]

            class Tokenizer(sd1_clip.SDTokenizer):
                def __init__(self, embedding_directory=None, tokenizer_data={}):
                    super().__init__(tokenizer_path=folder, embedding_directory=embedding_directory,
                                     embedding_size=width, embedding_key="clip_l", tokenizer_data=tokenizer_data)

            class TinyTokenizer(sd1_clip.SD1Tokenizer):
                def __init__(self, embedding_directory=None, tokenizer_data={}):
                    super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                     tokenizer=Tokenizer)

            class TextModel(sd1_clip.SDClipModel):
                def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
                    super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(text_config),
                                     special_tokens=tokens, model_options=model_options, **kwargs)

            class TinyClip(sd1_clip.SD1ClipModel):
                def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
                    super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TextModel,
                                     **kwargs)

            return supported_models_base.ClipTarget(TinyTokenizer, TinyClip)

    StudioTinyModel.studio_config = None
    sm.models.insert(0, StudioTinyModel)
    _REGISTERED = True


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[-2], file=sys.stderr)
        sys.exit(2)
    for what, path in write_checkpoint(sys.argv[1], sys.argv[2]).items():
        print(f"{what}: {path}")
