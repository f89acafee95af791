"""I2V-Adapter: the first-frame branch on every spatial attn1, image-to-video sampling through the core hooks
(`begin_call` encodes the first frame, `initial_latents` gives the Frame Similarity Prior), formats, inspect /
convert, the family."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from adapter_studio import CheckpointError, IncompatibleAdapterError, Mix, MixError, StudioError, UnitSpec, apply_mix
from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.i2v_adapter import (FAMILY, I2VAdapter, encode_first_frame,
                                                 frame_similarity_prior_latents, gaussian_blur, load_i2v_adapter,
                                                 save_original, spatial_self_attention_layers)
from adapter_studio.adapters.ip_adapter import IPAdapter
from adapter_studio.cli import main as cli
from adapter_studio.pipelines import ImageToVideoPipeline, StudioPipeline, export_video
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import get_family

SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def sp():
    studio = StudioPipeline(load_pipeline("tiny-video"))
    studio.pipe.set_progress_bar_config(disable=True)
    return studio


@pytest.fixture(autouse=True)
def _empty_stack(request):
    yield
    if "sp" in request.fixturenames:
        request.getfixturevalue("sp").stack.clear()


@pytest.fixture
def image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64] / 63.0
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _trained(unet, seed: int = 0, std: float = 0.2) -> I2VAdapter:
    """An adapter with random weights everywhere, standing in for a trained one (a fresh one adds zero)."""
    adapter = I2VAdapter.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return adapter


def _unet_inputs(frames: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, frames, 8, 8, generator=g), timestep=torch.tensor(400),
                encoder_hidden_states=torch.randn(2, 77, 32, generator=g).repeat_interleave(frames, dim=0))


# ---------------------------------------------------------------------------------------------------------- the model
def test_adapter_covers_every_spatial_self_attention_and_only_trains_its_own_weights(sp):
    unet = sp.pipe.unet
    adapter = I2VAdapter.from_unet(unet)
    layers = spatial_self_attention_layers(unet)
    assert len(layers) == 7 and not any("motion_modules" in p for p in layers)
    assert adapter.layer_names() == [p + ".processor" for p in layers]
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    sd = adapter.state_dict()
    assert list(sd)[:3] == [f"{first}.to_q_ff.weight", f"{first}.to_out_ff.weight", f"{first}.to_out_ff.bias"]
    assert torch.equal(sd[f"{first}.to_q_ff.weight"], layers[first].to_q.weight), "to_q_ff starts as a copy of to_q"
    assert all(not t.any() for k, t in sd.items() if "to_out_ff" in k), "to_out_ff starts at zero"
    # trainable: a loss through the frozen UNet reaches the adapter's weights and nothing else
    sp.add(adapter, name="i2v", image_latents=torch.zeros(4, 8, 8))
    inp = _unet_inputs()
    unet(**inp).sample.square().mean().backward()
    assert all(p.requires_grad for p in adapter.parameters())
    assert not any(p.requires_grad for p in unet.parameters())
    assert adapter.get_submodule(first).to_out_ff.weight.grad.abs().sum() > 0


def test_fresh_adapter_leaves_the_unet_output_bit_identical(sp):
    unet = sp.pipe.unet
    inp = _unet_inputs()
    with torch.no_grad():
        base = unet(**inp).sample
        sp.add(I2VAdapter.from_unet(unet), name="i2v", image_latents=inp["sample"][:, :, 0])
        assert torch.equal(unet(**inp).sample, base)


class ReferenceMixedAttention:
    """The reference release's `MixedCausalAttention2D.forward`, transcribed as a diffusers processor: per-head
    attention of `to_q` over every frame and of `to_q_ff` over frame 0's keys/values (index `[0] * f`), then
    `to_out[0](self) + to_out_ff(first frame)`, then dropout."""

    def __init__(self, branch, num_frames: int):
        self.branch, self.f = branch, num_frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        f = self.f
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        b = key.shape[0] // f
        key_ff = key.view(b, f, *key.shape[1:])[:, [0] * f].reshape(key.shape)
        value_ff = value.view(b, f, *value.shape[1:])[:, [0] * f].reshape(value.shape)

        def attend(q, k, v):
            q, k, v = (attn.head_to_batch_dim(t) for t in (q, k, v))
            return attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k, None), v))

        out = attn.to_out[0](attend(attn.to_q(hidden_states), key, value))
        out = out + self.branch.to_out_ff(attend(self.branch.to_q_ff(hidden_states), key_ff, value_ff))
        return attn.to_out[1](out)


def test_matches_the_reference_attention_through_the_whole_unet(sp):
    unet = sp.pipe.unet
    adapter = _trained(unet)
    inp = _unet_inputs(frames=4)
    sp.stack.detach()
    original = unet.attn_processors
    try:
        unet.set_attn_processor({name: ReferenceMixedAttention(adapter.get_submodule(name[: -len(".processor")]), 4)
                                 if name in adapter.layer_names() else proc for name, proc in original.items()})
        with torch.no_grad():
            expected = unet(**inp).sample
    finally:
        unet.set_attn_processor(original)
        sp.stack.attach(unet)
    sp.add(adapter, name="i2v", image_latents=inp["sample"][:, :, 0])  # frame 0 as given: pinning changes nothing
    with torch.no_grad():
        torch.testing.assert_close(unet(**inp).sample, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- sampling
def test_fresh_adapter_video_is_bit_identical_to_animatediff(sp, image):
    """A fresh adapter adds exactly zero: the video is diffusers' AnimateDiff output from the same starting latents
    (the frame similarity prior from the same seed) with frame 0 held at the image's latent by a plain callback."""
    pipe = sp.pipe
    sp.add(I2VAdapter.from_unet(pipe.unet), name="i2v")
    kw = dict(num_frames=4, num_inference_steps=3, output_type="pt", **SIZE)
    out = ImageToVideoPipeline(sp)(image, "a red ball", generator=torch.Generator().manual_seed(0), **kw).frames
    first = encode_first_frame(pipe.vae, image, **SIZE)
    g = torch.Generator().manual_seed(0)
    pipe.scheduler.set_timesteps(3)
    latents = frame_similarity_prior_latents(first, 4, pipe.scheduler, g)

    def hold_first_frame(p, i, t, kwargs):
        kwargs["latents"][:, :, 0] = first
        return kwargs

    sp.stack.detach()
    try:
        base = pipe("a red ball", latents=latents, generator=g, callback_on_step_end=hold_first_frame, **kw).frames
        # without the prior (frame_similarity_prior=False): AnimateDiff's own noise from the same seed, frame 0
        # pinned before the first forward too
        noise = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        noise[:, :, 0] = first
        plain = pipe("a red ball", latents=noise, callback_on_step_end=hold_first_frame, **kw).frames
    finally:
        sp.stack.attach(pipe.unet)
    assert torch.equal(out, base)
    no_prior = sp("a red ball", adapter_inputs={"i2v": {"image": image, "frame_similarity_prior": False}},
                  generator=torch.Generator().manual_seed(0), **kw).frames
    assert torch.equal(no_prior, plain)


def test_a_plain_studio_call_gets_the_prior_and_frame_0_from_the_adapter_alone(sp, image):
    """No ImageToVideoPipeline: the adapter encodes `image` in begin_call at the call's size and gives the Frame
    Similarity Prior through initial_latents; its two coefficients are inputs; a plain diffusers call of the wrapped
    pipeline (no size known up front) encodes at the first UNet forward and holds frame 0 too."""
    pipe = sp.pipe
    sp.add(_trained(pipe.unet), name="i2v", image=image)
    kw = dict(num_frames=3, num_inference_steps=2, output_type="latent", **SIZE)
    starts = []
    hook = pipe.unet.register_forward_pre_hook(  # after the stack's own hook: the UNet's real first input
        lambda m, args, kwargs: starts.append(kwargs["sample"].clone()) if not starts else None, with_kwargs=True)
    try:
        out = sp("a cat", generator=torch.Generator().manual_seed(5), **kw).frames
    finally:
        hook.remove()
    first = encode_first_frame(pipe.vae, image, **SIZE)
    assert torch.equal(out[:, :, 0], first)
    pipe.scheduler.set_timesteps(2)
    prior = frame_similarity_prior_latents(first, 3, pipe.scheduler, torch.Generator().manual_seed(5))
    torch.testing.assert_close(starts[0], torch.cat([prior, prior]), rtol=0, atol=1e-6)  # CFG: both halves
    via_pipeline = ImageToVideoPipeline(sp)(image, "a cat", generator=torch.Generator().manual_seed(5), **kw).frames
    assert torch.equal(via_pipeline, out), "the convenience pipeline only hands the image over"
    other = sp("a cat", adapter_inputs={"i2v": {"fsp_sharp_ratio": 0.9, "fsp_blur_sigma": 2.0}},
               generator=torch.Generator().manual_seed(5), **kw).frames
    assert (other[:, :, 1:] - out[:, :, 1:]).abs().max() > 1e-3, "the coefficients reach the prior"
    with pytest.raises(StudioError, match="fsp_sharp_ratio must lie in \\[0, 1\\]"):
        sp("a cat", adapter_inputs={"i2v": {"fsp_sharp_ratio": 1.5}}, **kw)
    with pytest.raises(StudioError, match="unknown keys \\['fsp_sharpness'\\]"):
        sp("a cat", adapter_inputs={"i2v": {"fsp_sharpness": 0.5}}, **kw)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["sample"][:, :, 0].clone()),
                                               with_kwargs=True)
    try:
        with torch.no_grad():  # diffusers' own call: no step callback, frame 0 pinned in every UNet input
            pipe("a cat", generator=torch.Generator().manual_seed(5), **kw)
    finally:
        hook.remove()
    assert len(seen) == 2 and all(torch.equal(x, torch.cat([first, first])) for x in seen)


def test_frame_0_is_the_input_image_up_to_the_vae_and_sizes_are_right(sp, image):
    pipe = sp.pipe
    sp.add(_trained(pipe.unet), name="i2v")
    wide = image.resize((96, 64))
    i2v = ImageToVideoPipeline(sp)
    out = i2v(wide, "a cat", num_frames=5, num_inference_steps=3, height=64, width=96, output_type="pt",
              num_videos_per_prompt=2, generator=torch.Generator().manual_seed(1)).frames
    assert out.shape == (2, 5, 3, 64, 96)
    first = encode_first_frame(pipe.vae, wide, 64, 96)
    with torch.no_grad():
        decoded = (pipe.vae.decode(first / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    for video in out:
        torch.testing.assert_close(video[0], decoded[0], rtol=0, atol=1e-5)
        assert all((video[k] - video[0]).abs().max() > 1e-2 for k in range(1, 5)), "the other frames are generated"
    assert (out[0, 1:] - out[1, 1:]).abs().max() > 1e-2, "two videos from two draws of the prior"
    frames = i2v(wide, "a cat", num_frames=5, num_inference_steps=2, height=64, width=96,
                 generator=torch.Generator().manual_seed(1)).frames
    assert len(frames) == 1 and len(frames[0]) == 5 and all(f.size == (96, 64) for f in frames[0])


def test_gif_mp4_and_webm_read_back_with_their_frames_and_fps(sp, image, tmp_path):
    import imageio.v3 as iio

    sp.add(_trained(sp.pipe.unet), name="i2v")
    frames = ImageToVideoPipeline(sp)(image, "a cat", num_frames=6, num_inference_steps=2,
                                      generator=torch.Generator().manual_seed(2), **SIZE).frames[0]
    gif = export_video(frames, tmp_path / "clip.gif", fps=10)
    with Image.open(gif) as im:
        assert (im.n_frames, im.size, im.info["duration"]) == (6, (64, 64), 100)
    for fmt, codec, fps in (("mp4", "h264", 10), ("webm", "vp9", 8)):
        path = export_video(frames, tmp_path / f"clip.{fmt}", fps=fps)
        meta = iio.immeta(path, plugin="FFMPEG")
        assert (meta["codec"], meta["fps"], meta["size"]) == (codec, fps, (64, 64))
        assert iio.imread(path, plugin="FFMPEG").shape == (6, 64, 64, 3)
    with pytest.raises(StudioError, match="writes .gif, .mp4 or .webm"):
        export_video(frames, tmp_path / "clip.avi")


def test_i2v_ip_adapter_and_agd_act_together_in_one_call(sp, image):
    """AGD's family lists image models only (model_kinds), but the adapter itself runs on the video UNet: its attn2
    layers are the image model's, and its contribution is repeated per frame."""
    pipe = sp.pipe
    unet = pipe.unet
    ip = IPAdapter.from_unet(unet, pipe.image_encoder.config.projection_dim)
    agd = AGDAdapter.from_unet(unet, hidden_dim=16)
    with torch.no_grad():  # a fresh AGD adds zero: give its zero-initialised projections weights
        for p in agd.parameters():
            if not p.any():
                p.normal_(std=0.05)
    calls = {}
    for name, adapter in (("i2v", _trained(unet)), ("ip", ip), ("agd", agd)):
        sp.add(adapter, name=name)

        def counted(*args, _name=name, _f=adapter.contribution, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _f(*args, **kwargs)

        adapter.contribution = counted
    batches = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: batches.append(kwargs["sample"].shape[0])
                                          if "sample" in kwargs else batches.append(args[0].shape[0]), with_kwargs=True)
    try:
        out = ImageToVideoPipeline(sp)(image, "a cat", image_prompt="ip", guidance="agd", guidance_scale=5.0,
                                       num_frames=3, num_inference_steps=2, output_type="latent",
                                       generator=torch.Generator().manual_seed(3), **SIZE).frames
    finally:
        hook.remove()
    assert batches == [1, 1], "AGD: one UNet pass per step, no CFG batch"
    assert calls == {"i2v": 2 * 7, "ip": 2 * 7, "agd": 2 * 7}, "each adapter on its 7 layers, every step"
    assert torch.equal(out[:, :, 0], encode_first_frame(pipe.vae, image, **SIZE))
    with pytest.raises(StudioError, match="'agd' .* takes no image prompt"):
        ImageToVideoPipeline(sp)(image, "a cat", image_prompt="agd", guidance="agd", num_frames=2,
                                 num_inference_steps=1, **SIZE)


def test_a_first_image_of_another_size_is_resized_with_a_warning(sp, image):
    sp.add(_trained(sp.pipe.unet), name="i2v")
    odd = image.resize((80, 48))
    with pytest.warns(UserWarning, match="the first image is 80x48; resized to the video's 64x64"):
        out = ImageToVideoPipeline(sp)(odd, "a cat", num_frames=2, num_inference_steps=1, output_type="pt",
                                       generator=torch.Generator().manual_seed(4), **SIZE).frames
    assert out.shape[-2:] == (64, 64)
    # every form of the image encodes to the same latent
    latents = []
    for img in (odd, np.asarray(odd), torch.from_numpy(np.array(odd)).permute(2, 0, 1) / 255.0):
        with pytest.warns(UserWarning, match="resized"):
            latents.append(encode_first_frame(sp.pipe.vae, img, 64, 64))
    assert all(torch.equal(x, latents[0]) for x in latents)


def test_bad_first_images_and_a_missing_adapter_are_refused(sp, image):
    i2v = ImageToVideoPipeline(sp)
    with pytest.raises(StudioError, match="needs an enabled I2V-Adapter unit"):
        i2v(image, "a cat", num_frames=2, num_inference_steps=1, **SIZE)
    sp.add(_trained(sp.pipe.unet), name="i2v")
    with pytest.raises(StudioError, match="values must lie in \\[0, 1\\]"):
        i2v(torch.full((3, 64, 64), 2.0), "a cat", num_frames=2, num_inference_steps=1, **SIZE)
    with pytest.raises(StudioError, match="needs its first frame"):
        sp("a cat", num_frames=2, num_inference_steps=1, **SIZE)
    with pytest.raises(StudioError, match="needs a video pipeline"):
        ImageToVideoPipeline(StudioPipeline(load_pipeline("tiny-sd15")))


def test_frame_similarity_prior_matches_the_reference_recipe():
    """Repeated first-frame latent; each element kept with probability 0.5 (`rand >= 0.5`), else the 9x9 Gaussian
    blur (sigma 18, reflect padding: OpenCV's BORDER_REFLECT_101) of it; noised to the first timestep; frame 0 clean."""
    from diffusers import DDIMScheduler

    x = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(x, 18.0)
    cv = np.stack([cv2.GaussianBlur(c.numpy(), (9, 9), 18.0, borderType=cv2.BORDER_REFLECT_101) for c in x[0]])
    np.testing.assert_allclose(blurred[0].numpy(), cv, atol=1e-5)
    assert torch.equal(gaussian_blur(x, 0.0), x)

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(25)
    latents = frame_similarity_prior_latents(x, 5, scheduler, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(1, 4, 5, 12, 12, generator=g) >= 0.5
    noise = torch.randn(1, 4, 5, 12, 12, generator=g)
    mixed = torch.where(keep, x[:, :, None], torch.from_numpy(cv)[None, :, None])
    a = scheduler.alphas_cumprod[scheduler.timesteps[0]]
    expected = a.sqrt() * mixed + (1 - a).sqrt() * noise
    torch.testing.assert_close(latents[:, :, 1:], expected[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(latents[:, :, 0], x)
    with pytest.raises(StudioError, match="fsp_sharp_ratio"):
        frame_similarity_prior_latents(x, 5, scheduler, sharp_ratio=1.5)
    with pytest.raises(StudioError, match="fsp_blur_sigma must be >= 0"):
        frame_similarity_prior_latents(x, 5, scheduler, blur_sigma=-1.0)


# -------------------------------------------------------------------------------------------------------- formats
def test_formats_round_trip_with_the_original_names(sp, tmp_path):
    unet = sp.pipe.unet
    adapter = _trained(unet, seed=5)
    sd = adapter.state_dict()
    adapter.save_pretrained(tmp_path / "ours")
    save_original(adapter, tmp_path / "original.safetensors")
    # the release's own layout: a (DDP-prefixed) UNet state dict in a pickle, with other modules' keys beside
    torch.save({"state_dict": {**{f"module.{k}": v for k, v in sd.items()},
                               "module.conv_in.weight": unet.conv_in.weight.detach()}}, tmp_path / "release.ckpt")
    for source in ("ours", "original.safetensors", "release.ckpt"):
        loaded = load_i2v_adapter(tmp_path / source, unet)
        assert loaded.state_dict().keys() == sd.keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items()), source
    for key in sd:  # the keys name the UNet's own attn1 modules
        assert key.rsplit(".", 2)[0] in spatial_self_attention_layers(unet)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["_class_name"] == "I2VAdapter"


def test_wrong_weights_are_refused_with_the_unet_untouched(sp, tmp_path):
    from safetensors.torch import save_file

    pipe, unet = sp.pipe, sp.pipe.unet
    sp.add(_trained(unet), name="kept")
    procs, params = dict(unet.attn_processors), {k: v.clone() for k, v in unet.state_dict().items()}
    # an image UNet's checkpoint: no I2V-Adapter keys at all
    save_file({k: v.contiguous() for k, v in load_pipeline("tiny-sd15").unet.state_dict().items()},
              str(tmp_path / "image_unet.safetensors"))
    with pytest.raises(CheckpointError, match="no I2V-Adapter weights .* found e.g."):
        FAMILY.load(str(tmp_path / "image_unet.safetensors"), pipe)
    # I2V-Adapter weights of a wider base model: the same layer names, other shapes
    wide = {f"{p}.{n}": torch.zeros(tuple(2 * s for s in shape)) for p, a in spatial_self_attention_layers(unet).items()
            for n, shape in {"to_q_ff.weight": (32, 32), "to_out_ff.weight": (32, 32), "to_out_ff.bias": (32,)}.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match=r"to_q_ff.weight: expected \[32, 32\], found \[64, 64\]"):
        FAMILY.load(str(tmp_path / "wide.safetensors"), pipe)
    # weights of another layout, our folder made for another UNet, and a pickle that needs code
    save_file({f"down_blocks.9.attentions.0.transformer_blocks.0.attn1.{k.split('attn1.')[1]}": v
               for k, v in list(wide.items())[:3]}, str(tmp_path / "layout.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="this UNet lacks .*down_blocks.9"):
        load_i2v_adapter(tmp_path / "layout.safetensors", unet)
    torch.save({"state_dict": Image.new("RGB", (2, 2))}, tmp_path / "code.bin")
    with pytest.raises(CheckpointError, match="cannot read I2V-Adapter weights"):
        load_i2v_adapter(tmp_path / "code.bin", unet)
    # a valid adapter on an image model
    save_original(_trained(unet), tmp_path / "good.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="needs a video UNet .* this UNet2DConditionModel has none"):
        FAMILY.load(str(tmp_path / "good.safetensors"), load_pipeline("tiny-sd15"))
    assert dict(unet.attn_processors) == procs and list(sp.stack.slots) == ["kept"]
    assert all(torch.equal(v, params[k]) for k, v in unet.state_dict().items())


# --------------------------------------------------------------------------------------------------------- family
def test_the_family_runs_from_a_mix_through_a_plain_studio_call(sp, image, tmp_path):
    fam = get_family("i2v")
    assert fam is FAMILY and fam.output == "video" and fam.model_kinds == ("video",)
    assert [(f.key, f.kind, f.required, f.default) for f in fam.fields] == [
        ("image", "image", True, None), ("fsp_sharp_ratio", "number", False, 0.5),
        ("fsp_blur_sigma", "number", False, 18.0)], "the prior's coefficients with the reference defaults"
    assert fam.comfy_nodes == ("AdapterStudioI2VAdapterLoader", "AdapterStudioApplyI2VAdapter")
    assert [(t.script, t.configs, t.data_key) for t in fam.training] == [
        ("train/i2v_adapter.py", "i2v_adapter*.yaml", "data_dir")]
    _trained(sp.pipe.unet).save_pretrained(tmp_path / "i2v")
    image.save(tmp_path / "first.png")
    inputs = {"image": "first.png", "fsp_sharp_ratio": 0.25, "fsp_blur_sigma": 4}
    mix = Mix(units=[UnitSpec(family="i2v", weights="i2v", name="i2v", inputs=inputs)])
    apply_mix(Mix.from_json(mix.to_json()), sp, base_dir=tmp_path)
    kw = dict(num_frames=3, num_inference_steps=2, output_type="latent", **SIZE)
    out = sp("a cat", generator=torch.Generator().manual_seed(6), **kw).frames
    assert torch.equal(out[:, :, 0], encode_first_frame(sp.pipe.vae, image, **SIZE))
    # the same call by hand: the same adapter, the same inputs as Python values
    sp.stack.clear()
    sp.add(load_i2v_adapter(tmp_path / "i2v", sp.pipe.unet), name="i2v", fsp_sharp_ratio=0.25, fsp_blur_sigma=4.0)
    by_hand = ImageToVideoPipeline(sp)(image, "a cat", generator=torch.Generator().manual_seed(6), **kw).frames
    assert torch.equal(out, by_hand)
    with pytest.raises(MixError, match="unknown keys \\['fps'\\]; allowed: image, frame_similarity_prior"):
        fam.inputs_from_json({"image": "first.png", "fps": 8}, tmp_path)
    with pytest.raises(MixError, match="does not exist"):
        fam.inputs_from_json({"image": "missing.png"}, tmp_path)
    with pytest.raises(MixError, match="'fsp_blur_sigma' must be a number"):
        fam.inputs_from_json({"fsp_blur_sigma": "x"}, tmp_path)
    with pytest.raises(MixError, match="must be true or false"):
        fam.inputs_from_json({"frame_similarity_prior": 1}, tmp_path)


def test_inspect_names_the_family_layers_and_fit_and_convert_round_trips(sp, tmp_path, capsys):
    unet = sp.pipe.unet
    adapter = _trained(unet, seed=8)
    adapter.register_to_config(base_model="tiny-video")
    adapter.save_pretrained(tmp_path / "folder")
    save_original(adapter, tmp_path / "i2v.safetensors")
    torch.save({"state_dict": {**adapter.state_dict(), "conv_in.weight": unet.conv_in.weight.detach()}},
               tmp_path / "release.ckpt")
    n = sum(p.numel() for p in adapter.parameters())

    def inspect(*argv):
        assert cli(["inspect", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    d = inspect(str(tmp_path / "i2v.safetensors"), "--preset", "tiny-video")
    assert (d["family"], d["format"], d["variant"]) == ("i2v", "original single file (.safetensors)",
                                                         "adapter weights"), "no other family claims it"
    assert d["base"] == {"spatial self-attention layers": 7, "by block": "down 2, mid 1, up 4",
                         "channel widths": [32, 64]}
    assert d["parameters"] == n and d["dtype"] == "float32" and d["fits tiny-video"].startswith("yes")
    d = inspect(str(tmp_path / "i2v.safetensors"), "--preset", "tiny-sd15")
    assert d["fits tiny-sd15"].startswith("no: ") and "needs a video UNet" in d["fits tiny-sd15"]
    d = inspect(str(tmp_path / "folder"))
    assert (d["family"], d["format"], d["base"]["trained for"], d["parameters"]) == (
        "i2v", "folder (save_pretrained)", "tiny-video", n)
    d = inspect(str(tmp_path / "release.ckpt"))
    assert (d["format"], d["variant"]) == ("original pickle (.ckpt)", "inside a UNet checkpoint (1 other keys ignored)")
    assert FAMILY.to_json()["formats_written"] == ["folder", "original"]
    # conversion through the family's loader and writers: pickle -> folder -> single file, the same tensors
    assert cli(["convert", str(tmp_path / "release.ckpt"), str(tmp_path / "conv"), "--to", "folder",
                "--preset", "tiny-video"]) == 0
    assert cli(["convert", str(tmp_path / "conv"), str(tmp_path / "back.safetensors"), "--to", "original",
                "--preset", "tiny-video"]) == 0
    assert "wrote" in capsys.readouterr().out
    back = load_i2v_adapter(tmp_path / "back.safetensors", unet)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in adapter.state_dict().items())
