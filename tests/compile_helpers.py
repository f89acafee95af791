"""Shared pieces of the compiled-mode tests: a graph-counting backend, a fresh dynamo per test, the eager path, a
tiny Ctrl unit and the compiled-vs-eager check of it that tests/test_cuda.py runs on a GPU."""

import contextlib

import torch
from torch._dynamo.backends.registry import lookup_backend


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (one per compile or recompile)."""

    def __init__(self, inner: str = "aot_eager"):
        self.inner = lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def fresh_dynamo():
    """A fixture's body: the test starts and ends with no compiled code cached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def eager_path(stack):
    """The plain eager path of the same stack (compiled forward and static gates off), then back to compiled."""
    unet, fn = stack.unet, stack.unet.__dict__.pop("forward")
    stack.static = False
    try:
        yield
    finally:
        stack.static = True
        unet.forward = fn


def tiny_ctrl_parts(unet, g: torch.Generator) -> tuple:
    """`(ControlNet, Ctrl-Adapter)`: the tiny ControlNet with weights (from `g`) in its zero-initialised convs, else it
    adds zeros, and a stronger hint embedding (with std 0.1 another control image moves the output by only ~1e-4);
    a one-block Ctrl-Adapter from it to `unet`."""
    from adapter_studio.adapters.ctrl_adapter import CtrlAdapterModel
    from adapter_studio.presets import build_tiny_controlnet

    cn = build_tiny_controlnet(0)
    with torch.no_grad():
        for p in cn.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.1, generator=g)
        cn.controlnet_cond_embedding.conv_out.weight.normal_(0.0, 1.0, generator=g)
    torch.manual_seed(0)
    model = CtrlAdapterModel.for_models(cn.eval(), unet, num_blocks=1, num_attention_heads=4, attention_head_dim=8)
    return cn, model.eval()


def compiled_ctrl_unit_equals_eager(device: str, dtype: torch.dtype, atol: float, **compile_options) -> None:
    """A Ctrl unit (ControlNet + Ctrl-Adapter) through `StudioPipeline`, eager then compiled (on CUDA: the UNet as a
    CUDA graph, the ControlNet and the adapter compiled beside it). Two compiled calls (the second replays what the
    first recorded) equal the eager call within `atol`, with a control that moves the latents by far more; on CUDA
    the second call's steps after the first do not synchronise. Run by tests/test_cuda.py,
    and on the CPU by tests/test_compiled_families.py."""
    import numpy as np
    from PIL import Image

    from adapter_studio.adapters.ctrl_adapter import CtrlAdapter
    from adapter_studio.pipelines.studio_pipeline import StudioPipeline
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    cn, model = tiny_ctrl_parts(pipe.unet, torch.Generator().manual_seed(0))
    pipe.to(device, dtype)
    sp = StudioPipeline(pipe)
    image = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))
    sp.add(CtrlAdapter(cn, model).to(device, dtype), "ctrl", image=image, conditioning_scale=0.8)
    steps = 4

    def run(check: bool = False) -> torch.Tensor:
        def step_end(p, i, t, kw):  # on after step 0 is done, off after the last step
            torch.cuda.set_sync_debug_mode("error" if i + 1 < steps else "default")
            return kw

        return sp(["a cat", "a dog"], num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0),
                  callback_on_step_end=step_end if check and device == "cuda" else None).images.float()

    sp.stack["ctrl"].enabled = False
    bare = run()
    sp.stack["ctrl"].enabled = True
    ref = run()
    assert (ref - bare).abs().max() > 20 * atol, "the control acts"
    sp.compile(**compile_options)
    try:
        for check in (False, True):
            torch.testing.assert_close(run(check), ref, rtol=0, atol=atol)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        sp.stack.uncompile()
        torch._dynamo.reset()

