"""Adapter Studio: adapters of any family composed on one frozen diffusers UNet.

This package is the core (the folder `studio/` of the checkout): the adapter stack and its composing attention
processor, the family contract and registry, mixes, samplers and model presets. It knows no family and no UI:
families live in `adapter_studio.adapters.*`, the diffusers pipeline wrapper in `adapter_studio.pipelines`, the
shared training loop in `adapter_studio.train`, the Gradio studio in `adapter_studio.webapp`.
"""

from .adapter import AttentionAdapter, ResidualAdapter, StudioAdapter
from .block_scale import layer_scale
from .context import CallInfo, ForwardContext, UNetCall
from .errors import CheckpointError, IncompatibleAdapterError, MixError, PresetError, StudioError
from .family import Family, Field, TrainingScript, WeightsFile
from .mix import Mix, Sampling, UnitSpec, apply_mix
from .presets import available_presets, load_pipeline, load_preset
from .registry import families, get_family, register_family
from .stack import AdapterStack, Slot

__all__ = [
    "AdapterStack", "AttentionAdapter", "CallInfo", "CheckpointError", "Family", "Field", "ForwardContext",
    "IncompatibleAdapterError", "Mix", "MixError", "PresetError", "ResidualAdapter", "Sampling", "Slot",
    "StudioAdapter", "StudioError", "TrainingScript", "UNetCall", "UnitSpec", "WeightsFile", "apply_mix",
    "available_presets", "families", "get_family", "layer_scale", "load_pipeline", "load_preset", "register_family",
]
__version__ = "0.1.0"
