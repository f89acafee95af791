"""Training configs: a dataclass per family, read from YAML with any field overridable on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from adapter_studio.errors import StudioError

C = TypeVar("C", bound="TrainConfig")


class ConfigError(StudioError):
    """A training config with an unknown key or a value of the wrong type."""


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
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 50
    checkpoints_total_limit: int | None = 3
    validation_steps: int = 0
    resume_from_checkpoint: str | None = "latest"
    report_to: str = "tensorboard"
    dataloader_num_workers: int = 0
    find_unused_parameters: bool = False

    def validate(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for key in ("max_steps", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine",
                                     "cosine_with_restarts", "polynomial"):
            raise ConfigError(f"lr_scheduler {self.lr_scheduler!r} is not a diffusers scheduler name")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert a YAML or CLI value against a dataclass field type (int, float, bool, str, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for a in args:
            try:
                return _coerce(name, a, value)
            except ConfigError:
                continue
        raise ConfigError(f"config field {name!r}: {value!r} is not a {tp}")
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
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field {name!r} takes a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config field {name!r} takes a string, got {value!r}")
        return str(value)
    return value  # lists / dicts: taken as YAML gives them


def _is_str_field(tp: Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args == [str]


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(names))}")
    cfg = cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})
    cfg.validate()
    return cfg


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """`--config file.yaml` plus `--field value` (or `--field=value`) overrides for any field of `cls`."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    parser.add_argument("--config", type=str, default=None, help="YAML file with config fields")
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name}", type=str, default=None, help=f"override {f.name} (default {f.default!r})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(loaded).__name__}")
        values.update(loaded)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            continue
        if _is_str_field(hints[f.name]) and raw.lower() not in ("none", "null"):
            values[f.name] = raw  # YAML would turn `--mixed_precision no` into False
        else:
            values[f.name] = yaml.safe_load(raw) if raw.strip() else raw
    return config_from_dict(cls, values)
