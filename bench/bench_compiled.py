"""Compiled mode of the adapter stack (`AdapterStack.compile`): every ratio of docs/performance.md in one run.

    python bench/bench_compiled.py --device cuda --size sd15          # inductor, CUDA graphs (reduce-overhead)
    python bench/bench_compiled.py --device cpu --size tiny --latent 8  # what a CPU can do in minutes

Rows (UNet steps, compiled unless said; each configuration's first call is its compile, timed separately):
eager vs compiled bare UNet; compiled stack with IP / AGD / IP+AGD vs compiled bare; AGD vs CFG per sampling step
(AGD: one pass of batch B with the adapter, CFG: one bare pass of batch 2B) at B = 1 and 8; a heterogeneous batch
of 4 (4 different mixes: none, IP, AGD, IP+AGD with per-sample references and w) vs a uniform batch of 4 (IP+AGD
for all); a plain ControlNet unit (`ctrl`, a ControlNet made from the UNet, its control image at the latent's pixel
size) vs compiled bare and vs its eager step, the ControlNet compiled as a graph of its own. Every compiled output is checked against eager (max abs difference printed). Each configuration's inputs
are encoded once as a sampling call does (`begin_call`), so the steps timed are a call's steps after its first; steps
run back to back with one wait for the GPU per round, as in a sampling loop.

Levers (diffusers' recipe for a compiled SD UNet) are configurations too: `bare:2@fused+cl` is the bare batch-2 step
with them on, compiled apart (its own graph) and compared with the plain `bare:2` of the same run:
  fused     QKV / KV projections fused (diffusers' `unet.fuse_qkv_projections()`; the stack keeps its adapters)
  cl        the UNet in channels_last memory format
  tuned     inductor flags of diffusers' "accelerate inference" guide (conv 1x1 as matmul, coordinate descent
            tuning, no epilogue fusion)
  autotune  mode "max-autotune" (CUDA graphs and autotuned matmul / conv templates; minutes more per graph)
  eagercn   what adapters run outside the UNet (the `ctrl` unit's ControlNet) left eager, as before it was compiled
The bare batch-1 step (`bare:1`) against the CFG step gives the floor of AGD / CFG at B=1: AGD is one UNet pass of
batch 1 plus the adapter, so it cannot be faster than the bare UNet at batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_controlnet, build_unet, machine, print_table, time_fn  # noqa: E402

LEVERS = ("fused", "cl", "tuned", "autotune", "eagercn")
TUNED_INDUCTOR = dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False,
                      coordinate_descent_check_all_directions=True)
from adapter_studio.adapters.agd import AGDAdapter  # noqa: E402
from adapter_studio.adapters.ctrl_adapter import CtrlAdapter  # noqa: E402
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
                    help="which configurations to run, in this order, e.g. 'bare:2,ip+agd:2,bare:2@fused+cl' "
                         "(default: all without levers, in order of importance); ratios whose parts are missing say "
                         f"so; levers after '@', joined by '+': {', '.join(LEVERS)}")
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
    ctrl = CtrlAdapter(build_controlnet(unet).to(dev, dtype))
    control_image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (side * 8, side * 8, 3), dtype=np.uint8))
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
        if kind == "ctrl":
            stack.add(ctrl, "ctrl", image=control_image)
        # as inside a sampling call: inputs encoded once by `begin_call`, so steps reuse what is fixed over a call
        call = CallInfo(pipe=SimpleNamespace(unet=unet), batch_size=b, num_images_per_prompt=1, cfg=False, guidance_scale=5.0,
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
    configs = [("bare", 2, ""), ("agd", 1, ""), ("bare", 1, ""), ("ip", 2, ""), ("ip+agd", 2, ""), ("agd", 2, ""),
               ("hetero", 4, ""), ("uniform", 4, ""), ("agd", B, ""), ("bare", maxb, ""), ("ctrl", 2, "")]
    if args.configs:
        configs = [parse_config(c) for c in args.configs.split(",")]
    step_flops = count_flops(step_fn(2))  # the bare UNet's CFG step (batch 2)
    eager: dict[tuple, float] = {}
    refs: dict[tuple, torch.Tensor] = {}
    for kind, b, lever in configs:
        key = (kind, b, lever)
        if lever:  # levers change the compiled code, not the eager one: compared with the plain configuration's
            continue
        setup(kind, b)
        step = step_fn(b)
        refs[key] = step()
        eager[key] = time_fn(step, dev, warmup=1, iters=args.iters, back_to_back=True)
    for kind, b, lever in configs:
        if lever and (kind, b, "") not in refs:
            setup(kind, b)
            refs[(kind, b, "")] = step_fn(b)()
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
            tables = dict(eager_s=eager, compiled_s=comp, first_call_s=first, max_abs_diff=diff,
                          cudagraph_skips=skips, pre_hook_s=hook)
            Path(args.json).write_text(json.dumps(dict(
                title=title, step_flops=step_flops,
                **{name: {label(k): v for k, v in table.items()} for name, table in tables.items()}), indent=1))

    for kind, b, lever in configs:
        key = (kind, b, lever)
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {label(key)} not compiled", flush=True)
            continue
        setup(kind, b)
        step = step_fn(b)
        with levers_on(lever, stack, args):
            skipped_before = cudagraph_skips()
            t0 = time.perf_counter()
            out = step()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            first[key] = time.perf_counter() - t0
            diff[key] = float((out.float() - refs[(kind, b, "")].float()).abs().max())
            comp[key] = time_fn(step, dev, warmup=2, iters=args.iters, back_to_back=True)
            skips[key] = cudagraph_skips() - skipped_before
            hook[key] = time_fn(hook_fn(b), dev, warmup=2, iters=args.iters)
        print(f"{label(key)}: eager {eager[key] * 1e3:.4g} ms, " if key in eager else f"{label(key)}: ", end="")
        print(f"compiled {comp[key] * 1e3:.4g} ms (of which the eager pre-hook {hook[key] * 1e3:.3g} ms), first "
              f"call {first[key]:.4g} s, max abs diff {diff[key]:.3g}, CUDA-graph skips {skips[key]}", flush=True)
        dump()

    def ratio(text: str, num: tuple, den: tuple, den_table: dict[tuple, float]) -> list:
        if num not in comp or den not in den_table:
            return [text, "not measured", "not measured"]
        return [text, comp[num] * 1e3, comp[num] / den_table[den]]

    rows = [
        ratio("bare UNet, batch 2: compiled / eager", ("bare", 2, ""), ("bare", 2, ""), eager),
        ratio("IP, batch 2: compiled / compiled bare", ("ip", 2, ""), ("bare", 2, ""), comp),
        ratio("AGD, batch 2: compiled / compiled bare", ("agd", 2, ""), ("bare", 2, ""), comp),
        ratio("IP+AGD, batch 2: compiled / compiled bare", ("ip+agd", 2, ""), ("bare", 2, ""), comp),
        ratio("sampling step B=1: AGD (batch 1) / CFG (bare batch 2)", ("agd", 1, ""), ("bare", 2, ""), comp),
        ratio("the floor of that: bare UNet batch 1 / batch 2", ("bare", 1, ""), ("bare", 2, ""), comp),
        ratio(f"sampling step B={B}: AGD (batch {B}) / CFG (bare batch {2 * B})", ("agd", B, ""),
              ("bare", 2 * B, ""), comp),
        ratio("batch 4: heterogeneous (4 mixes) / uniform (IP+AGD)", ("hetero", 4, ""), ("uniform", 4, ""), comp),
        ratio("ControlNet unit, batch 2: compiled / compiled bare", ("ctrl", 2, ""), ("bare", 2, ""), comp),
        ratio("ControlNet unit, batch 2: compiled / eager", ("ctrl", 2, ""), ("ctrl", 2, ""), eager),
    ]
    rows += [ratio(f"{label(k)}: with levers / without", k, (k[0], k[1], ""), comp) for k in configs if k[2]]
    print_table(title, ["ratio", "ms / step (numerator)", "ratio"], rows)
    if ("bare", 2, "") in comp:
        print(f"bare CFG step (batch 2): {step_flops / 1e12:.3g} TFLOP (FlopCounterMode); eager "
              f"{step_flops / eager[('bare', 2, '')] / 1e12:.3g} TFLOP/s, compiled "
              f"{step_flops / comp[('bare', 2, '')] / 1e12:.3g} TFLOP/s", flush=True)
    print_table("per configuration", ["configuration", "batch", "eager ms", "compiled ms", "compiled / eager",
                                      "pre-hook ms", "first call (compile) s", "max abs diff vs eager",
                                      "CUDA-graph skips"],
                [[k[0] + (f" @{k[2]}" if k[2] else ""), k[1],
                  eager[k] * 1e3 if k in eager else "-", comp[k] * 1e3 if k in comp else "skipped",
                  comp[k] / eager[k] if k in comp and k in eager else "-", hook[k] * 1e3 if k in comp else "",
                  first[k] if k in comp else "", diff[k] if k in comp else "", skips[k] if k in comp else ""]
                 for k in configs])
    dump()


def parse_config(text: str) -> tuple[str, int, str]:
    """'kind:batch[@lever+lever]' -> (kind, batch, 'lever+lever') with the levers in a fixed order."""
    head, _, levers = text.partition("@")
    kind, _, b = head.partition(":")
    names = [x for x in levers.split("+") if x]
    unknown = set(names) - set(LEVERS)
    if unknown or not b.isdigit():
        raise SystemExit(f"configuration {text!r}: expected kind:batch[@lever+...] with levers from {LEVERS}")
    return kind, int(b), "+".join(x for x in LEVERS if x in names)


def label(key: tuple[str, int, str]) -> str:
    kind, b, lever = key
    return f"{kind} b{b}" + (f" @{lever}" if lever else "")


@contextlib.contextmanager
def levers_on(lever: str, stack: AdapterStack, args: argparse.Namespace) -> Iterator[None]:
    """The UNet with `lever`'s changes (see the module docstring) and the stack compiled again for them; all undone
    after. With no lever: nothing changes."""
    if not lever:
        yield
        return
    names = lever.split("+")
    unet = stack.unet
    torch._dynamo.reset()  # dynamo's cache does not guard on inductor's flags: a graph compiled without them is new
    with contextlib.ExitStack() as undo:
        if "tuned" in names:
            undo.enter_context(torch._inductor.config.patch(**TUNED_INDUCTOR))
        if "fused" in names:
            unet.fuse_qkv_projections()
            stack.sync_processors()
            undo.callback(unet.unfuse_qkv_projections)
        if "cl" in names:
            unet.to(memory_format=torch.channels_last)
            undo.callback(lambda: unet.to(memory_format=torch.contiguous_format))
        stack.compile(backend=args.backend, mode="max-autotune" if "autotune" in names else args.mode)
        undo.callback(lambda: stack.compile(backend=args.backend, mode=args.mode))
        undo.callback(torch._dynamo.reset)
        if "eagercn" in names:
            stack._compile_part = lambda module: module  # the stack hands adapters their modules uncompiled
            undo.callback(lambda: delattr(stack, "_compile_part"))
        yield


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
