"""The Train tab's backend: one training run as a background process, and what it has written so far.

Which script a config runs comes from the families: each `Family.training` entry names a script and a glob of its
configs under `configs/train/`; a config runs the first entry whose glob matches (families in display order, then
their entries in order), and the Train tab's data folder fills that entry's `data_key`. A run is
`accelerate launch <script> --config configs/train/<name>.yaml --output_dir ... --<data key> ...` (or plain
`python`), started in its own process group so Stop ends the launcher and its workers together. The shared training
loop (`train/loop.py`) writes `output_dir/logs/loss.jsonl` (one JSON line per step) and
`output_dir/validation/latest.png`; the tab only reads those files, so it shows the same numbers the run logs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapter_studio.errors import StudioError
from adapter_studio.family import Family, TrainingScript
from adapter_studio.registry import families

from .stores import weights_folder

REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingError(StudioError):
    """A training run that cannot start (unknown config, missing data folder, one already running)."""


@dataclass
class TrainingRun:
    config: Path
    family: Family
    entry: TrainingScript
    output_dir: Path
    command: list[str]
    process: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.time)
    max_steps: int | None = None
    stopped: bool = False

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class TrainingRunner:
    """Starts, watches and stops one training run at a time.

    Args:
        configs_dir: where the training YAMLs are (`configs/train`).
        root: the folder the families' `TrainingScript.script` paths are relative to, and the run's working
            directory (the checkout).
        runs_dir: default parent of output folders.
        launcher: `accelerate` (`python -m accelerate.commands.launch --num_processes 1`) or `python`.
    """

    def __init__(self, configs_dir: str | os.PathLike = REPO_ROOT / "configs" / "train",
                 root: str | os.PathLike = REPO_ROOT, runs_dir: str | os.PathLike = "runs",
                 launcher: str = "accelerate"):
        self.configs_dir = Path(configs_dir)
        self.root = Path(root)
        self.runs_dir = Path(runs_dir)
        if launcher not in ("accelerate", "python"):
            raise TrainingError(f"launcher must be 'accelerate' or 'python', got {launcher!r}")
        self.launcher = launcher
        self.run: TrainingRun | None = None
        self._lock = threading.Lock()

    # ---- configs
    def configs(self) -> list[str]:
        """Config names (YAML stems) that a family's training script takes."""
        if not self.configs_dir.is_dir():
            return []
        return [p.stem for p in sorted(self.configs_dir.glob("*.yaml")) if self.entry_for(p.stem) is not None]

    def entry_for(self, config_name: str) -> tuple[Family, TrainingScript] | None:
        """The family and training entry a config runs: the first whose `configs` glob matches its file name."""
        return next(((fam, t) for fam in families() for t in fam.training
                     if fnmatch.fnmatch(f"{config_name}.yaml", t.configs)), None)

    def config_path(self, name: str) -> Path:
        path = self.configs_dir / f"{name}.yaml"
        if not path.is_file() or self.entry_for(name) is None:
            raise TrainingError(f"training config {name!r} not found; available: {', '.join(self.configs()) or 'none'}")
        return path

    def config_text(self, name: str) -> str:
        return self.config_path(name).read_text() if name else ""

    def data_key(self, config_name: str) -> str | None:
        """The config field the data folder fills (None: the config's script takes no data folder)."""
        entry = self.entry_for(config_name)
        return entry[1].data_key if entry else None

    # ---- lifecycle
    def start(self, config_name: str, data_dir: str = "", output_dir: str = "", max_steps: int | None = None,
              extra_args: str = "") -> TrainingRun:
        """Start a run in the background; raises `TrainingError` when one is running or the inputs are wrong."""
        with self._lock:
            if self.run is not None and self.run.running:
                raise TrainingError(f"a run is already going ({self.run.output_dir}); stop it first")
            config = self.config_path(config_name)
            fam, entry = self.entry_for(config_name)
            script = self.root / entry.script
            cmd_args = ["--config", str(config)]
            if data_dir:
                if entry.data_key is None:
                    raise TrainingError(f"config {config_name!r} runs {entry.script}, which takes no data folder; "
                                        "leave the data folder blank")
                if not Path(data_dir).is_dir():
                    raise TrainingError(f"data folder {data_dir!r} does not exist")
                cmd_args += [f"--{entry.data_key}", str(Path(data_dir).resolve())]
            out = Path(output_dir) if output_dir else self.runs_dir / f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            out = out.resolve()
            cmd_args += ["--output_dir", str(out)]
            if max_steps:
                cmd_args += ["--max_steps", str(int(max_steps))]
            try:
                cmd_args += shlex.split(extra_args or "")
            except ValueError as e:
                raise TrainingError(f"extra arguments: {e}") from None
            if self.launcher == "accelerate":
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *cmd_args]
            else:
                cmd = [sys.executable, str(script), *cmd_args]
            (out / "logs").mkdir(parents=True, exist_ok=True)
            log_path = out / "logs" / "console.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(log_path, "ab") as log:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            self.run = TrainingRun(config=config, family=fam, entry=entry, output_dir=out, command=cmd, process=proc,
                                   log_path=log_path, max_steps=int(max_steps) if max_steps else _config_steps(config))
            return self.run

    def stop(self, timeout: float = 15.0) -> str:
        """Stop the running run (SIGTERM to its process group, SIGKILL after `timeout`)."""
        run = self.run
        if run is None or not run.running:
            return "no run is going"
        run.stopped = True
        pgid = run.process.pid  # started with start_new_session: the launcher leads the group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        # the launcher exits at once on SIGTERM while the training process finishes its step and writes a
        # checkpoint (train/loop.py): "stopped" is true only when the whole group is gone
        if not _wait_group(pgid, run.process, timeout):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_group(pgid, run.process, 5.0)
        return f"stopped at step {self.last_step() or 0}"

    def add_to_models(self, models_dir: str | os.PathLike) -> str:
        """Copy the finished run's `final/` adapter into `models/<its family's weights folder>/<run name>`; returns
        its weights name (relative to `models_dir`). Refuses runs whose script makes no adapter (a recorder)."""
        run = self.run
        if run is None:
            raise TrainingError("no run yet: start one, and add its adapter when it has finished")
        if not run.entry.produces_adapter:
            raise TrainingError(f"{run.entry.script} does not make an adapter (its output feeds another training "
                                f"config of {run.family.label}); nothing to add")
        final = run.output_dir / "final"
        if not final.is_dir():
            raise TrainingError("the run has no final adapter yet (it is written when training finishes)")
        models_dir = Path(models_dir)
        keys = [w.key for w in run.family.weights]
        index = keys.index(run.entry.weights) if run.entry.weights in keys else 0
        dest = models_dir / weights_folder(run.family, index) / run.output_dir.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(final, dest)
        return dest.relative_to(models_dir).as_posix()

    # ---- what the run wrote
    def losses(self, output_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """The `loss.jsonl` records so far (a partly written last line is skipped)."""
        out = Path(output_dir) if output_dir else (self.run.output_dir if self.run else None)
        if out is None:
            return []
        path = out / "logs" / "loss.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec and "loss" in rec:
                rows.append(rec)
        return rows

    def last_step(self) -> int | None:
        rows = self.losses()
        return int(rows[-1]["step"]) if rows else None

    def latest_validation(self) -> Path | None:
        if self.run is None:
            return None
        vdir = self.run.output_dir / "validation"
        latest = vdir / "latest.png"
        if latest.is_file():
            return latest
        grids = sorted(vdir.glob("step-*.png")) if vdir.is_dir() else []
        return grids[-1] if grids else None

    def log_tail(self, n_chars: int = 4000) -> str:
        if self.run is None or not self.run.log_path.is_file():
            return ""
        with open(self.run.log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n_chars))
            text = fh.read().decode("utf-8", "replace")
        return text.replace("\r", "\n")

    def status(self) -> dict[str, Any]:
        run = self.run
        if run is None:
            return {"state": "idle"}
        rows = self.losses()
        rc = run.process.poll()
        state = "running" if rc is None else "stopped" if run.stopped else "finished" if rc == 0 else "failed"
        final = run.output_dir / "final"
        return {
            "state": state, "returncode": rc, "config": run.config.stem, "output_dir": str(run.output_dir),
            "step": int(rows[-1]["step"]) if rows else 0, "max_steps": run.max_steps,
            "loss": float(rows[-1]["loss"]) if rows else None, "elapsed_s": round(time.time() - run.started, 1),
            "final": str(final) if final.is_dir() else None,
        }


def _config_steps(config: Path) -> int | None:
    try:
        values = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return None
    steps = values.get("max_steps")
    return int(steps) if isinstance(steps, int) else None


def _wait_group(pgid: int, launcher: subprocess.Popen, timeout: float) -> bool:
    """Wait until every process of group `pgid` has exited (reaping the launcher); True when it emptied in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        launcher.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
