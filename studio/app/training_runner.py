"""The Train tab's backend: one training run as a background process, and what it has written so far.

A run is `accelerate launch train/<family>.py --config configs/train/<name>.yaml --output_dir ... --<data key> ...`
(or plain `python`), started in its own process group so Stop ends the launcher and its workers together. The
shared training loop (`train/loop.py`) writes `output_dir/logs/loss.jsonl` (one JSON line per step) and
`output_dir/validation/latest.png`; the tab only reads those files, so it shows the same numbers the run logs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from studio.errors import StudioError

REPO_ROOT = Path(__file__).resolve().parents[2]
# keys a family's training config may use for its data folder, first found in the YAML wins
DATA_KEYS = ("data_dir", "train_data_dir", "data_root", "dataset_dir", "image_dir", "trajectories", "data")


class TrainingError(StudioError):
    """A training run that cannot start (unknown config, missing data folder, one already running)."""


@dataclass
class TrainingRun:
    config: Path
    script: Path
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
        scripts_dir: where the training scripts are (`train`); a config runs the script whose name's words are all
            in the config's name, the most words winning (`agd_tiny.yaml` -> `agd.py`,
            `agd_tiny_trajectories.yaml` -> `agd_trajectories.py`, `ip_adapter_tiny.yaml` -> `ip_adapter.py`).
        runs_dir: default parent of output folders.
        launcher: `accelerate` (`python -m accelerate.commands.launch --num_processes 1`) or `python`.
    """

    def __init__(self, configs_dir: str | os.PathLike = REPO_ROOT / "configs" / "train",
                 scripts_dir: str | os.PathLike = REPO_ROOT / "train", runs_dir: str | os.PathLike = "runs",
                 launcher: str = "accelerate"):
        self.configs_dir = Path(configs_dir)
        self.scripts_dir = Path(scripts_dir)
        self.runs_dir = Path(runs_dir)
        if launcher not in ("accelerate", "python"):
            raise TrainingError(f"launcher must be 'accelerate' or 'python', got {launcher!r}")
        self.launcher = launcher
        self.run: TrainingRun | None = None
        self._lock = threading.Lock()

    # ---- configs
    def configs(self) -> list[str]:
        """Config names (YAML stems) that have a training script."""
        if not self.configs_dir.is_dir():
            return []
        return [p.stem for p in sorted(self.configs_dir.glob("*.yaml")) if self._script_for(p.stem) is not None]

    def _script_for(self, config_name: str) -> Path | None:
        words = set(re.split(r"[-_.]", config_name))
        best, best_n = None, 0
        for p in sorted(self.scripts_dir.glob("*.py")):
            if p.stem in ("__init__", "loop", "config"):
                continue
            need = set(p.stem.split("_"))
            if need <= words and len(need) > best_n:
                best, best_n = p, len(need)
        return best

    def config_path(self, name: str) -> Path:
        path = self.configs_dir / f"{name}.yaml"
        if not path.is_file():
            raise TrainingError(f"training config {name!r} not found; available: {', '.join(self.configs()) or 'none'}")
        return path

    def config_text(self, name: str) -> str:
        return self.config_path(name).read_text() if name else ""

    def data_key(self, config: Path) -> str:
        try:
            values = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainingError(f"{config.name} is not valid YAML: {e}") from None
        return next((k for k in DATA_KEYS if k in values), DATA_KEYS[0])

    # ---- lifecycle
    def start(self, config_name: str, data_dir: str = "", output_dir: str = "", max_steps: int | None = None,
              extra_args: str = "") -> TrainingRun:
        """Start a run in the background; raises `TrainingError` when one is running or the inputs are wrong."""
        with self._lock:
            if self.run is not None and self.run.running:
                raise TrainingError(f"a run is already going ({self.run.output_dir}); stop it first")
            config = self.config_path(config_name)
            script = self._script_for(config_name)
            if script is None:
                raise TrainingError(f"no training script in {self.scripts_dir} matches config {config_name!r}")
            cmd_args = ["--config", str(config)]
            if data_dir:
                if not Path(data_dir).is_dir():
                    raise TrainingError(f"data folder {data_dir!r} does not exist")
                cmd_args += [f"--{self.data_key(config)}", str(Path(data_dir).resolve())]
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
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *cmd_args]
            else:
                cmd = [sys.executable, str(script), *cmd_args]
            (out / "logs").mkdir(parents=True, exist_ok=True)
            log_path = out / "logs" / "console.log"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   "PYTHONUNBUFFERED": "1"}
            with open(log_path, "ab") as log:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            self.run = TrainingRun(config=config, script=script, output_dir=out, command=cmd, process=proc,
                                   log_path=log_path, max_steps=int(max_steps) if max_steps else _config_steps(config))
            return self.run

    def stop(self, timeout: float = 15.0) -> str:
        """Stop the running run (SIGTERM to its process group, SIGKILL after `timeout`)."""
        run = self.run
        if run is None or not run.running:
            return "no run is going"
        run.stopped = True
        try:
            os.killpg(run.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            run.process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(run.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            run.process.wait(5)
        return f"stopped at step {self.last_step() or 0}"

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
