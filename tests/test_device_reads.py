"""A sampling call never waits for the device between its steps.

A read of a device value (`.item()`, `bool()`, indexing a host table with a device tensor) or a blocking host-to-device
copy makes the CPU wait for every queued GPU kernel: it cannot queue step k+1 while step k runs. No GPU is needed to
find them: the whole pipeline runs on PyTorch's `meta` device, whose tensors have shapes but no values, so any read
of a device value raises; a dispatch mode records the host-to-device copies and the step they happen in.
diffusers' DDIM and PNDM index their host tables with the step's timestep, which its pipelines keep on the UNet's
device; `StudioPipeline` keeps the timesteps on the host (`_timesteps_on_host`).
"""

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.ip_adapter import IPAdapter
from adapter_studio.pipelines import studio_pipeline
from adapter_studio.pipelines.studio_pipeline import StudioPipeline
from adapter_studio.samplers import SAMPLERS


class HostToDevice(TorchDispatchMode):
    """Records `(step, shape)` of every blocking copy from the host to the `meta` device (a non-blocking one, from
    pinned memory on a GPU, does not wait); `step` is set by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.copies: list[tuple[int, tuple[int, ...]]] = []

    def step_end(self, pipe, i, t, kw):
        """A pipeline's `callback_on_step_end`: copies from here on belong to step `i + 1`."""
        self.step = i + 1
        return kw

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default:
            src, non_blocking = args[0], kwargs.get("non_blocking", False)
        elif func is torch.ops.aten.copy_.default:
            src, non_blocking = args[1], args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        else:
            return out
        if src.device.type == "cpu" and out.device.type == "meta" and not non_blocking:
            self.copies.append((self.step, tuple(src.shape)))
        return out


@pytest.fixture(scope="module")
def meta_studio():
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    sp = StudioPipeline(pipe)
    d = pipe.image_encoder.config.projection_dim
    ip = IPAdapter.from_unet(pipe.unet, d, init_from_unet=False)
    agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=16)
    sp.add(ip, "ip", start=0.2, end=0.8, image_embeds=torch.zeros(2, 1, d))  # a window and per-sample references
    sp.add(agd, "agd")
    pipe.to("meta")
    ip.to("meta")
    agd.to("meta")
    return sp


def _call(sp, guidance, traffic):
    sp.stack["agd"].enabled = guidance == "agd"
    emb = torch.zeros(2, 77, 32, device="meta")

    with traffic:
        out = sp(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=4, output_type="latent",
                 guidance=guidance, guidance_scale=5.0, callback_on_step_end=getattr(traffic, "step_end", None),
                 adapter_inputs={"ip": {"sample_mask": [True, False]}})
    return out.images


UNIPC = pytest.param("UniPC", marks=pytest.mark.xfail(
    strict=True, reason="diffusers' UniPC copies its host sigmas to the device in every step (its own code)"))


@pytest.mark.parametrize("sampler", [s if s != "UniPC" else UNIPC for s in SAMPLERS])
@pytest.mark.parametrize("guidance", ["agd", "cfg"])
def test_studio_sampling_reads_nothing_from_the_device(meta_studio, sampler, guidance):
    meta_studio.set_sampler(sampler)
    traffic = HostToDevice()
    latents = _call(meta_studio, guidance, traffic)  # raises at the first read of a device value
    assert latents.device.type == "meta" and latents.shape == (2, 4, 16, 16)
    assert traffic.copies and all(step == 0 for step, _ in traffic.copies), (
        f"blocking host-to-device copies after the first step (each waits for the device): {traffic.copies}")


@pytest.mark.parametrize("sampler", ["DDIM", "PNDM"])
def test_timesteps_on_the_device_make_ddim_and_pndm_read_it_every_step(meta_studio, sampler, monkeypatch):
    monkeypatch.setattr(studio_pipeline, "_timesteps_on_host", lambda scheduler: contextlib.nullcontext())
    meta_studio.set_sampler(sampler)
    with pytest.raises(RuntimeError, match="meta tensor"):
        _call(meta_studio, "cfg", HostToDevice())


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_host_timesteps_give_the_images_of_plain_diffusers(sd15_pipe, sampler):
    from adapter_studio.samplers import make_scheduler

    sd15_pipe.scheduler = make_scheduler(sampler, sd15_pipe.scheduler.config)

    def gen(p):
        return p("a cat", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                 output_type="np").images

    ref = gen(sd15_pipe)
    studio = StudioPipeline(sd15_pipe)
    ours = gen(studio)
    assert np.array_equal(ours, ref)
    assert "set_timesteps" not in vars(sd15_pipe.scheduler), "the scheduler is given back as it was"


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_compiled_sampling_reads_nothing_from_the_device(meta_studio, sampler):
    """Compiled mode's pre-hook (gates and states as device tensors) reads nothing back either. Dynamo runs with
    meta tensors; a dispatch mode cannot run under it, so only reads are checked here (its copies are the same
    `host_to_device` ones the eager test counts)."""
    meta_studio.set_sampler(sampler)
    meta_studio.compile(backend="eager", fullgraph=True)
    try:
        for guidance in ("agd", "cfg"):
            latents = _call(meta_studio, guidance, contextlib.nullcontext())
            assert latents.device.type == "meta"
    finally:
        meta_studio.stack.uncompile()
        torch._dynamo.reset()


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_image_to_video_sampling_reads_nothing_from_the_device(guidance_scale):
    """I2V-Adapter pins frame 0 before every UNet forward and after every scheduler step; the pins' per-sample rows
    used to be copied to the device with a blocking copy, twice a step. (DDIM: the sigma samplers' `add_noise`, which
    the Frame Similarity Prior calls once at the start, reads the device once per call in diffusers' own code.)"""
    from PIL import Image

    from adapter_studio.adapters.i2v_adapter import I2VAdapter
    from adapter_studio.presets import load_pipeline

    sp = StudioPipeline(load_pipeline("tiny-video"))
    sp.pipe.set_progress_bar_config(disable=True)
    i2v = I2VAdapter.from_unet(sp.pipe.unet)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    sp.add(i2v, "i2v", image=image)
    sp.pipe.to("meta")
    i2v.to("meta")
    sp.set_sampler("DDIM")
    emb = torch.zeros(1, 77, sp.pipe.unet.config.cross_attention_dim, device="meta")
    traffic = HostToDevice()
    with traffic:
        out = sp(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=4, num_frames=4, height=64,
                 width=64, output_type="latent", guidance_scale=guidance_scale, callback_on_step_end=traffic.step_end)
    assert out.frames.device.type == "meta" and out.frames.shape[2] == 4
    assert traffic.copies and all(step == 0 for step, _ in traffic.copies), traffic.copies


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_ctrl_adapter_sampling_reads_nothing_from_the_device(sampler):
    """Ctrl-Adapter with a step window and a per-sample mask (rows picked and scattered each step): its fusion
    weights, row indices and the control image (made when the window opens, mid-call) used blocking copies."""
    from PIL import Image

    from adapter_studio.adapters.ctrl_adapter import CtrlAdapter, CtrlAdapterModel
    from adapter_studio.presets import build_tiny_controlnet, load_pipeline

    pipe = load_pipeline("tiny-sd15")
    sp = StudioPipeline(pipe)
    cn = build_tiny_controlnet(0)
    model = CtrlAdapterModel.for_models(cn, pipe.unet, num_blocks=1, num_attention_heads=4, attention_head_dim=8)
    ctrl = CtrlAdapter(cn, model)
    image = Image.fromarray((np.random.default_rng(1).random((128, 128, 3)) * 255).astype(np.uint8))  # output size
    sp.add(ctrl, "ctrl", image=image, start=0.2, end=0.8)
    pipe.to("meta")
    ctrl.to("meta")
    sp.set_sampler(sampler)
    emb = torch.zeros(2, 77, 32, device="meta")
    traffic = HostToDevice()
    with traffic:
        out = sp(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=4, output_type="latent",
                 guidance_scale=5.0, callback_on_step_end=traffic.step_end,
                 adapter_inputs={"ctrl": {"sample_mask": [True, False]}})
    assert out.images.device.type == "meta"
    assert all(step == 0 for step, _ in traffic.copies), traffic.copies
