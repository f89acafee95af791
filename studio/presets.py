"""Model presets: tiny models built from configs, and real ones through the ordinary `from_pretrained` code.

A preset is a YAML file under `configs/models/` (or a path to one). `source: tiny` builds every component
from the config with random weights, deterministically for `seed`; `source: pretrained` loads a hub id or a
local diffusers folder. Any hub id or local folder can also be given directly instead of a preset name.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from .errors import PresetError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODELS_DIR = CONFIG_DIR / "models"


@dataclass
class ModelPreset:
    """A parsed model preset file.

    `kind` is the pipeline family: `sd15`, `sdxl`, `video` or `controlnet`; `source` is `tiny` or `pretrained`.
    """

    name: str
    kind: str
    source: str
    resolution: int = 512
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def pretrained(self) -> str | None:
        return self.config.get("pretrained")


def available_presets() -> list[str]:
    """Names of the presets under `configs/models/`."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str, **overrides: Any) -> ModelPreset:
    """Read a preset by name (`tiny-sd15`), by YAML path, or wrap a hub id / local diffusers folder.

    `overrides` replace top-level keys (e.g. `pretrained="/path/to/folder"`).
    """
    path = Path(name_or_path)
    if (MODELS_DIR / f"{name_or_path}.yaml").is_file():
        path = MODELS_DIR / f"{name_or_path}.yaml"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise PresetError(f"model preset {path} is not valid YAML: {e}") from e
    elif path.is_dir() or _looks_like_hub_id(name_or_path):
        kind = _guess_kind(path) if path.is_dir() else "sd15"
        cfg = {"name": name_or_path, "kind": kind, "source": "pretrained", "pretrained": name_or_path,
               "resolution": 1024 if kind == "sdxl" else 512}
    else:
        raise PresetError(
            f"unknown model {name_or_path!r}: give a preset name ({', '.join(available_presets())}), "
            "a preset YAML file, a local diffusers folder or a hub id like 'owner/name'"
        )
    cfg = {**cfg, **overrides}
    for key in ("pretrained", "motion_adapter"):
        # a preset's relative folder (the shipped toy models) is found from any working directory
        value = cfg.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (CONFIG_DIR.parent / value).is_dir():
            cfg[key] = str(CONFIG_DIR.parent / value)
    for key in ("name", "kind", "source"):
        if key not in cfg:
            raise PresetError(f"model preset {name_or_path!r} lacks the key {key!r}")
    if cfg["kind"] not in ("sd15", "sdxl", "video", "controlnet"):
        raise PresetError(f"model preset {name_or_path!r}: kind {cfg['kind']!r} is not one of sd15, sdxl, video, controlnet")
    if cfg["source"] not in ("tiny", "pretrained"):
        raise PresetError(f"model preset {name_or_path!r}: source {cfg['source']!r} is not 'tiny' or 'pretrained'")
    return ModelPreset(name=cfg["name"], kind=cfg["kind"], source=cfg["source"],
                       resolution=int(cfg.get("resolution", 512)), seed=int(cfg.get("seed", 0)), config=cfg)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(s)


def _guess_kind(folder: Path) -> str:
    if (folder / "motion_adapter").is_dir() or (folder / "unet" / "config.json").is_file() and "UNetMotionModel" in (folder / "unet" / "config.json").read_text():
        return "video"
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    return "sd15"


# ----------------------------------------------------------------------------------------------------------
# tiny components


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build under `seed` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_clip_text(cfg: dict[str, Any], with_projection: bool, seed: int, tokenizer: dict[str, Any] | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import tiny_clip_tokenizer

    # `tokenizer:` in a preset: {extra_words: "...", model_max_length: N} (the toy world's whole-word vocabulary)
    tok = tiny_clip_tokenizer(**(tokenizer or {}))
    conf = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **cfg)
    with _seeded(seed):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(conf)
    return model.eval(), tok


def build_tiny_image_encoder(cfg: dict[str, Any], seed: int = 0):
    """Tiny `CLIPVisionModelWithProjection` and its `CLIPImageProcessor` (image_size from cfg)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    conf = CLIPVisionConfig(**cfg)
    with _seeded(seed + 3):
        enc = CLIPVisionModelWithProjection(conf).eval()
    size = conf.image_size
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_center_crop=True, do_resize=True)
    return enc, proc


def build_tiny_unet(cfg: dict[str, Any], seed: int = 0):
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(**cfg).eval()


def build_tiny_vae(cfg: dict[str, Any], seed: int = 0):
    from diffusers import AutoencoderKL

    with _seeded(seed + 1):
        return AutoencoderKL(**cfg).eval()


def build_scheduler(cfg: dict[str, Any]):
    import diffusers

    cfg = dict(cfg)
    cls_name = cfg.pop("class", "DDIMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise PresetError(f"scheduler class {cls_name!r} is not a diffusers scheduler")
    return cls(**cfg)


def build_tiny_components(preset: ModelPreset) -> dict[str, Any]:
    """All pipeline components of a tiny preset, keyed like the diffusers pipeline's `components`."""
    cfg, seed = preset.config, preset.seed
    if preset.kind == "video":
        from diffusers import MotionAdapter, UNetMotionModel

        base = build_tiny_components(load_preset(cfg.get("base", "tiny-sd15")))
        with _seeded(seed + 7):
            motion_adapter = MotionAdapter(**cfg["motion_adapter"]).eval()
        base["unet"] = UNetMotionModel.from_unet2d(base["unet"], motion_adapter).eval()
        base["motion_adapter"] = motion_adapter
        return base
    if preset.kind == "controlnet":
        from diffusers import ControlNetModel

        base = build_tiny_components(load_preset(cfg.get("base", "tiny-sd15")))
        with _seeded(seed + 11):
            cn = ControlNetModel.from_unet(
                base["unet"], conditioning_embedding_out_channels=tuple(cfg["conditioning_embedding_out_channels"]))
        return {"controlnet": cn.eval()}
    comps: dict[str, Any] = {
        "unet": build_tiny_unet(cfg["unet"], seed),
        "vae": build_tiny_vae(cfg["vae"], seed),
        "scheduler": build_scheduler(cfg["scheduler"]),
    }
    comps["text_encoder"], comps["tokenizer"] = _tiny_clip_text(cfg["text_encoder"], False, seed + 2, cfg.get("tokenizer"))
    if preset.kind == "sdxl":
        comps["text_encoder_2"], comps["tokenizer_2"] = _tiny_clip_text(cfg["text_encoder_2"], True, seed + 5)
    if "image_encoder" in cfg:
        comps["image_encoder"], comps["feature_extractor"] = build_tiny_image_encoder(cfg["image_encoder"], seed)
    return comps


def build_tiny_controlnet(seed: int = 0):
    """The tiny SD1.5-shaped `ControlNetModel` (made from the tiny-sd15 UNet)."""
    return build_tiny_components(load_preset("tiny-controlnet", seed=seed))["controlnet"]


# ----------------------------------------------------------------------------------------------------------
# pipelines


def load_pipeline(model: str | ModelPreset = "tiny-sd15", torch_dtype: torch.dtype | None = None, **overrides: Any):
    """A diffusers pipeline for a preset name, preset file, hub id or local folder.

    Returns `StableDiffusionPipeline` (kind sd15), `StableDiffusionXLPipeline` (sdxl) or `AnimateDiffPipeline` (video),
    with `image_encoder` + `feature_extractor` where the preset has one.
    """
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    preset = model if isinstance(model, ModelPreset) else load_preset(model, **overrides)
    cls = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "video": AnimateDiffPipeline}.get(preset.kind)
    if cls is None:
        raise PresetError(f"preset {preset.name!r} of kind {preset.kind!r} is a component, not a pipeline")
    if preset.source == "tiny":
        comps = build_tiny_components(preset)
        names = set(cls._get_signature_keys(cls)[0]) | set(cls._optional_components)
        kwargs = {k: v for k, v in comps.items() if k in names}
        for opt in ("safety_checker", "feature_extractor", "image_encoder"):
            if opt in names:
                kwargs.setdefault(opt, None)
        if cls is StableDiffusionPipeline:
            kwargs["requires_safety_checker"] = False
        pipe = cls(**kwargs)
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
    else:
        pipe = _load_pretrained(cls, preset, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.studio_preset = preset  # the preset travels with the pipeline (mix metadata, resolution)
    return pipe


def _load_pretrained(cls, preset: ModelPreset, torch_dtype):
    cfg = preset.config
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if preset.kind == "video":
        from diffusers import MotionAdapter

        if cfg.get("motion_adapter") and not Path(cfg["pretrained"], "motion_adapter").is_dir():
            kwargs["motion_adapter"] = MotionAdapter.from_pretrained(cfg["motion_adapter"], **kwargs)
    enc_cfg = cfg.get("image_encoder")
    if isinstance(enc_cfg, dict) and enc_cfg.get("pretrained"):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        kwargs["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
            enc_cfg["pretrained"], subfolder=enc_cfg.get("subfolder"), **({"dtype": torch_dtype} if torch_dtype else {}))
        kwargs["feature_extractor"] = CLIPImageProcessor()
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(cfg["pretrained"], **kwargs)
    except (OSError, ValueError) as e:
        raise PresetError(
            f"could not load {cfg['pretrained']!r} for preset {preset.name!r}: {e}. Give a local diffusers folder "
            "(model_index.json + component folders) or a hub id reachable from this machine"
        ) from e
