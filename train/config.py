"""Training configs: a dataclass per family, read from YAML with any field overridable on the command line.

Every way a config can be wrong (a YAML file that does not parse, an unknown key or option, a value of the wrong
type or range, a tracker that is not installed) raises `ConfigError`, one line naming the file / line / field and
what would fit; the training entry points print it without a traceback (`adapter_studio.train.loop.run_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from adapter_studio.errors import StudioError

C = TypeVar("C", bound="TrainConfig")


class ConfigError(StudioError):
    """A training config with an unknown key or a value of the wrong type."""


class DataError(ConfigError):
    """Training data that cannot be read: a malformed metadata line, a missing or unreadable image."""


class TrainingError(StudioError):
    """A run that cannot start or go on for a reason the user can fix: the output folder holds another run or is
    in use, the disk is full."""


#: `report_to` values and the package each needs (accelerate's tracker names); tensorboard falls back to none
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
            "clearml": "clearml", "dvclive": "dvclive", "aim": "aim"}
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    """Fields every training run has; a family subclasses it with its own (data paths, adapter options)."""

    output_dir: str = "runs/run"
    model: str = "tiny-sd15"
    seed: int = 0
    max_steps: int = 100
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 10
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None  # None: what `accelerate launch --mixed_precision` says, else "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 50
    checkpoints_total_limit: int | None = 3
    validation_steps: int = 0
    resume_from_checkpoint: str | None = "latest"
    overwrite_output_dir: bool = False
    report_to: str = "tensorboard"
    dataloader_num_workers: int = 0
    find_unused_parameters: bool = False

    #: Fields a resumed run may change: they say how long to run, how often to save or look, and where to log, not
    #: what is learned. Every other field is part of the run's identity (`identity`, `config_hash`): an output
    #: folder holding a run with another identity is refused. A family adds its own (validation inputs, caches).
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({
        "output_dir", "max_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
        "resume_from_checkpoint", "overwrite_output_dir", "report_to", "dataloader_num_workers",
        "gradient_checkpointing", "find_unused_parameters"})

    def validate(self) -> None:
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for key in ("max_steps", "train_batch_size", "gradient_accumulation_steps"):
            _at_least(key, getattr(self, key), 1)
        # 0 is refused rather than meaning "never": the loop always checkpoints the last step, so a value >= max_steps
        # already says "only at the end", and Ctrl-C / SIGTERM still save where the run stopped
        _at_least("checkpointing_steps", self.checkpointing_steps, 1,
                  "; to checkpoint only at the last step give a value >= max_steps")
        for key in ("lr_warmup_steps", "validation_steps", "dataloader_num_workers"):
            _at_least(key, getattr(self, key), 0)
        if self.checkpoints_total_limit is not None:
            _at_least("checkpoints_total_limit", self.checkpoints_total_limit, 1, " (or none: keep every checkpoint)")
        if not 0 <= self.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        for key in ("weight_decay", "adam_epsilon", "max_grad_norm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler {self.lr_scheduler!r} is not a diffusers scheduler name; use one of "
                              f"{', '.join(LR_SCHEDULERS)}")
        if not self.output_dir or not self.output_dir.strip():
            raise ConfigError("output_dir is empty")
        self._check_tracker()

    def _check_tracker(self) -> None:
        """Refuse up front a tracker whose package is missing (tensorboard, the default, falls back to none)."""
        if self.report_to in ("none", "tensorboard"):
            return
        package = TRACKERS.get(self.report_to)
        if package is None:
            raise ConfigError(f"report_to must be none or one of {', '.join(TRACKERS)}, got {self.report_to!r}")
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to {self.report_to}: the {package} package is not installed (pip install "
                              f"{package}), or use --report_to tensorboard / none")

    def values(self) -> dict[str, Any]:
        """Every field as a JSON-able dict (what `output_dir/config.json` records)."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run learns (all but `RESUMABLE`)."""
        return {k: v for k, v in self.values().items() if k not in self.RESUMABLE}


def config_hash(identity: dict[str, Any], task: str) -> str:
    """A short, stable hash of a run's identity and task name (recorded in `config.json`)."""
    blob = json.dumps({"task": task, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _at_least(key: str, value: int, low: int, hint: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}{hint}")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert a YAML or CLI value against a dataclass field type (int, float, bool, str, list[X], Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config field {name!r}: {value!r} is not a {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field {name!r} takes true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config field {name!r} takes an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config field {name!r} takes an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config field {name!r} takes a number, got {value!r}")
        try:
            return float(value)
        except (OverflowError, ValueError):
            raise ConfigError(f"config field {name!r} takes a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML reads no / yes / on / off as booleans
            raise ConfigError(f"config field {name!r} takes a string, got the boolean {value!r}: quote it in the "
                              "YAML file ('no')")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config field {name!r} takes a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):  # from the command line: `--validation_prompts "[a cat, a dog]"` is YAML
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, list):
            raise ConfigError(f"config field {name!r} takes a list (on the command line as YAML: \"[a, b]\"), "
                              f"got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return value if item is Any else [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    return value


def _is_str_field(tp: Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args == [str]


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(map(str, unknown))} for {cls.__name__}; valid keys: "
                          f"{', '.join(sorted(names))}")
    cfg = cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})
    cfg.validate()
    return cfg


def load_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping of fields; every way it can be wrong is a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {path}{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{what} {path}: nested too deeply") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of fields (key: value lines), got "
                          f"{type(loaded).__name__}")
    return loaded


class _Parser(argparse.ArgumentParser):
    """argparse that raises `ConfigError` instead of printing usage and exiting (unknown or incomplete options)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"command line: {message} (every config field is an option: --field value)")


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """`--config file.yaml` plus `--field value` (or `--field=value`) overrides for any field of `cls`.

    Which fields came from the command line is kept in `cfg.cli_fields` (a family may act on it: IP-Adapter writes
    demo data only into a `data_dir` given where `make_demo_data` was given).
    """
    # no abbreviations: a typo'd prefix such as --learning 3 must not silently set a field
    parser = _Parser(description=cls.__doc__, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file with config fields")
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name}", type=str, default=None, help=f"override {f.name} (default {f.default!r})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_yaml_mapping(args.config))
    hints = typing.get_type_hints(cls)
    cli: set[str] = set()
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            continue
        cli.add(f.name)
        if _is_str_field(hints[f.name]) and raw.lower() not in ("none", "null"):
            values[f.name] = raw  # YAML would turn `--mixed_precision no` into False
            continue
        try:
            values[f.name] = yaml.safe_load(raw) if raw.strip() else raw
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"--{f.name} {raw!r} is not a valid value (YAML)") from None
    cfg = config_from_dict(cls, values)
    cfg.cli_fields = frozenset(cli)  # not a dataclass field: neither recorded nor hashed
    return cfg
