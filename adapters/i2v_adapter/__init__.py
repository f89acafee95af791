"""I2V-Adapter: image-to-video through first-frame attention on every spatial self-attention of a video UNet."""

from .family import FAMILY
from .first_frame import encode_first_frame, frame_similarity_prior_latents, gaussian_blur
from .formats import adapter_from_state_dict, inspect_weights, load_i2v_adapter, original_state_dict, save_original
from .modeling_i2v_adapter import FirstFrameAttention, I2VAdapter, spatial_self_attention_layers

__all__ = ["FAMILY", "FirstFrameAttention", "I2VAdapter", "adapter_from_state_dict", "encode_first_frame",
           "frame_similarity_prior_latents", "gaussian_blur", "inspect_weights", "load_i2v_adapter",
           "original_state_dict", "save_original", "spatial_self_attention_layers"]
