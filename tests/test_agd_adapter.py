"""AGD adapter: one UNet pass per step, zero at init, every attn2, formats (ours and upstream), SD1.5 + SDXL, + IP."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from adapter_studio.adapters.agd import (AGDAdapter, adapter_from_upstream, adapter_to_upstream, cross_attention_layers,
                          load_upstream_into)
from adapter_studio.pipelines.studio_pipeline import StudioPipeline
from adapter_studio.errors import CheckpointError, IncompatibleAdapterError, StudioError
from adapter_studio.mix import Mix, UnitSpec, apply_mix
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import get_family


def _count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    return calls, handle


def _randomize(adapter, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return adapter


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_one_unet_pass_per_step_in_agd_mode_and_a_doubled_batch_under_cfg(preset):
    sp = StudioPipeline.from_preset(preset)
    adapter = AGDAdapter.from_unet(sp.pipe.unet, hidden_dim=16)
    sp.add(adapter, name="agd")
    calls, handle = _count_unet_calls(sp.pipe)
    steps, prompts = 3, ["a red cat", "a blue dog"]
    sp(prompts, guidance="agd", guidance_scale=6.0, num_inference_steps=steps, output_type="latent")
    assert calls == [2] * steps, "AGD: exactly one UNet pass per step, conditional batch only"
    calls.clear()
    sp.stack["agd"].enabled = False  # adapter off -> "auto" falls back to classifier-free guidance
    assert sp.guidance_mode("auto") == "cfg"
    sp(prompts, guidance="auto", guidance_scale=6.0, num_inference_steps=steps, output_type="latent")
    assert calls == [4] * steps, "CFG: one UNet pass per step on the doubled [uncond; cond] batch"
    handle.remove()


def test_every_cross_attention_is_covered_and_the_timestep_embedding_is_the_unets_own():
    pipe = load_pipeline("tiny-sd15")
    adapter = AGDAdapter.from_unet(pipe.unet, hidden_dim=16)
    attn2 = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(adapter.layer_names()) == sorted(attn2) and len(attn2) == 7
    assert {n.split(".")[0] for n in adapter.layer_names()} == {"down_blocks", "mid_block", "up_blocks"}
    assert adapter.config.timestep_dim == pipe.unet.time_embedding.linear_2.out_features
    assert adapter.config.prompt_dim == pipe.unet.config.cross_attention_dim
    # SDXL: the plain time embedding (no added text/time-id embedding), width of time_embedding
    xl = load_pipeline("tiny-sdxl").unet
    xa = AGDAdapter.from_unet(xl, hidden_dim=16)
    assert xa.config.timestep_dim == xl.time_embedding.linear_2.out_features
    assert xa.config.prompt_dim == 64 and len(xa.layer_paths) == len(cross_attention_layers(xl)) > 0


@pytest.mark.parametrize("arch", ["attention", "additive"])
def test_fresh_adapter_adds_exactly_zero(arch, unet_inputs):
    pipe = load_pipeline("tiny-sd15")
    sp = StudioPipeline(pipe)
    ref = pipe.unet(**unet_inputs).sample
    adapter = AGDAdapter.from_unet(pipe.unet, hidden_dim=16, arch=arch)
    sp.add(adapter, name="agd", guidance_scale=torch.tensor([3.0, 9.0]))
    out = pipe.unet(**unet_inputs).sample
    assert torch.equal(out, ref), "zero-initialised output projection: the conditional prediction, bit for bit"
    # and a full sampling call: AGD at init == the plain conditional-only sampler (same seed)
    sp.stack["agd"].inputs = {}  # w from the call
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    agd = sp("a cat", guidance="agd", guidance_scale=7.0, num_inference_steps=3, generator=g(), output_type="latent")
    sp.stack["agd"].enabled = False
    cond = sp("a cat", guidance="cfg", guidance_scale=1.0, num_inference_steps=3, generator=g(), output_type="latent")
    assert torch.equal(agd.images, cond.images)


def test_contribution_depends_on_w_and_the_additive_variant_is_token_independent(unet_inputs):
    pipe = load_pipeline("tiny-sd15")
    from adapter_studio.stack import AdapterStack

    stack = AdapterStack().attach(pipe.unet)
    outs = {}
    for arch in ("attention", "additive"):
        adapter = _randomize(AGDAdapter.from_unet(pipe.unet, hidden_dim=16, arch=arch))
        slot = stack.add(adapter, name=arch)
        seen = {}
        orig = adapter.contribution

        def spy(layer, attn, hs, ehs, state, ctx, _orig=orig, _seen=seen):
            out = _orig(layer, attn, hs, ehs, state, ctx)
            _seen.setdefault(layer, out)
            return out

        adapter.contribution = spy
        for w in (2.0, 8.0):
            slot.inputs = {"guidance_scale": w}
            seen.clear()
            outs[arch, w] = pipe.unet(**unet_inputs).sample
            if arch == "additive":
                c = next(iter(seen.values()))
                assert torch.equal(c, c[:, :1].expand_as(c)), "additive: the same vector at every position"
        stack.remove(arch)
        assert not torch.allclose(outs[arch, 2.0], outs[arch, 8.0], atol=1e-4), f"{arch}: output depends on w"


def test_save_pretrained_round_trip_and_family_loader(tmp_path, sd15_pipe):
    adapter = _randomize(AGDAdapter.from_unet(sd15_pipe.unet, hidden_dim=16, base_model="tiny-sd15"))
    adapter.save_pretrained(tmp_path / "agd")
    assert sorted(p.name for p in (tmp_path / "agd").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = get_family("agd").load(str(tmp_path / "agd"), sd15_pipe)
    assert isinstance(loaded, AGDAdapter) and loaded.layer_paths == adapter.layer_paths
    for (k, a), (k2, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # a mix unit loads it and runs one pass per step with the unit's own w
    sp = StudioPipeline(sd15_pipe)
    mix = Mix(model="tiny-sd15", units=[UnitSpec(family="agd", weights=str(tmp_path / "agd"), name="agd",
                                                 inputs={"guidance_scale": 4.5})])
    apply_mix(Mix.from_json(mix.to_json()), sp)
    assert sp.stack["agd"].inputs == {"guidance_scale": 4.5}
    calls, handle = _count_unet_calls(sd15_pipe)
    sp("a dog", num_inference_steps=2, output_type="latent")  # guidance "auto" -> agd
    handle.remove()
    assert calls == [1, 1]


def test_incompatible_base_model_is_a_clear_error_and_leaves_the_pipeline_alone(tmp_path, sd15_pipe):
    AGDAdapter.from_unet(sd15_pipe.unet, hidden_dim=16).save_pretrained(tmp_path / "agd")
    xl = StudioPipeline.from_preset("tiny-sdxl")
    before = dict(xl.stack.slots)
    with pytest.raises(IncompatibleAdapterError, match="lacks|width"):
        get_family("agd").load(str(tmp_path / "agd"), xl.pipe)
    with pytest.raises(IncompatibleAdapterError):
        xl.add(AGDAdapter.from_pretrained(tmp_path / "agd"), name="agd")
    assert xl.stack.slots == before
    # garbage where the weights should be
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "diffusion_pytorch_model.safetensors").write_bytes(b"nonsense")
    with pytest.raises(CheckpointError, match="config.json"):
        get_family("agd").load(str(tmp_path / "bad"), sd15_pipe)


# ---------------------------------------------------------------------------------------------------------
# upstream checkpoints: an independent reference of the upstream cross-attention adapter's forward


def _reference_upstream_layer(sd, x, w, t_emb, prompt):
    """The upstream 'attention' adapter computed straight from its state dict (paper's formulas, one head)."""
    f, ph = sd["guidance_scale_embedder.net.0.frequencies"], sd["guidance_scale_embedder.net.0.phases"]
    feat = torch.cos(2 * math.pi * (w[:, None] * f + ph))
    h = F.linear(F.relu(F.linear(feat, sd["guidance_scale_embedder.net.1.net.0.weight"],
                                 sd["guidance_scale_embedder.net.1.net.0.bias"])),
                 sd["guidance_scale_embedder.net.1.net.2.weight"], sd["guidance_scale_embedder.net.1.net.2.bias"])
    w_tok = F.layer_norm(h, h.shape[-1:], sd["guidance_scale_embedder.net.2.weight"],
                         sd["guidance_scale_embedder.net.2.bias"])
    t_tok = F.linear(t_emb, sd["timestep_proj.weight"], sd["timestep_proj.bias"])
    p_tok = F.linear(prompt, sd["prompt_proj.weight"], sd["prompt_proj.bias"])
    toks = torch.cat([w_tok[:, None], t_tok[:, None], p_tok], 1)
    d = toks.shape[-1]
    pos = torch.arange(toks.shape[1], dtype=torch.float32)[:, None]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    toks = toks + torch.cat([torch.sin(pos * inv), torch.cos(pos * inv)], -1)
    q, k, v = x @ sd["q_proj.weight"].T, toks @ sd["k_proj.weight"].T, toks @ sd["v_proj.weight"].T
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), -1) @ v
    return F.linear(att, sd["out_proj.weight"], sd["out_proj.bias"])


UPSTREAM_KEYS = {  # the key set of one upstream SD 'attention' adapter (use_timestep, use_prompt)
    "guidance_scale_embedder.net.0.frequencies", "guidance_scale_embedder.net.0.phases",
    "guidance_scale_embedder.net.1.net.0.weight", "guidance_scale_embedder.net.1.net.0.bias",
    "guidance_scale_embedder.net.1.net.2.weight", "guidance_scale_embedder.net.1.net.2.bias",
    "guidance_scale_embedder.net.2.weight", "guidance_scale_embedder.net.2.bias",
    "timestep_proj.weight", "timestep_proj.bias", "prompt_proj.weight", "prompt_proj.bias",
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "out_proj.bias", "pos_enc.pe",
}


def test_upstream_checkpoint_loads_safely_and_matches_the_reference_forward(tmp_path, sd15_pipe):
    unet = sd15_pipe.unet
    src = _randomize(AGDAdapter.from_unet(unet, hidden_dim=16), seed=5)
    ckpt = adapter_to_upstream(src)
    # upstream's SD script adapts `layers_per_block` attentions per up block: drop the last one of each
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith(("up_blocks.1.attentions.1",
                                                                                 "up_blocks.2.attentions.1"))}
    assert all(set(sd) == UPSTREAM_KEYS for sd in ckpt["model"].values())
    torch.save(ckpt, tmp_path / "0005000.pt")
    adapter = get_family("agd").load(str(tmp_path / "0005000.pt"), sd15_pipe)
    assert adapter.layer_paths == [p for p in src.layer_paths if p in ckpt["model"]] and len(adapter.layer_paths) == 5

    # the studio's contribution at one layer == the reference computed from the raw upstream tensors
    path = adapter.layer_paths[1]
    attn = unet.get_submodule(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    prompt = torch.randn(2, 77, 32, generator=g)
    w, t = torch.tensor([2.0, 7.5]), torch.tensor([999.0, 101.0])
    from adapter_studio.context import ForwardContext

    ctx = ForwardContext(batch_size=2, cfg=False, timestep=t, progress=torch.zeros(2), latent_size=(16, 16), unet=unet)
    state = adapter.prepare({"guidance_scale": w}, ctx)
    ours = adapter.contribution(path + ".processor", attn, x, prompt, state, ctx)
    t_emb = unet.time_embedding(unet.time_proj(t))
    ref = _reference_upstream_layer(ckpt["model"][path], x, w, t_emb, prompt)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()

    # save in our format and back: identical
    adapter.save_pretrained(tmp_path / "converted")
    again = AGDAdapter.from_pretrained(tmp_path / "converted")
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values()))


def test_upstream_checkpoint_errors_name_expected_and_found_and_leave_the_adapter_untouched(tmp_path, sd15_pipe):
    unet = sd15_pipe.unet
    target = _randomize(AGDAdapter.from_unet(unet, hidden_dim=16), seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ckpt = adapter_to_upstream(_randomize(AGDAdapter.from_unet(unet, hidden_dim=16), seed=2))
    last = list(ckpt["model"])[-1]
    ckpt["model"][last]["q_proj.weight"] = torch.zeros(24, 64)  # hidden 24 where 16 is expected
    torch.save(ckpt, tmp_path / "bad_shape.pt")
    with pytest.raises(IncompatibleAdapterError, match=r"\(24, 64\).*\(16, 64\)"):
        load_upstream_into(target, tmp_path / "bad_shape.pt")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items()), "failed load changed nothing"

    # a checkpoint for another model: its module paths are not this UNet's attn2 layers
    torch.save({"model": {"transformer_blocks.0.attn": ckpt["model"][last]}}, tmp_path / "dit.pt")
    with pytest.raises(IncompatibleAdapterError, match="not an attn2 layer"):
        adapter_from_upstream(tmp_path / "dit.pt", unet)
    # widths that do not fit the UNet (an SD1.5 checkpoint on the SDXL-shaped UNet)
    torch.save(adapter_to_upstream(target), tmp_path / "sd15.pt")
    with pytest.raises(IncompatibleAdapterError):
        adapter_from_upstream(tmp_path / "sd15.pt", load_pipeline("tiny-sdxl").unet)

    # pickles that need arbitrary code are refused (weights_only=True), as are files of another structure
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights_only"):
        adapter_from_upstream(tmp_path / "evil.pt", unet)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected an upstream AGD checkpoint"):
        adapter_from_upstream(tmp_path / "other.pt", unet)


def test_w_comes_from_the_call_or_from_the_unit_inputs(sd15_pipe):
    sp = StudioPipeline(sd15_pipe)
    adapter = _randomize(AGDAdapter.from_unet(sd15_pipe.unet, hidden_dim=16))
    sp.add(adapter, name="agd")
    seen = []
    orig = adapter.prepare
    adapter.prepare = lambda inputs, ctx: seen.append(inputs["guidance_scale"].tolist()) or orig(inputs, ctx)
    sp(["a", "b"], guidance="agd", guidance_scale=5.5, num_inference_steps=1, output_type="latent")
    sp(["a", "b"], guidance="agd", guidance_scale=5.5, num_inference_steps=1, output_type="latent",
       adapter_inputs={"agd": {"guidance_scale": [2.0, 9.0]}})
    assert seen == [[5.5, 5.5], [2.0, 9.0]]
    with pytest.raises(StudioError, match="3 values for a batch of 2"):
        sp(["a", "b"], guidance="agd", num_inference_steps=1, output_type="latent",
           adapter_inputs={"agd": {"guidance_scale": [1.0, 2.0, 3.0]}})
    with pytest.raises(StudioError, match="replaces classifier-free guidance"):
        sp("a", guidance="cfg", num_inference_steps=1)


@pytest.mark.parametrize("use_timestep,use_prompt,extra", [
    (True, True, {}), (False, True, {"qkv_bias": True}), (True, False, {"num_heads": 2, "qkv_bias": True})])
def test_every_layers_keys_values_at_once_equal_each_block_alone_and_are_kept_over_a_call(
        sd15_pipe, use_timestep, use_prompt, extra):
    """`adapters.agd.batched` (all layers' keys/values in a few stacked products, w and prompt parts kept over a
    call) gives each layer what its block computes alone from `[w, t, prompt]`."""
    from adapter_studio.context import CallInfo, ForwardContext

    unet = sd15_pipe.unet
    adapter = _randomize(AGDAdapter.from_unet(unet, hidden_dim=16, use_timestep=use_timestep,
                                              use_prompt=use_prompt, **extra), seed=3)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999.0, 101.0])
    t_emb = unet.time_embedding(unet.time_proj(t))
    call = CallInfo(pipe=None, batch_size=2, num_images_per_prompt=1, cfg=False, guidance_scale=7.5,
                    device=torch.device("cpu"), dtype=torch.float32)
    inputs = adapter.begin_call({"guidance_scale": [2.0, 7.5]}, call)

    def run(ctx_prompt, layer_prompt, call_inputs=inputs):
        ctx = ForwardContext(batch_size=2, cfg=False, timestep=t, progress=torch.zeros(2), latent_size=(16, 16),
                             unet=unet, encoder_hidden_states=ctx_prompt)
        state = adapter.prepare(call_inputs, ctx)
        outs = []
        for i, path in enumerate(adapter.layer_paths):
            attn = unet.get_submodule(path)
            x = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(i))
            outs.append(adapter.contribution(path + ".processor", attn, x, layer_prompt, state, ctx))
        return state, outs

    def reference(p):
        w = torch.tensor([2.0, 7.5])
        outs = []
        with torch.no_grad():
            for i, (path, blk) in enumerate(zip(adapter.layer_paths, adapter.blocks)):
                attn = unet.get_submodule(path)
                x = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(i))
                t_tok = blk.embed_t(t_emb) if use_timestep else None
                outs.append(blk(x, blk.tokens(blk.embed_w(w), t_tok, p if use_prompt else None)))
        return outs

    with torch.no_grad():
        state, ours = run(prompt, prompt)
        assert state.kv.shape == (len(adapter.blocks), 2, 1 + use_timestep + 77 * use_prompt, 32)
        assert state.prompt_in_keys == use_prompt
        fixed = inputs["_cache"]["fixed"]
        _, again = run(prompt, prompt)
        assert inputs["_cache"]["fixed"] is fixed, "w's and the prompt's keys/values are computed once per call"
        _, per_layer = run(None, prompt)  # no text tokens in the context: each layer adds its own prompt's
        _, direct = run(prompt, prompt, {"guidance_scale": [2.0, 7.5]})  # no call: a training step's path
        prompt.mul_(-1.5)  # the same tensor changed in place: the kept keys/values must not be reused
        _, changed = run(prompt, prompt)
    for got in (ours, again, per_layer, direct):
        for a, b in zip(got, reference(prompt / -1.5)):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    for a, b in zip(changed, reference(prompt)):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    if use_prompt:
        assert not torch.allclose(changed[0], ours[0], atol=1e-3), "the prompt matters"
