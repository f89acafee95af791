"""Training the toy world's base models on the shared loop, one part per run:

    vae          the tiny `AutoencoderKL` (pictures -> 16 x 16 x 4 latents), from scratch
    clip         a tiny CLIP (vision + text towers, contrastive); its vision tower is the IP-Adapter image encoder
    unet         the text-to-image `UNet2DConditionModel` and its CLIP text encoder, on the frozen trained VAE
    controlnet   a `ControlNetModel` made from the trained UNet, following the shapes' masks (or edges)
    motion       an AnimateDiff `MotionAdapter` on the frozen trained UNet, from the toy clips

    python train/toy_world.py --config configs/toyworld/unet.yaml [--field value ...]    (or accelerate launch ...)

Each part's `final/` folder is a diffusers folder of what it trained; `python -m adapter_studio.toyworld assemble`
puts them together into the pipeline folder the `toy-sd15` preset loads. Data is drawn on the fly (`data.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adapter_studio.train.config import ConfigError, TrainConfig
from adapter_studio.train.loop import TrainingTask, run_cli

from .data import ATTRIBUTES, SceneClips, SceneImages
from .scenes import VOCABULARY

REPO = Path(__file__).resolve().parent.parent
PARTS = ("vae", "clip", "unet", "controlnet", "motion")


@dataclass
class ToyTrainConfig(TrainConfig):
    """One part of the toy world's base model (see the module docstring for `part`)."""

    part: str = "vae"
    architecture: str = "configs/toyworld/architecture.yaml"  # shapes of the models trained from scratch
    vae: str | None = None  # part unet: the trained VAE folder (the vae run's final/)
    text_encoder: str | None = None  # part unet: a trained text tower kept frozen (the clip run's final/text_encoder,
    #   as SD keeps CLIP's); none: a text encoder trained with the UNet from scratch
    init_unet: str | None = None  # part unet: start from this folder's unet/ (a warm start) instead of random
    base: str | None = None  # parts controlnet, motion: the assembled toy pipeline folder
    resolution: int = 64
    dataset_size: int = 200_000  # distinct scenes (or clips) per epoch
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    noise_offset: float = 0.0  # parts unet, controlnet, motion: std of a per-channel constant added to the noise
    kl_weight: float = 1.0e-6
    condition: str = "mask"  # part controlnet: mask | edges
    num_frames: int = 8  # part motion
    attribute_weight: float = 1.0  # part clip: weight of the attribute heads (0: contrastive only)
    group_size: int = 8  # part clip: scenes per batch that share colour, size and ground (hard negatives)
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a large red circle in the center on a white background", "a small blue square at the top left on a black background",
        "a large yellow star at the bottom right on a blue background", "a small green triangle at the top right on a striped gray background"])
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 5.0

    RESUMABLE: ClassVar[frozenset[str]] = TrainConfig.RESUMABLE | {
        "validation_prompts", "validation_inference_steps", "validation_guidance_scale"}

    def validate(self) -> None:
        super().validate()
        if self.part not in PARTS:
            raise ConfigError(f"part {self.part!r} is not one of {', '.join(PARTS)}")
        if self.part == "unet" and not self.vae:
            raise ConfigError("part unet needs --vae: the trained VAE folder (the vae run's final/)")
        if self.part in ("controlnet", "motion") and not self.base:
            raise ConfigError(f"part {self.part} needs --base: the assembled toy pipeline folder "
                              "(python -m adapter_studio.toyworld assemble)")
        for key, holds, parts in (("vae", "config.json", ("unet",)), ("text_encoder", "config.json", ("unet",)),
                                  ("base", "model_index.json", ("controlnet", "motion"))):
            value = getattr(self, key)
            if self.part in parts and value is not None and not (Path(value) / holds).is_file():
                want = {"vae": "the vae run's final/ folder", "text_encoder": "the clip run's final/text_encoder "
                        "(or none: train one with the UNet)", "base": "the toy pipeline folder (python -m "
                        "adapter_studio.toyworld assemble)"}[key]
                raise ConfigError(f"{key} {value} is not a trained folder (no {holds} in it): give {want}")
        if self.condition not in ("mask", "edges"):
            raise ConfigError(f"condition {self.condition!r} is not mask or edges")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def architecture(cfg: ToyTrainConfig) -> Any:
    """The architecture preset, with the toy world's whole-word vocabulary in its tokenizer."""
    from adapter_studio.presets import load_preset

    path = Path(cfg.architecture)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    preset = load_preset(str(path))
    tok = {**preset.config.get("tokenizer", {}), "extra_words": VOCABULARY}
    return load_preset(str(path), tokenizer=tok, seed=cfg.seed)


# ------------------------------------------------------------------------------------------------- losses
class VAELoss(nn.Module):
    """Reconstruction (MSE + L1) plus `kl_weight` x KL of a tiny `AutoencoderKL`."""

    def __init__(self, vae: nn.Module, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["pixel_values"]  # (B, 3, S, S) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + self.kl_weight * posterior.kl().mean()


class CLIPLoss(nn.Module):
    """CLIP's symmetric contrastive loss between a vision and a text tower (both with projections), plus
    `attribute_weight` x cross-entropy of linear heads reading shape, colour, size and position from the image
    embedding: contrastive training alone learns colour, size and place and leaves shape near chance (the easy
    features suppress the hard one), and IP-Adapter can carry over only what the embedding holds."""

    def __init__(self, vision: nn.Module, text: nn.Module, attribute_weight: float = 0.0):
        super().__init__()
        self.vision, self.text, self.attribute_weight = vision, text, attribute_weight
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's start
        dim = vision.config.projection_dim
        self.heads = nn.ModuleList([nn.Linear(dim, len(values)) for values in ATTRIBUTES.values()])

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        embeds = self.vision(pixel_values=batch["clip_pixels"]).image_embeds  # (B, P)
        attr = sum(F.cross_entropy(head(embeds), batch["labels"][:, k]) for k, head in enumerate(self.heads))
        img = F.normalize(embeds, dim=-1)  # (B, P)
        txt = F.normalize(self.text(input_ids=batch["input_ids"]).text_embeds, dim=-1)  # (B, P)
        logits = self.logit_scale.clamp(max=4.6052).exp() * img @ txt.T  # (B, B)
        # the same caption twice in a batch is a true match too: targets are every equal caption
        same = torch.tensor([[a == b for b in batch["caption"]] for a in batch["caption"]], device=logits.device)
        targets = same.float() / same.sum(1, keepdim=True)
        contrastive = 0.5 * (torch.sum(-targets * logits.log_softmax(1), 1).mean()
                             + torch.sum(-targets * logits.log_softmax(0), 0).mean())
        return contrastive + self.attribute_weight * attr


class DiffusionLoss(nn.Module):
    """Epsilon-prediction loss of a UNet on VAE latents of the batch's pictures, DDPM noise at uniform timesteps.

    With `controlnet`, the ControlNet's residuals (from `batch["condition"]`) enter the frozen UNet; with 5-d
    `batch["frames"]` the UNet is a `UNetMotionModel` and the latents are `(B, 4, F, h, w)`.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, scheduler: Any,
                 empty_ids: torch.Tensor, caption_dropout: float, controlnet: nn.Module | None = None,
                 noise_offset: float = 0.0):
        super().__init__()
        self.noise_offset = noise_offset
        self.unet, self.text_encoder, self.vae, self.controlnet = unet, text_encoder, vae, controlnet
        self.scheduler, self.caption_dropout = scheduler, caption_dropout
        self.register_buffer("empty_ids", empty_ids, persistent=False)

    @torch.no_grad()
    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, L)
        drop = torch.rand(ids.shape[0], device=ids.device) < self.caption_dropout
        ids = torch.where(drop[:, None], self.empty_ids.to(ids.device)[None], ids)
        text = self.text_encoder(ids)[0]  # (B, L, D)
        video = "frames" in batch
        if video:
            b, f = batch["frames"].shape[:2]
            lat = self._latents(batch["frames"].flatten(0, 1))  # (B*F, 4, h, w)
            lat = lat.unflatten(0, (b, f)).transpose(1, 2)  # (B, 4, F, h, w)
        else:
            lat = self._latents(batch["pixel_values"])  # (B, 4, h, w)
        noise = torch.randn_like(lat)
        if self.noise_offset:
            # offset noise: SD's schedule leaves a picture's mean colour almost intact at t = T, so a model trained
            # on plain noise cannot change it while sampling (the toy world's grounds came out one bluish grey)
            noise = noise + self.noise_offset * torch.randn(*lat.shape[:2], *([1] * (lat.ndim - 2)), device=lat.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (lat.shape[0],), device=lat.device)
        noisy = self.scheduler.add_noise(lat, noise, t)
        if video:
            text = text.repeat_interleave(lat.shape[2], dim=0)  # (B*F, L, D): what AnimateDiff passes
        kwargs = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=batch["condition"],
                                        return_dict=False)
            kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        pred = self.unet(noisy, t, encoder_hidden_states=text, **kwargs).sample
        return F.mse_loss(pred.float(), noise.float())


# ------------------------------------------------------------------------------------------------- task
class ToyWorldTask(TrainingTask):
    """The shared loop's task for every part; `build` picks the modules by `cfg.part`."""

    cfg: ToyTrainConfig

    def build(self) -> tuple[nn.Module, nn.Module]:
        from diffusers import DDPMScheduler

        from adapter_studio.presets import build_tiny_components

        cfg = self.cfg
        self.preset = architecture(cfg)
        part = cfg.part
        if part in ("vae", "clip", "unet"):
            comps = build_tiny_components(self.preset)
        else:
            comps = self._trained_pipeline_components()
        self.tokenizer = comps["tokenizer"]
        self.scheduler = DDPMScheduler.from_config(comps["scheduler"].config)
        empty = self.tokenizer("", max_length=self.tokenizer.model_max_length, padding="max_length",
                               return_tensors="pt").input_ids[0]
        if part == "vae":
            self.trained = comps["vae"]
            return VAELoss(comps["vae"], cfg.kl_weight), comps["vae"]
        if part == "clip":
            from adapter_studio.presets import _tiny_clip_text

            text, _ = _tiny_clip_text(self.preset.config["text_encoder"], True, cfg.seed + 13,
                                      self.preset.config.get("tokenizer"))
            self.processor = comps["feature_extractor"]
            self.trained = comps["image_encoder"]
            model = CLIPLoss(comps["image_encoder"], text, cfg.attribute_weight)
            return model, model  # both towers and the temperature train; only the vision tower is kept
        if part == "unet":
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel

            vae = AutoencoderKL.from_pretrained(cfg.vae).eval()
            unet = comps["unet"]
            if cfg.init_unet:
                unet = UNet2DConditionModel.from_pretrained(Path(cfg.init_unet) / "unet")
            text = comps["text_encoder"]
            trained = nn.ModuleDict({"unet": unet})
            if cfg.text_encoder:
                text = CLIPTextModel.from_pretrained(cfg.text_encoder).eval()
            else:
                trained["text_encoder"] = text
            self.text_encoder = text
            self.components = {**comps, "vae": vae}
            self.trained = trained
            return DiffusionLoss(unet, text, vae, self.scheduler, empty, cfg.caption_dropout,
                                 noise_offset=cfg.noise_offset), trained
        if part == "controlnet":
            from diffusers import ControlNetModel

            emb = tuple(comps["vae"].config.block_out_channels)  # one stride-2 step per VAE level: the same factor
            controlnet = ControlNetModel.from_unet(comps["unet"], conditioning_embedding_out_channels=emb)
            self.components, self.trained = comps, controlnet
            return DiffusionLoss(comps["unet"], comps["text_encoder"], comps["vae"], self.scheduler, empty,
                                 cfg.caption_dropout, controlnet=controlnet, noise_offset=cfg.noise_offset), controlnet
        from diffusers import MotionAdapter, UNetMotionModel

        unet2d = comps["unet"]
        adapter = MotionAdapter(block_out_channels=tuple(unet2d.config.block_out_channels),
                                motion_layers_per_block=unet2d.config.layers_per_block, motion_num_attention_heads=2,
                                motion_norm_num_groups=unet2d.config.norm_num_groups, motion_max_seq_length=32)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        modules = nn.ModuleList([m for name, m in unet.named_modules() if name.endswith("motion_modules")])
        self.components, self.trained, self.motion_unet = comps, modules, unet
        return DiffusionLoss(unet, comps["text_encoder"], comps["vae"], self.scheduler, empty,
                             cfg.caption_dropout, noise_offset=cfg.noise_offset), modules

    def _trained_pipeline_components(self) -> dict[str, Any]:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(self.cfg.base, safety_checker=None, requires_safety_checker=False)
        return dict(pipe.components)

    def dataloader(self) -> DataLoader:
        cfg = self.cfg
        if cfg.part == "motion":
            ds: Any = SceneClips("train", cfg.dataset_size, cfg.num_frames, cfg.resolution, self.tokenizer)
        else:
            ds = SceneImages("train", cfg.dataset_size, cfg.resolution,
                             self.tokenizer if cfg.part != "vae" else None,
                             cfg.condition if cfg.part == "controlnet" else None,
                             group=cfg.group_size if cfg.part == "clip" else 1)
        collate = _clip_collate(self.processor) if cfg.part == "clip" else None
        # clip reads its groups in order (items are independent draws anyway); the others shuffle
        shuffle = not (cfg.part == "clip" and cfg.group_size > 1)
        return DataLoader(ds, batch_size=cfg.train_batch_size, shuffle=shuffle, drop_last=True,
                          num_workers=cfg.dataloader_num_workers, collate_fn=collate)

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        folder = Path(folder)
        part = self.cfg.part
        if part == "vae":
            self.trained.register_to_config(scaling_factor=self._latent_scale())
            self.trained.save_pretrained(folder)
        elif part == "clip":
            self.trained.save_pretrained(folder / "image_encoder")
            self.processor.save_pretrained(folder / "feature_extractor")
            adapter.text.save_pretrained(folder / "text_encoder")  # the UNet's frozen text encoder
            self.tokenizer.save_pretrained(folder / "tokenizer")
        elif part == "unet":
            self.trained["unet"].save_pretrained(folder / "unet")
            self.text_encoder.save_pretrained(folder / "text_encoder")
            self.tokenizer.save_pretrained(folder / "tokenizer")
        elif part == "controlnet":
            self.trained.save_pretrained(folder)
        else:
            self.motion_unet.save_motion_modules(str(folder))

    @torch.no_grad()
    def _latent_scale(self) -> float:
        """1 / std of the latents of 256 training pictures (what SD calls the VAE's scaling factor)."""
        vae = self.trained
        was = vae.training
        vae.eval()
        ds = SceneImages("train", 256, self.cfg.resolution)
        x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))]).to(next(vae.parameters()).device)
        std = vae.encode(x).latent_dist.mean.float().std().item()
        vae.train(was)
        return round(1.0 / max(std, 1e-6), 5)

    @torch.no_grad()
    def validate(self, adapter: nn.Module, step: int) -> Any:
        """unet / controlnet: samples of the validation prompts (with the training conditions); vae: pictures over
        their reconstructions; clip / motion: nothing."""
        from diffusers.utils import make_image_grid

        from .data import CONDITIONS
        from .scenes import render, scene_for

        cfg = self.cfg
        if cfg.part == "vae":
            vae = self.trained
            scenes = [scene_for("val", i) for i in range(8)]
            x = torch.stack([SceneImages("val", 8, cfg.resolution)[i]["pixel_values"] for i in range(8)])
            rec = vae.decode(vae.encode(x.to(next(vae.parameters()).device)).latent_dist.mean).sample
            from diffusers.image_processor import VaeImageProcessor

            outs = VaeImageProcessor().postprocess(rec.float().cpu(), output_type="pil")
            return make_image_grid([render(s, cfg.resolution) for s in scenes] + outs, rows=2, cols=8)
        if cfg.part not in ("unet", "controlnet"):
            return None
        from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

        comps = dict(self.components)
        sched = DDIMScheduler.from_config(comps["scheduler"].config)
        if cfg.part == "unet":
            pipe = StableDiffusionPipeline(vae=comps["vae"], text_encoder=self.text_encoder,
                                           tokenizer=self.tokenizer, unet=self.trained["unet"], scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            extra: list[dict[str, Any]] = [{} for _ in cfg.validation_prompts]
            prompts = cfg.validation_prompts
        else:
            pipe = StableDiffusionControlNetPipeline(
                vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=self.tokenizer, unet=comps["unet"],
                controlnet=self.trained, scheduler=sched, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
            scenes = [scene_for("val", i) for i in range(4)]
            prompts = [s.caption for s in scenes]
            extra = [{"image": CONDITIONS[cfg.condition](s, cfg.resolution).convert("RGB")} for s in scenes]
        pipe.set_progress_bar_config(disable=True)
        tiles = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator().manual_seed(cfg.seed + i)
            tiles += pipe(prompt, num_inference_steps=cfg.validation_inference_steps, height=cfg.resolution,
                          width=cfg.resolution, guidance_scale=cfg.validation_guidance_scale, generator=gen,
                          num_images_per_prompt=2, **extra[i]).images
        return make_image_grid(tiles, rows=len(prompts), cols=2)


def _clip_collate(processor: Any):
    """Batches for the clip part: the processor's pixels, as the image encoder will see them in the studio."""
    from PIL import Image

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        pics = [Image.fromarray(((it["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8"))
                for it in items]
        return {"clip_pixels": processor(pics, return_tensors="pt").pixel_values,
                "input_ids": torch.stack([it["input_ids"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items]),
                "caption": [it["caption"] for it in items]}

    return collate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`--config file.yaml [--field value ...]` -> one part trained; see `run_cli` for the exit statuses."""
    return run_cli(ToyTrainConfig, ToyWorldTask, argv)
