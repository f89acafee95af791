"""diffusers pipeline wrappers that run any adapter stack."""

from .studio_pipeline import StudioPipeline

__all__ = ["StudioPipeline"]
