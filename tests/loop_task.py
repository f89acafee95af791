"""Test helpers for the shared training loop.

* `DummyTask`: a real training task (a linear attention adapter on the tiny UNet, noise MSE). The noise target is
  drawn from the global torch RNG at every step, so exact resume also checks the RNG restore.
* Run as a script, a family's training entry with fault injection, for kill / resume tests:

      python tests/loop_task.py {ip,agd} --config ... [--field value ...]
      accelerate launch --multi_gpu --num_processes 2 tests/loop_task.py {ip,agd} ...

  Environment: `STUDIO_TEST_KILL_IN_CHECKPOINT=N` SIGKILLs the launcher and every worker at once (a power cut) while
  checkpoint-N is written (complete in its temp folder, not yet renamed); `STUDIO_TEST_SIGNAL_AT_STEP=N:SIGTERM`
  sends that signal during step N where a user would: to the launcher, which forwards it to the workers (`accelerate
  launch --multi_gpu` = torchrun starts each worker in its own session), or to the process of a plain `python` run;
  `STUDIO_TEST_RECORD_ITEMS=folder` appends every IP dataset index a process reads to `folder/rank{R}.txt`.
* `launch`, `kill_all`, `finish`, `assert_same_run`, `loss_log`: what the kill / resume tests share.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dummy_adapters import LinearAttnAdapter
from app_fixtures import free_port  # a 2-process launch on its own port: a killed run may hold 29500
from adapter_studio.presets import load_pipeline
from adapter_studio.stack import AdapterStack
from adapter_studio.train.loop import TrainingTask

ROOT = Path(__file__).resolve().parent.parent


class StackModel(nn.Module):
    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.stack = AdapterStack().attach(unet)
        self.stack.add(adapter, name="dummy")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = self.unet(batch["x"], batch["t"], batch["text"]).sample
        return nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


class DummyTask(TrainingTask):
    def build(self):
        unet = load_pipeline(self.cfg.model).unet
        adapter = LinearAttnAdapter(unet, seed=3)
        return StackModel(unet, adapter), adapter

    def dataloader(self):
        g = torch.Generator().manual_seed(0)
        n = 8
        data = [{"x": torch.randn(4, 16, 16, generator=g), "t": torch.randint(0, 1000, (), generator=g),
                 "text": torch.randn(77, 32, generator=g)} for _ in range(n)]
        return torch.utils.data.DataLoader(data, batch_size=self.cfg.train_batch_size, shuffle=True)

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, folder / "adapter.safetensors")


# ------------------------------------------------------------------------------------------------ kill / resume
def launch(family: str, processes: int, args: list[str], **env: str) -> subprocess.Popen:
    """Start `tests/loop_task.py family args` (1 process: plain python; 2: accelerate launch --multi_gpu, gloo) in
    a session of its own (a signal it sends to its process group reaches nothing else). Threads: as many as this
    process uses per process, so a 1-process run computes bit-for-bit what an in-process `train` computes."""
    threads = torch.get_num_threads() if processes == 1 else 1
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), **env}
    script = [str(Path(__file__)), family, *args]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", *script]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def kill_all(pid: int) -> None:
    """SIGKILL `pid` and every process below it, by id (torchrun's workers live in sessions of their own, so the
    launcher's process group does not reach them)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for a launched run; returns (exit status, output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"run did not finish in {timeout} s:\n{out[-3000:]}") from None
    return proc.returncode, out


def loss_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "logs" / "loss.jsonl").read_text().splitlines()]


def adapter_state(out: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a run's last checkpoint (the same as `final/`, in one format for every family)."""
    from adapter_studio.train.loop import list_checkpoints

    return load_file(list_checkpoints(out)[-1] / "training_state" / "adapter_state.safetensors")


def assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Same final adapter (to `atol`) and the same loss per step, each step logged once."""
    wa, wb = adapter_state(a), adapter_state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
    la, lb = loss_log(a), loss_log(b)
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, len(la) + 1))
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) <= atol, (ra, rb)


def _fault_injection() -> None:
    from adapter_studio.train import loop

    kill_at = os.environ.get("STUDIO_TEST_KILL_IN_CHECKPOINT")
    if kill_at:
        commit = loop._commit_dir

        def commit_or_die(tmp: Path, final: Path) -> None:
            if final.name == f"checkpoint-{kill_at}":
                kill_all(_launcher())
            commit(tmp, final)

        loop._commit_dir = commit_or_die


def _launcher() -> int:
    """The process a user starts and signals: torchrun's agent (this worker's parent) or this process."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()


def _task(family: str) -> tuple[type, type]:
    if family == "ip":
        from adapter_studio.adapters.ip_adapter import training as fam

        config_cls, task_cls = fam.IPAdapterTrainConfig, fam.IPAdapterTask
        record = os.environ.get("STUDIO_TEST_RECORD_ITEMS")
        if record:
            getitem = fam.IPAdapterDataset.__getitem__

            def recorded(self: Any, i: int) -> dict[str, torch.Tensor]:
                with open(Path(record) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as fh:
                    fh.write(f"{i}\n")
                return getitem(self, i)

            fam.IPAdapterDataset.__getitem__ = recorded
    else:
        from adapter_studio.adapters.agd import training as fam

        config_cls, task_cls = fam.AGDTrainConfig, fam.AGDTask
    signal_at = os.environ.get("STUDIO_TEST_SIGNAL_AT_STEP")
    if not signal_at or os.environ.get("RANK", "0") != "0":
        return config_cls, task_cls
    at, name = signal_at.split(":")
    base = task_cls

    class Signalled(base):  # one forward per step (no accumulation): the N-th forward is step N
        def build(self):
            model, adapter = super().build()
            forward, calls = model.forward, [0]

            def counted(batch):
                calls[0] += 1
                if calls[0] == int(at):
                    os.kill(_launcher(), getattr(signal, name))
                return forward(batch)

            model.forward = counted
            return model, adapter

    Signalled.__name__ = base.__name__  # the run's identity names the family's task
    return config_cls, Signalled


if __name__ == "__main__":
    from adapter_studio.train.loop import run_cli

    _fault_injection()
    config_cls, task_cls = _task(sys.argv[1])
    run_cli(config_cls, task_cls, sys.argv[2:])
