"""Compiled mode of the adapter stack (`AdapterStack.compile`, `StudioPipeline(compile=True)`).

Graph tests use a counting backend over "aot_eager" (traces to ATen like inductor, runs eagerly: fast on a CPU);
`fullgraph=True` everywhere, so any graph break fails. One numerical test runs inductor on a 64 px tiny UNet.
Tolerances: 1e-5 absolute against eager for aot_eager (same kernels, other order of a few adds), 1e-4 for inductor
(fused kernels) and for a batch of 4 against 4 batches of 1 (BLAS blocking differs with the batch).
"""

import pytest
import torch

from adapter_studio import AdapterStack
from compile_helpers import CountingBackend, eager_path, fresh_dynamo
from adapter_studio.adapters.agd import AGDAdapter
from adapter_studio.adapters.ip_adapter import IPAdapter


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield from fresh_dynamo()


@pytest.fixture(scope="module")
def parts():
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    torch.manual_seed(0)
    ip = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim, init_from_unet=False)
    agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=16)
    with torch.no_grad():
        for p in list(ip.parameters()) + [b.out_proj.weight for b in agd.blocks]:
            p.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(1)
    d = pipe.image_encoder.config.projection_dim
    data = dict(emb=torch.randn(4, 1, d, generator=g), x=torch.randn(4, 4, 16, 16, generator=g),
                text=torch.randn(4, 77, 32, generator=g))
    return pipe, ip, agd, data


def _run(unet, x, text, t=500):
    with torch.no_grad():
        return unet(x, torch.tensor(t), text).sample


def _stack(pipe, ip, agd, config, data):
    stack = AdapterStack().attach(pipe.unet)
    if "ip" in config:
        stack.add(ip, "ip", image_embeds=data["emb"][:1])
    if "agd" in config:
        stack.add(agd, "agd", guidance_scale=5.0)
    return stack


@pytest.mark.parametrize("config", [(), ("ip",), ("agd",), ("ip", "agd")], ids=["none", "ip", "agd", "ip+agd"])
def test_fullgraph_compiled_equals_eager(parts, config):
    pipe, ip, agd, data = parts
    stack = _stack(pipe, ip, agd, config, data)
    try:
        x, text = data["x"][:2], data["text"][:2]
        ref = _run(pipe.unet, x, text)
        backend = CountingBackend()
        stack.compile(backend=backend, fullgraph=True)
        out = _run(pipe.unet, x, text)
        assert backend.graphs == 1, "one graph, no break"
        assert torch._dynamo.config.recompile_limit >= 64, "one cached graph per mix structure: room for many"
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    finally:
        stack.detach()


def test_changing_scale_window_mask_and_inputs_does_not_recompile(parts):
    pipe, ip, agd, data = parts
    stack = AdapterStack().attach(pipe.unet)
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1.0
    ip_slot = stack.add(ip, "ip", image_embeds=data["emb"][:1], mask=mask)
    agd_slot = stack.add(agd, "agd", guidance_scale=5.0, sample_mask=[True, True])
    x, text = data["x"][:2], data["text"][:2]
    try:
        backend = CountingBackend()
        stack.compile(backend=backend)
        changes = [
            lambda: setattr(ip_slot, "scale", 0.3),
            lambda: setattr(ip_slot, "scale", {"down": 0.5, "mid": 0.0, "up": 1.5}),
            lambda: ip_slot.set_window(0.0, 0.2),  # t=500 -> progress 0.5: out of the window, gate 0
            lambda: ip_slot.set_window(0.4, 1.0),
            lambda: ip_slot.inputs.update(mask=1.0 - mask),  # another mask of the same shape
            lambda: ip_slot.inputs.update(image_embeds=data["emb"][1:2]),  # another reference image
            lambda: agd_slot.inputs.update(guidance_scale=2.0),
            lambda: setattr(agd_slot, "sample_mask", [False, True]),
            lambda: setattr(agd_slot, "sample_mask", [False, False]),
        ]
        outs = []
        for change in [lambda: None, *changes]:
            change()
            out = _run(pipe.unet, x, text)
            with eager_path(stack):
                ref = _run(pipe.unet, x, text)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            outs.append(out)
        assert backend.graphs == 1, f"{backend.graphs} graphs: a change of values recompiled"
        assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:])), "every change acts"
        stack.remove("agd")  # a structural change may recompile, and still matches eager
        out = _run(pipe.unet, x, text)
        with eager_path(stack):
            torch.testing.assert_close(out, _run(pipe.unet, x, text), rtol=0, atol=1e-5)
    finally:
        stack.detach()
    assert "forward" not in pipe.unet.__dict__, "detach drops the compiled forward"


def _mixed(stack, ip, agd, data, rows):
    """4 mixes: none; IP (ref 1); AGD w=5; IP (ref 3) + AGD w=3 — restricted to `rows`."""
    ip_mask = torch.tensor([False, True, False, True])[rows]
    agd_mask = torch.tensor([False, False, True, True])[rows]
    stack.add(ip, "ip", scale=0.8, image_embeds=data["emb"][rows], sample_mask=ip_mask)
    stack.add(agd, "agd", guidance_scale=torch.tensor([1.0, 1.0, 5.0, 3.0])[rows], sample_mask=agd_mask)


def test_heterogeneous_batch_equals_samples_alone(parts):
    pipe, ip, agd, data = parts
    x, text = data["x"], data["text"]
    stack = AdapterStack().attach(pipe.unet)
    try:
        _mixed(stack, ip, agd, data, slice(0, 4))
        eager = _run(pipe.unet, x, text)
        backend = CountingBackend()
        stack.compile(backend=backend)
        batch = _run(pipe.unet, x, text)
        torch.testing.assert_close(batch, eager, rtol=0, atol=1e-5)
        assert backend.graphs == 1
        stack.uncompile()
        alone = []
        for i in range(4):
            stack.clear()
            _mixed(stack, ip, agd, data, slice(i, i + 1))
            alone.append(_run(pipe.unet, x[i:i + 1], text[i:i + 1]))
        torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=1e-4)
        assert len({round(float(a.abs().sum()), 3) for a in alone}) == 4, "four different results"
    finally:
        stack.detach()


def test_pipeline_compile_option_matches_eager(parts):
    from adapter_studio.pipelines.studio_pipeline import StudioPipeline

    pipe, ip, agd, data = parts
    sp = StudioPipeline(pipe)
    sp.add(ip, "ip", image_embeds=data["emb"][:1])
    sp.add(agd, "agd")
    kw = dict(num_inference_steps=3, output_type="latent", guidance="agd", guidance_scale=4.0)
    try:
        ref = sp("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        backend = CountingBackend()
        sp.compile(backend=backend)
        out = sp("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        sp.stack["ip"].scale = 0.5
        sp("a cat", generator=torch.Generator().manual_seed(0), adapter_inputs={"ip": {"image_embeds": data["emb"][1:2]}},
           **{**kw, "guidance_scale": 2.0})
        assert backend.graphs == 1, "new w, scale and reference: no recompilation"
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    finally:
        sp.stack.detach()


def test_inductor_numerics_ip_and_agd():
    """One real inductor compile, with IP + AGD against eager, on a one-level UNet (8 attention layers, 64 px: 8x8
    latents) so that it compiles in about 30 s on 2 cores."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8).eval().requires_grad_(False)
    ip = IPAdapter.from_unet(unet, 16, init_from_unet=False)
    agd = AGDAdapter.from_unet(unet, hidden_dim=16)
    with torch.no_grad():
        for p in list(ip.parameters()) + [b.out_proj.weight for b in agd.blocks]:
            p.normal_(0.0, 0.2)
    stack = AdapterStack().attach(unet)
    stack.add(ip, "ip", image_embeds=torch.randn(1, 1, 16))
    stack.add(agd, "agd", guidance_scale=4.0)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    ref = _run(unet, x, text)
    stack.compile(backend="inductor")
    out = _run(unet, x, text)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert not torch.equal(ref, _run_detached(stack, unet, x, text)), "the adapters act"


def _run_detached(stack, unet, x, text):
    stack.detach()
    return _run(unet, x, text)


def test_compiled_steps_of_a_call_do_not_wait_for_the_device(parts, monkeypatch):
    """What keeps a CUDA-graph step from waiting on the GPU: without a step window nothing reads the timestep on the
    CPU (progress stays uncomputed), the gates' device tensors are reused while their values hold (a copy from
    pageable memory drains the queue), and AGD checks its w where it was given, in `begin_call`, not on the device
    (`bool()` of a device tensor waits). tests/test_device_reads.py checks whole sampling calls on the meta device."""
    from adapter_studio.context import CallInfo

    pipe, ip, agd, data = parts
    stack = _stack(pipe, ip, agd, ("ip", "agd"), data)
    x, text = data["x"][:2], data["text"][:2]
    checks = []
    real_as_w = AGDAdapter._as_w
    monkeypatch.setattr(AGDAdapter, "_as_w", staticmethod(
        lambda *a, **kw: (kw.get("check", True) and checks.append(1)) or real_as_w(*a, **kw)))
    try:
        backend = CountingBackend()
        stack.compile(backend=backend)
        call = CallInfo(pipe=None, batch_size=2, num_images_per_prompt=1, cfg=False, guidance_scale=5.0,
                        device=torch.device("cpu"), dtype=torch.float32)
        for slot in stack:
            slot.call_inputs = slot.adapter.begin_call(dict(slot.inputs), call)
        assert len(checks) == 1, "begin_call checks w"
        gates = []
        for t in (900, 500, 100):
            out = _run(pipe.unet, x, text, t)
            assert stack.context.progress is None, "no window: the step's progress was never computed"
            gates.append(stack["ip"]._static_gates)
            with eager_path(stack):  # the same call eagerly: AGD's timestep row made in the pre-hook, not the graph
                torch.testing.assert_close(out, _run(pipe.unet, x, text, t), rtol=0, atol=1e-5)
        assert backend.graphs == 1, "three timesteps of a call: one graph"
        assert len(checks) == 1, "w checked by begin_call only, not when the call's keys/values were made (a read "
        "of a device tensor) nor at every step"
        assert gates[0] is gates[1] is gates[2], "unchanged gates: the same device tensor, no copy per step"
        stack["ip"].scale = 0.5
        _run(pipe.unet, x, text, 100)
        assert stack["ip"]._static_gates is not gates[0]
        assert torch.allclose(stack["ip"]._static_gates, 0.5 * gates[0])
        stack["ip"].set_window(0.0, 0.6)  # a window needs the step's place in sampling: computed, t=100 -> 0.9
        _run(pipe.unet, x, text, 100)
        assert stack.context.progress is not None and float(stack.context.progress[0]) == pytest.approx(0.9)
        assert float(stack["ip"]._static_gates.abs().max()) == 0.0, "out of its window: gate 0"
    finally:
        for slot in stack:
            slot.call_inputs = None
        stack.detach()


def test_fused_qkv_projections_keep_the_adapters_compiled(parts):
    """diffusers' `fuse_qkv_projections()` (a lever for compiled SD) on a compiled, attached UNet: adapters stay."""
    pipe, ip, agd, data = parts
    stack = _stack(pipe, ip, agd, ("ip", "agd"), data)
    x, text = data["x"][:2], data["text"][:2]
    try:
        ref = _run(pipe.unet, x, text)
        backend = CountingBackend()
        stack.compile(backend=backend)
        torch.testing.assert_close(_run(pipe.unet, x, text), ref, rtol=0, atol=1e-5)
        pipe.unet.fuse_qkv_projections()
        torch.testing.assert_close(_run(pipe.unet, x, text), ref, rtol=0, atol=1e-5)
        assert backend.graphs == 2, "the fused processors are a new graph"
        pipe.unet.unfuse_qkv_projections()
        torch.testing.assert_close(_run(pipe.unet, x, text), ref, rtol=0, atol=1e-5)
        assert backend.graphs == 2, "back to the first graph"
    finally:
        stack.detach()


def test_training_steps_through_the_compiled_stack_equal_eager(parts):
    """Training under compile: IP + AGD trained through the compiled UNet (fullgraph, a backward through the graph)
    take the same steps as eagerly; weights changing between steps are read anew (nothing cached across them)."""
    pipe, ip, agd, data = parts
    unet = pipe.unet
    stack = AdapterStack().attach(unet)
    stack.add(ip, "ip", image_embeds=data["emb"][:2])
    stack.add(agd, "agd", guidance_scale=torch.tensor([3.0, 5.0]))
    params = [p for p in [*ip.parameters(), *agd.parameters()] if p.requires_grad]
    start = [p.detach().clone() for p in params]
    x, text = data["x"][:2], data["text"][:2]

    def train(steps=3):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for t in (900, 500, 100)[:steps]:
            opt.zero_grad()
            loss = unet(x, torch.tensor([t, 300]), text).sample.pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in params]

    try:
        ref_losses, ref_weights = train()
        assert params and all(not torch.equal(w, s) for w, s in zip(ref_weights, start)), "every weight trained"
        backend = CountingBackend()
        stack.compile(backend=backend)
        losses, weights = train()
        assert backend.graphs == 1
        assert losses == pytest.approx(ref_losses, rel=0, abs=1e-6)
        for a, b in zip(weights, ref_weights):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    finally:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        stack.detach()
