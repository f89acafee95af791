"""diffusers pipeline wrappers that run any adapter stack."""

from .image_to_video import ImageToVideoPipeline, export_video
from .studio_pipeline import StudioPipeline

__all__ = ["ImageToVideoPipeline", "StudioPipeline", "export_video"]
