"""The one training loop every adapter family shares.

A family provides a `TrainingTask` (model, adapter, data, how to save a loadable adapter, validation grid); the
loop does the rest: accelerate (several processes, mixed precision), AdamW with warmup + cosine, gradient clipping
and accumulation, gradient checkpointing, tqdm, trackers, validation grids, atomic checkpoints and resume.

Checkpoint layout (`output_dir/checkpoint-{step}/`, written to a temp folder then renamed, so a killed run never
leaves a half-written checkpoint behind):

    adapter/          the family's own format: loads straight into the pipeline, no conversion script
    training_state/   `Accelerator.save_state`: optimizer.bin, scheduler.bin, random_states_{rank}.pkl (+ scaler.pt
                      with fp16), and through our hooks adapter_state.safetensors instead of the whole model; plus
                      trainer_state.json (the step; its presence marks a complete checkpoint)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_STATE = "adapter_state.safetensors"


class TrainingTask:
    """What a family supplies to the shared loop. Subclass and implement the four methods.

    Attributes set by the loop before `build`: `cfg`, `accelerator`, `weight_dtype` (dtype for the frozen parts).
    """

    def __init__(self, cfg: TrainConfig, accelerator: Any):
        self.cfg = cfg
        self.accelerator = accelerator
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    def build(self) -> tuple[nn.Module, nn.Module]:
        """Return `(model, adapter)`: `model(batch)` returns the scalar loss; only `adapter`'s parameters train."""
        raise NotImplementedError

    def dataloader(self) -> torch.utils.data.DataLoader:
        raise NotImplementedError

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        """Write `adapter` to `folder` in a format the pipeline loads directly."""
        raise NotImplementedError

    def validate(self, adapter: nn.Module, step: int) -> Any:
        """Return a PIL image (a grid) for this step, or None."""
        return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    cks = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
           and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "training_state" / "trainer_state.json").is_file()]
    return sorted(cks, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _register_state_hooks(accelerator: Any, adapter: nn.Module) -> None:
    """Make `save_state` / `load_state` keep only the adapter's tensors (as safetensors): the prepared model is the
    frozen base plus the adapter, and accelerate would otherwise write (and expect) the whole base in every checkpoint.
    """

    def save_hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], folder: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()},
                      os.path.join(folder, ADAPTER_STATE))

    def load_hook(models: list[nn.Module], folder: str) -> None:
        models.clear()
        missing, unexpected = adapter.load_state_dict(load_file(os.path.join(folder, ADAPTER_STATE)), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {folder} does not fit this adapter: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    elif cfg.report_to not in ("none", "", None):
        log_with = cfg.report_to
    # `accelerate launch --multi_gpu` on a machine without CUDA: accelerate forms the gloo process group only when
    # told to run on the CPU; without this each process would train alone and write the same files.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
        # a seedable sampler gives each epoch the same order on resume, so skipping batches lands where the run stopped
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )


def train(cfg: TrainConfig, task_cls: type[TrainingTask]) -> dict[str, Any]:
    """Run a training job; returns `{"step", "losses", "output_dir", "final"}` (losses of this process's steps)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    cfg.validate()
    accelerator = _make_accelerator(cfg)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while writing
        (out / "config.json").write_text(json.dumps({**cfg.__dict__, "task": task_cls.__name__}, indent=2, default=str))
    accelerator.wait_for_everyone()
    set_seed(cfg.seed, device_specific=True)

    task = task_cls(cfg, accelerator)
    model, adapter = task.build()
    adapter_ids = {id(p) for p in adapter.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)  # the base model stays frozen, whatever the task built
    params = [p for p in adapter.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{task_cls.__name__}.build() returned an adapter without trainable parameters")
    if cfg.gradient_checkpointing:
        for m in model.modules():
            if m is not adapter and hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_steps * accelerator.num_processes)
    dataloader = task.dataloader()
    if dataloader.generator is None:
        # iterators draw their base seed from this generator, not the global RNG: a resumed run starts an iterator
        # mid-epoch where the uninterrupted run did not, and must still draw the same random numbers afterwards
        dataloader.generator = torch.Generator().manual_seed(cfg.seed)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    raw_adapter = adapter  # the same parameters the prepared model trains
    _register_state_hooks(accelerator, raw_adapter)

    step = 0
    resume = _resume_dir(cfg)
    if resume is not None:
        # no unsafe unpickling: accelerate >= 1.1 reads optimizer.bin, scheduler.bin and random_states_*.pkl through
        # torch.load(weights_only=True), allowing only numpy's array/dtype globals (1.0 called a bare torch.load)
        accelerator.load_state(str(resume / "training_state"))
        step = int(json.loads((resume / "training_state" / "trainer_state.json").read_text())["step"])
        accelerator.print(f"resumed from {resume} at step {step}")
    if accelerator.log_with:
        accelerator.init_trackers("adapter-studio", config={k: v for k, v in cfg.__dict__.items()
                                                            if isinstance(v, (int, float, str, bool))})

    losses: list[float] = []
    loss_log = out / "logs" / "loss.jsonl"
    if accelerator.is_main_process:
        loss_log.parent.mkdir(parents=True, exist_ok=True)
    batches_per_epoch = max(1, len(dataloader))
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    t0 = time.time()
    while step < cfg.max_steps:
        epoch = step * cfg.gradient_accumulation_steps // batches_per_epoch
        skip = step * cfg.gradient_accumulation_steps % batches_per_epoch
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            losses.append(loss_value)
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if accelerator.log_with:
                accelerator.log({"loss": loss_value, "lr": lr}, step=step)
            if accelerator.is_main_process:
                with open(loss_log, "a") as fh:
                    fh.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "time": time.time() - t0}) + "\n")
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                _validate(task, accelerator, raw_adapter, step, out)
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
                save_checkpoint(cfg, task, accelerator, raw_adapter, step)
            if step >= cfg.max_steps:
                break
    progress.close()
    final = out / "final"
    if accelerator.is_main_process:
        tmp = _atomic_dir(final)
        task.save_adapter(raw_adapter, tmp)
        _commit_dir(tmp, final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "losses": losses, "output_dir": str(out), "final": str(final)}


def _validate(task: TrainingTask, accelerator: Any, adapter: nn.Module, step: int, out: Path) -> None:
    if accelerator.is_main_process:
        was_training = adapter.training
        adapter.eval()
        with torch.no_grad():
            grid = task.validate(adapter, step)
        adapter.train(was_training)
        if grid is not None:
            vdir = out / "validation"
            vdir.mkdir(parents=True, exist_ok=True)
            grid.save(vdir / f"step-{step:06d}.png")
            grid.save(vdir / ".latest.png.tmp", format="PNG")
            os.replace(vdir / ".latest.png.tmp", vdir / "latest.png")
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({"validation": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
    accelerator.wait_for_everyone()


def save_checkpoint(cfg: TrainConfig, task: TrainingTask, accelerator: Any, adapter: nn.Module, step: int) -> Path:
    """Write `checkpoint-{step}` atomically (all processes call this; rank 0 writes the shared files)."""
    out = Path(cfg.output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        _atomic_dir(final)
    accelerator.wait_for_everyone()
    # Not `ProjectConfiguration(automatic_checkpoint_naming=True)`: it numbers folders by save count
    # (`checkpoints/checkpoint_{i}`) and writes them in place, where we need `checkpoint-{step}` renamed in whole.
    state = tmp / "training_state"
    accelerator.save_state(str(state))  # every process: its own RNG states; rank 0 the rest
    if accelerator.is_main_process:
        task.save_adapter(adapter, tmp / "adapter")
        (state / "trainer_state.json").write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit_dir(tmp, final)
        if cfg.checkpoints_total_limit:
            for old in list_checkpoints(out)[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _resume_dir(cfg: TrainConfig) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        cks = list_checkpoints(cfg.output_dir)
        return cks[-1] if cks else None
    path = Path(cfg.resume_from_checkpoint)
    if not (path / "training_state" / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no training_state/trainer_state.json)")
    return path


def steps_per_second(losses_log: Path) -> float:
    """Mean training steps per second from a run's `logs/loss.jsonl` (skipping the first, warm-up step)."""
    rows = [json.loads(line) for line in losses_log.read_text().splitlines() if line.strip()]
    if len(rows) < 3:
        return float("nan")
    return (len(rows) - 2) / max(1e-9, rows[-1]["time"] - rows[1]["time"])
