"""The host's work per sampling step: what the CPU does between two UNet steps of a `StudioPipeline` call, measured
with every tensor on PyTorch's `meta` device (shapes without values, no kernels), so no GPU is needed.

    python bench/bench_host.py --size sd15          # SD1.5 shapes, 512 px, IP-Adapter + AGD, every sampler
    python bench/bench_host.py --size tiny --steps 10

Why it matters: a compiled step with CUDA graphs costs the GPU about 7 ms at SD1.5 size (docs/performance.md) and the
CPU only the graph's replay. Once nothing between two steps waits for the GPU (tests/test_device_reads.py), the GPU
stays the bound only while the CPU's work per step (the pipeline's loop, the scheduler's step, the step-end callback,
the stack's pre-hook) takes less than that.

Rows, per sampler and guidance (CFG: a UNet batch of 2; AGD: of 1; IP-Adapter with a reference image in both), for
the eager and the compiled mode's pre-hook: ms per step of a whole call whose UNet forward is a stub returning a
tensor of the right shape (the stack's pre-hook still runs): the median time between two step-end callbacks (steps 3..,
so the call's fixed work, the encoders, is not in it). Many of the meta device's shape functions are Python, so
an op costs more to dispatch there than to launch on a GPU: read these as an upper bound of the host's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_end_to_end import build_pipeline, make_adapters  # noqa: E402
from bench.common import print_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--iters", type=int, default=3, help="calls per measurement (the median of all their steps)")
    args = ap.parse_args(argv)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    from PIL import Image

    from adapter_studio.pipelines.studio_pipeline import StudioPipeline
    from adapter_studio.samplers import SAMPLERS

    pipe = build_pipeline(args.size, "meta", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    side = 512 if args.size == "sd15" else 64
    sp = StudioPipeline(pipe)
    ip, agd = make_adapters(pipe, args.size, 0.02)
    reference = Image.new("RGB", (256, 256), (120, 80, 200))
    sp.add(ip, name="ip", image=reference)
    sp.add(agd, name="agd")
    unet = pipe.unet

    def stub(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        out = torch.empty_like(sample)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    prompt = "a photo of a cat on a red sofa, high quality"

    def step_ms(guidance: str) -> float:
        sp.stack["agd"].enabled = guidance == "agd"
        gaps: list[float] = []
        for i in range(args.iters + 1):
            stamps: list[float] = []

            def step_end(p, step, t, kw):
                stamps.append(time.perf_counter())
                return kw

            sp(prompt, num_inference_steps=args.steps, guidance=guidance, guidance_scale=5.0, height=side, width=side,
               output_type="latent", callback_on_step_end=step_end)
            if i:  # the first call warms up
                gaps += [b - a for a, b in zip(stamps[2:], stamps[3:])]
        return statistics.median(gaps) * 1e3
    rows = {name: [name] for name in SAMPLERS}
    for compiled in (False, True):
        if compiled:  # the compiled mode's pre-hook (gates and states as device tensors); the body stays the stub
            sp.stack.compile(backend="eager")
        unet.forward = stub  # nn.Module.__call__ still runs the stack's pre-hook, then this
        for name in SAMPLERS:
            sp.set_sampler(name)
            for guidance in ("cfg", "agd"):
                rows[name].append(step_ms(guidance))
    print_table(f"Host ms per sampling step outside the UNet, StudioPipeline + IP-Adapter, size {args.size} "
                f"({side} px), meta device, torch {torch.__version__}",
                ["sampler", "CFG eager", "AGD eager", "CFG compiled mode", "AGD compiled mode"], list(rows.values()))


if __name__ == "__main__":
    main()
