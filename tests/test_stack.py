"""The composing adapter stack on the real diffusers UNet."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from dummy_adapters import ConstantResidualAdapter, LinearAttnAdapter, attention_layers
from adapter_studio import AdapterStack, StudioError
from adapter_studio.processor import ComposingAttnProcessor
from adapter_studio.block_scale import layer_scale


def _run(unet, inp):
    with torch.no_grad():
        return unet(**inp).sample


def test_attached_empty_and_detached_stack_is_bit_identical(sd15_pipe, unet_inputs):
    unet = sd15_pipe.unet
    ref = _run(unet, unet_inputs)
    originals = dict(unet.attn_processors)
    stack = AdapterStack().attach(unet)
    assert all(isinstance(p, ComposingAttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(_run(unet, unet_inputs), ref)
    stack.detach()
    assert all(unet.attn_processors[k] is v for k, v in originals.items()), "detach restores the very same processors"
    assert torch.equal(_run(unet, unet_inputs), ref)


@pytest.mark.parametrize("target", ["attn1", "attn2"])
def test_zero_scale_window_and_disabled_are_bit_identical(sd15_pipe, unet_inputs, target):
    unet = sd15_pipe.unet
    ref = _run(unet, unet_inputs)
    stack = AdapterStack().attach(unet)
    slot = stack.add(LinearAttnAdapter(unet, target=target))
    assert not torch.equal(_run(unet, unet_inputs), ref), "the adapter does act"
    slot.scale = 0.0
    assert torch.equal(_run(unet, unet_inputs), ref)
    slot.scale = {"down": 0.0, "mid": 0.0, "up": {"block_1": [0.0, 0.0]}}
    assert torch.equal(_run(unet, unet_inputs), ref)
    slot.scale = 1.0
    # t=500 -> progress 0.5 outside a sampling run; a window of [0, 0.4) excludes it
    slot.end = 0.4
    assert torch.equal(_run(unet, unet_inputs), ref)
    slot.set_window(0.45, 0.55)
    assert not torch.equal(_run(unet, unet_inputs), ref)
    slot.enabled = False
    assert torch.equal(_run(unet, unet_inputs), ref)
    slot.enabled = True
    stack.remove(slot.name)
    assert torch.equal(_run(unet, unet_inputs), ref)


def test_two_adapters_add_their_contributions(sd15_pipe, unet_inputs):
    unet = sd15_pipe.unet
    stack = AdapterStack().attach(unet)
    a, b = LinearAttnAdapter(unet, seed=1), LinearAttnAdapter(unet, seed=2)
    _run(unet, unet_inputs)  # builds the forward context the processors read
    name, attn = next(iter(attention_layers(unet, "attn2").items()))
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    text = unet_inputs["encoder_hidden_states"]

    def layer_out():
        with torch.no_grad():
            return attn(hs, encoder_hidden_states=text)

    def with_adapters(*adapters, scales=None):
        stack.clear()
        for i, ad in enumerate(adapters):
            stack.add(ad, name=f"a{i}", scale=(scales or [1.0] * len(adapters))[i])
        _run(unet, unet_inputs)
        return layer_out()

    base = with_adapters()
    da = with_adapters(a, scales=[0.7]) - base
    db = with_adapters(b, scales=[1.3]) - base
    both = with_adapters(a, b, scales=[0.7, 1.3]) - base
    assert da.abs().max() > 1e-2 and db.abs().max() > 1e-2
    torch.testing.assert_close(both, da + db, rtol=0, atol=1e-5)


def test_per_sample_mask_equals_separate_runs(sd15_pipe, unet_inputs):
    unet = sd15_pipe.unet
    stack = AdapterStack().attach(unet)
    slot = stack.add(LinearAttnAdapter(unet), sample_mask=[True, False])
    batched = _run(unet, unet_inputs)
    single = lambda i: {k: (v[i : i + 1] if k != "timestep" else v) for k, v in unet_inputs.items()}
    slot.sample_mask = None
    with_adapter = _run(unet, single(0))
    slot.enabled = False
    without = _run(unet, single(1))
    torch.testing.assert_close(batched[0:1], with_adapter, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1:2], without, rtol=0, atol=1e-5)
    assert (batched[0:1] - without).abs().max() > 1e-2


def test_mask_of_wrong_length_is_a_clear_error(sd15_pipe, unet_inputs):
    stack = AdapterStack().attach(sd15_pipe.unet)
    stack.add(LinearAttnAdapter(sd15_pipe.unet), sample_mask=[True, False, True])
    with pytest.raises(StudioError, match="sample_mask has 3 entries for a batch of 2"):
        _run(sd15_pipe.unet, unet_inputs)


def test_other_processors_and_peft_lora_keep_working(sd15_pipe, unet_inputs):
    from peft import LoraConfig

    unet = sd15_pipe.unet
    unet.set_attn_processor(AttnProcessor())  # a non-default processor: the stack must run it, not SDPA
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    lora_ref = _run(unet, unet_inputs)
    unet.disable_adapters()
    plain = _run(unet, unet_inputs)
    unet.enable_adapters()
    assert (lora_ref - plain).abs().max() > 1e-3, "the LoRA changes the output"
    stack = AdapterStack().attach(unet)
    assert all(isinstance(p.base, AttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(_run(unet, unet_inputs), lora_ref)
    slot = stack.add(LinearAttnAdapter(unet))
    assert not torch.equal(_run(unet, unet_inputs), lora_ref)
    slot.scale = 0.0
    assert torch.equal(_run(unet, unet_inputs), lora_ref)
    stack.detach()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


def test_attach_twice_and_foreign_adapter_are_refused(sd15_pipe):
    stack = AdapterStack().attach(sd15_pipe.unet)
    with pytest.raises(StudioError, match="already attached"):
        stack.attach(sd15_pipe.unet)
    with pytest.raises(StudioError, match="already carries an adapter stack"):
        AdapterStack().attach(sd15_pipe.unet)
    with pytest.raises(StudioError, match="not a StudioAdapter"):
        stack.add(torch.nn.Linear(2, 2))
    with pytest.raises(StudioError, match="window"):
        stack.add(LinearAttnAdapter(sd15_pipe.unet), start=0.8, end=0.2)
    with pytest.raises(StudioError, match="scale"):
        stack.add(LinearAttnAdapter(sd15_pipe.unet), scale={"sideways": 1.0})


def test_layer_scale_follows_diffusers_block_convention():
    up1 = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"
    down2 = "down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    style = {"up": {"block_1": [0.0, 1.0, 0.0]}}
    assert layer_scale(style, up1) == 1.0
    assert layer_scale(style, down2) == 0.0 and layer_scale(style, mid) == 0.0
    assert layer_scale({"down": {"block_2": 0.5}, "mid": 0.25}, down2) == 0.5
    assert layer_scale({"down": {"block_2": 0.5}, "mid": 0.25}, mid) == 0.25
    assert layer_scale(0.6, mid) == 0.6


def test_residual_adapter_equals_passing_residuals(sd15_pipe, unet_inputs):
    unet = sd15_pipe.unet
    # shapes of the down-block outputs, read off a ControlNet made from this UNet
    from adapter_studio.presets import build_tiny_controlnet

    cn = build_tiny_controlnet()
    with torch.no_grad():
        down, mid = cn(unet_inputs["sample"], unet_inputs["timestep"], unet_inputs["encoder_hidden_states"],
                       controlnet_cond=torch.zeros(2, 3, 128, 128), return_dict=False)
    adapter = ConstantResidualAdapter([tuple(d.shape[1:]) for d in down], tuple(mid.shape[1:]))
    n = unet_inputs["sample"].shape[0]
    with torch.no_grad():
        expected = unet(**unet_inputs, down_block_additional_residuals=[d.expand(n, *d.shape) for d in adapter.down],
                        mid_block_additional_residual=adapter.mid.expand(n, *adapter.mid.shape)).sample
    ref = _run(unet, unet_inputs)
    stack = AdapterStack().attach(unet)
    slot = stack.add(adapter, sample_mask=[True, True])
    torch.testing.assert_close(_run(unet, unet_inputs), expected, rtol=0, atol=1e-6)
    slot.scale = 0.0
    assert torch.equal(_run(unet, unet_inputs), ref)
    stack.detach()
    assert torch.equal(_run(unet, unet_inputs), ref)


def test_stack_on_sdxl_and_video_unets():
    from adapter_studio.presets import load_pipeline

    xl = load_pipeline("tiny-sdxl").unet
    g = torch.Generator().manual_seed(0)
    inp = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor(10),
               encoder_hidden_states=torch.randn(1, 77, 64, generator=g),
               added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])})
    ref = _run(xl, inp)
    stack = AdapterStack().attach(xl)
    assert torch.equal(_run(xl, inp), ref)
    stack.add(LinearAttnAdapter(xl))
    assert not torch.equal(_run(xl, inp), ref)
    stack.detach()
    assert torch.equal(_run(xl, inp), ref)

    video = load_pipeline("tiny-video").unet
    # diffusers' AnimateDiff pipeline repeats the text tokens per frame: [(b f), 77, C]
    vin = dict(sample=torch.randn(1, 4, 3, 16, 16, generator=g), timestep=torch.tensor(10),
               encoder_hidden_states=torch.randn(1, 77, 32, generator=g).repeat_interleave(3, dim=0))
    vref = _run(video, vin)
    stack = AdapterStack().attach(video)
    ad = LinearAttnAdapter(video, target="attn1")
    stack.add(ad)
    out = _run(video, vin)
    assert out.shape == vref.shape and not torch.equal(out, vref)
    assert ad.prepared[-1].num_frames == 3
    stack["dummy0"].scale = 0.0
    assert torch.equal(_run(video, vin), vref)


def test_processors_set_after_attach_keep_the_adapters(sd15_pipe, unet_inputs):
    """diffusers' fuse_qkv_projections / set_attn_processor on an attached UNet used to drop every adapter silently."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    unet = sd15_pipe.unet
    bare = _run(unet, unet_inputs)
    stack = AdapterStack().attach(unet)
    stack.add(LinearAttnAdapter(unet, target="attn1"), name="self")
    stack.add(LinearAttnAdapter(unet, target="attn2", seed=2), name="cross")
    with_adapters = _run(unet, unet_inputs)
    assert (with_adapters - bare).abs().max() > 1e-2

    unet.fuse_qkv_projections()
    fused = _run(unet, unet_inputs)
    procs = unet.attn_processors
    assert all(isinstance(p, ComposingAttnProcessor) and isinstance(p.base, FusedAttnProcessor2_0)
               for p in procs.values())
    torch.testing.assert_close(fused, with_adapters, rtol=0, atol=1e-5)

    unet.unfuse_qkv_projections()  # puts back the processors it saved: the stack's own, with their SDPA bases
    torch.testing.assert_close(_run(unet, unet_inputs), with_adapters, rtol=0, atol=1e-5)
    assert all(type(p.base) is AttnProcessor2_0 for p in unet.attn_processors.values())

    unet.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(_run(unet, unet_inputs), with_adapters, rtol=0, atol=1e-5)
    stack.detach()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values()), "detach gives back what was set last"
    torch.testing.assert_close(_run(unet, unet_inputs), bare, rtol=0, atol=1e-5)

    stack.attach(unet)
    stack.add(LinearAttnAdapter(unet))
    name = next(iter(unet.attn_processors))
    unet.set_attn_processor({**unet.attn_processors, name: ComposingAttnProcessor(AttnProcessor(), name, AdapterStack())})
    with pytest.raises(StudioError, match="another adapter stack"):
        _run(unet, unet_inputs)


def test_unet_called_with_more_positional_arguments(sd15_pipe, unet_inputs):
    """The pre-hook named the first three positional arguments only; a fourth (class_labels) then clashed."""
    unet = sd15_pipe.unet
    stack = AdapterStack().attach(unet)
    stack.add(LinearAttnAdapter(unet))
    x, t, text = unet_inputs["sample"], unet_inputs["timestep"], unet_inputs["encoder_hidden_states"]
    with torch.no_grad():
        positional = unet(x, t, text, None, None, None).sample
    torch.testing.assert_close(positional, _run(unet, unet_inputs), rtol=0, atol=0)
