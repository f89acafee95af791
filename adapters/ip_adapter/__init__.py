"""IP-Adapter: image prompts through decoupled cross-attention (base, plus and full projections)."""

from .adapter import IPAdapter, cross_attention_layers
from .family import FAMILY
from .formats import load_ip_adapter, original_state_dict, save_original
from .projection import ImageProjModel, MLPProjModel, Resampler, build_projection

__all__ = ["FAMILY", "IPAdapter", "ImageProjModel", "MLPProjModel", "Resampler", "build_projection",
           "cross_attention_layers", "load_ip_adapter", "original_state_dict", "save_original"]
