"""AGD: adapter guidance distillation — classifier-free guidance in ONE UNet pass per sampling step.

    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.pipelines.studio_pipeline import StudioPipeline

    sp = StudioPipeline.from_preset("tiny-sd15")
    sp.add(AGDAdapter.from_pretrained("runs/agd_tiny/final"), name="agd")
    image = sp("a red cube", guidance="agd", guidance_scale=5.0).images[0]
"""

from .family import AGD_FAMILY, FAMILY, agd_inputs_from_json, load_agd
from .modeling_agd import AGDAdapter, cross_attention_layers
from .upstream import adapter_from_upstream, adapter_to_upstream, load_upstream_into, read_upstream_file

__all__ = [
    "AGDAdapter", "AGD_FAMILY", "FAMILY", "adapter_from_upstream", "adapter_to_upstream", "agd_inputs_from_json",
    "cross_attention_layers", "load_agd", "load_upstream_into", "read_upstream_file",
]
