"""Ctrl-Adapter / ControlNet: target shapes and sampling on every tiny preset, parity with diffusers' ControlNet
pipelines, fusion and routing, latent skipping, formats (ours, the release's key layout, diffusers ControlNets),
`inspect` / `convert`, the family, preprocessors, bad input, and Ctrl + IP-Adapter + AGD together."""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from diffusers import (AnimateDiffControlNetPipeline, ControlNetModel, StableDiffusionControlNetPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file

from adapter_studio import ForwardContext, UNetCall
from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.ctrl_adapter import (PREPROCESSORS, CtrlAdapter, CtrlAdapterModel, CtrlRouter,
                                                  ResidualLayout, load_controlnet, load_ctrl_adapter, preprocess,
                                                  select_residuals)
from adapter_studio.adapters.ctrl_adapter.router import fusion_weights
from adapter_studio.adapters.ip_adapter import IPAdapter
from adapter_studio.errors import CheckpointError, IncompatibleAdapterError, StudioError
from adapter_studio.mix import Mix, UnitSpec, apply_mix
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.presets import build_tiny_controlnet, load_pipeline
from adapter_studio.registry import get_family

TINY = dict(num_attention_heads=4, attention_head_dim=8)  # the adapter's transformer width for 32/64-channel models


def _img(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def _controlnet(seed: int = 0, unet: torch.nn.Module | None = None) -> ControlNetModel:
    """The tiny SD1.5-shaped ControlNet with its zero-initialised output convs given weights (else it adds zeros)."""
    cn = build_tiny_controlnet(seed) if unet is None else ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.1, generator=g)
    return cn.eval()


def _adapter(cn: ControlNetModel, unet: torch.nn.Module, seed: int = 0, **kw) -> CtrlAdapterModel:
    torch.manual_seed(seed)
    return CtrlAdapterModel.for_models(cn, unet, num_blocks=1, **TINY, **kw).eval()


def _diffusers_sd(controlnet) -> StableDiffusionControlNetPipeline:
    comps = load_pipeline("tiny-sd15").components
    pipe = StableDiffusionControlNetPipeline(
        **{k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}, controlnet=controlnet,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompt="a cat", steps=3, **kw):
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), height=64, width=64,
               output_type="np", **kw)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


@pytest.fixture(scope="module")
def cns():
    return _controlnet(0), _controlnet(1)


@pytest.fixture(scope="module")
def sd15():
    return StudioPipeline(load_pipeline("tiny-sd15"))


@pytest.fixture
def studio(sd15):
    yield sd15
    sd15.stack.clear()


# ---------------------------------------------------------------------------------------------------- targets
def _unet_residual_shapes(unet, **inputs):
    """The shapes of the residuals the UNet adds to (its own down-block outputs and mid output), recorded by hooks."""
    shapes = {"down": [], "mid": None}
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, o: shapes["down"].append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(
            lambda m, a, o: shapes["down"].extend(tuple(t.shape) for t in o[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, o: shapes.__setitem__("mid", tuple(o.shape))))
    with torch.no_grad():
        unet(**inputs)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl", "tiny-video"])
def test_adapter_fits_every_target_and_samples(cns, preset):
    sp = StudioPipeline(load_pipeline(preset))
    unet = sp.pipe.unet
    video = preset == "tiny-video"
    # tiny-sdxl as released for SDXL: the SD1.5 ControlNet at half the latent size, the adapter resizes 2x
    model = _adapter(cns[0], unet, source_scale=0.5 if preset == "tiny-sdxl" else 1.0)
    assert model.temporal == video
    ctrl = CtrlAdapter(cns[0], model)

    # the adapter's outputs have exactly the shapes the UNet adds its residuals to
    g = torch.Generator().manual_seed(0)
    frames = 3 if video else 1
    sample = torch.randn(2, 4, *((frames,) if video else ()), 8, 8, generator=g)
    text = torch.randn(2 * frames, 77, unet.config.cross_attention_dim, generator=g)
    added = ({"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
             if preset == "tiny-sdxl" else None)
    want = _unet_residual_shapes(unet, sample=sample, timestep=torch.tensor(500), encoder_hidden_states=text,
                                 added_cond_kwargs=added)
    ctx = ForwardContext(batch_size=2, cfg=False, timestep=torch.full((2,), 500.0), progress=torch.zeros(2),
                         latent_size=(8, 8), num_frames=frames, unet=unet)
    call = UNetCall(sample, torch.full((2,), 500.0), text, added, frames)
    with torch.no_grad():
        down, mid = ctrl.residuals({"image": _img(1)}, ctx, call)
    assert [tuple(d.shape) for d in down] == want["down"] and tuple(mid.shape) == want["mid"]
    assert all(d.abs().max() > 0 for d in down), "every residual of the target gets an adapter (default locations)"

    # a full sampling call; scale 0 and a window that never opens are bit-identical to no control
    kw = dict(steps=2, num_frames=3) if video else dict(steps=2)
    bare = _run(sp, **kw)
    images = [_img(i) for i in range(3)] if video else _img(1)  # video: one control image per frame
    sp.add(ctrl, "ctrl", image=images)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert np.abs(_run(sp, **kw) - bare).max() > 1e-3, "the control acts"
    assert not [w for w in seen if "resized" in str(w.message)], "output-size images are not resampled needlessly"
    sp.stack["ctrl"].scale = 0.0
    assert np.array_equal(_run(sp, **kw), bare)
    sp.stack["ctrl"].scale = 1.0
    sp.stack["ctrl"].set_window(0.9, 1.0)  # 2 steps: progress 0 and 0.5
    assert np.array_equal(_run(sp, **kw), bare)
    sp.stack["ctrl"].set_window(0.0, 1.0)
    assert np.array_equal(_run(sp, adapter_inputs={"ctrl": {"conditioning_scale": 0.0}}, **kw), bare)
    assert np.array_equal(_run(sp, adapter_inputs={"ctrl": {"end": 0.4, "start": 0.2}}, **kw), bare), \
        "a condition's own window (stack rule) that holds no step: absent, exact zeros"
    if video:  # sparse control: frames without an image get no residual (the temporal adapter sees 2 frames)
        sparse = _run(sp, adapter_inputs={"ctrl": {"image": [images[0], None, images[2]]}}, **kw)
        assert np.abs(sparse - bare).max() > 1e-3 and np.abs(sparse - _run(sp, **kw)).max() > 1e-4


# ---------------------------------------------------------------------------------------------------- parity
def test_plain_controlnet_matches_diffusers(cns, studio):
    """Same backbone, no adapter: the unit is diffusers' StableDiffusionControlNetPipeline, CFG, scale, window,
    guess mode and per-prompt control images included (to 1e-5; in practice bit-exact)."""
    ref_pipe = _diffusers_sd(cns[0])
    studio.add(CtrlAdapter(cns[0]), "ctrl", image=_img(1))
    assert np.abs(_run(studio) - _run(ref_pipe, image=_img(1))).max() < 1e-5

    # diffusers keeps step i when i/n >= start and (i+1)/n <= end; the stack when start <= i/n < end: they agree
    # whenever end * steps is a whole number (here 4 steps, window 0.25..0.75 keeps steps 1 and 2 in both)
    studio.stack["ctrl"].set_window(0.25, 0.75)
    studio.stack["ctrl"].scale = 0.7
    ref = _run(ref_pipe, steps=4, image=_img(1), controlnet_conditioning_scale=0.7, control_guidance_start=0.25,
               control_guidance_end=0.75)
    assert np.abs(_run(studio, steps=4) - ref).max() < 1e-5
    studio.stack["ctrl"].set_window(0.0, 1.0)
    studio.stack["ctrl"].scale = 1.0

    ref = _run(ref_pipe, image=_img(1), guess_mode=True, guidance_scale=4.0)
    out = _run(studio, adapter_inputs={"ctrl": {"guess_mode": True}}, guidance_scale=4.0)
    assert np.abs(out - ref).max() < 1e-5
    assert np.abs(out - _run(studio, guidance_scale=4.0)).max() > 1e-3, "guess mode changes the result"

    # per-sample control images in one batch (diffusers: one per prompt, repeated per image of the prompt)
    prompts, images = ["a cat", "a dog"], [_img(2), _img(3)]
    ref = _run(ref_pipe, prompts, image=images, num_images_per_prompt=2)
    assert np.abs(_run(studio, prompts, adapter_inputs={"ctrl": {"image": images}}, num_images_per_prompt=2)
                  - ref).max() < 1e-5
    with pytest.raises(StudioError, match="3 images for a call of 2 samples"):
        _run(studio, prompts, adapter_inputs={"ctrl": {"image": [_img(1)] * 3}})


def test_two_controlnets_match_diffusers_multicontrolnet(cns, studio):
    ref_pipe = _diffusers_sd([cns[0], cns[1]])  # diffusers wraps the list in a MultiControlNetModel
    ref = _run(ref_pipe, steps=4, image=[_img(1), _img(2)], controlnet_conditioning_scale=[0.6, 1.2],
               control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0])
    studio.add(CtrlAdapter(list(cns)), "multi", conditions=[
        {"image": _img(1), "conditioning_scale": 0.6, "end": 0.5},
        {"image": _img(2), "conditioning_scale": 1.2, "start": 0.25}])
    assert np.abs(_run(studio, steps=4) - ref).max() < 1e-5
    # the same unit through the flat keys the studio's form and mixes use
    studio.stack["multi"].inputs = {"image": _img(1), "conditioning_scale": 0.6, "end": 0.5,
                                    "image_2": _img(2), "conditioning_scale_2": 1.2, "start_2": 0.25}
    assert np.abs(_run(studio, steps=4) - ref).max() < 1e-5


def test_plain_controlnet_on_animatediff_matches_diffusers_per_frame(cns):
    base = load_pipeline("tiny-video")
    ref_pipe = AnimateDiffControlNetPipeline(**base.components, controlnet=cns[0])
    ref_pipe.set_progress_bar_config(disable=True)
    frames = [_img(i) for i in range(3)]
    ref = _run(ref_pipe, steps=2, conditioning_frames=frames, num_frames=3)
    sp = StudioPipeline(load_pipeline("tiny-video"))
    sp.add(CtrlAdapter(cns[0]), "ctrl", image=frames)
    assert np.abs(_run(sp, steps=2, num_frames=3) - ref).max() < 1e-5


# ---------------------------------------------------------------------------------------------------- fusion
def test_router_is_a_softmax_over_present_conditions():
    router = CtrlRouter(num_experts=3, num_routers=4)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0.0, 1.0)
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    down, mid = fusion_weights(present, 4, "router", router)
    logits = torch.stack([r.wg.weight[:, 0] for r in router.down_blocks_router])
    for row, on in enumerate(present):
        expect = torch.zeros(4, 3)
        expect[:, on] = torch.softmax(logits[:, on], dim=-1)
        torch.testing.assert_close(down[:, row], expect)
        assert torch.all(mid[row][~on] == 0) and torch.isclose(mid[row].sum(), torch.tensor(1.0))
    assert torch.equal(down[:, 2], torch.tensor([[0.0, 1.0, 0.0]] * 4)), "one present condition weighs exactly 1"
    eq, _ = fusion_weights(present, 4, "equal")
    assert torch.equal(eq[0, 1], torch.tensor([0.5, 0.0, 0.5]))
    assert torch.equal(fusion_weights(present, 4, "sum")[0][0, 1], torch.tensor([1.0, 0.0, 1.0]))


def test_fusion_end_to_end_router_weights_and_equal_fusion_of_one_condition(cns):
    pipe = load_pipeline("tiny-sd15")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ctx = ForwardContext(batch_size=2, cfg=False, timestep=torch.full((2,), 400.0), progress=torch.zeros(2),
                         latent_size=(8, 8), unet=unet)
    call = UNetCall(sample, torch.full((2,), 400.0), text)
    router = CtrlRouter(num_experts=2, num_routers=6)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0.0, 1.0, generator=g)
    a, b = _img(1), _img(2)
    # sample 0 has both conditions, sample 1 only the first: its residuals are the first ControlNet's alone
    inputs = {"conditions": [{"image": [a, a]}, {"image": [b, None]}]}
    with torch.no_grad():
        down, mid = CtrlAdapter(list(cns), router=router).residuals(inputs, ctx, call)
        ref = []
        for cn, img in zip(cns, (a, b)):
            cond = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
            cond = cond[None].expand(2, -1, -1, -1)
            ref.append(cn(sample, call.timestep, text, controlnet_cond=cond, return_dict=False))
    w = torch.softmax(torch.stack([r.wg.weight[:, 0] for r in router.down_blocks_router]), dim=-1)
    for i, d in enumerate(down):
        torch.testing.assert_close(d[0], w[i, 0] * ref[0][0][i][0] + w[i, 1] * ref[1][0][i][0])
        assert torch.equal(d[1], ref[0][0][i][1])
    wm = torch.softmax(router.mid_block_router.wg.weight[:, 0], dim=-1)
    torch.testing.assert_close(mid[0], wm[0] * ref[0][1][0] + wm[1] * ref[1][1][0])

    # with an adapter: equal fusion of one present condition == a one-condition unit with the same adapter
    model = _adapter(cns[0], unet)
    with torch.no_grad():
        two = CtrlAdapter(list(cns), model).residuals({"image": a, "fusion": "equal"}, ctx, call)
        one = CtrlAdapter(cns[0], model).residuals({"image": a}, ctx, call)
    assert all(torch.equal(x, y) for x, y in zip(two[0], one[0])) and torch.equal(two[1], one[1])


def test_locations_select_residuals_and_the_rest_are_zero(cns):
    unet = load_pipeline("tiny-sd15").unet
    layout = ResidualLayout.from_config(unet.config)
    assert layout.levels == (0, 0, 1, 1, 2, 2) and select_residuals(layout.levels, "ABCM", 1) == ([1, 3, 5], True)
    model = _adapter(cns[0], unet, locations="B", per_location=1)  # the last residual of level 1 only, no mid
    assert model.config.down_ids == [3] and model.mid_block_adapter is None
    ctx = ForwardContext(batch_size=1, cfg=False, timestep=torch.full((1,), 300.0), progress=torch.zeros(1),
                         latent_size=(8, 8), unet=unet)
    call = UNetCall(torch.randn(1, 4, 8, 8), torch.full((1,), 300.0), torch.randn(1, 77, 32))
    with torch.no_grad():
        down, mid = CtrlAdapter(cns[0], model).residuals({"image": _img(1)}, ctx, call)
    assert [bool(d.any()) for d in down] == [False, False, False, True, False, False] and mid is None
    with pytest.raises(StudioError, match="locations \\['E'\\] do not exist here"):
        select_residuals(layout.levels, "AE")


def test_latent_skipping_makes_the_controlnet_ignore_the_latent(cns):
    unet = load_pipeline("tiny-sd15").unet
    ctrl = CtrlAdapter(cns[0])
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 77, 32, generator=g)
    outs = {}
    for skip in (False, True):
        for seed in (1, 2):
            sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
            ctx = ForwardContext(batch_size=1, cfg=False, timestep=torch.full((1,), 300.0), progress=torch.zeros(1),
                                 latent_size=(8, 8), unet=unet)
            with torch.no_grad():
                outs[skip, seed] = ctrl.residuals({"image": _img(1), "skip_latents": skip}, ctx,
                                                  UNetCall(sample, torch.full((1,), 300.0), text))[0][0]
    assert torch.equal(outs[True, 1], outs[True, 2]) and not torch.allclose(outs[False, 1], outs[False, 2])
    assert not ctrl.controlnets[0].conv_in._forward_hooks, "the skipping hook is removed after the call"


# ---------------------------------------------------------------------------------------------------- formats
def _sd15_shaped_unet() -> UNet2DConditionModel:
    """A small UNet with SD1.5's structure (4 levels, 2 layers per block: 12 down residuals) for the release's
    layout, which is sized from SD1.5's residuals."""
    torch.manual_seed(3)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def test_released_key_layout_loads_and_wrong_shapes_are_refused(tmp_path):
    unet = _sd15_shaped_unet()
    cn = _controlnet(4, unet)
    assert select_residuals(ResidualLayout.from_config(cn.config).levels, "ABCD", 2)[0] == [0, 2, 3, 5, 6, 8, 9, 11], \
        "two adapters per location: the first and the last residual of each level, as released"
    upstream = {"_class_name": "ControlNetAdapter", "backbone_model_name": "i2vgenxl", "num_blocks": 1,
                "num_frames": 8, "num_adapters_per_location": 3, "cross_attention_dim": 32,
                "adapter_type": "spatial_temporal_resnet_transformer", "add_spatial_resnet": True,
                "add_temporal_resnet": False, "add_spatial_transformer": True, "add_temporal_transformer": False,
                "add_adapter_location_A": True, "add_adapter_location_B": True, "add_adapter_location_C": True,
                "add_adapter_location_D": False, "add_adapter_location_M": True, "num_repeats": 1,
                "out_channels": None, "num_attention_heads": 4, "attention_head_dim": 8}
    ours = CtrlAdapterModel.for_models(cn, unet, locations="ABCM", num_blocks=1, **TINY)
    sd = ours.state_dict()
    # the release's names, key for key (model/adapter_spatial_temporal.py + model/ctrl_adapter.py)
    for key in ("down_blocks_adapter.0.resnet_time_embedding.linear_1.weight",
                "down_blocks_adapter.0.spatial_resnets.0.conv_shortcut.weight",
                "down_blocks_adapter.8.spatial_resnets.0.time_emb_proj.weight", "down_blocks_adapter.3.norm.weight",
                "down_blocks_adapter.3.proj_in.weight", "down_blocks_adapter.3.spatial_attentions.0.attn2.to_k.weight",
                "mid_block_adapter.proj_out.bias", "mid_block_adapter.spatial_attentions.0.ff.net.0.proj.weight"):
        assert key in sd, key
    assert len(ours.down_blocks_adapter) == 9
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(upstream))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    router = tmp_path / "released" / "router"
    router.mkdir()
    (router / "config.json").write_text(json.dumps({"_class_name": "ControlNetRouter", "num_experts": 2,
                                                    "router_type": "simple_weights", "num_routers": 12,
                                                    "add_mid_block_router": True}))
    save_file({**{f"down_blocks_router.{i}.wg.weight": torch.randn(2, 1) for i in range(12)},
               "mid_block_router.wg.weight": torch.randn(2, 1)}, str(router / "diffusion_pytorch_model.safetensors"))
    ctrl = load_ctrl_adapter([cn, _controlnet(5, unet)], adapter=folder, unet=unet)
    assert all(torch.equal(v, ctrl.adapter.state_dict()[k]) for k, v in sd.items())
    assert ctrl.router is not None and ctrl.router.config.num_experts == 2

    # inspect names it without a model; the family's folder writer converts it to ours, which reloads the same
    fam = get_family("ctrl")
    desc = fam.inspect(folder)
    assert desc["format"] == "released Ctrl-Adapter folder (ControlNetAdapter)"
    assert desc["variant"] == "locations ABCM, 3 per location, 1 block(s) each"
    assert desc["router"] == "2 conditions over 12 residuals"
    assert desc["parameters"] == sum(v.numel() for v in sd.values()) + 26
    fam.writers["folder"](ctrl, tmp_path / "ours")
    again = load_ctrl_adapter([cn, _controlnet(5, unet)], adapter=tmp_path / "ours", unet=unet)
    assert all(torch.equal(v, again.adapter.state_dict()[k]) for k, v in sd.items())
    assert all(torch.equal(v, again.router.state_dict()[k]) for k, v in ctrl.router.state_dict().items())

    # a tensor of the wrong shape: refused with expected vs found
    bad = dict(sd)
    bad["down_blocks_adapter.0.proj_in.weight"] = torch.zeros(32, 16)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match=r"proj_in.weight expected \[32, 32\], found \[32, 16\]"):
        load_ctrl_adapter(cn, adapter=folder, unet=unet)
    # the release's SDXL adapters write 9 residuals; a 12-residual target with D selected is another target
    with pytest.raises(IncompatibleAdapterError, match="this UNet takes 6"):
        load_ctrl_adapter(cn, adapter=folder, unet=load_pipeline("tiny-sd15").unet)


def test_our_folder_and_diffusers_controlnet_formats_through_the_family(cns, studio, tmp_path):
    unet = studio.pipe.unet
    model = _adapter(cns[0], unet, seed=1)
    router = CtrlRouter(num_experts=2, num_routers=6)
    CtrlAdapter(list(cns), model, router).save_pretrained(tmp_path / "ctrl")
    assert (tmp_path / "ctrl" / "config.json").is_file() and (tmp_path / "ctrl" / "router" / "config.json").is_file()
    cns[0].save_pretrained(tmp_path / "cn0")
    cns[1].save_pretrained(tmp_path / "cn1")
    fam = get_family("ctrl")
    back = fam.load({"controlnet": str(tmp_path / "cn0"), "controlnet_2": str(tmp_path / "cn1"),
                     "adapter": str(tmp_path / "ctrl")}, studio.pipe)
    assert back.router is not None and len(back.controlnets) == 2
    assert all(torch.equal(v, back.adapter.state_dict()[k]) for k, v in model.state_dict().items())

    # single files: diffusers' from_single_file, its config from config= or a config.json beside the file
    single = tmp_path / "cn0.safetensors"
    save_file({k: v.contiguous() for k, v in cns[0].state_dict().items()}, str(single))
    for cn in (load_controlnet(single, config=str(tmp_path / "cn0")),
               load_controlnet(tmp_path / "cn0" / "diffusion_pytorch_model.safetensors")):
        assert all(torch.equal(v, cn.state_dict()[k]) for k, v in cns[0].state_dict().items())
    with pytest.raises(CheckpointError, match="give config= a diffusers ControlNet folder"):
        load_controlnet(single)

    # a plain-ControlNet unit through a mix: the family's loader, its JSON inputs, the stack
    _img(1).save(tmp_path / "edges.png")
    mix = Mix(units=[UnitSpec(family="ctrl", weights={"controlnet": "cn0"}, name="c", scale=0.8,
                              inputs={"image": ["edges.png"], "preprocessor": "canny", "guess_mode": "off"})])
    apply_mix(Mix.from_json(mix.to_json()), studio, base_dir=tmp_path)
    out = _run(studio)
    studio.stack.clear()
    studio.add(CtrlAdapter(cns[0]), "c", scale=0.8, image=preprocess(_img(1), "canny"))
    assert np.array_equal(out, _run(studio))


# ---------------------------------------------------------------------------------------------------- the family
def test_family_form_preview_and_preprocessors(tmp_path):
    fam = get_family("ctrl")
    assert (fam.name, fam.label) == ("ctrl", "Ctrl-Adapter / ControlNet")
    assert [w.key for w in fam.weights][:2] == ["controlnet", "adapter"] and not fam.weights[1].required
    assert fam.weights[0].folder == "controlnet" and fam.weights[1].folder == "ctrl"
    assert fam.comfy_nodes == ("AdapterStudioCtrlAdapterLoader", "AdapterStudioApplyCtrlAdapter")
    assert [(t.script, t.configs, t.data_key) for t in fam.training] == [
        ("train/ctrl_adapter.py", "ctrl_adapter*.yaml", "data_dir")]
    field = fam.field("image")
    assert field.preview is not None and fam.field("preprocessor").choices == tuple(PREPROCESSORS)
    photo = _img(7, 48)
    shown = field.preview({"image": photo, "preprocessor": "canny"})
    assert np.array_equal(np.asarray(shown)[..., 0], cv2.Canny(np.asarray(photo), 100, 200))
    assert field.preview({"image": None}) is None
    json.dumps(fam.to_json())  # the app's /families endpoint serves it

    for name, fn in PREPROCESSORS.items():
        out = preprocess(photo, name)
        assert out.mode == "RGB" and out.size == photo.size, name
    assert set(np.unique(np.asarray(preprocess(photo, "mask")))) <= {0, 255}
    assert set(np.unique(np.asarray(preprocess(photo, "scribble")))) <= {0, 255}
    assert preprocess(np.asarray(photo, dtype=np.float32) / 255, "grayscale").size == (48, 48)

    _img(1).save(tmp_path / "b.png")
    got = fam.inputs_from_json({"image": ["b.png"], "image_2": [["b.png", "b.png"]], "skip_latents": "on"}, tmp_path)
    assert isinstance(got["image"], Image.Image) and len(got["image_2"]) == 1 and len(got["image_2"][0]) == 2
    assert got["skip_latents"] is True
    # the form stores every field: a 2nd / 3rd condition's settings without its image are dropped, not refused
    got = fam.inputs_from_json({"image": "b.png", "preprocessor": "canny", "preprocessor_2": "none",
                                "conditioning_scale_3": 1.0, "skip_latents": "off"}, tmp_path)
    assert set(got) == {"image", "preprocessor", "skip_latents"}
    with pytest.raises(StudioError, match="unknown Ctrl inputs \\['strength'\\]"):
        fam.inputs_from_json({"strength": 1}, tmp_path)
    with pytest.raises(StudioError, match="does not exist"):
        fam.inputs_from_json({"image": "missing.png"}, tmp_path)


def _inspect(capsys, *argv) -> dict:
    from adapter_studio.cli import main

    assert main(["inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _original_layout(widths=(8, 16, 16, 16), layers=2, cross=24) -> dict[str, torch.Tensor]:
    """The key layout of the original ControlNet releases (lllyasviel `control_*.pth`: `control_model.` prefix,
    `input_blocks.{i}` = conv_in, then per level its resnets (+ attention) and a downsampler `op`, `zero_convs.{i}`,
    `input_hint_block`), at a tiny width: only the names and shapes matter here."""
    sd = {"input_hint_block.0.weight": torch.zeros(4, 3, 3, 3),
          "input_blocks.0.0.weight": torch.zeros(widths[0], 4, 3, 3)}
    i, prev = 1, widths[0]
    for level, w in enumerate(widths):
        for _ in range(layers):
            sd[f"input_blocks.{i}.0.in_layers.2.weight"] = torch.zeros(w, prev, 3, 3)
            sd[f"input_blocks.{i}.0.out_layers.3.weight"] = torch.zeros(w, w, 3, 3)
            if level < len(widths) - 1:
                sd[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(w, cross)
            prev, i = w, i + 1
        if level < len(widths) - 1:
            sd[f"input_blocks.{i}.0.op.weight"] = torch.zeros(w, w, 3, 3)
            i += 1
    sd.update({f"zero_convs.{j}.0.weight": torch.zeros(4, 4, 1, 1) for j in range(i)})
    return {f"control_model.{k}": v for k, v in sd.items()}


def test_inspect_and_convert_controlnets_and_adapters(cns, tmp_path, capsys):
    """`python -m adapter_studio inspect`: a ControlNet (folder, single file in diffusers' or the original key layout)
    by the backbone it was made for, and whether it fits a preset; our adapter folder with its router. `convert --to
    diffusers` turns a single file into a diffusers folder."""
    from adapter_studio.cli import main

    base = "ControlNet for cross_attention_dim 32, block widths 32, 64, 64 (1 layer per block)"
    cns[0].save_pretrained(tmp_path / "cn")
    d = _inspect(capsys, tmp_path / "cn", "--preset", "tiny-sd15")
    assert (d["family"], d["format"], d["variant"], d["base"]) == ("ctrl", "diffusers ControlNet folder", "ControlNet",
                                                                   base)
    assert d["parameters"] == sum(p.numel() for p in cns[0].parameters()) and d["dtype"] == "float32"
    assert d["fits tiny-sd15"].startswith("yes")
    d = _inspect(capsys, tmp_path / "cn", "--preset", "tiny-sdxl")
    assert d["fits tiny-sdxl"].startswith("no: ") and "another backbone" in d["fits tiny-sdxl"]
    single = tmp_path / "sf" / "cn.safetensors"  # its config.json beside it (else diffusers asks the hub)
    single.parent.mkdir()
    (single.parent / "config.json").write_text((tmp_path / "cn" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in cns[0].state_dict().items()}, str(single))
    d = _inspect(capsys, single)
    assert (d["format"], d["base"]) == ("single-file ControlNet (diffusers keys)", base)
    torch.save(_original_layout(), tmp_path / "control_tiny.pth")
    d = _inspect(capsys, tmp_path / "control_tiny.pth")
    assert d["format"] == "single-file ControlNet (original key layout)"
    assert d["base"] == "ControlNet for cross_attention_dim 24, block widths 8, 16, 16, 16 (2 layers per block)"

    sd15 = load_pipeline("tiny-sd15").unet
    model = _adapter(cns[0], sd15)
    CtrlAdapter(list(cns), model, CtrlRouter(num_experts=2, num_routers=6)).save_pretrained(tmp_path / "ad")
    d = _inspect(capsys, tmp_path / "ad", "--preset", "tiny-sd15")
    assert d["format"] == "Ctrl-Adapter folder (save_pretrained)"
    assert d["variant"] == "spatial, 6 of 6 residuals + mid, 1 block(s) each"
    assert d["base"]["target"] == ResidualLayout.from_config(sd15.config).describe()
    assert d["base"]["cross_attention_dim"] == 32 and d["router"] == "2 conditions over 6 residuals"
    assert d["parameters"] == sum(p.numel() for p in model.parameters()) + 14
    assert "is a Ctrl-Adapter, not a ControlNet: give it as the unit's 'adapter'" in d["fits tiny-sd15"]

    assert main(["convert", str(single), str(tmp_path / "cn_folder"), "--to", "diffusers", "--preset",
                 "tiny-sd15"]) == 0
    back = load_controlnet(tmp_path / "cn_folder")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in cns[0].state_dict().items())
    assert main(["convert", str(single), str(tmp_path / "x"), "--to", "folder", "--preset", "tiny-sd15"]) == 2
    assert "a plain ControlNet unit has no adapter weights" in capsys.readouterr().err
    # what is not a ControlNet or a Ctrl-Adapter is refused, so `inspect` asks the other families
    ip = IPAdapter.from_unet(sd15, 24)
    save_file({k: v.contiguous() for k, v in ip.state_dict().items()}, str(tmp_path / "ip.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet or a Ctrl-Adapter"):
        get_family("ctrl").inspect(tmp_path / "ip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="cannot read"):
        get_family("ctrl").inspect(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_or_reported(cns, studio, tmp_path):
    studio.add(CtrlAdapter(cns[0]), "ctrl", image=_img(1, 40))
    with pytest.warns(UserWarning, match="control image of 40x40 resized to the output size 64x64"):
        out = _run(studio)
    # resized as diffusers' pipeline resizes it (silently): the same image
    assert np.abs(out - _run(_diffusers_sd(cns[0]), image=_img(1, 40))).max() < 1e-5
    # a [3, H, W] tensor in 0..1 is the same control image as the picture it holds
    as_tensor = torch.from_numpy(np.asarray(_img(1), dtype=np.float32) / 255).permute(2, 0, 1)
    assert np.abs(_run(studio, adapter_inputs={"ctrl": {"image": as_tensor}})
                  - _run(studio, adapter_inputs={"ctrl": {"image": _img(1)}})).max() < 1e-6
    for bad, match in ((object(), "must be an image .* got object"), ("no/such.png", "is not an image file"),
                       (np.zeros((4, 4, 7)), "got shape \\[4, 4, 7\\]")):
        with pytest.raises(StudioError, match=match):
            _run(studio, adapter_inputs={"ctrl": {"image": bad}})
    with pytest.raises(StudioError, match="unknown preprocessor 'hed'"):
        _run(studio, adapter_inputs={"ctrl": {"preprocessor": "hed"}})
    with pytest.raises(StudioError, match="unknown Ctrl inputs \\['image_2'\\] \\(this unit has 1 ControlNet\\)"):
        _run(studio, adapter_inputs={"ctrl": {"image_2": _img(1)}})
    studio.stack.clear()

    # a ControlNet made for another backbone, no adapter: refused, naming both layouts; the UNet untouched
    unet = studio.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    procs = dict(unet.attn_processors)
    sdxl_cn = _controlnet(6, load_pipeline("tiny-sdxl").unet)
    sdxl_cn.save_pretrained(tmp_path / "sdxl_cn")
    with pytest.raises(IncompatibleAdapterError, match=r"made for a UNet with 6 down residuals \[32@1 32@1 32@1 "
                                                       r"32@2 64@2 64@2\].*this UNet takes 6 down residuals \[32@1 "
                                                       r"32@1 32@2 64@2 64@4 64@4\]"):
        get_family("ctrl").load({"controlnet": str(tmp_path / "sdxl_cn")}, studio.pipe)
    with pytest.raises(IncompatibleAdapterError, match="another backbone"):
        studio.add(CtrlAdapter(sdxl_cn), "x")
    # an adapter made for another target (tiny-sdxl) on this UNet
    with pytest.raises(IncompatibleAdapterError, match="made for another target model"):
        studio.add(CtrlAdapter(cns[0], _adapter(cns[0], load_pipeline("tiny-sdxl").unet)), "y")
    assert len(studio.stack) == 0 and dict(unet.attn_processors) == procs
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------- together
def test_ctrl_ip_adapter_and_agd_in_one_sampling_call(cns):
    sp = StudioPipeline.from_preset("tiny-sd15")
    pipe = sp.pipe
    torch.manual_seed(0)
    ip = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim, projection="base",
                             init_from_unet=False)
    agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=16)
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0.0, 0.2)
        for blk in agd.blocks:
            blk.out_proj.weight.normal_(0.0, 0.2)
    sp.add(ip, "ip", image=_img(8, 40))
    sp.add(CtrlAdapter(cns[0]), "ctrl", image=_img(1))
    sp.add(agd, "agd")
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append((a[0] if a else k["sample"]).shape[0]),
                                               with_kwargs=True)
    kw = dict(steps=3, guidance="agd", guidance_scale=6.0)
    all_three = _run(sp, **kw)
    hook.remove()
    assert calls == [1, 1, 1], "AGD: one UNet pass per step with the IP-Adapter and the ControlNet acting"
    for name in ("ip", "ctrl"):
        sp.stack[name].enabled = False
        assert np.abs(_run(sp, **kw) - all_three).max() > 1e-3, f"{name} acts next to the others"
        sp.stack[name].enabled = True
    sp.stack["agd"].enabled = False
    assert np.abs(_run(sp, steps=3, guidance="cfg", guidance_scale=6.0) - all_three).max() > 1e-3


# ---------------------------------------------------------------------------------------------------- training
def test_only_adapter_and_router_train(cns):
    pipe = load_pipeline("tiny-sd15")
    model = _adapter(cns[0], pipe.unet)
    ctrl = CtrlAdapter(list(cns), model, CtrlRouter(2, 6)).train()
    assert not ctrl.controlnets.training and ctrl.adapter.training
    params = ctrl.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for p in [*model.parameters(), *ctrl.router.parameters()]}
    assert not any(p.requires_grad for p in ctrl.controlnets.parameters())
    ctx = ForwardContext(batch_size=1, cfg=False, timestep=torch.full((1,), 300.0), progress=torch.zeros(1),
                         latent_size=(8, 8), unet=pipe.unet)
    call = UNetCall(torch.randn(1, 4, 8, 8), torch.full((1,), 300.0), torch.randn(1, 77, 32))
    down, mid = ctrl.residuals({"image": _img(1), "image_2": _img(2), "fusion": "router"}, ctx, call)
    (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
    assert all(p.grad is not None for p in params) and ctrl.router.down_blocks_router[0].wg.weight.grad.abs().sum() > 0


def test_adapter_for_models_of_widths_32_does_not_divide():
    """A backbone 48 / 96 channels wide (the toy model's) gets group norms that divide its widths (it was always 32:
    GroupNorm refused 48 channels and the toy build's Ctrl-Adapter run failed before its first step)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(48, 96, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16).eval()
    cn = _controlnet(0, unet=unet)
    ada = _adapter(cn, unet)
    assert ada.config.norm_num_groups == 24  # gcd(48, 96) = 48: the largest count <= 32 dividing it
    assert CtrlAdapterModel.for_models(build_tiny_controlnet(0), load_pipeline("tiny-sd15").unet,
                                       num_blocks=1, **TINY).config.norm_num_groups == 32  # release widths: as before
    ctrl = CtrlAdapter([cn], ada)
    sp = StudioPipeline(StableDiffusionPipeline(**{**load_pipeline("tiny-sd15").components, "unet": unet}))
    sp.add(ctrl, "ctrl", image=_img(1), preprocessor="canny")
    out = sp("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
