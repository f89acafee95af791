"""The one training loop every adapter family shares.

A family provides a `TrainingTask` (model, adapter, data, how to save a loadable adapter, validation grid, and the
data-side state a checkpoint must hold); the loop does the rest: accelerate (several processes, mixed precision),
AdamW with warmup + cosine, gradient clipping and accumulation, gradient checkpointing, tqdm, trackers, validation
grids, atomic checkpoints, exact resume, a lock on the output folder and a checkpoint on Ctrl-C / SIGTERM. The rules
(what refuses, what warns, what resumes) are in docs/training.md.

Output folder:

    config.json       the run's config and `config_hash` (written once the run has started cleanly)
    .lock             held (flock) by the run's main process; pid and host inside
    logs/loss.jsonl   one line per optimizer step: step, mean loss over its micro-batches and processes, lr, time
    checkpoint-{step}/
        adapter/          the family's own format: loads straight into the pipeline, no conversion script
        training_state/   `Accelerator.save_state`: optimizer.bin, scheduler.bin, random_states_{rank}.pkl (+ scaler.pt
                          with fp16), and through our hooks adapter_state.safetensors instead of the whole model;
                          task_state_{rank}.pt (a task's data position, e.g. AGD's trajectory stream); and
                          trainer_state.json (step, processes, config hash; its presence marks a complete checkpoint)
    final/            the adapter after the last step

Checkpoints are written to `.checkpoint-{step}.tmp` and renamed, so a run killed at any point leaves either a complete
checkpoint or a temp folder the next run deletes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapter_studio.errors import CheckpointError, StudioError

from .config import MIXED_PRECISION, ConfigError, TrainConfig, TrainingError, config_hash, parse_config

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_STATE = "adapter_state.safetensors"
TRAINER_STATE = "trainer_state.json"
LOCK_FILE = ".lock"
T = TypeVar("T")


class TrainingTask:
    """What a family supplies to the shared loop. Subclass and implement the four methods; the two state methods
    are optional (for data whose position is not a function of the step, such as a stream).

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
        """The training data. A map-style dataset resumes exactly by itself (the loop skips the batches of the
        interrupted epoch); randomness belongs in `model(batch)` (the global RNG is checkpointed), not in workers."""
        raise NotImplementedError

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        """Write `adapter` to `folder` in a format the pipeline loads directly."""
        raise NotImplementedError

    def validate(self, adapter: nn.Module, step: int) -> Any:
        """Return a PIL image (a grid) for this step, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Data-side state this process needs to resume exactly (tensors, numbers, strings, lists, tuples, dicts:
        it is read back with `torch.load(weights_only=True)`); called at each checkpoint, between optimizer steps."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (called once on resume, after `dataloader`)."""


class TrainingStopped(Exception):
    """The run stopped on Ctrl-C / SIGTERM after checkpointing the step it was at (not an error: resume continues)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {checkpoint} saved: run the same "
                         "command again to resume")


def warn(message: str) -> None:
    """One warning line on stderr, from the main process only (`RANK` 0, or no launcher)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def run_on_main(accelerator: Any, fn: Callable[[], T]) -> T | None:
    """Run `fn` on the main process only and wait for it; a `StudioError` it raises is raised on every process, so
    no process waits at a barrier for one that gave up. Returns `fn`'s result on the main process, None elsewhere."""
    if accelerator is None:
        return fn()
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except StudioError as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([(type(error), str(error)) if error is not None else None])[0]
        if shared is not None and error is None:
            error = shared[0](shared[1])
            error.main_reports = True  # the main process prints it; the CLI keeps the others quiet
    if error is not None:
        raise error
    return result


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    cks = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
           and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "training_state" / TRAINER_STATE).is_file()]
    return sorted(cks, key=_checkpoint_step)


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


# ------------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """Turn an OSError while writing `what` into a one-line `TrainingError` (full disk, read-only folder)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "no space left on the device: free some (or lower checkpoints_total_limit) and run again to resume"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "the folder is not writable: choose another --output_dir"
        else:
            hint = e.strerror or str(e)
        raise TrainingError(f"writing {what} failed: {hint} ({e.strerror or e})") from None


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean_stale(out: Path) -> None:
    """Remove what a run killed while writing left behind: temp folders, and put back a folder whose replacement
    was interrupted between the two renames of `_commit_dir`."""
    for stale in out.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for old in out.glob(".*.old"):
        final = out / old.name[1:-len(".old")]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def _truncate_loss_log(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (a killed run may have logged steps after its last checkpoint, and a
    partly written last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    _write_atomic(path, "".join(keep))


class _OutputLock:
    """An exclusive `flock` on `output_dir/.lock`, held by the main process for the whole run.

    The kernel drops a flock when its process dies (even on SIGKILL), so a lock file left by a dead run is simply
    taken over; the pid and host inside only name the holder in the refusal.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingError(f"output_dir {self.path.parent} is in use by {previous or 'another process'}: wait "
                                "for that run, stop it (see docs/training.md), or give another --output_dir") from None
        except OSError as e:  # a filesystem without locks: run unprotected rather than not at all
            warn(f"cannot lock {self.path} ({e.strerror}): two runs into this folder would not be stopped")
        else:
            if previous:
                warn(f"took over the lock of {previous} in {self.path.parent} (that run is no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody to name, nothing to take over
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------------------------------------ output folder
def _prepare_output_dir(cfg: TrainConfig, task_name: str, lock: _OutputLock) -> None:
    """Main process: lock the folder, then refuse to mix runs (the rules are in docs/training.md)."""
    out = Path(cfg.output_dir)
    with _writing(f"output_dir {out}"):
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        _clean_stale(out)
    recorded = out / "config.json"
    checkpoints = list_checkpoints(out)
    if cfg.overwrite_output_dir:
        resume = cfg.resume_from_checkpoint
        if resume not in (None, "latest") and Path(resume).resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"overwrite_output_dir deletes {out}'s checkpoints, including resume_from_checkpoint "
                              f"{resume}: drop one of the two")
        with _writing(f"output_dir {out}"):
            for path in [*checkpoints, out / "final", out / "validation", out / "logs" / "adapter-studio"]:
                shutil.rmtree(path, ignore_errors=True)
            for path in (recorded, out / "logs" / "loss.jsonl"):
                path.unlink(missing_ok=True)
        return
    if recorded.is_file():
        try:
            old = json.loads(recorded.read_text())
            old_hash = old.get("config_hash") or config_hash(
                {k: old.get(k) for k in cfg.identity()}, str(old.get("task")))
        except (ValueError, AttributeError):
            raise TrainingError(f"{recorded} is not a run config this loop wrote: give another --output_dir, or "
                                "--overwrite_output_dir true to start over there") from None
        if old_hash != config_hash(cfg.identity(), task_name):
            new = {"task": task_name, **cfg.identity()}
            diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
            raise TrainingError(f"output_dir {out} holds another run (config differs: {'; '.join(diff[:4]) or 'hash'}"
                                f"): give a new --output_dir, or --overwrite_output_dir true to delete it and start "
                                "over")
    if checkpoints and cfg.resume_from_checkpoint is None:
        raise TrainingError(f"output_dir {out} holds checkpoints (latest {checkpoints[-1].name}) and "
                            "resume_from_checkpoint is none: resume (--resume_from_checkpoint latest), give a new "
                            "--output_dir, or --overwrite_output_dir true to delete them and start over")


def _resume_dir(cfg: TrainConfig) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        cks = list_checkpoints(cfg.output_dir)
        return cks[-1] if cks else None
    path = Path(cfg.resume_from_checkpoint)
    if not (path / "training_state" / TRAINER_STATE).is_file():
        raise ConfigError(f"resume_from_checkpoint {path} is not a complete checkpoint (no training_state/"
                          f"{TRAINER_STATE}); give a checkpoint-N folder, latest, or none")
    return path


# ------------------------------------------------------------------------------------------------ accelerate
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
            raise CheckpointError(f"checkpoint {folder} does not fit this adapter: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _resolve_mixed_precision(cfg: TrainConfig) -> None:
    """The config's `mixed_precision`, else the launcher's (`accelerate launch --mixed_precision`, which sets
    ACCELERATE_MIXED_PRECISION), else "no". A config value wins over a different launcher value, with a warning."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if cfg.mixed_precision is None:
        if launcher not in (None, *MIXED_PRECISION):
            raise ConfigError(f"accelerate launch --mixed_precision {launcher}: this loop takes no, fp16 or bf16")
        cfg.mixed_precision = launcher or "no"
    elif launcher not in (None, "no", cfg.mixed_precision):
        warn(f"mixed_precision: the config says {cfg.mixed_precision}, accelerate launch says {launcher}; using the "
             "config's (drop one of the two)")


def _make_accelerator(cfg: TrainConfig) -> Any:
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
        # a seedable sampler gives each epoch the same order on resume, so skipping batches lands where the run
        # stopped; data_seed makes that order the same on every process (by default each process would shuffle with
        # its own device-specific seed, and the shards would overlap)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )


class _StopRequest:
    """SIGINT / SIGTERM set a flag the loop reads after each optimizer step (then it checkpoints and stops).

    Further signals while stopping are ignored: `accelerate launch` (torchrun) forwards the signal the process group
    already got, and a second one must not cut the checkpoint short. SIGKILL still ends the process at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            warn(f"{signal.Signals(signum).name}: checkpointing at the end of this step, then stopping")

    def requested(self, accelerator: Any) -> bool:
        """Whether any process was signalled; every process gets the same answer at the same step."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if self.signum is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, task_cls: type[TrainingTask]) -> dict[str, Any]:
    """Run a training job; returns `{"step", "losses", "output_dir", "final"}` (losses of this run's steps).

    Raises `StudioError` subclasses for what the user can fix (`ConfigError`, `DataError`, `TrainingError`, ...)
    and `TrainingStopped` after checkpointing on Ctrl-C / SIGTERM.
    """
    from accelerate.utils import set_seed

    cfg.validate()
    _resolve_mixed_precision(cfg)
    accelerator = _make_accelerator(cfg)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        warn("mixed_precision fp16 on a CPU is slow and unscaled (no fp16 autocast or loss scaling there): use "
             "--mixed_precision bf16 or no")
    out = Path(cfg.output_dir)
    lock = _OutputLock(out)
    try:
        run_on_main(accelerator, lambda: _prepare_output_dir(cfg, task_cls.__name__, lock))
        set_seed(cfg.seed, device_specific=True)
        return _train(cfg, task_cls, accelerator, out)
    finally:
        lock.release()


def _train(cfg: TrainConfig, task_cls: type[TrainingTask], accelerator: Any, out: Path) -> dict[str, Any]:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

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
    if len(dataloader) == 0:
        raise ConfigError(f"the training data gives no batch: train_batch_size {cfg.train_batch_size} x "
                          f"{accelerator.num_processes} processes is more than the data holds")

    step = 0
    resume = _resume_dir(cfg)
    identity_hash = config_hash(cfg.identity(), task_cls.__name__)
    if resume is not None:
        step = _load_checkpoint(accelerator, task, resume, identity_hash)
        accelerator.print(f"resumed from {resume} at step {step}")
    # the run has started cleanly: only now record its config (a run that failed above leaves the folder's as it was)
    if accelerator.is_main_process:
        with _writing(f"{out / 'config.json'}"):
            _write_atomic(out / "config.json", json.dumps({**cfg.values(), "task": task_cls.__name__,
                                                           "config_hash": identity_hash}, indent=2, default=str))
            (out / "logs").mkdir(parents=True, exist_ok=True)
            _truncate_loss_log(out / "logs" / "loss.jsonl", step)
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        # tensorboard hides the events a killed run logged after the step it resumes from
        accelerator.init_trackers("adapter-studio", config={k: v for k, v in cfg.values().items()
                                                            if isinstance(v, (int, float, str, bool))},
                                  init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else {})

    losses: list[float] = []
    loss_log = out / "logs" / "loss.jsonl"
    ga = cfg.gradient_accumulation_steps
    # accelerate ends an accumulation window at the end of each epoch, so an epoch is ceil(batches / ga) steps
    steps_per_epoch = math.ceil(len(dataloader) / ga)
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    t0 = time.time()
    saved_at = step if resume is not None else -1
    with _StopRequest() as stop:
        while step < cfg.max_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if hasattr(dataloader, "set_epoch"):
                dataloader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(dataloader, in_epoch * ga) if in_epoch else dataloader
            window_loss, window_batches = torch.zeros((), device=accelerator.device), 0
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
                window_loss += loss.detach().float()
                window_batches += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                # the step's loss: the mean over its micro-batches and processes
                loss_value = accelerator.reduce(window_loss / window_batches, reduction="mean").item()
                window_loss, window_batches = torch.zeros((), device=accelerator.device), 0
                losses.append(loss_value)
                lr = lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if accelerator.log_with:
                    accelerator.log({"loss": loss_value, "lr": lr}, step=step)
                if accelerator.is_main_process:
                    record = {"step": step, "loss": loss_value, "lr": lr, "time": time.time() - t0}
                    with _writing(str(loss_log)), open(loss_log, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                if cfg.validation_steps and step % cfg.validation_steps == 0:
                    _validate(task, accelerator, raw_adapter, step, out)
                if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
                    save_checkpoint(cfg, task, accelerator, raw_adapter, step)
                    saved_at = step
                if step >= cfg.max_steps:
                    break  # a signal during the last step: the run is complete, final/ follows
                if stop.requested(accelerator):
                    progress.close()
                    if saved_at != step:
                        save_checkpoint(cfg, task, accelerator, raw_adapter, step)
                    accelerator.end_training()
                    raise TrainingStopped(stop.signum or signal.SIGTERM, step, out / f"{CHECKPOINT_PREFIX}{step}")
    progress.close()
    final = out / "final"
    if accelerator.is_main_process:
        with _writing(str(final)):
            tmp = _atomic_dir(final)
            task.save_adapter(raw_adapter, tmp)
            _commit_dir(tmp, final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "losses": losses, "output_dir": str(out), "final": str(final)}


def _load_checkpoint(accelerator: Any, task: TrainingTask, resume: Path, identity_hash: str) -> int:
    """Restore adapter, optimizer, scheduler, RNG and task state from `resume`; returns its step."""
    state_dir = resume / "training_state"
    trainer_state = json.loads((state_dir / TRAINER_STATE).read_text())
    if trainer_state.get("config_hash", identity_hash) != identity_hash:  # a checkpoint of another folder's run
        warn(f"{resume} was written by a run with another config (see its run's config.json): continuing from it "
             "with this one")
    saved_processes = int(trainer_state.get("num_processes", 1))
    if saved_processes != accelerator.num_processes:
        warn(f"{resume} was written by {saved_processes} processes, this run has {accelerator.num_processes}: it "
             "continues, but the data order, random streams and learning-rate schedule differ from an uninterrupted "
             "run")
    # no unsafe unpickling: accelerate >= 1.1 reads optimizer.bin, scheduler.bin and random_states_*.pkl through
    # torch.load(weights_only=True), allowing only numpy's array/dtype globals (1.0 called a bare torch.load)
    accelerator.load_state(str(state_dir))
    task_state = state_dir / f"task_state_{accelerator.process_index}.pt"
    if task_state.is_file():
        task.load_state_dict(torch.load(task_state, map_location="cpu", weights_only=True))
    return int(trainer_state["step"])


def _validate(task: TrainingTask, accelerator: Any, adapter: nn.Module, step: int, out: Path) -> None:
    if accelerator.is_main_process:
        was_training = adapter.training
        adapter.eval()
        with torch.no_grad():
            grid = task.validate(adapter, step)
        adapter.train(was_training)
        if grid is not None:
            vdir = out / "validation"
            with _writing(str(vdir)):
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
    try:
        with _writing(str(final)):
            if accelerator.is_main_process:
                _atomic_dir(final)
            accelerator.wait_for_everyone()
            # Not `ProjectConfiguration(automatic_checkpoint_naming=True)`: it numbers folders by save count
            # (`checkpoints/checkpoint_{i}`) and writes them in place, where we need `checkpoint-{step}` renamed whole.
            state = tmp / "training_state"
            accelerator.save_state(str(state))  # every process: its own RNG states; rank 0 the rest
            task_state = task.state_dict()
            if task_state:
                torch.save(task_state, state / f"task_state_{accelerator.process_index}.pt")
            if accelerator.is_main_process:
                task.save_adapter(adapter, tmp / "adapter")
                (state / TRAINER_STATE).write_text(json.dumps({
                    "step": step, "num_processes": accelerator.num_processes,
                    "config_hash": config_hash(cfg.identity(), type(task).__name__)}))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _commit_dir(tmp, final)
    except TrainingError:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written checkpoint is of no use, and the disk may be full
        raise
    if accelerator.is_main_process and cfg.checkpoints_total_limit:
        # only checkpoints up to this step rotate: later ones (left by a run this one resumed before) are
        # overwritten when this run reaches them, and the one just written is never deleted
        done = [c for c in list_checkpoints(out) if _checkpoint_step(c) <= step]
        for old in done[: -cfg.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ command line
def run_cli(config_cls: type[TrainConfig], task_cls: type[TrainingTask],
            argv: list[str] | None = None) -> dict[str, Any]:
    """The training scripts' entry: parse, train, and turn what the user can fix into ONE line and an exit status.

    `StudioError` -> `error: <message>` on stderr, exit 2 (printed by the main process when every process raised
    it); Ctrl-C / SIGTERM -> the checkpoint line, exit 128 + signal number (130, 143) like a shell. Anything else is
    an internal error and keeps its traceback.
    """
    try:
        cfg = parse_config(config_cls, argv)
    except ConfigError as e:
        # every process parses the same command line and fails the same way: the main one says so
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        return train(cfg, task_cls)
    except TrainingStopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except StudioError as e:
        if not getattr(e, "main_reports", False):
            print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def steps_per_second(losses_log: Path) -> float:
    """Mean training steps per second from a run's `logs/loss.jsonl` (skipping the first, warm-up step)."""
    rows = [json.loads(line) for line in losses_log.read_text().splitlines() if line.strip()]
    if len(rows) < 3:
        return float("nan")
    return (len(rows) - 2) / max(1e-9, rows[-1]["time"] - rows[1]["time"])
