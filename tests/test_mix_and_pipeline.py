"""Mixes (versioned JSON) and the StudioPipeline wrapper around diffusers pipelines."""

import json

import numpy as np
import pytest
import torch

from dummy_adapters import LinearAttnAdapter
from adapter_studio.pipelines import StudioPipeline
from adapter_studio import Mix, MixError, StudioError, UnitSpec, apply_mix
from adapter_studio.mix import file_sha256
from adapter_studio.registry import Family, register_family, unregister_family


def _gen(pipe, **kw):
    kw.setdefault("num_inference_steps", 4)
    return pipe("a red house", generator=torch.Generator().manual_seed(0), output_type="np", height=64, width=64, **kw).images


def test_mix_round_trip_and_errors(tmp_path):
    mix = Mix(model="tiny-sd15", sampling={"seed": 3, "steps": 4},
              units=[UnitSpec(family="ip", weights="models/ip.safetensors", scale={"up": {"block_0": [0.0, 1.0, 0.0]}},
                              start=0.1, end=0.9, inputs={"images": ["a.png"]}),
                     UnitSpec(family="agd", weights="models/agd", inputs={"w": 5.0})])
    path = mix.save(tmp_path / "mix.json")
    back = Mix.load(path)
    assert back == mix and back.to_dict()["format"] == "adapter-studio/mix"
    d = json.loads(path.read_text())
    with pytest.raises(MixError, match="mix version 3 is not supported: this studio reads versions 1, 2"):
        Mix.from_dict({**d, "version": 3})
    with pytest.raises(MixError, match="unknown keys \\['strength'\\]"):
        Mix.from_dict({**d, "units": [{"family": "ip", "strength": 1}]})
    with pytest.raises(MixError, match="window"):
        Mix.from_dict({**d, "units": [{"family": "ip", "start": 0.9, "end": 0.1}]})
    with pytest.raises(MixError, match="'units' must be a list"):
        Mix.from_dict({**d, "units": {"family": "ip"}})
    with pytest.raises(MixError, match="must be JSON"):
        Mix.from_json("{not json")
    with pytest.raises(MixError, match="scale"):
        Mix.from_dict({**d, "units": [{"family": "ip", "scale": "loud"}]})


def test_file_hash(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256("owner/hub-id") is None


def test_wrapper_without_adapters_equals_plain_diffusers(sd15_pipe):
    ref = _gen(sd15_pipe)
    studio = StudioPipeline(sd15_pipe)
    assert np.array_equal(_gen(studio), ref)
    slot = studio.add(LinearAttnAdapter(sd15_pipe.unet))
    assert not np.array_equal(_gen(studio), ref)
    slot.scale = 0.0
    assert np.array_equal(_gen(studio), ref)


def test_window_counts_steps_and_cfg_mask_covers_both_halves(sd15_pipe):
    studio = StudioPipeline(sd15_pipe)
    adapter = LinearAttnAdapter(sd15_pipe.unet)
    slot = studio.add(adapter, start=0.2, end=0.6)
    active = []
    orig = adapter.contribution

    def spy(layer, *a):
        active.append(float(studio.stack.context.step_progress()[0]))
        return orig(layer, *a)

    adapter.contribution = spy
    _gen(studio, num_inference_steps=10)
    fractions = sorted(set(active))
    assert fractions == pytest.approx([0.2, 0.3, 0.4, 0.5]), "steps 2..5 of 10 are inside [0.2, 0.6)"
    assert all(ctx.cfg and ctx.batch_size == 2 for ctx in adapter.prepared)
    # per-sample mask under CFG: prompt 0 with the adapter, prompt 1 without == separate runs
    slot.set_window(0.0, 1.0)
    both = studio(["a red house", "a blue car"], num_inference_steps=3, height=64, width=64, output_type="np",
                  generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
                  adapter_inputs={slot.name: {"sample_mask": [True, False]}}).images
    assert slot.sample_mask is None, "a per-call mask does not stick to the slot"
    one = studio("a red house", num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    slot.enabled = False
    two = studio("a blue car", num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(both[0], one[0], atol=1e-4)
    np.testing.assert_allclose(both[1], two[0], atol=1e-4)


def test_guidance_modes_are_checked(sd15_pipe):
    studio = StudioPipeline(sd15_pipe)
    assert studio.guidance_mode("auto") == "cfg"
    with pytest.raises(StudioError, match="guidance='agd' needs an enabled adapter providing it"):
        studio.guidance_mode("agd")
    with pytest.raises(StudioError, match="not in the stack"):
        studio("x", adapter_inputs={"nope": {}})


def test_apply_mix_loads_units_and_keeps_stack_on_error(sd15_pipe, tmp_path):
    torch.save(LinearAttnAdapter(sd15_pipe.unet, seed=4).state_dict(), tmp_path / "dummy.pt")

    def load(weights, pipe):
        ad = LinearAttnAdapter(pipe.unet)
        ad.load_state_dict(torch.load(weights["weights"], weights_only=True))
        return ad

    register_family(Family("dummy", "Dummy", loader=load))
    try:
        studio = StudioPipeline(sd15_pipe)
        mix = Mix(units=[UnitSpec(family="dummy", weights="dummy.pt", scale=0.5, name="d")])
        assert apply_mix(mix, studio, base_dir=tmp_path) == ["d"]
        assert studio.stack["d"].scale == 0.5
        studio.pipe.unet.to(torch.float64)
        apply_mix(mix, studio, base_dir=tmp_path)
        assert studio.stack["d"].adapter.proj[0].weight.dtype == torch.float64, "adapters follow the UNet's dtype"
        studio.pipe.unet.to(torch.float32)
        apply_mix(mix, studio, base_dir=tmp_path)
        torch.testing.assert_close(studio.stack["d"].adapter.proj[0].weight, LinearAttnAdapter(sd15_pipe.unet, seed=4).proj[0].weight)
        bad = Mix(units=[UnitSpec(family="dummy", weights="dummy.pt"), UnitSpec(family="no-such-family")])
        with pytest.raises(MixError, match="unknown adapter family 'no-such-family'"):
            apply_mix(bad, studio, base_dir=tmp_path)
        assert list(studio.stack.slots) == ["d"], "a failed mix leaves the stack as it was"
    finally:
        unregister_family("dummy")


def test_set_sampler_starts_from_the_model_config_each_time(sd15_pipe):
    studio = StudioPipeline(sd15_pipe)
    studio.set_sampler("DPM++ 2M Karras")
    assert studio.pipe.scheduler.config.use_karras_sigmas
    studio.set_sampler("DPM++ 2M")
    assert not studio.pipe.scheduler.config.use_karras_sigmas, "the last sampler's settings must not carry over"
    studio.set_sampler("DDIM")
    assert type(studio.pipe.scheduler).__name__ == "DDIMScheduler"
    assert studio.pipe.scheduler.config.beta_schedule == sd15_pipe.scheduler.config.beta_schedule
