"""Checks that need a GPU (run on a CUDA machine; on a machine without one they are skipped, as there is nothing to check)."""

import pytest
import torch

from dummy_adapters import LinearAttnAdapter
from adapter_studio import AdapterStack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stack_is_bit_identical_and_acts_in_half_precision(dtype):
    from adapter_studio.presets import load_pipeline

    unet = load_pipeline("tiny-sd15").unet.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g).to("cuda", dtype)
    text = torch.randn(2, 77, 32, generator=g).to("cuda", dtype)
    with torch.no_grad():
        ref = unet(x, 500, text).sample
        stack = AdapterStack().attach(unet)
        assert torch.equal(unet(x, 500, text).sample, ref)
        slot = stack.add(LinearAttnAdapter(unet).to("cuda", dtype), sample_mask=[True, False])
        out = unet(x, 500, text).sample
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out[0] - ref[0]).abs().max() > 1e-2
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
        slot.scale = 0.0
        assert torch.equal(unet(x, 500, text).sample, ref)
        stack.detach()
        assert torch.equal(unet(x, 500, text).sample, ref)


def test_training_step_under_autocast_keeps_base_frozen():
    from adapter_studio.presets import load_pipeline

    unet = load_pipeline("tiny-sd15").unet.to("cuda", torch.float16).requires_grad_(False)
    adapter = LinearAttnAdapter(unet).to("cuda")  # fp32 master weights, as in mixed-precision training
    stack = AdapterStack().attach(unet)
    stack.add(adapter)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    text = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = unet(x, torch.tensor([10, 900], device="cuda"), text).sample.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
    opt.step()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("sampler, compiled", [("DDIM", False), ("Euler", False), ("DDIM", True)],
                         ids=["DDIM-eager", "Euler-eager", "DDIM-compiled"])
def test_sampling_steps_after_the_first_do_not_synchronize(sampler, compiled):
    """The GPU form of tests/test_device_reads.py: torch's sync debug mode raises at any synchronising operation (a
    read of a device value, a blocking copy) in steps 1.. of a StudioPipeline call with IP-Adapter (step window,
    per-sample references) and AGD, then with CFG. Each is checked on its second call (a compiled graph records its
    CUDA graph on the first)."""
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import IPAdapter
    from adapter_studio.pipelines.studio_pipeline import StudioPipeline
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15").to("cuda", torch.float16)
    sp = StudioPipeline(pipe)
    d = pipe.image_encoder.config.projection_dim
    sp.add(IPAdapter.from_unet(pipe.unet, d, init_from_unet=False), "ip", start=0.2, end=0.8,
           image_embeds=torch.randn(2, 1, d))
    sp.add(AGDAdapter.from_unet(pipe.unet, hidden_dim=16), "agd")
    sp.set_sampler(sampler)
    if compiled:
        sp.compile()
    steps = 6

    def step_end(p, i, t, kw):  # on after step 0 is done, off after the last step
        torch.cuda.set_sync_debug_mode("error" if i + 1 < steps else "default")
        return kw

    try:
        for guidance in ("agd", "cfg"):
            sp.stack["agd"].enabled = guidance == "agd"
            for check in (False, True):
                out = sp(["a cat", "a dog"], num_inference_steps=steps, guidance=guidance, guidance_scale=5.0,
                         output_type="latent", callback_on_step_end=step_end if check else None,
                         adapter_inputs={"ip": {"sample_mask": [True, False]}})
                assert torch.isfinite(out.images).all()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch._dynamo.reset()


def test_compiled_ctrl_unit_equals_eager_on_the_gpu():
    from compile_helpers import compiled_ctrl_unit_equals_eager

    compiled_ctrl_unit_equals_eager("cuda", torch.float16, atol=5e-2)  # the control moves the latents by ~4
