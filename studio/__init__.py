"""Adapter Studio core: the composing adapter stack, mixes and model presets."""

from .adapter import AttentionAdapter, ResidualAdapter
from .context import CallInfo, ForwardContext
from .errors import CheckpointError, IncompatibleAdapterError, MixError, PresetError, StudioError
from .mix import Mix, UnitSpec, apply_mix
from .presets import available_presets, load_pipeline, load_preset
from .stack import AdapterStack, Slot, layer_scale

__all__ = [
    "AdapterStack", "AttentionAdapter", "CallInfo", "CheckpointError", "ForwardContext", "IncompatibleAdapterError",
    "Mix", "MixError", "PresetError", "ResidualAdapter", "Slot", "StudioError", "UnitSpec", "apply_mix",
    "available_presets", "layer_scale", "load_pipeline", "load_preset",
]
__version__ = "0.1.0"
