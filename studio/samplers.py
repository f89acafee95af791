"""The one sampler table: a mix's sampler name -> the diffusers scheduler that runs it."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import MixError

# name -> (diffusers scheduler class, config overrides); names as the A1111/Forge UIs say them
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """The scheduler of sampler `name`, built from the model's own scheduler config (betas, prediction type, ...)."""
    import diffusers

    if name not in SAMPLERS:
        raise MixError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config({**dict(base_config), **extra})
