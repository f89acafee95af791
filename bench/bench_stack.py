"""Cost of the composing adapter stack itself: bare UNet vs an attached stack with nothing acting, vs one adapter gated off.

    python bench/bench_stack.py --device cuda --size sd15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.common import build_unet, machine, print_table, time_fn  # noqa: E402
from adapter_studio.stack import AdapterStack  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="mid", choices=["tiny", "mid", "sd15"])
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one CFG step of one image)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    unet = build_unet(args.size, args.device, dtype)
    cfg = unet.config
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 4, cfg.sample_size, cfg.sample_size, generator=g).to(args.device, dtype)
    text = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g).to(args.device, dtype)
    t = torch.tensor(500, device=args.device)

    def step():
        with torch.no_grad():
            return unet(x, t, text).sample

    ref = step()
    stack = AdapterStack()
    from dummy_adapters import LinearAttnAdapter

    adapter = LinearAttnAdapter(unet).to(args.device, dtype)

    def configure(attached: bool, scale: float | None) -> None:
        stack.detach()
        stack.clear()
        if attached:
            stack.attach(unet)
            if scale is not None:
                stack.add(adapter, scale=scale)

    configs = [("bare diffusers UNet", False, None), ("stack attached, no adapter", True, None),
               ("one adapter at scale 0", True, 0.0), ("one linear adapter acting", True, 1.0)]
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for _ in range(args.rounds):  # round-robin, so drift of the machine hits every configuration alike
        for name, attached, scale in configs:
            configure(attached, scale)
            times[name].append(time_fn(step, args.device, warmup=2, iters=args.iters))
            if scale in (None, 0.0):
                assert torch.equal(step(), ref), f"{name}: output differs from the bare UNet"
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    bare = med["bare diffusers UNet"]
    rows = [[name, med[name] * 1e3, med[name] / bare] for name, *_ in configs]
    print_table(f"UNet step, size {args.size}, batch {args.batch}, {dtype} on {machine(args.device)}",
                ["configuration", "ms / step", "ratio to bare"], rows)


if __name__ == "__main__":
    main()
