"""AGD together with IP-Adapter on one UNet: one pass per step, both adapters acting, AGD neutral at init."""

import numpy as np
import torch
from PIL import Image

from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.ip_adapter import IPAdapter
from adapter_studio.pipelines.studio_pipeline import StudioPipeline


def _img(seed, size=40):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def _latents(sp, **kw):
    return sp(["a cat", "a dog"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
              output_type="latent", **kw).images


def test_agd_and_ip_adapter_compose_in_one_pass_per_step():
    sp = StudioPipeline.from_preset("tiny-sd15")
    pipe = sp.pipe
    torch.manual_seed(0)
    ip = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim, projection="base",
                            init_from_unet=False)
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0.0, 0.2)
    sp.add(ip, "ip", image=_img(1))
    cond_ip = _latents(sp, guidance="cfg", guidance_scale=1.0)  # IP, conditional only (no CFG)
    no_ip_slot = sp.stack["ip"]
    no_ip_slot.enabled = False
    cond_plain = _latents(sp, guidance="cfg", guidance_scale=1.0)
    no_ip_slot.enabled = True
    assert not torch.allclose(cond_ip, cond_plain, atol=1e-4), "the IP-Adapter acts"

    agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=16)
    sp.add(agd, "agd")
    calls = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append((a[0] if a else k["sample"]).shape[0]),
                                            with_kwargs=True)
    at_init = _latents(sp, guidance="agd", guidance_scale=7.0)
    assert calls == [2, 2, 2], "AGD + IP: one UNet pass per step on the conditional batch"
    assert torch.equal(at_init, cond_ip), "a fresh AGD adapter adds exactly nothing next to the IP-Adapter"

    with torch.no_grad():
        for blk in agd.blocks:
            blk.out_proj.weight.normal_(0.0, 0.2)
    both = _latents(sp, guidance="agd", guidance_scale=7.0)
    sp.stack["ip"].enabled = False
    agd_only = _latents(sp, guidance="agd", guidance_scale=7.0)
    h.remove()
    assert not torch.allclose(both, cond_ip, atol=1e-4), "the AGD adapter acts"
    assert not torch.allclose(both, agd_only, atol=1e-4), "the IP-Adapter still acts under AGD"
