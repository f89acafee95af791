"""The stack's residual path and latent hook, on the real diffusers UNets and ControlNetModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from adapter_studio import AdapterStack, ResidualAdapter, StudioAdapter, StudioError
from adapter_studio.block_scale import residual_blocks, residual_scales
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.presets import load_pipeline

SD15_UNET_CONFIG = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2}


class ControlNetResiduals(ResidualAdapter):
    """A frozen ControlNet as a residual adapter: the simplest real user of the residual path.

    Records every `UNetCall` it sees; `drop_mid` returns no mid residual (the stack must then give zeros).
    """

    family = "test-controlnet"

    def __init__(self, controlnet: ControlNetModel, cond: torch.Tensor, drop_mid: bool = False):
        super().__init__()
        self.controlnet = controlnet
        self.cond = cond
        self.drop_mid = drop_mid
        self.calls: list = []
        self.time_embeddings: list[torch.Tensor] = []

    def residuals(self, inputs, ctx, call):
        self.calls.append(call)
        self.time_embeddings.append(ctx.time_embedding())
        sample = call.sample
        if sample.ndim == 5:  # video: the ControlNet sees every frame as an image, text tokens repeated per frame
            b, c, f, h, w = sample.shape
            sample = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        n = sample.shape[0]
        text = call.encoder_hidden_states.repeat_interleave(n // call.encoder_hidden_states.shape[0], 0)
        down, mid = self.controlnet(sample, call.timestep[:1].expand(n), text, controlnet_cond=self.cond.expand(n, -1, -1, -1),
                                    added_cond_kwargs=call.added_cond_kwargs, return_dict=False)
        return list(down), None if self.drop_mid else mid


def _inputs(batch: int = 2, size: int = 16, text_dim: int = 32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(batch, 77, text_dim, generator=g))


def _controlnet(unet) -> ControlNetModel:
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    for p in cn.parameters():  # from_unet zero-inits the output convs: give them weights so residuals are not zero
        if p.ndim == 4 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return cn.eval()


@torch.no_grad()
def test_residual_adapter_without_mid_gets_zeros_not_t2i_semantics(sd15_pipe):
    unet = sd15_pipe.unet
    inp = _inputs()
    cn = _controlnet(unet)
    cond = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    down, _ = cn(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], controlnet_cond=cond.expand(2, -1, -1, -1),
                 return_dict=False)
    as_controlnet = unet(**inp, down_block_additional_residuals=down,
                         mid_block_additional_residual=torch.zeros_like(down[-1])).sample
    with pytest.raises(RuntimeError, match="size of tensor"):  # diffusers' T2I-Adapter reading of the same list
        unet(**inp, down_block_additional_residuals=[d.clone() for d in down])
    stack = AdapterStack().attach(unet)
    stack.add(ControlNetResiduals(cn, cond, drop_mid=True))
    torch.testing.assert_close(unet(**inp).sample, as_controlnet, rtol=0, atol=1e-6)
    stack.detach()


def test_residual_blocks_follow_diffusers_order(sd15_pipe):
    # SD1.5: conv_in + per block 2 resnets (+ a downsampler for the first three): 12 residuals
    assert residual_blocks(SD15_UNET_CONFIG) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    cn = _controlnet(sd15_pipe.unet)
    inp = _inputs()
    with torch.no_grad():
        down, _ = cn(inp["sample"], inp["timestep"], inp["encoder_hidden_states"],
                     controlnet_cond=torch.zeros(2, 3, 128, 128), return_dict=False)
    assert len(residual_blocks(sd15_pipe.unet.config)) == len(down)


@torch.no_grad()
def test_residual_per_block_scale(sd15_pipe):
    unet = sd15_pipe.unet
    inp = _inputs()
    cn = _controlnet(unet)
    cond = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    down, mid = cn(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], controlnet_cond=cond.expand(2, -1, -1, -1),
                   return_dict=False)
    blocks = residual_blocks(unet.config)
    scale = {"down": {"block_1": 0.5}, "mid": 2.0}
    expected = unet(**inp, down_block_additional_residuals=[d * (0.5 if b == 1 else 0.0) for d, b in zip(down, blocks)],
                    mid_block_additional_residual=mid * 2.0).sample
    stack = AdapterStack().attach(unet)
    stack.add(ControlNetResiduals(cn, cond), scale=scale)
    torch.testing.assert_close(unet(**inp).sample, expected, rtol=0, atol=1e-6)
    with pytest.raises(StudioError, match="takes keys down and mid"):
        stack.add(ControlNetResiduals(cn, cond), name="up", scale={"up": {"block_1": 1.0}})
    with pytest.raises(StudioError, match="down block_0 is one number"):
        stack.add(ControlNetResiduals(cn, cond), name="list", scale={"down": {"block_0": [1.0, 0.0]}})
    with pytest.raises(StudioError, match="block_7"):
        residual_scales({"down": {"block_7": 1.0}}, unet.config)
    stack.detach()


@torch.no_grad()
def test_sdxl_added_cond_kwargs_and_time_embedding_reach_the_residual_adapter():
    unet = load_pipeline("tiny-sdxl").unet
    g = torch.Generator().manual_seed(0)
    inp = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor(10),
               encoder_hidden_states=torch.randn(1, 77, 64, generator=g),
               added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                  "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])})
    cn = _controlnet(unet)
    cond = torch.rand(1, 3, 128, 128, generator=g)
    down, mid = cn(**{k: v for k, v in inp.items()}, controlnet_cond=cond, return_dict=False)
    expected = unet(**inp, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    adapter = ControlNetResiduals(cn, cond)
    stack = AdapterStack().attach(unet)
    stack.add(adapter)
    out = unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"],  # positional, as some callers pass them
               added_cond_kwargs=inp["added_cond_kwargs"]).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    call = adapter.calls[-1]
    assert call.added_cond_kwargs is inp["added_cond_kwargs"]
    assert call.encoder_hidden_states is inp["encoder_hidden_states"]
    t_emb = unet.time_embedding(unet.time_proj(torch.tensor([10.0])))
    torch.testing.assert_close(adapter.time_embeddings[-1], t_emb)
    stack.detach()


@torch.no_grad()
def test_residual_adapter_on_the_video_unet():
    pipe = load_pipeline("tiny-video")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    frames = 3
    # diffusers' AnimateDiff pipeline repeats the text tokens per frame: [(b f), 77, C]
    inp = dict(sample=torch.randn(1, 4, frames, 16, 16, generator=g), timestep=torch.tensor(300),
               encoder_hidden_states=torch.randn(1, 77, 32, generator=g).repeat_interleave(frames, dim=0))
    cn = _controlnet(load_pipeline("tiny-sd15").unet)
    cond = torch.rand(1, 3, 128, 128, generator=g)
    flat = inp["sample"].permute(0, 2, 1, 3, 4).reshape(frames, 4, 16, 16)
    down, mid = cn(flat, inp["timestep"].expand(frames), inp["encoder_hidden_states"],
                   controlnet_cond=cond.expand(frames, -1, -1, -1), return_dict=False)
    expected = unet(**inp, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    adapter = ControlNetResiduals(cn, cond)
    stack = AdapterStack().attach(unet)
    stack.add(adapter, scale={"down": 1.0, "mid": 1.0})
    torch.testing.assert_close(unet(**inp).sample, expected, rtol=0, atol=1e-6)
    assert adapter.calls[-1].num_frames == frames
    stack.detach()


class FirstFramePin(StudioAdapter):
    """Keeps frame 0 of a video latent at a fixed latent: before every UNet call and after every scheduler step."""

    family = "test-pin"

    def __init__(self, latent: torch.Tensor):
        super().__init__()
        self.latent = latent  # [C, H, W]
        self.seen: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.batch_sizes: list[int] = []

    def begin_call(self, inputs, call):
        self.batch_sizes.append(call.batch_size)
        return inputs

    def _pin(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, 0] = self.latent.to(x.dtype)
        return x

    def latents_before_unet(self, sample, inputs, ctx, active):
        pinned = self._pin(sample)
        self.seen.append(pinned[:, :, 0].clone())
        return pinned

    def latents_after_step(self, latents, inputs, step, timestep, scheduler):
        self.steps.append(step)
        return self._pin(latents)


def test_latent_hook_pins_frame_0_through_a_full_video_sampling_call():
    sp = StudioPipeline(load_pipeline("tiny-video"))
    z0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5))
    pin = FirstFramePin(z0)
    sp.add(pin, name="pin")
    user_steps = []

    def user_callback(pipe, step, t, kw):
        user_steps.append(step)
        assert torch.equal(kw["latents"][:, :, 0], z0.expand(2, -1, -1, -1)), "the user's callback sees pinned latents"
        return kw

    out = sp("a ball", num_frames=3, num_inference_steps=3, height=64, width=64, num_images_per_prompt=2,
             output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=user_callback)
    latents = out.frames
    assert latents.shape[:3] == (2, 4, 3), "num_images_per_prompt=2 gives two videos on AnimateDiff"
    assert pin.batch_sizes == [2], "the call's batch counts the videos"
    assert torch.equal(latents[:, :, 0], z0.expand(2, -1, -1, -1))
    assert pin.steps == [0, 1, 2] and user_steps == [0, 1, 2]
    # every UNet call saw the pinned frame (CFG doubles the batch: 4 samples)
    assert len(pin.seen) == 3 and all(torch.equal(s, z0.expand(4, -1, -1, -1)) for s in pin.seen)
    assert not torch.equal(latents[:, :, 1], latents[:, :, 0])


def test_latent_hook_acts_in_a_bare_unet_call_as_in_training():
    unet = load_pipeline("tiny-video").unet
    z0 = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(6))
    pin = FirstFramePin(z0)
    stack = AdapterStack().attach(unet)
    stack.add(pin)
    sample = torch.randn(1, 4, 2, 16, 16)
    with torch.no_grad():
        unet(sample, torch.tensor(999), torch.randn(2, 77, 32))
    assert torch.equal(pin.seen[-1], z0[None])
    stack["test-pin0"].enabled = False
    with torch.no_grad():
        unet(sample, torch.tensor(999), torch.randn(2, 77, 32))
    assert len(pin.seen) == 1, "a disabled slot pins nothing"
    stack.detach()


class StartFrom(StudioAdapter):
    """Gives the starting latents of a call (what I2V's Frame Similarity Prior does), recording what it was told."""

    family = "test-start"

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x
        self.seen = []

    def initial_latents(self, inputs, call, scheduler):
        self.seen.append((call.height, call.width, call.num_inference_steps, call.prompt, int(scheduler.timesteps[0])))
        return self.x * scheduler.init_noise_sigma


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_initial_latents_are_where_sampling_starts(sd15_pipe, sampler):
    sp = StudioPipeline(sd15_pipe)
    sp.set_sampler(sampler)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    kw = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    sp.pipe.scheduler.set_timesteps(3)
    expected_t0 = int(sp.pipe.scheduler.timesteps[0])
    reference = sp("a cube", latents=x, **kw).images  # diffusers starts from latents * init_noise_sigma
    start = StartFrom(x)
    sp.add(start, name="start")
    out = sp("a cube", **kw).images
    np.testing.assert_array_equal(out, reference)
    assert start.seen == [(64, 64, 3, "a cube", expected_t0)]
    assert np.array_equal(sp("a cube", latents=torch.zeros_like(x), **kw).images,
                          sp.pipe("a cube", latents=torch.zeros_like(x), **kw).images), "given latents win"
    sp.add(StartFrom(x), name="start2")
    with pytest.raises(StudioError, match="each give the starting latents"):
        sp("a cube", **kw)
