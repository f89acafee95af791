"""Compiled mode of the adapter stack (`AdapterStack.compile`): every ratio of docs/performance.md in one run.

    python bench/bench_compiled.py --device cuda --size sd15          # inductor, CUDA graphs (reduce-overhead)
    python bench/bench_compiled.py --device cpu --size tiny --latent 8  # what a CPU can do in minutes

Rows (UNet steps, compiled unless said; each configuration's first call is its compile, timed separately):
eager vs compiled bare UNet; compiled stack with IP / AGD / IP+AGD vs compiled bare; AGD vs CFG per sampling step
(AGD: one pass of batch B with the adapter, CFG: one bare pass of batch 2B) at B = 1 and 8; a heterogeneous batch
of 4 (4 different mixes: none, IP, AGD, IP+AGD with per-sample references and w) vs a uniform batch of 4 (IP+AGD
for all). Every compiled output is checked against eager (max abs difference printed). Each configuration's inputs
are encoded once as a sampling call does (`begin_call`), so the steps timed are a call's steps after its first; steps
run back to back with one wait for the GPU per round, as in a sampling loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_unet, machine, print_table, time_fn  # noqa: E402
from adapter_studio.adapters.agd import AGDAdapter  # noqa: E402
from adapter_studio.adapters.ip_adapter import IPAdapter  # noqa: E402
from adapter_studio.context import CallInfo  # noqa: E402
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
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop compiling further configurations once this many seconds have passed (a GPU lease is "
                         "short: the configurations run in order of importance and the tables mark what was skipped)")
    ap.add_argument("--configs", default=None,
                    help="which configurations to run, in this order, e.g. 'bare:2,ip+agd:2' (default: all, in order "
                         "of importance); ratios whose parts are missing say so")
    ap.add_argument("--json", default=None, help="also write every number here (rewritten after each configuration)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
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
        # as inside a sampling call: inputs encoded once by `begin_call`, so steps reuse what is fixed over a call
        call = CallInfo(pipe=None, batch_size=b, num_images_per_prompt=1, cfg=False, guidance_scale=5.0,
                        device=torch.device(dev), dtype=dtype)
        for slot in stack:
            slot.call_inputs = slot.adapter.begin_call(dict(slot.inputs), call)

    def step_fn(b: int):
        x, txt = xs[:b], texts[:b]

        def step():
            with torch.no_grad():
                return unet(x, t, txt).sample
        return step

    def hook_fn(b: int):
        """The stack's eager pre-hook alone (gates, adapters' `prepare`): the part of a step outside the graph."""
        x, txt = xs[:b], texts[:b]

        def hook():
            with torch.no_grad():
                return stack._pre_forward(unet, (x, t, txt), {})
        return hook

    B = args.big_batch
    # in order of importance: a short GPU lease compiles as many as its budget allows, the first ones first
    configs = [("bare", 2), ("agd", 1), ("ip", 2), ("ip+agd", 2), ("agd", 2), ("hetero", 4), ("uniform", 4),
               ("agd", B), ("bare", maxb)]
    if args.configs:
        configs = [(k, int(b)) for k, b in (c.split(":") for c in args.configs.split(","))]
    step_flops = count_flops(step_fn(2))  # the bare UNet's CFG step (batch 2)
    eager: dict[tuple, float] = {}
    refs: dict[tuple, torch.Tensor] = {}
    for kind, b in configs:
        setup(kind, b)
        step = step_fn(b)
        refs[(kind, b)] = step()
        eager[(kind, b)] = time_fn(step, dev, warmup=1, iters=args.iters, back_to_back=True)
    stack.compile(backend=args.backend, mode=args.mode)
    comp: dict[tuple, float] = {}
    first: dict[tuple, float] = {}
    diff: dict[tuple, float] = {}
    skips: dict[tuple, int] = {}
    hook: dict[tuple, float] = {}
    title = (f"compiled ({args.backend}, mode {args.mode}), size {args.size}, latent {side}x{side}, {dtype} on "
             f"{machine(dev)}")

    def dump() -> None:
        if args.json:
            key = lambda k: f"{k[0]} b{k[1]}"  # noqa: E731
            Path(args.json).write_text(json.dumps(dict(
                title=title, step_flops=step_flops, eager_s={key(k): v for k, v in eager.items()},
                compiled_s={key(k): v for k, v in comp.items()}, first_call_s={key(k): v for k, v in first.items()},
                max_abs_diff={key(k): v for k, v in diff.items()}, cudagraph_skips={key(k): v for k, v in skips.items()},
                pre_hook_s={key(k): v for k, v in hook.items()},
            ), indent=1))

    for kind, b in configs:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {kind} batch {b} not compiled", flush=True)
            continue
        setup(kind, b)
        step = step_fn(b)
        skipped_before = cudagraph_skips()
        t0 = time.perf_counter()
        out = step()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        first[(kind, b)] = time.perf_counter() - t0
        diff[(kind, b)] = float((out.float() - refs[(kind, b)].float()).abs().max())
        comp[(kind, b)] = time_fn(step, dev, warmup=2, iters=args.iters, back_to_back=True)
        skips[(kind, b)] = cudagraph_skips() - skipped_before
        hook[(kind, b)] = time_fn(hook_fn(b), dev, warmup=2, iters=args.iters)
        print(f"{kind} batch {b}: eager {eager[(kind, b)] * 1e3:.4g} ms, compiled {comp[(kind, b)] * 1e3:.4g} ms "
              f"(of which the eager pre-hook {hook[(kind, b)] * 1e3:.3g} ms), first call {first[(kind, b)]:.4g} s, "
              f"max abs diff {diff[(kind, b)]:.3g}, CUDA-graph skips {skips[(kind, b)]}", flush=True)
        dump()

    def ratio(label: str, num: tuple, den: tuple, den_table: dict[tuple, float]) -> list:
        if num not in comp or den not in den_table:
            return [label, "not measured (budget)", "not measured (budget)"]
        return [label, comp[num] * 1e3, comp[num] / den_table[den]]

    rows = [
        ratio("bare UNet, batch 2: compiled / eager", ("bare", 2), ("bare", 2), eager),
        ratio("IP, batch 2: compiled / compiled bare", ("ip", 2), ("bare", 2), comp),
        ratio("AGD, batch 2: compiled / compiled bare", ("agd", 2), ("bare", 2), comp),
        ratio("IP+AGD, batch 2: compiled / compiled bare", ("ip+agd", 2), ("bare", 2), comp),
        ratio("sampling step B=1: AGD (batch 1) / CFG (bare batch 2)", ("agd", 1), ("bare", 2), comp),
        ratio(f"sampling step B={B}: AGD (batch {B}) / CFG (bare batch {2 * B})", ("agd", B), ("bare", 2 * B), comp),
        ratio("batch 4: heterogeneous (4 mixes) / uniform (IP+AGD)", ("hetero", 4), ("uniform", 4), comp),
    ]
    print_table(title, ["ratio", "ms / step (numerator)", "ratio"], rows)
    if ("bare", 2) in comp:
        print(f"bare CFG step (batch 2): {step_flops / 1e12:.3g} TFLOP (FlopCounterMode); eager "
              f"{step_flops / eager[('bare', 2)] / 1e12:.3g} TFLOP/s, compiled {step_flops / comp[('bare', 2)] / 1e12:.3g}"
              " TFLOP/s", flush=True)
    print_table("per configuration", ["configuration", "batch", "eager ms", "compiled ms", "compiled / eager",
                                      "pre-hook ms", "first call (compile) s", "max abs diff vs eager",
                                      "CUDA-graph skips"],
                [[k, b, eager[(k, b)] * 1e3, comp[(k, b)] * 1e3, comp[(k, b)] / eager[(k, b)], hook[(k, b)] * 1e3,
                  first[(k, b)], diff[(k, b)], skips[(k, b)]] if (k, b) in comp else
                 [k, b, eager[(k, b)] * 1e3, "skipped", "", "", "", "", ""] for k, b in configs])
    dump()


def count_flops(step) -> float:
    """FLOPs of one call of `step`, counted by torch's FlopCounterMode (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def cudagraph_skips() -> int:
    """How often inductor fell back from CUDA graphs so far (its own counter; 0 on a CPU)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


if __name__ == "__main__":
    main()
