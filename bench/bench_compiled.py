"""Compiled mode of the adapter stack (`AdapterStack.compile`): every ratio of docs/performance.md in one run.

    python bench/bench_compiled.py --device cuda --size sd15          # inductor, CUDA graphs (reduce-overhead)
    python bench/bench_compiled.py --device cpu --size tiny --latent 8  # what a CPU can do in minutes

Rows (UNet steps, compiled unless said; each configuration's first call is its compile, timed separately):
eager vs compiled bare UNet; compiled stack with IP / AGD / IP+AGD vs compiled bare; AGD vs CFG per sampling step
(AGD: one pass of batch B with the adapter, CFG: one bare pass of batch 2B) at B = 1 and 8; a heterogeneous batch
of 4 (4 different mixes: none, IP, AGD, IP+AGD with per-sample references and w) vs a uniform batch of 4 (IP+AGD
for all). Every compiled output is checked against eager (max abs difference printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_unet, machine, print_table, time_fn  # noqa: E402
from adapter_studio.adapters.agd import AGDAdapter  # noqa: E402
from adapter_studio.adapters.ip_adapter import IPAdapter  # noqa: E402
from adapter_studio.stack import AdapterStack  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="tiny", choices=["tiny", "mid", "sd15"])
    ap.add_argument("--latent", type=int, default=None, help="latent side (default: the UNet's sample size)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--mode", default="auto", help="torch.compile mode; auto = reduce-overhead on CUDA")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--big-batch", type=int, default=8, help="the larger B of the AGD vs CFG rows")
    args = ap.parse_args(argv)
    dev = args.device
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    unet = build_unet(args.size, dev, dtype)
    cfg = unet.config
    side = args.latent or cfg.sample_size
    cad = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    torch.manual_seed(0)
    ip = IPAdapter.from_unet(unet, 64, init_from_unet=False)
    agd = AGDAdapter.from_unet(unet, hidden_dim=64)
    with torch.no_grad():
        for p in list(ip.parameters()) + [b.out_proj.weight for b in agd.blocks]:
            p.normal_(0.0, 0.05)
    ip.to(dev, dtype)
    agd.to(dev, dtype)
    g = torch.Generator().manual_seed(1)
    maxb = 2 * args.big_batch
    xs = torch.randn(maxb, 4, side, side, generator=g).to(dev, dtype)
    texts = torch.randn(maxb, 77, cad, generator=g).to(dev, dtype)
    embs = torch.randn(4, 1, 64, generator=g).to(dev, dtype)
    t = torch.tensor(500, device=dev)
    stack = AdapterStack().attach(unet)

    def setup(kind: str, b: int) -> None:
        stack.clear()
        if kind in ("ip", "ip+agd", "uniform"):
            stack.add(ip, "ip", image_embeds=embs[:1])
        if kind in ("agd", "ip+agd", "uniform"):
            stack.add(agd, "agd", guidance_scale=5.0)
        if kind == "hetero":  # sample i: none, IP (ref 1), AGD w=5, IP (ref 3) + AGD w=3
            stack.add(ip, "ip", image_embeds=embs, sample_mask=[False, True, False, True])
            stack.add(agd, "agd", guidance_scale=torch.tensor([1.0, 1.0, 5.0, 3.0]), sample_mask=[False, False, True, True])

    def step_fn(b: int):
        x, txt = xs[:b], texts[:b]

        def step():
            with torch.no_grad():
                return unet(x, t, txt).sample
        return step

    configs = [("bare", 2), ("ip", 2), ("agd", 2), ("ip+agd", 2), ("agd", 1), ("agd", args.big_batch),
               ("bare", maxb), ("hetero", 4), ("uniform", 4)]
    eager: dict[tuple, float] = {}
    refs: dict[tuple, torch.Tensor] = {}
    for kind, b in configs:
        setup(kind, b)
        step = step_fn(b)
        refs[(kind, b)] = step()
        eager[(kind, b)] = time_fn(step, dev, warmup=1, iters=args.iters)
    stack.compile(backend=args.backend, mode=args.mode)
    comp: dict[tuple, float] = {}
    first: dict[tuple, float] = {}
    diff: dict[tuple, float] = {}
    for kind, b in configs:
        setup(kind, b)
        step = step_fn(b)
        t0 = time.perf_counter()
        out = step()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        first[(kind, b)] = time.perf_counter() - t0
        diff[(kind, b)] = float((out.float() - refs[(kind, b)].float()).abs().max())
        comp[(kind, b)] = time_fn(step, dev, warmup=2, iters=args.iters)
        print(f"{kind} batch {b}: eager {eager[(kind, b)] * 1e3:.4g} ms, compiled {comp[(kind, b)] * 1e3:.4g} ms, "
              f"first call {first[(kind, b)]:.4g} s, max abs diff {diff[(kind, b)]:.3g}", flush=True)
    B = args.big_batch
    rows = [
        ["bare UNet, batch 2: compiled / eager", comp[("bare", 2)] * 1e3, comp[("bare", 2)] / eager[("bare", 2)]],
        ["IP, batch 2: compiled / compiled bare", comp[("ip", 2)] * 1e3, comp[("ip", 2)] / comp[("bare", 2)]],
        ["AGD, batch 2: compiled / compiled bare", comp[("agd", 2)] * 1e3, comp[("agd", 2)] / comp[("bare", 2)]],
        ["IP+AGD, batch 2: compiled / compiled bare", comp[("ip+agd", 2)] * 1e3,
         comp[("ip+agd", 2)] / comp[("bare", 2)]],
        ["sampling step B=1: AGD (batch 1) / CFG (bare batch 2)", comp[("agd", 1)] * 1e3,
         comp[("agd", 1)] / comp[("bare", 2)]],
        [f"sampling step B={B}: AGD (batch {B}) / CFG (bare batch {2 * B})", comp[("agd", B)] * 1e3,
         comp[("agd", B)] / comp[("bare", 2 * B)]],
        ["batch 4: heterogeneous (4 mixes) / uniform (IP+AGD)", comp[("hetero", 4)] * 1e3,
         comp[("hetero", 4)] / comp[("uniform", 4)]],
    ]
    title = (f"compiled ({args.backend}, mode {args.mode}), size {args.size}, latent {side}x{side}, {dtype} on "
             f"{machine(dev)}")
    print_table(title, ["ratio", "ms / step (numerator)", "ratio"], rows)
    print_table("per configuration", ["configuration", "batch", "eager ms", "compiled ms", "compiled / eager",
                                      "first call (compile) s", "max abs diff vs eager"],
                [[k, b, eager[(k, b)] * 1e3, comp[(k, b)] * 1e3, comp[(k, b)] / eager[(k, b)], first[(k, b)],
                  diff[(k, b)]] for k, b in configs])


if __name__ == "__main__":
    main()
