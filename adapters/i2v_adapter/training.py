"""Train an I2V-Adapter on a frozen AnimateDiff model.

    accelerate launch train/i2v_adapter.py --config configs/train/i2v_adapter_tiny.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/i2v_adapter.py --config ...   # several processes

The recipe is the paper's: the video UNet (spatial layers and motion modules), VAE and text encoder are frozen; the
adapter's `to_q_ff` starts as a copy of each layer's `to_q` and `to_out_ff` at zero. Per window of frames (see
`data.py`), frame 0 is the condition: its latent (the VAE posterior's mean, as sampling encodes the first image) goes
into the UNet **without noise** and is pinned by the adapter as at sampling; frames 1..F-1 are noised to a random
timestep and the loss is the MSE of the predicted noise (or v) on those frames only. A share of the captions
(`caption_dropout`) is dropped to the empty text, so the adapter also learns the unconditional half of CFG.
`train_motion_modules: true` trains the motion modules as well (saved beside the adapter as a diffusers
`MotionAdapter` folder). The shared loop (`adapter_studio.train.loop`) does AdamW, warmup + cosine, clipping,
mixed precision, gradient checkpointing, validation grids, trackers, atomic checkpoints and exact resume.

Every checkpoint's `adapter/` folder (and `final/`) loads directly: `load_i2v_adapter(folder, unet)`, or a mix unit
`{"family": "i2v", "weights": folder}`; its `diffusion_pytorch_model.safetensors` carries the original release's key
names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adapter_studio.stack import AdapterStack
from adapter_studio.train.config import ConfigError, TrainConfig
from adapter_studio.train.demo_data import ensure_data_dir
from adapter_studio.train.loop import TrainingTask, run_cli, run_on_main

from .data import ClipDataset, make_windows, read_metadata, write_demo_clips
from .formats import load_i2v_adapter
from .modeling_i2v_adapter import I2VAdapter

SLOT = "i2v"
MOTION_FOLDER = "motion_adapter"


@dataclass
class I2VAdapterTrainConfig(TrainConfig):
    """I2V-Adapter training: data, frames, what trains, validation."""

    model: str = "tiny-video"
    data_dir: str | None = None
    caption_column: str = "text"
    resolution: int = 0  # 0: the model preset's resolution
    num_frames: int = 16
    frame_stride: int = 4
    train_motion_modules: bool = False
    caption_dropout: float = 0.05
    init_weights: str | None = None  # continue from an I2V-Adapter in any supported format
    validation_clips: int = 2  # the first clips of the data: their first frame and caption
    validation_num_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    # > 0: generate that many moving-shape clips into data_dir when that folder does not exist yet and data_dir was
    # given where make_demo_data was (both in the YAML file, or both on the command line)
    make_demo_data: int = 0

    RESUMABLE: ClassVar[frozenset[str]] = TrainConfig.RESUMABLE | {
        "validation_clips", "validation_num_inference_steps", "validation_guidance_scale", "make_demo_data"}

    def validate(self) -> None:
        super().validate()
        if not self.data_dir:
            raise ConfigError("give data_dir: a folder of videos (.mp4 / .webm / .gif) or frame folders with "
                              "metadata.jsonl")
        for key, low in (("num_frames", 2), ("frame_stride", 1), ("validation_clips", 0),
                         ("validation_num_inference_steps", 1), ("make_demo_data", 0), ("resolution", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key} must be >= {low}, got {getattr(self, key)}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not self.caption_column:
            raise ConfigError("caption_column is empty")


class I2VTrainable(nn.Module):
    """What the loop trains: the I2V-Adapter (`i2v`) and, with `train_motion_modules`, the UNet's motion modules
    (`motion`, the same module objects the UNet runs)."""

    def __init__(self, i2v: I2VAdapter, motion: nn.ModuleDict | None = None):
        super().__init__()
        self.i2v = i2v
        self.motion = motion


def motion_modules(unet: nn.Module) -> nn.ModuleDict:
    """Every `motion_modules` list of a `UNetMotionModel`, keyed by its path (dots as `__`)."""
    return nn.ModuleDict({name.replace(".", "__"): m for name, m in unet.named_modules()
                          if name.endswith("motion_modules")})


class I2VTrainingModel(nn.Module):
    """Frozen video UNet (with the adapter in its own stack), VAE and text encoder; `forward(batch)` is the noise
    MSE on frames 1..F-1 of `pixel_values` `[B, F, 3, R, R]`, frame 0 the clean condition."""

    def __init__(self, pipe: Any, trainable: I2VTrainable, noise_scheduler: Any, cfg: I2VAdapterTrainConfig,
                 empty_ids: torch.Tensor):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.trainable = pipe.unet, pipe.vae, pipe.text_encoder, trainable
        self.noise_scheduler, self.cfg = noise_scheduler, cfg
        self.register_buffer("empty_ids", empty_ids, persistent=False)  # [77]
        self.stack = AdapterStack().attach(self.unet)
        self.slot = self.stack.add(trainable.i2v, name=SLOT)

    @torch.no_grad()
    def noisy_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`latents`, `noise` `[B, C, F, h, w]`, `timestep` `[B]`, `noisy` (frame 0 clean), `first` `[B, C, h, w]`
        and `text` `[(B F), S, D]` of a batch (random draws from the global RNG, which checkpoints keep)."""
        pixels = batch["pixel_values"]  # [B, F, 3, R, R]
        b, f = pixels.shape[:2]
        sf = self.vae.config.scaling_factor
        dist = self.vae.encode(pixels.flatten(0, 1).to(self.vae.dtype)).latent_dist
        # [(B F), C, h, w] -> [B, C, F, h, w], the UNet's video layout
        latents = (dist.sample() * sf).unflatten(0, (b, f)).transpose(1, 2)
        first = (dist.mean * sf).unflatten(0, (b, f))[:, 0]  # as sampling encodes the first image: the mean
        latents[:, :, 0] = first
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        noisy[:, :, 0] = first  # frame 0 gets no noise: the condition, as at sampling
        drop = torch.rand(b, device=latents.device) < self.cfg.caption_dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], batch["input_ids"])
        # AnimateDiff's pipelines give the UNet the text tokens once per frame
        text = self.text_encoder(ids)[0].repeat_interleave(f, dim=0)
        return {"latents": latents, "noise": noise, "timestep": t, "noisy": noisy, "first": first, "text": text}

    def loss(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of `noisy_inputs` `x`: MSE over frames 1..F-1 (frame 0 is given, not predicted)."""
        self.slot.inputs = {"image_latents": x["first"]}
        pred = self.unet(x["noisy"].to(self.unet.dtype), x["timestep"], x["text"].to(self.unet.dtype)).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x["latents"], x["noise"], x["timestep"])
        else:
            target = x["noise"]
        return F.mse_loss(pred[:, :, 1:].float(), target[:, :, 1:].float())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.noisy_inputs(batch))


class I2VAdapterTask(TrainingTask):
    """The I2V-Adapter family's task for the shared loop."""

    cfg: I2VAdapterTrainConfig

    def build(self) -> tuple[nn.Module, nn.Module]:
        from diffusers import DDPMScheduler

        from adapter_studio.pipelines.studio_pipeline import StudioPipeline
        from adapter_studio.presets import load_pipeline

        cfg, acc = self.cfg, self.accelerator
        if not Path(cfg.data_dir).exists():
            run_on_main(acc, self._demo_data)
        # the clips are read (and probed) before the model loads: a data error costs seconds, not a model load
        self.windows = make_windows(read_metadata(cfg.data_dir, cfg.caption_column), cfg.num_frames,
                                    cfg.frame_stride)
        pipe = load_pipeline(cfg.model)
        if not hasattr(pipe.unet, "save_motion_modules"):
            raise ConfigError(f"model {cfg.model!r} is not a video model; the I2V-Adapter trains on AnimateDiff "
                              "(a preset of kind video, e.g. tiny-video or animatediff-sd15)")
        self.pipe = pipe
        self.resolution = cfg.resolution or getattr(getattr(pipe, "studio_preset", None), "resolution", 512)
        device = acc.device if acc is not None else torch.device("cpu")
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False).eval().to(device=device)
            if self.weight_dtype != torch.float32:
                m.to(dtype=self.weight_dtype)
        adapter = load_i2v_adapter(cfg.init_weights, pipe.unet) if cfg.init_weights else I2VAdapter.from_unet(
            pipe.unet, base_model=cfg.model)
        trainable = I2VTrainable(adapter.float().train(), motion_modules(pipe.unet) if cfg.train_motion_modules
                                 else None)
        empty_ids = pipe.tokenizer("", max_length=pipe.tokenizer.model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids[0]
        model = I2VTrainingModel(pipe, trainable, DDPMScheduler.from_config(pipe.scheduler.config), cfg, empty_ids)
        # the validation pipeline shares the training stack (which stays the task's); made before the motion modules
        # are set to train, since a StudioPipeline freezes its UNet
        self.studio = StudioPipeline(pipe, stack=model.stack)
        if trainable.motion is not None:
            trainable.motion.float().requires_grad_(True).train()
        self.model = model
        return model, trainable

    def _demo_data(self) -> None:
        cfg = self.cfg
        span = (cfg.num_frames - 1) * cfg.frame_stride + 1
        ensure_data_dir(cfg, lambda folder: write_demo_clips(folder, cfg.make_demo_data, size=cfg.resolution or 64,
                                                             frames=2 * span, seed=cfg.seed), "moving-shape clips")

    def dataset(self) -> ClipDataset:
        return ClipDataset(self.windows, self.pipe.tokenizer, self.cfg.num_frames, self.cfg.frame_stride,
                           self.resolution)

    def dataloader(self) -> DataLoader:
        ds = self.dataset()
        return DataLoader(ds, batch_size=self.cfg.train_batch_size, shuffle=True,
                          num_workers=self.cfg.dataloader_num_workers, drop_last=len(ds) >= self.cfg.train_batch_size)

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        folder = Path(folder)
        adapter.i2v.save_pretrained(folder)
        if adapter.motion is not None:
            self.pipe.unet.save_motion_modules(str(folder / MOTION_FOLDER))

    @torch.no_grad()
    def validate(self, adapter: nn.Module, step: int) -> Any:
        """Grid: per validation clip two rows of `num_frames` tiles, the clip's own frames, then the frames sampled
        from its first frame and caption."""
        from diffusers.utils import make_image_grid

        cfg, model, res = self.cfg, self.model, self.resolution
        ds = self.dataset()
        slot = model.slot
        saved_inputs = slot.inputs
        model.unet.eval()
        tiles = []
        try:
            slot.inputs = {}
            for i in range(min(cfg.validation_clips, len(ds))):
                frames = [f.resize((res, res)) for f in ds.frames(i)]
                out = self.studio(ds.windows[i].caption, num_frames=cfg.num_frames, height=res, width=res,
                                  num_inference_steps=cfg.validation_num_inference_steps,
                                  guidance_scale=cfg.validation_guidance_scale,
                                  generator=torch.Generator("cpu").manual_seed(cfg.seed + i),
                                  adapter_inputs={SLOT: {"image": frames[0]}}).frames[0]
                tiles += frames + list(out)
        finally:
            slot.inputs = saved_inputs
            model.unet.train()
        if not tiles:
            return None
        return make_image_grid(tiles, rows=len(tiles) // cfg.num_frames, cols=cfg.num_frames, resize=res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`--config file.yaml [--field value ...]` -> one training run; returns `train`'s summary dict. What the user
    can fix ends the process with one `error:` line and exit status 2 (`adapter_studio.train.loop.run_cli`)."""
    return run_cli(I2VAdapterTrainConfig, I2VAdapterTask, argv)
