"""Compiled mode (`AdapterStack.compile`) with the Ctrl-Adapter and I2V-Adapter families, alone and next to IP-Adapter
/ AGD (tests/test_compiled.py covers IP-Adapter and AGD alone).

As there: a counting backend over "aot_eager", `fullgraph=True` (any graph break fails), compiled = eager to atol 1e-5,
tiny preset models with 8x8 latents. Every "a change acts" check asks for a difference far above that tolerance, so a
compiled graph that kept a stale value would fail the equality with eager.

* Ctrl-Adapter: its residuals are computed in the stack's pre-hook, by the ControlNet and the Ctrl-Adapter compiled
  as graphs of their own (`ForwardContext.compile_part`), and enter the compiled UNet as
  `down_block_additional_residuals` / `mid_block_additional_residual`. Their values (scale, per-block scale, control
  image, conditioning scale, per-sample mask) never recompile; out of its window or at scale 0 the stack hands the
  UNet zero residuals of the same shapes (`ResidualAdapter.zero_residuals`), so that does not recompile either;
  `enabled=False` removes it from the mix, the residual-free structure (diffusers branches on `None`), compiled once.
* I2V-Adapter: an attention adapter on attn1 of the video UNet (its gate repeated over frames); its first frame enters
  as the pinned frame 0 of the UNet's input (pre-hook, eager), so a new first frame is new input values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adapter_studio import AdapterStack
from compile_helpers import (CountingBackend, compiled_ctrl_unit_equals_eager, eager_path, fresh_dynamo,
                             tiny_ctrl_parts)
from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.ctrl_adapter import CtrlAdapter, CtrlAdapterModel
from adapter_studio.adapters.i2v_adapter import I2VAdapter
from adapter_studio.adapters.ip_adapter import IPAdapter
from adapter_studio.presets import load_pipeline

ATOL = 1e-5  # compiled (aot_eager) against eager, as tests/test_compiled.py
ACTS = 1e-4  # the least difference a change must make (10x the tolerance)
FRAMES = 3


def _img(seed: int) -> Image.Image:
    """A 64 px control image: the size 8x8 latents decode to (no resizing)."""
    return Image.fromarray((np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield from fresh_dynamo()


@pytest.fixture(scope="module")
def sd15():
    pipe = load_pipeline("tiny-sd15")
    g = torch.Generator().manual_seed(0)
    cn, model = tiny_ctrl_parts(pipe.unet, g)
    ip = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim, init_from_unet=False)
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0.0, 0.2, generator=g)
    data = dict(x=torch.randn(2, 4, 8, 8, generator=g), text=torch.randn(2, 77, 32, generator=g),
                emb=torch.randn(2, 1, pipe.image_encoder.config.projection_dim, generator=g))
    return pipe.unet, CtrlAdapter(cn, model), ip, data


@pytest.fixture(scope="module")
def video():
    unet = load_pipeline("tiny-video").unet
    g = torch.Generator().manual_seed(0)
    i2v = I2VAdapter.from_unet(unet)
    agd = AGDAdapter.from_unet(unet, hidden_dim=16)
    with torch.no_grad():
        for p in i2v.parameters():  # a fresh I2V-Adapter adds zero (to_out_ff): random weights stand for trained ones
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for b in agd.blocks:
            b.out_proj.weight.normal_(0.0, 0.2, generator=g)
    data = dict(x=torch.randn(2, 4, FRAMES, 8, 8, generator=g),
                text=torch.randn(2, 77, 32, generator=g).repeat_interleave(FRAMES, dim=0),
                first=torch.randn(2, 4, 8, 8, generator=g))
    return unet, i2v, agd, data


def _run(unet, data, t):
    with torch.no_grad():
        return unet(data["x"], torch.tensor(t), data["text"]).sample


def _compiled_and_eager(stack, data, t):
    """This forward compiled and eager; asserts they agree."""
    out = _run(stack.unet, data, t)
    with eager_path(stack):
        ref = _run(stack.unet, data, t)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    return out


def _check_changes(stack, data, t, changes, backend, graphs=1):
    """Each change in turn: compiled = eager, the output moves by more than ACTS, no recompilation (`graphs`: the
    UNet's, and those of what an adapter runs outside it)."""
    prev = _compiled_and_eager(stack, data, t)
    assert backend.graphs == graphs, "one graph each, no break"
    for name, change in changes:
        change()
        out = _compiled_and_eager(stack, data, t)
        assert (out - prev).abs().max() > ACTS, f"{name}: the change acts"
        assert backend.graphs == graphs, f"{name}: recompiled ({backend.graphs} graphs)"
        prev = out
    return prev


def _each_acts_next_to_the_other(stack, data, t, both, names):
    """Switching either adapter off (on the eager path: no recompilation) moves the output of the two together."""
    with eager_path(stack):
        for name in names:
            stack[name].enabled = False
            assert (_run(stack.unet, data, t) - both).abs().max() > 1e-2, f"{name} acts next to the other"
            stack[name].enabled = True


# ------------------------------------------------------------------------------------------------- Ctrl-Adapter
def test_ctrl_adapter_compiled_equals_eager_and_values_window_and_scale_do_not_recompile(sd15):
    unet, ctrl, _, data = sd15
    t = 500  # progress 0.5 outside a sampling call
    bare = _run(unet, data, t)
    stack = AdapterStack().attach(unet)
    slot = stack.add(ctrl, "ctrl", image=_img(1))
    try:
        backend = CountingBackend()
        stack.compile(backend=backend, fullgraph=True)
        on = _check_changes(stack, data, t, [
            ("scale", lambda: setattr(slot, "scale", 0.4)),
            ("per-block scale", lambda: setattr(slot, "scale", {"down": {"block_0": 1.0, "block_1": 0.5}, "mid": 1.5})),
            ("control image", lambda: slot.inputs.update(image=_img(2))),  # same size, another image
            ("conditioning scale", lambda: slot.inputs.update(conditioning_scale=0.5)),
            ("sample mask", lambda: setattr(slot, "sample_mask", [True, False])),
        ], backend, graphs=3)  # the UNet, the ControlNet, the Ctrl-Adapter: each compiled, none recompiled
        assert (on - bare).abs().max() > 1e-2, "the control acts"
        # a condition switched off inside the unit (conditioning scale 0) gives zero residuals: still the same graph
        slot.inputs.update(conditioning_scale=0.0)
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), bare, rtol=0, atol=ATOL)
        assert backend.graphs == 3, "zero residuals: no recompilation"
        slot.inputs.update(conditioning_scale=0.5)

        # out of its window or at scale 0 it adds nothing: compiled mode hands the UNet zero residuals of the same
        # shapes (`zero_residuals`), so the graph keeps its inputs and nothing recompiles
        slot.set_window(0.0, 0.2)
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), bare, rtol=0, atol=ATOL)
        assert backend.graphs == 3, "leaving the window: zero residuals, the same graph"
        slot.set_window(0.0, 1.0)
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), on, rtol=0, atol=ATOL)
        slot.scale = 0.0
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), bare, rtol=0, atol=ATOL)
        assert backend.graphs == 3, "scale 0: zero residuals, the same graph"
        # disabling removes the adapter from the mix (a structural change, as for every family): the residual-free
        # UNet, compiled once
        slot.scale, slot.enabled = 1.0, False
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), bare, rtol=0, atol=ATOL)
        slot.enabled = True
        controlled = _compiled_and_eager(stack, data, t)
        assert (controlled - bare).abs().max() > 1e-2
        assert backend.graphs == 4, f"{backend.graphs} graphs: the UNet with residuals and without (disabled)"
        # latent skipping hooks the ControlNet's conv_in: the compiled ControlNet must see the hook come and go
        slot.inputs.update(skip_latents=True)
        assert (_compiled_and_eager(stack, data, t) - controlled).abs().max() > ACTS, "latent skipping acts"
        slot.inputs.update(skip_latents=False)
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), controlled, rtol=0, atol=ATOL)
        inputs, mask = dict(slot.inputs), slot.sample_mask
        stack.remove("ctrl")
        assert not stack._parts, "a removed unit's compiled ControlNet and adapter are not kept"
        # the studio's pool clears a pipeline's stack after every call: the same unit added again compiles nothing
        graphs = backend.graphs
        stack.add(ctrl, "ctrl", sample_mask=mask, **inputs)
        torch.testing.assert_close(_compiled_and_eager(stack, data, t), controlled, rtol=0, atol=ATOL)
        assert backend.graphs == graphs, "added again: no recompilation"
    finally:
        stack.detach()


def test_ctrl_adapter_and_ip_adapter_together_compiled_equals_eager(sd15):
    unet, ctrl, ip, data = sd15
    t = 500
    stack = AdapterStack().attach(unet)
    stack.add(ctrl, "ctrl", image=_img(1))
    ip_slot = stack.add(ip, "ip", image_embeds=data["emb"][:1])
    try:
        backend = CountingBackend()
        stack.compile(backend=backend, fullgraph=True)
        both = _check_changes(stack, data, t, [
            ("ip scale", lambda: setattr(ip_slot, "scale", 0.5)),
            ("ip reference", lambda: ip_slot.inputs.update(image_embeds=data["emb"][1:])),
            ("ctrl scale", lambda: setattr(stack["ctrl"], "scale", 0.6)),
            ("control image", lambda: stack["ctrl"].inputs.update(image=_img(3))),
        ], backend, graphs=3)
        _each_acts_next_to_the_other(stack, data, t, both, ("ctrl", "ip"))
        assert backend.graphs == 3
    finally:
        stack.detach()


def test_temporal_ctrl_adapter_on_the_video_unet_compiled_equals_eager(sd15, video):
    """A Ctrl-Adapter made for the AnimateDiff UNet (its temporal layers: a graph of its own beside the ControlNet's)
    with one control image per frame."""
    cn = sd15[1].controlnets[0]
    unet, _, _, data = video
    torch.manual_seed(0)
    model = CtrlAdapterModel.for_models(cn, unet, num_blocks=1, num_attention_heads=4, attention_head_dim=8).eval()
    assert model.temporal
    t = 500
    bare = _run(unet, data, t)
    stack = AdapterStack().attach(unet)
    slot = stack.add(CtrlAdapter(cn, model), "ctrl", image=[_img(i) for i in range(FRAMES)])
    try:
        backend = CountingBackend()
        stack.compile(backend=backend, fullgraph=True)
        on = _check_changes(stack, data, t, [
            ("scale", lambda: setattr(slot, "scale", 0.5)),
            ("control frames", lambda: slot.inputs.update(image=[_img(i + 5) for i in range(FRAMES)])),
            ("conditioning scale", lambda: slot.inputs.update(conditioning_scale=0.6)),
        ], backend, graphs=3)
        assert (on - bare).abs().max() > 1e-2, "the control acts"
    finally:
        stack.detach()


# ------------------------------------------------------------------------------------------------- I2V-Adapter
def test_i2v_adapter_compiled_equals_eager_and_values_do_not_recompile(video):
    unet, i2v, _, data = video
    t = 400  # progress 0.6
    bare = _run(unet, data, t)
    stack = AdapterStack().attach(unet)
    slot = stack.add(i2v, "i2v", image_latents=data["first"][:1])
    try:
        backend = CountingBackend()
        stack.compile(backend=backend, fullgraph=True)
        assert (_run(unet, data, t) - bare).abs().max() > 1e-2, "the adapter acts"
        _check_changes(stack, data, t, [
            ("scale", lambda: setattr(slot, "scale", 0.4)),
            ("per-block scale", lambda: setattr(slot, "scale", {"down": 1.0, "up": 0.5})),
            ("first frame", lambda: slot.inputs.update(image_latents=data["first"][1:])),
            ("a first frame per sample", lambda: slot.inputs.update(image_latents=data["first"])),
            ("sample mask", lambda: setattr(slot, "sample_mask", [False, True])),
            ("out of the window", lambda: slot.set_window(0.0, 0.5)),
            ("back in the window", lambda: slot.set_window(0.5, 1.0)),
        ], backend)
        slot.set_window(0.0, 0.5)  # off: no branch and no pinned frame 0, in both modes
        torch.testing.assert_close(_run(unet, data, t), bare, rtol=0, atol=ATOL)
        assert backend.graphs == 1
    finally:
        stack.detach()


def test_i2v_adapter_and_agd_together_compiled_equals_eager(video):
    unet, i2v, agd, data = video
    t = 400
    stack = AdapterStack().attach(unet)
    i2v_slot = stack.add(i2v, "i2v", image_latents=data["first"][:1])
    agd_slot = stack.add(agd, "agd", guidance_scale=5.0)
    try:
        backend = CountingBackend()
        stack.compile(backend=backend, fullgraph=True)
        both = _check_changes(stack, data, t, [
            ("agd w", lambda: agd_slot.inputs.update(guidance_scale=2.0)),
            ("first frame", lambda: i2v_slot.inputs.update(image_latents=data["first"][1:])),
            ("i2v scale", lambda: setattr(i2v_slot, "scale", 0.5)),
        ], backend)
        _each_acts_next_to_the_other(stack, data, t, both, ("i2v", "agd"))
        assert backend.graphs == 1
    finally:
        stack.detach()


def test_compiled_ctrl_unit_through_the_pipeline_equals_eager():
    """The CUDA check of tests/test_cuda.py (a Ctrl unit compiled through StudioPipeline), run on the CPU in fp32."""
    compiled_ctrl_unit_equals_eager("cpu", torch.float32, atol=1e-4, backend="aot_eager")
