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
