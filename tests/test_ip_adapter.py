"""IP-Adapter inference: parity with diffusers' own loader/processor, formats, per-sample references, masks, errors."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from adapter_studio.adapters.ip_adapter import IPAdapter, load_ip_adapter, original_state_dict, save_original
from adapter_studio.adapters.ip_adapter.formats import read_weights
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.errors import CheckpointError, IncompatibleAdapterError, StudioError
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import get_family
from adapter_studio.stack import AdapterStack


def _img(seed, size=40):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def _embed_dim(pipe, kind):
    cfg = pipe.image_encoder.config
    return cfg.projection_dim if kind == "base" else cfg.hidden_size


def _random_adapter(pipe, kind="base", seed=0, std=0.2):
    """An IP-Adapter with random weights for the tiny UNet (random, so every weight shows in the output)."""
    torch.manual_seed(seed)
    ad = IPAdapter.from_unet(pipe.unet, _embed_dim(pipe, kind), projection=kind, init_from_unet=False)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0.0, std)
    return ad


def _run(pipe, prompt="a cat", steps=3, **kw):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                height=64, width=64, **kw).images


@pytest.fixture(scope="module")
def pipes():
    """A plain diffusers pipeline (for `load_ip_adapter`) and a StudioPipeline on an identical copy."""
    dpipe = load_pipeline("tiny-sd15")
    studio = StudioPipeline(load_pipeline("tiny-sd15"))
    yield dpipe, studio


@pytest.fixture
def diffusers_pipe(pipes):
    dpipe, _ = pipes
    encoder, fe = dpipe.image_encoder, dpipe.feature_extractor
    yield dpipe
    if getattr(dpipe.unet, "encoder_hid_proj", None) is not None:
        dpipe.unload_ip_adapter()  # also drops the image encoder: put the preset's back
    dpipe.register_modules(image_encoder=encoder, feature_extractor=fe)


@pytest.fixture
def studio(pipes):
    _, sp = pipes
    yield sp
    sp.stack.clear()


@pytest.mark.parametrize("kind", ["base", "plus", "full"])
def test_original_file_matches_diffusers_load_ip_adapter(tmp_path, diffusers_pipe, studio, kind):
    path = save_original(_random_adapter(diffusers_pipe, kind), tmp_path / f"ip_{kind}.bin")
    diffusers_pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    ref = _run(diffusers_pipe, ip_adapter_image=_img(0))
    studio.add(get_family("ip").load(str(path), studio.pipe), "ip", image=_img(0))
    out = _run(studio)
    assert np.abs(out - ref).max() < 1e-5
    studio.stack["ip"].scale = 0.0
    bare = _run(studio)
    assert np.abs(bare - ref).max() > 1e-2, "the adapter changes the image, so the parity above means something"
    if kind == "base":  # per-block scale (InstantStyle convention) == diffusers' set_ip_adapter_scale
        scale = {"down": {"block_1": 0.5}, "up": {"block_1": [0.0, 1.0]}}
        diffusers_pipe.set_ip_adapter_scale(scale)
        studio.stack["ip"].scale = scale
        assert np.abs(_run(studio) - _run(diffusers_pipe, ip_adapter_image=_img(0))).max() < 1e-5


@pytest.mark.parametrize("preset,kind", [("tiny-sdxl", "plus"), ("tiny-video", "base")])
def test_sdxl_numbering_and_video_frames_match_diffusers(tmp_path, preset, kind):
    """SDXL-shaped UNet: two transformer blocks per attention, so the original keys step through blocks.
    AnimateDiff UNet: motion modules are skipped in the numbering and the attention batch is samples x frames."""
    dpipe, studio = load_pipeline(preset), StudioPipeline(load_pipeline(preset))
    path = save_original(_random_adapter(dpipe, kind, seed=11), tmp_path / "ip.safetensors")
    dpipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    studio.add(load_ip_adapter(path, studio.pipe.unet, studio.pipe.image_encoder), "ip", image=_img(0))
    kw = dict(num_inference_steps=2, output_type="np", height=64, width=64, guidance_scale=5.0)
    if preset == "tiny-video":
        kw["num_frames"] = 4
    ref = dpipe("a cat", ip_adapter_image=_img(0), generator=torch.Generator().manual_seed(0), **kw)
    out = studio("a cat", generator=torch.Generator().manual_seed(0), **kw)
    key = "frames" if preset == "tiny-video" else "images"
    assert np.abs(np.asarray(getattr(out, key)) - np.asarray(getattr(ref, key))).max() < 1e-5
    assert len(studio.stack["ip"].adapter.layer_names()) == {"tiny-sdxl": 12, "tiny-video": 7}[preset]


def test_two_adapters_several_images_and_embeds_match_diffusers(tmp_path, diffusers_pipe, studio):
    base = save_original(_random_adapter(diffusers_pipe, "base", seed=1), tmp_path / "a.safetensors")
    plus = save_original(_random_adapter(diffusers_pipe, "plus", seed=2), tmp_path / "b.bin")
    diffusers_pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=[base.name, plus.name],
                                   image_encoder_folder=None)
    diffusers_pipe.set_ip_adapter_scale([0.6, 0.8])
    images = [_img(1), [_img(2), _img(3)]]  # the plus adapter gets two reference images (tokens concatenated)
    ref = _run(diffusers_pipe, ip_adapter_image=images)
    studio.add(load_ip_adapter(base, studio.pipe.unet, studio.pipe.image_encoder), "a", scale=0.6, image=images[0])
    studio.add(load_ip_adapter(plus, studio.pipe.unet, studio.pipe.image_encoder), "b", scale=0.8, image=images[1])
    assert np.abs(_run(studio) - ref).max() < 1e-5

    # precomputed embeddings with explicit negatives (diffusers takes them stacked [negative; positive])
    g = torch.Generator().manual_seed(5)
    e_base, n_base = torch.randn(1, 1, 24, generator=g), torch.randn(1, 1, 24, generator=g)
    e_plus, n_plus = torch.randn(1, 2, 17, 32, generator=g), torch.randn(1, 2, 17, 32, generator=g)
    ref = _run(diffusers_pipe, ip_adapter_image_embeds=[torch.cat([n_base, e_base]), torch.cat([n_plus, e_plus])])
    out = _run(studio, adapter_inputs={"a": {"image": None, "image_embeds": e_base, "negative_image_embeds": n_base},
                                       "b": {"image": None, "image_embeds": e_plus, "negative_image_embeds": n_plus}})
    assert np.abs(out - ref).max() < 1e-5


def test_single_adapter_embeds_path_and_average(tmp_path, diffusers_pipe, studio):
    path = save_original(_random_adapter(diffusers_pipe, "base", seed=3), tmp_path / "ip.bin")
    diffusers_pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pos = torch.randn(1, 1, 24, generator=torch.Generator().manual_seed(0))
    ref = _run(diffusers_pipe, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(pos), pos])])
    ad = load_ip_adapter(path, studio.pipe.unet)
    studio.add(ad, "ip", image_embeds=pos)  # default negative: projection of zero embeddings, as diffusers does
    assert np.abs(_run(studio) - ref).max() < 1e-5
    # combine="average" of two embeddings == one image whose embedding is their mean
    two = torch.randn(1, 2, 24, generator=torch.Generator().manual_seed(1))
    avg = _run(studio, adapter_inputs={"ip": {"image_embeds": two, "combine": "average"}})
    mean = _run(studio, adapter_inputs={"ip": {"image_embeds": two.mean(1, keepdim=True)}})
    concat = _run(studio, adapter_inputs={"ip": {"image_embeds": two}})
    assert np.abs(avg - mean).max() < 1e-6 and np.abs(avg - concat).max() > 1e-3


def test_original_bin_to_safetensors_round_trip_loads_in_diffusers(tmp_path, diffusers_pipe, studio):
    src = save_original(_random_adapter(diffusers_pipe, "plus", seed=4), tmp_path / "orig.bin")
    raw = read_weights(src)
    assert set(raw) == {"image_proj", "ip_adapter"} and "latents" in raw["image_proj"]
    ad = load_ip_adapter(src, studio.pipe.unet, studio.pipe.image_encoder)
    out_dir = tmp_path / "export"
    dst = save_original(ad, out_dir / "ip.safetensors")
    flat = read_weights(dst)
    assert all(torch.equal(flat[f"{p}.{k}"], v) for p in raw for k, v in raw[p].items()) and \
        len(flat) == sum(len(v) for v in raw.values())
    diffusers_pipe.load_ip_adapter(str(out_dir), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    studio.add(ad, "ip", image=_img(7))
    assert np.abs(_run(studio) - _run(diffusers_pipe, ip_adapter_image=_img(7))).max() < 1e-5

    # diffusers-converted weights (a UNet state dict after load_ip_adapter) read back to the same tensors
    conv = load_ip_adapter(diffusers_pipe.unet.state_dict(), studio.pipe.unet)
    assert all(torch.equal(a, b) for a, b in zip(conv.state_dict().values(), ad.state_dict().values()))


def test_folder_format_round_trip_and_registry(tmp_path, studio):
    ad = _random_adapter(studio.pipe, "plus", seed=5)
    ad.save_pretrained(tmp_path / "ip")
    assert (tmp_path / "ip" / "config.json").is_file()
    back = get_family("ip").load(str(tmp_path / "ip"), studio.pipe)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ad.config)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ad.state_dict().items())
    # the folder's weights file is the original flattened format: diffusers-style readers take it as is
    assert set(original_state_dict(back)) == {"image_proj", "ip_adapter"}
    studio.add(ad, "a", image=_img(1))
    ref = _run(studio)
    studio.remove("a")
    studio.add(back, "b", image=_img(1))
    assert np.array_equal(_run(studio), ref)


def test_per_sample_references_equal_separate_runs(studio):
    studio.add(_random_adapter(studio.pipe, "base", seed=6), "ip")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=3, output_type="latent", height=64, width=64)
    both = studio(["a cat", "a dog"], latents=latents, adapter_inputs={"ip": {"sample_images": [_img(1), _img(2)]}},
                  **kw).images
    one = studio("a cat", latents=latents[:1], adapter_inputs={"ip": {"image": _img(1)}}, **kw).images
    two = studio("a dog", latents=latents[1:], adapter_inputs={"ip": {"image": _img(2)}}, **kw).images
    # final latents reach |13|; batching alone (no adapter) moves them by ~1.5e-5 on this CPU, so 1e-4 absolute
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=0, atol=1e-4)
    swapped = studio("a dog", latents=latents[1:], adapter_inputs={"ip": {"image": _img(1)}}, **kw).images
    assert (swapped - two).abs().max() > 0.05, "sample 1 sees its own reference, not sample 0's"
    with pytest.raises(StudioError, match="3 rows; give 1 \\(shared\\), one per sample \\(2\\)"):
        studio(["a", "b"], adapter_inputs={"ip": {"sample_images": [_img(1)] * 3}}, **kw)


def test_mask_confines_the_effect(sd15_pipe, unet_inputs):
    unet = sd15_pipe.unet
    ad = _random_adapter(sd15_pipe, "base", seed=7)
    stack = AdapterStack().attach(unet)
    mask = torch.zeros(128, 128)
    mask[:, :64] = 1.0  # left half; binary at every layer's resolution (16, 8, 4 tokens wide)
    slot = stack.add(ad, "ip", image_embeds=torch.randn(1, 1, 24), mask=mask)
    seen = {}
    hooks = [unet.get_submodule(n[: -len(".processor")]).register_forward_hook(
        lambda m, a, kw, out, n=n: seen.__setitem__(n, (a[0], kw.get("encoder_hidden_states"), out)), with_kwargs=True)
        for n in ad.layer_names()]
    with torch.no_grad():
        masked = unet(**unet_inputs).sample
    for h in hooks:
        h.remove()
    for name, (hs, ehs, out) in seen.items():
        attn = unet.get_submodule(name[: -len(".processor")])
        with torch.no_grad():
            base = stack._original[name](attn, hs, encoder_hidden_states=ehs)
        side = int(round(hs.shape[1] ** 0.5))
        out, base = out.view(2, side, side, -1), base.view(2, side, side, -1)
        assert torch.equal(out[:, :, side // 2:], base[:, :, side // 2:]), f"{name}: right half untouched"
        assert (out[:, :, : side // 2] - base[:, :, : side // 2]).abs().max() > 1e-3, f"{name}: left half changed"
    # whole-UNet checks: an empty mask is exactly no adapter, a full mask exactly no mask
    with torch.no_grad():
        slot.inputs["mask"] = torch.zeros(64, 64)
        empty = unet(**unet_inputs).sample
        slot.inputs["mask"] = np.ones((32, 32), dtype=bool)
        full = unet(**unet_inputs).sample
        del slot.inputs["mask"]
        unmasked = unet(**unet_inputs).sample
        stack.detach()
        bare = unet(**unet_inputs).sample
    assert torch.equal(empty, bare) and torch.equal(full, unmasked)
    assert not torch.allclose(masked, bare) and not torch.allclose(masked, unmasked)

    # two regions, two references, ONE adapter module in two slots == two separate copies of it
    import copy

    right = 1.0 - mask
    e1, e2 = torch.randn(1, 1, 24), torch.randn(1, 1, 24)
    outs = []
    for second in (ad, copy.deepcopy(ad)):
        stack = AdapterStack().attach(unet)
        stack.add(ad, "left", image_embeds=e1, mask=mask)
        stack.add(second, "right", image_embeds=e2, mask=right)
        with torch.no_grad():
            outs.append(unet(**unet_inputs).sample)
        stack.detach()
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], masked)


def _bad_files(pipe, tmp_path):
    """Files made for another base model / encoder / architecture, in the original format."""
    names = IPAdapter.from_unet(pipe.unet, 24).config.layer_names
    hidden = list(IPAdapter.from_unet(pipe.unet, 24).config.hidden_sizes)
    files = {}
    other_cad = IPAdapter(projection="base", image_embed_dim=24, cross_attention_dim=48, layer_names=names,
                          hidden_sizes=hidden)
    files["cad"] = (save_original(other_cad, tmp_path / "cad.bin"), "cross_attention_dim 48.*cross_attention_dim 32")
    sd = original_state_dict(_random_adapter(pipe, "base"))
    fewer = {"image_proj": sd["image_proj"], "ip_adapter": {k: v for k, v in sd["ip_adapter"].items()
                                                            if not k.startswith("13.")}}
    torch.save(fewer, tmp_path / "layers.bin")
    files["layers"] = (tmp_path / "layers.bin", "6 cross-attention layers \\(keys 1..11\\), this UNet has 7 "
                                                "\\(expected keys 1..13\\)")
    other_enc = IPAdapter.from_unet(pipe.unet, 16)
    files["embed"] = (save_original(other_enc, tmp_path / "embed.safetensors"),
                      "image embeddings of size 16.*projection_dim \\(image_embeds\\) 24")
    wide = original_state_dict(_random_adapter(pipe, "base"))
    wide["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(48, 32)
    wide["ip_adapter"]["1.to_v_ip.weight"] = torch.zeros(48, 32)
    torch.save(wide, tmp_path / "width.bin")
    files["width"] = (tmp_path / "width.bin", "expects 32 \\(shape \\[32, 32\\] expected, \\[48, 32\\] found\\)")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "foreign.bin")
    files["foreign"] = (tmp_path / "foreign.bin", "not an IP-Adapter checkpoint")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    files["trunc"] = (tmp_path / "trunc.safetensors", "cannot read IP-Adapter weights")
    good = tmp_path / "good.bin"
    torch.save(original_state_dict(_random_adapter(pipe, "base")), good)
    (tmp_path / "trunc.bin").write_bytes(good.read_bytes()[:200])
    files["trunc-bin"] = (tmp_path / "trunc.bin", "cannot read IP-Adapter weights .*the file is truncated")
    # our folder format with a pickle that would run code in place of the safetensors file
    evil = tmp_path / "evil"
    _random_adapter(pipe, "base").save_pretrained(evil)
    (evil / "diffusion_pytorch_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(evil / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    files["evil"] = (evil, "cannot load the IP-Adapter folder")
    return files


def test_wrong_shape_checkpoints_get_clear_errors_and_leave_the_unet_alone(tmp_path, studio):
    studio.add(_random_adapter(studio.pipe, "base", seed=8), "ip", image=_img(0))
    before = _run(studio)
    unet_state = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items()}
    procs = dict(studio.pipe.unet.attn_processors)
    for what, (path, message) in _bad_files(studio.pipe, tmp_path).items():
        with pytest.raises(CheckpointError, match=message):
            get_family("ip").load(str(path), studio.pipe)
        err = CheckpointError if what in ("foreign", "trunc", "trunc-bin", "evil") else IncompatibleAdapterError
        with pytest.raises(err):
            load_ip_adapter(path, studio.pipe.unet, studio.pipe.image_encoder)
    # an adapter built for another UNet is refused by the stack too
    from adapter_studio.presets import load_pipeline as lp
    xl = lp("tiny-sdxl")
    with pytest.raises(IncompatibleAdapterError, match="cross_attention_dim"):
        studio.add(IPAdapter.from_unet(xl.unet, 24), "other")
    assert list(studio.stack.slots) == ["ip"]
    assert dict(studio.pipe.unet.attn_processors) == procs
    assert all(torch.equal(v, studio.pipe.unet.state_dict()[k]) for k, v in unet_state.items())
    assert np.array_equal(_run(studio), before)


def test_bad_inputs_are_clear_errors(studio):
    studio.add(_random_adapter(studio.pipe, "plus", seed=9), "ip")
    with pytest.raises(StudioError, match="exactly one of `image`, `sample_images` or `image_embeds`"):
        _run(studio)
    with pytest.raises(StudioError, match="unknown IP-Adapter inputs \\['scale_image'\\]"):
        _run(studio, adapter_inputs={"ip": {"image": _img(0), "scale_image": 2}})
    with pytest.raises(IncompatibleAdapterError, match="expects image embeddings of size 32, got 24"):
        _run(studio, adapter_inputs={"ip": {"image_embeds": torch.randn(1, 1, 5, 24)}})
    with pytest.raises(StudioError, match="mask must be"):
        _run(studio, adapter_inputs={"ip": {"image": _img(0), "mask": torch.ones(1, 1, 1, 8, 8)}})


def test_a_plain_diffusers_call_of_the_wrapped_pipeline_runs_the_units_fixed_inputs(studio):
    """`StudioPipeline(pipe)` then the user's own `pipe(...)`: the unit's reference image is encoded on the call's
    first UNet forward and CFG is read from the pipeline, so the output equals the wrapper's."""
    studio.add(_random_adapter(studio.pipe, "plus", seed=3), "ip", scale=0.8, image=_img(4))
    wrapped = _run(studio, guidance_scale=6.0)
    plain = _run(studio.pipe, guidance_scale=6.0)
    np.testing.assert_allclose(plain, wrapped, atol=1e-6)
    studio.stack["ip"].inputs["image"] = _img(5)  # a new reference is picked up by the next plain call
    changed = _run(studio.pipe, guidance_scale=6.0)
    assert not np.allclose(changed, plain, atol=1e-4)
    np.testing.assert_allclose(changed, _run(studio, guidance_scale=6.0), atol=1e-6)
    studio.stack["ip"].scale = 0.0
    studio.stack["ip"].inputs["image"] = _img(4)
    assert np.array_equal(_run(studio.pipe, guidance_scale=6.0), _run(studio, guidance_scale=6.0))


def test_training_forwards_use_the_slot_inputs_as_they_are(studio):
    """With gradients on (a training step) the stack never takes a forward for a plain diffusers call: inputs set per
    batch act at once, even on a wrapped pipeline whose last plain call left encoded inputs behind."""
    ad = _random_adapter(studio.pipe, "base", seed=5)
    slot = studio.add(ad, "ip", image=_img(1))
    _run(studio.pipe, guidance_scale=6.0)  # a plain call: encodes the reference and keeps it for that call
    unet = studio.pipe.unet
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    outs = []
    for seed in (1, 2):
        slot.inputs = {"image_embeds": torch.randn(2, 24, generator=torch.Generator().manual_seed(seed))}
        outs.append(unet(x, torch.tensor([901, 901]), text).sample)
    assert not torch.allclose(outs[0], outs[1]), "the second batch's embeddings act"
    ref = AdapterStack().attach(load_pipeline("tiny-sd15").unet)
    ref.add(ad, "ip", image_embeds=slot.inputs["image_embeds"])
    torch.testing.assert_close(outs[1], ref.unet(x, torch.tensor([901, 901]), text).sample)
    ref.detach()
    p = load_pipeline("tiny-sd15")
    assert StudioPipeline(p, stack=AdapterStack().attach(p.unet)).stack.pipe is None, "a given stack stays the caller's"
