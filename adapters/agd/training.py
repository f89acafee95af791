"""Train an AGD adapter: distil classifier-free guidance into one UNet pass.

    accelerate launch train/agd.py --config configs/train/agd_tiny.yaml [--field value ...]

The student is the frozen base UNet with an `AGDAdapter` on every cross-attention. Each step takes records
`(x_t, t, prompt, w) -> eps_cfg` of CFG-guided trajectories (on disk from `python train/agd_trajectories.py`, or
sampled on the fly with `trajectories: null` + `trajectory_config`) and minimises `MSE(student(x_t, t, prompt, w),
eps_cfg)` with ONE student pass: the teacher's two-pass guidance becomes the adapter's job. The shared loop
(`adapter_studio.train.loop`) does AdamW, warmup + cosine, clipping, checkpoints, resume and the validation grids
(CFG and AGD side by side, same seeds).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adapter_studio.errors import CheckpointError
from adapter_studio.stack import AdapterStack
from adapter_studio.train.config import ConfigError, TrainConfig, config_from_dict, load_yaml_mapping
from adapter_studio.train.loop import TrainingTask, run_cli

from .modeling_agd import AGDAdapter
from .trajectories import StreamingTrajectories, TrajectoryConfig, TrajectoryDataset

SLOT = "agd"


@dataclass
class AGDTrainConfig(TrainConfig):
    """AGD training: the shared fields plus data source, adapter shape and validation grid."""

    trajectories: str | None = None
    trajectory_config: str | None = None
    stream_pool_trajectories: int = 8
    hidden_dim: int = 320
    arch: str = "attention"
    num_heads: int = 1
    use_timestep: bool = True
    use_prompt: bool = True
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car in the city"])
    validation_guidance_scales: list[float] = field(default_factory=lambda: [3.0, 7.5])
    validation_inference_steps: int = 20
    validation_seed: int = 0

    RESUMABLE: ClassVar[frozenset[str]] = TrainConfig.RESUMABLE | {
        "validation_prompts", "validation_guidance_scales", "validation_inference_steps", "validation_seed"}

    def validate(self) -> None:
        super().validate()
        for key in ("stream_pool_trajectories", "hidden_dim", "num_heads", "validation_inference_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.arch not in ("attention", "additive"):
            raise ConfigError(f"arch must be 'attention' or 'additive', got {self.arch!r}")
        if not self.trajectories and not self.trajectory_config:
            raise ConfigError("give trajectories (a folder from train/agd_trajectories.py) or trajectory_config "
                              "(a trajectory YAML: then trajectories are sampled during training, no disk)")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"hidden_dim {self.hidden_dim} must be divisible by num_heads {self.num_heads}")


class AGDStudent(nn.Module):
    """The frozen UNet with the AGD adapter in its own adapter stack; `forward(batch)` is the distillation loss.

    Batch: `x_t` `[B, C, H, W]`, `timestep` `[B]`, `w` `[B]`, `prompt_embeds` `[B, S, D]`, `eps_cfg` `[B, C, H, W]`
    (+ SDXL `text_embeds` `[B, D2]`, `time_ids` `[B, 6]`).
    """

    def __init__(self, unet: nn.Module, adapter: AGDAdapter):
        super().__init__()
        self.unet, self.adapter = unet.requires_grad_(False), adapter  # the base stays frozen
        self.stack = AdapterStack().attach(unet)
        self.slot = self.stack.add(adapter, name=SLOT)

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's one-pass prediction `[B, C, H, W]` for the batch's `(x_t, t, prompt, w)`."""
        dtype = self.unet.dtype
        self.slot.inputs = {"guidance_scale": batch["w"]}
        kwargs: dict[str, Any] = {}
        if "text_embeds" in batch:
            kwargs["added_cond_kwargs"] = {"text_embeds": batch["text_embeds"].to(dtype),
                                           "time_ids": batch["time_ids"].to(dtype)}
        return self.unet(batch["x_t"].to(dtype), batch["timestep"], encoder_hidden_states=batch["prompt_embeds"].to(dtype),
                         **kwargs).sample

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.predict(batch).float(), batch["eps_cfg"].float())

    @contextlib.contextmanager
    def adapter_off(self) -> Iterator[None]:
        """The plain base UNet inside the block (the teacher when trajectories are sampled during training)."""
        old = self.slot.enabled
        self.slot.enabled = False
        try:
            yield
        finally:
            self.slot.enabled = old


def load_trajectory_config(path: str, model: str) -> TrajectoryConfig:
    values = load_yaml_mapping(path, "trajectory_config")
    values["model"] = model  # the teacher is always the model being distilled
    return config_from_dict(TrajectoryConfig, values)


class AGDTask(TrainingTask):
    """The AGD family's task for the shared loop."""

    cfg: AGDTrainConfig

    def build(self) -> tuple[nn.Module, nn.Module]:
        from adapter_studio.presets import load_pipeline

        cfg = self.cfg
        device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
        self.pipe = load_pipeline(cfg.model)
        # frozen parts in the training dtype; the adapter stays float32 (its master weights)
        self.pipe.to(device=device, dtype=self.weight_dtype)
        unet = self.pipe.unet.requires_grad_(False)
        adapter = AGDAdapter.from_unet(unet, hidden_dim=cfg.hidden_dim, arch=cfg.arch, num_heads=cfg.num_heads,
                                       use_timestep=cfg.use_timestep, use_prompt=cfg.use_prompt,
                                       base_model=cfg.model).to(device)
        self.student = AGDStudent(unet, adapter)
        return self.student, adapter

    def dataloader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        unet = self.student.unet
        if cfg.trajectories:
            ds = TrajectoryDataset(cfg.trajectories)
            idx = ds.index
            if idx.get("model") != cfg.model:
                raise CheckpointError(f"trajectories in {cfg.trajectories} come from teacher {idx.get('model')!r}, "
                                      f"this run distils {cfg.model!r}")
            if idx["latent_shape"][0] != unet.config.in_channels or idx["prompt_shape"][1] != unet.config.cross_attention_dim:
                raise CheckpointError(f"trajectories {cfg.trajectories}: latents {idx['latent_shape']} / prompt "
                                      f"{idx['prompt_shape']} do not fit the UNet ({unet.config.in_channels} channels, "
                                      f"cross_attention_dim {unet.config.cross_attention_dim})")
            if len(ds) < cfg.train_batch_size:
                raise ConfigError(f"{len(ds)} trajectory records are fewer than train_batch_size {cfg.train_batch_size}")
            g = torch.Generator().manual_seed(cfg.seed)
            return torch.utils.data.DataLoader(ds, batch_size=cfg.train_batch_size, shuffle=True, drop_last=True,
                                               num_workers=cfg.dataloader_num_workers, generator=g)
        tcfg = load_trajectory_config(cfg.trajectory_config, cfg.model)
        # One optimizer step's records (of all processes: each samples the same stream and takes its share) per
        # "epoch": every checkpoint falls between two epochs, where the stream has handed out exactly what the steps
        # so far used, so its state (`state_dict`) is the position to resume from.
        processes = self.accelerator.num_processes if self.accelerator is not None else 1
        self.stream = StreamingTrajectories(
            self.pipe, tcfg, epoch_records=cfg.train_batch_size * cfg.gradient_accumulation_steps * processes,
            pool_trajectories=cfg.stream_pool_trajectories, pause=self.student.adapter_off, seed=cfg.seed)
        # workers would sample in copies of the stream that the checkpoint never sees (and the teacher is here)
        return torch.utils.data.DataLoader(self.stream, batch_size=cfg.train_batch_size, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        stream = getattr(self, "stream", None)
        return {"stream": stream.state_dict()} if stream is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" in state and getattr(self, "stream", None) is not None:
            self.stream.load_state_dict(state["stream"])

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        adapter.save_pretrained(folder)

    def validate(self, adapter: nn.Module, step: int) -> Any:
        """Grid: columns CFG (2 passes) | AGD (1 pass), same seed in both; one row per (prompt, w) in config order
        (`validation_prompts` outer, `validation_guidance_scales` inner; both in the run's `config.json`)."""
        from diffusers.utils import make_image_grid

        from adapter_studio.pipelines.studio_pipeline import StudioPipeline

        cfg = self.cfg
        sp = StudioPipeline(self.pipe, stack=self.student.stack)
        slot = self.student.slot
        old_inputs, slot.inputs = slot.inputs, {}  # w from the call
        tiles = []
        try:
            for prompt in cfg.validation_prompts:
                for w in cfg.validation_guidance_scales:
                    kw = dict(num_inference_steps=cfg.validation_inference_steps, guidance_scale=w)
                    with self.student.adapter_off():
                        tiles.append(sp(prompt, guidance="cfg", generator=self._gen(), **kw).images[0])
                    tiles.append(sp(prompt, guidance="agd", generator=self._gen(), **kw).images[0])
        finally:
            slot.inputs = old_inputs
        return make_image_grid(tiles, rows=len(tiles) // 2, cols=2)

    def _gen(self) -> torch.Generator:
        return torch.Generator(self.student.unet.device).manual_seed(self.cfg.validation_seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`--config file.yaml [--field value ...]` -> one training run; returns `train`'s summary dict. What the user
    can fix ends the process with one `error:` line and exit status 2 (`adapter_studio.train.loop.run_cli`)."""
    return run_cli(AGDTrainConfig, AGDTask, argv)
