"""I2V-Adapter speed and memory.

    python bench/bench_i2v_adapter.py --device cpu --size tiny            # every part
    python bench/bench_i2v_adapter.py --device cuda --size mid --part unet
    python bench/bench_i2v_adapter.py --size sd15 --part flops --latent 64   # no GPU needed

Part `unet`: time of one UNet step of a video UNet (AnimateDiff's `UNetMotionModel`; batch 2 = one CFG step of one
video, `--frames` frames at the size's latent resolution or `--latent`) bare, with the studio's stack and the unit
switched off, and with the studio's I2V-Adapter (frame 0 pinned, the first-frame branch on every spatial
self-attention), as in a pipeline call. All on one UNet, measured in interleaved rounds in one run; the table gives
medians and the ratio to the bare UNet of the same run.

Part `train`: steps/s and peak memory of `train/i2v_adapter.py` (the shared loop: accelerate, clipping, the
loss log), adapter only and with `train_motion_modules`, against a bare loop over the same model and data
(forward, backward, AdamW: no accelerate). Each run in its own process (peak RSS on CPU, `max_memory_allocated` on
CUDA), the three interleaved over `--train_rounds` rounds; medians.

Part `flops`: the FLOPs of the same UNet step bare and with the adapter, counted by `torch.utils.flop_counter` on the
meta device (nothing is computed, any size runs on any machine): what the branch costs where time follows FLOPs.

Sizes: `tiny` (the tiny-video preset), `mid` (an SD1.5-shaped UNet at about a tenth of its width, `bench.common`,
with a motion adapter of the same widths), `sd15` (SD1.5's UNet and AnimateDiff's motion modules, random weights).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (add_worker_args, build_unet, loop_result, machine, peak_memory, preset_file,  # noqa: E402
                          print_table, run_training_workers, run_worker, sync, timed_steps, training_header,
                          training_rows, unet_config)

# motion modules per size: tiny = the preset's; mid / sd15 = AnimateDiff v1.5's layout at the UNet's widths
MOTION = {
    "mid": dict(block_out_channels=[64, 128, 256, 256], motion_layers_per_block=2, motion_num_attention_heads=8,
                motion_norm_num_groups=32, motion_max_seq_length=32),
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], motion_layers_per_block=2, motion_num_attention_heads=8,
                 motion_norm_num_groups=32, motion_max_seq_length=32),
}


def video_unet(size: str, device: str, dtype: torch.dtype) -> Any:
    """The size's video UNet (random weights), frozen, on `device`."""
    if size == "tiny":
        from adapter_studio.presets import load_pipeline

        unet = load_pipeline("tiny-video").unet
    else:
        from diffusers import MotionAdapter, UNetMotionModel

        torch.manual_seed(0)
        unet = UNetMotionModel.from_unet2d(build_unet(size, device, torch.float32), MotionAdapter(**MOTION[size]))
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def video_preset(size: str, folder: Path) -> tuple[str, int]:
    """A video model preset for `size` (random weights, built from configs) and its image resolution."""
    import yaml

    if size == "tiny":
        return "tiny-video", 64
    base, res = preset_file(size, folder)
    path = folder / f"bench-video-{size}.yaml"
    path.write_text(yaml.safe_dump({"name": f"bench-video-{size}", "kind": "video", "source": "tiny", "base": base,
                                    "seed": 0, "resolution": res, "motion_adapter": MOTION[size]}))
    return str(path), res


# ------------------------------------------------------------------------------------------------ part: unet
def bench_unet(args: argparse.Namespace) -> str:
    from adapter_studio.adapters.i2v_adapter import I2VAdapter
    from adapter_studio.stack import AdapterStack

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):  # random init on the device: seconds instead of a minute for SD1.5 on a CPU
        unet = video_unet(args.size, args.device, dtype)
    cfg = unet.config
    torch.manual_seed(1)
    adapter = I2VAdapter.from_unet(unet)
    with torch.no_grad():  # a fresh adapter's to_out_ff is zero: give it weights, as a trained one has
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    adapter.to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    side, f = args.latent or unet_config(args.size)["sample_size"], args.frames
    x = torch.randn(2, 4, f, side, side, generator=g).to(args.device, dtype)  # [B, C, F, h, w], B = 2: one CFG step
    text = torch.randn(2 * f, 77, cfg.cross_attention_dim, generator=g).to(args.device, dtype)  # per frame
    t = torch.tensor(500, device=args.device)
    stack = AdapterStack()
    stack.add(adapter, name="i2v", image_latents=x[0, :, 0])  # the first frame's latent

    def use(mode: str) -> None:
        stack.detach()
        if mode != "bare":  # the studio's composing processors on every attention layer
            stack.attach(unet)
            stack["i2v"].enabled = mode == "i2v"

    def step() -> torch.Tensor:
        with torch.no_grad(), stack.sampling(None, cfg=True):
            return unet(x, t, text).sample

    modes = {"bare video UNet": "bare", "studio stack, I2V-Adapter disabled": "off", "with I2V-Adapter": "i2v"}
    outs = {}
    for mode in modes.values():
        use(mode)
        outs[mode] = step().float()  # also the warm-up
    assert torch.equal(outs["off"], outs["bare"]), "a disabled adapter leaves the UNet bit-identical"
    assert (outs["i2v"] - outs["bare"]).abs().max() > 0, "the adapter acts"
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.rounds):
        # interleaved in short blocks: load from other processes or clock drift hits every configuration alike
        for name, mode in modes.items():
            use(mode)
            for _ in range(args.iters):
                sync(args.device)
                t0 = time.perf_counter()
                step()
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
    stack.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    bare = "bare video UNet"
    rows = [[name, med[name] * 1e3, low[name] * 1e3, med[name] / med[bare], low[name] / low[bare]] for name in modes]
    n = len(adapter.layer_names())
    return print_table(
        f"video UNet step ({args.size}, {f} frames, {side}x{side} latents, batch 2 = one CFG step, {n} spatial "
        f"self-attentions) on {machine(args.device)}, {args.rounds} rounds x {args.iters}",
        ["configuration", "median ms / step", "min ms", "median / bare", "min / bare min"], rows)


# ------------------------------------------------------------------------------------------------ part: flops
def bench_flops(args: argparse.Namespace) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    from adapter_studio.adapters.i2v_adapter import I2VAdapter

    # the tiny preset is built by its loader (on the CPU); the others straight on the meta device
    device = "cpu" if args.size == "tiny" else "meta"
    with torch.device(device):
        unet = video_unet(args.size, device, torch.float32)
        adapter = I2VAdapter.from_unet(unet)
    side, f = args.latent or unet_config(args.size)["sample_size"], args.frames
    x = torch.empty(2, 4, f, side, side, device=device)
    text = torch.empty(2 * f, 77, unet.config.cross_attention_dim, device=device)
    # each spatial self-attention's input shape, then the branch alone on inputs of those shapes: the stack's
    # per-forward bookkeeping reads values, which the meta device does not have
    shapes = {}
    hooks = [unet.get_submodule(name[: -len(".processor")]).register_forward_pre_hook(
        lambda m, a, k, _name=name: shapes.__setitem__(_name, (a[0] if a else k["hidden_states"]).shape),
        with_kwargs=True) for name in adapter.layer_names()]
    with FlopCounterMode(display=False) as bare, torch.no_grad():
        unet(x, torch.tensor(500, device=device), text)
    for h in hooks:
        h.remove()
    with FlopCounterMode(display=False) as branch, torch.no_grad():
        for name, shape in shapes.items():
            adapter._layers[name](unet.get_submodule(name[: -len(".processor")]), torch.empty(shape, device=device), f)
    b, a = bare.get_total_flops(), branch.get_total_flops()
    return print_table(
        f"video UNet step FLOPs ({args.size}, {f} frames, {side}x{side} latents = {side * 8} px, batch 2 = one CFG "
        f"step), counted on the {device} device",
        ["configuration", "GFLOP / step", "ratio"], [["bare video UNet", b / 1e9, 1.0],
                                                     ["with I2V-Adapter", (b + a) / 1e9, (b + a) / b]])


# ------------------------------------------------------------------------------------------------ part: train
def _train_args(args: argparse.Namespace, out: Path) -> list[str]:
    mp = ["--mixed_precision", "fp16"] if args.device.startswith("cuda") else []
    return ["--model", args.preset, "--data_dir", str(Path(args.workdir) / "data"), "--output_dir", str(out),
            "--resolution", str(args.resolution), "--num_frames", str(args.frames_train), "--frame_stride", "2",
            "--train_batch_size", str(args.train_batch), "--max_steps", str(args.steps), "--checkpointing_steps",
            str(10**9), "--validation_steps", "0", "--report_to", "none", "--lr_warmup_steps", "0",
            "--resume_from_checkpoint", "null", "--make_demo_data", "0", *mp]


def worker_studio(args: argparse.Namespace, motion: bool) -> dict[str, Any]:
    from adapter_studio.adapters.i2v_adapter.training import main
    from adapter_studio.train.loop import steps_per_second

    out = Path(args.workdir) / f"studio-run-{motion}"
    shutil.rmtree(out, ignore_errors=True)
    main(_train_args(args, out) + ["--train_motion_modules", str(motion).lower()])
    return {"steps_per_s": steps_per_second(out / "logs" / "loss.jsonl"), "peak_mib": peak_memory(args.device)}


def worker_bare(args: argparse.Namespace) -> dict[str, Any]:
    """The same model and data in a plain loop: forward, backward, AdamW; no accelerate, no clipping, no logging."""
    from adapter_studio.adapters.i2v_adapter.training import I2VAdapterTask, I2VAdapterTrainConfig
    from adapter_studio.train.config import parse_config

    dev = torch.device(args.device)
    cfg = parse_config(I2VAdapterTrainConfig, _train_args(args, Path(args.workdir) / "bare-run"))
    task = I2VAdapterTask(cfg, accelerator=None)
    model, trainable = task.build()
    model.to(dev)
    opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-2)
    stamps: list[float] = []
    for batch in timed_steps(task.dataloader, args.steps, args.device, stamps):
        with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            loss = model({k: v.to(dev) for k, v in batch.items()})
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loop_result(stamps, args.device)


def bench_train(args: argparse.Namespace) -> str:
    from adapter_studio.adapters.i2v_adapter.data import write_demo_clips

    kinds = {"bare loop (adapter only)": "bare", "train/i2v_adapter.py": "studio",
             "train/i2v_adapter.py --train_motion_modules true": "studio-motion"}
    with tempfile.TemporaryDirectory() as tmp:
        preset, res = video_preset(args.size, Path(tmp))
        span = (args.frames_train - 1) * 2 + 1
        write_demo_clips(Path(tmp) / "data", max(8, 2 * args.train_batch), size=res, frames=span)
        # interleaved, each in a fresh process
        runs = run_training_workers(__file__, list(kinds.values()) * args.train_rounds, args, tmp, preset, res,
                                    extra=["--frames_train", str(args.frames_train)])
    results = {name: runs.get(kind, []) for name, kind in kinds.items()}
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("steps_per_s", "peak_mib")} for k, v in results.items()}
    rows = training_rows(med.items(), med["bare loop (adapter only)"])
    return print_table(f"I2V-Adapter training, size {args.size} ({res} px, {args.frames_train} frames), batch "
                       f"{args.train_batch}, {args.steps} steps on {machine(args.device)}, medians of "
                       f"{args.train_rounds} interleaved rounds", training_header(args.device), rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="tiny", choices=["tiny", "mid", "sd15"])
    ap.add_argument("--part", default="all", choices=["all", "unet", "flops", "train"])
    ap.add_argument("--frames", type=int, default=16, help="frames per video for the UNet step")
    ap.add_argument("--latent", type=int, default=0, help="latent side for the UNet step (0: the size's sample_size)")
    ap.add_argument("--iters", type=int, default=2, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--train_batch", type=int, default=2)
    ap.add_argument("--frames_train", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train_rounds", type=int, default=3)
    add_worker_args(ap)
    args = ap.parse_args(argv)
    if args._worker:
        run_worker(args, worker_bare if args._worker == "bare"
                   else lambda a: worker_studio(a, a._worker == "studio-motion"))
        return
    if args.part in ("all", "unet"):
        bench_unet(args)
    if args.part in ("all", "flops"):
        bench_flops(args)
    if args.part in ("all", "train"):
        bench_train(args)


if __name__ == "__main__":
    main()
