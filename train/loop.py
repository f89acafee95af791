"""The one training loop every adapter family shares.

A family provides a `TrainingTask` (model, adapter, data, how to save a loadable adapter, validation grid); the
loop does the rest: accelerate (several processes, mixed precision), AdamW with warmup + cosine, gradient clipping
and accumulation, gradient checkpointing, tqdm, trackers, validation grids, atomic checkpoints and resume.

Checkpoint layout (`output_dir/checkpoint-{step}/`, written to a temp folder then renamed, so a killed run never
leaves a half-written checkpoint behind):

    adapter/          the family's own format: loads straight into the pipeline, no conversion script
    training_state/   adapter_state.safetensors, optimizer.pt, scheduler.json, rng-{rank}.pt, trainer_state.json
"""

from __future__ import annotations

import json
import os
import random
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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": torch.tensor(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    raw_adapter = adapter  # the same parameters the prepared model trains

    step = 0
    resume = _resume_dir(cfg)
    if resume is not None:
        step = _load_training_state(resume, raw_adapter, optimizer, lr_scheduler, accelerator)
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
                save_checkpoint(cfg, task, accelerator, raw_adapter, optimizer, lr_scheduler, step)
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


def save_checkpoint(cfg: TrainConfig, task: TrainingTask, accelerator: Any, adapter: nn.Module, optimizer: Any,
                    lr_scheduler: Any, step: int) -> Path:
    """Write `checkpoint-{step}` atomically (all processes call this; rank 0 writes the shared files)."""
    out = Path(cfg.output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        _atomic_dir(final)
        (tmp / "training_state").mkdir()
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / "training_state" / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        task.save_adapter(adapter, tmp / "adapter")
        state = tmp / "training_state"
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, state / "adapter_state.safetensors")
        torch.save(optimizer.state_dict(), state / "optimizer.pt")
        (state / "scheduler.json").write_text(json.dumps(lr_scheduler.state_dict(), default=_json_default))
        (state / "trainer_state.json").write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit_dir(tmp, final)
        if cfg.checkpoints_total_limit:
            for old in list_checkpoints(out)[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _json_default(o: Any) -> Any:
    if callable(o):
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")


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


def _load_training_state(folder: Path, adapter: nn.Module, optimizer: Any, lr_scheduler: Any, accelerator: Any) -> int:
    state = folder / "training_state"
    sd = load_file(state / "adapter_state.safetensors")
    missing, unexpected = adapter.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not fit this adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    optimizer.load_state_dict(torch.load(state / "optimizer.pt", map_location="cpu", weights_only=True))
    sched = json.loads((state / "scheduler.json").read_text())
    sched.pop("lr_lambdas", None)
    lr_scheduler.scheduler.load_state_dict({**lr_scheduler.scheduler.state_dict(), **sched}) \
        if hasattr(lr_scheduler, "scheduler") else lr_scheduler.load_state_dict(sched)
    rng = state / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return int(json.loads((state / "trainer_state.json").read_text())["step"])


def steps_per_second(losses_log: Path) -> float:
    """Mean training steps per second from a run's `logs/loss.jsonl` (skipping the first, warm-up step)."""
    rows = [json.loads(line) for line in losses_log.read_text().splitlines() if line.strip()]
    if len(rows) < 3:
        return float("nan")
    return (len(rows) - 2) / max(1e-9, rows[-1]["time"] - rows[1]["time"])
