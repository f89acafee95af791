"""Ctrl-Adapter speed and memory.

    python bench/bench_ctrl_adapter.py --device cpu --size tiny            # both parts
    python bench/bench_ctrl_adapter.py --device cpu --size mid --part unet
    python bench/bench_ctrl_adapter.py --device cuda --size sd15

Part `unet`: median time of one UNet step (batch 2 = one CFG step) on the target UNet: bare; with diffusers' own
ControlNet call (the ControlNet, then the UNet with its residuals); with the same ControlNet as the studio's plain
Ctrl unit; and with the ControlNet + a Ctrl-Adapter of each shape in `ADAPTERS` (the ControlNet is made from the
target UNet, so one run measures them all on one backbone). All in one run, round-robin in short blocks; the studio's
plain unit is checked equal to diffusers' call before timing. Reported against the bare UNet, and as the adapter's
own cost over the ControlNet's own cost, `(t_adapter - t_controlnet) / (t_controlnet - t_bare)`: target <= 0.15. On
a CPU each step's process CPU time (all threads) is measured beside its wall time: on a machine shared with other
jobs it counts the work done, not the waits for a core, and is the statistic the cost ratios use there.

Part `train`: steps/s and peak memory of `train/ctrl_adapter.py` (the full adapter shape and the lightest one with
transformers in `ADAPTERS`; frozen ControlNet, UNet, VAE, text encoder) against training a ControlNet for the target (the alternative Ctrl-Adapter saves: a
diffusers-style loop, ControlNet trainable, AdamW) on the same generated data and batch. Each runs in its own process
(peak RSS on CPU, `max_memory_allocated` on CUDA).

Sizes: tiny (tiny-sd15), mid (SD1.5's layout at about 1/5 width, 256 px), sd15 (the real SD1.5 UNet config, random
weights, nothing downloaded).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (add_worker_args, build_controlnet, build_unet, fastest, loop_result, machine,  # noqa: E402
                          peak_memory, preset_file, print_table, run_training_workers, run_worker, sync, time_fn,
                          timed_steps, training_header, training_rows)

# the adapter's transformer width per size: the release's 8 heads x 64 at SD1.5 size, scaled with the model below it
HEADS = {"tiny": dict(num_attention_heads=4, attention_head_dim=8),
         "mid": dict(num_attention_heads=8, attention_head_dim=16),
         "sd15": dict(num_attention_heads=8, attention_head_dim=64)}
# adapter shapes: (row label, locations (None = every level + M), adapters per location, blocks per adapter, other
# config entries); the first is the release's full shape, the others lighter ones the same code builds
ADAPTERS = (("full: every level + M, 3 per level, 2 blocks", None, 3, 2, {}),
            ("every level + M, 1 per level, 1 block", None, 1, 1, {}),
            ("levels B, C (, D) + M, 1 per level, 1 block", "BCDM", 1, 1, {}),
            ("every level + M, 1 per level, 1 block without transformer", None, 1, 1,
             {"add_spatial_transformer": False}))


def _existing(locations: str | None, unet_config: Any) -> str | None:
    """`locations` without the letters of levels this UNet does not have (tiny-sd15 has A, B, C)."""
    levels = len(unet_config.block_out_channels)
    return locations if locations is None else "".join(x for x in locations if x == "M" or "ABCDEFGH".index(x) < levels)


# ------------------------------------------------------------------------------------------------ part: unet
def bench_unet(args: argparse.Namespace) -> str:
    from adapter_studio.adapters.ctrl_adapter import CtrlAdapter, CtrlAdapterModel
    from adapter_studio.context import CallInfo
    from adapter_studio.stack import AdapterStack

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):  # random init on the device: seconds instead of a minute for SD1.5 on a CPU
        unet = build_unet(args.size, args.device, dtype)
        cn = build_controlnet(unet).to(args.device, dtype)
    cfg = unet.config
    units = {"plain": CtrlAdapter(cn)}
    for label, locations, per_location, blocks, extra in ADAPTERS:
        torch.manual_seed(1)
        model = CtrlAdapterModel.for_models(cn, unet, locations=_existing(locations, cfg), per_location=per_location,
                                            num_blocks=blocks, **HEADS[args.size], **extra)
        model.to(args.device, dtype).eval()
        units[label] = CtrlAdapter(cn, model)
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, cfg.sample_size
    x = torch.randn(b, 4, s, s, generator=g).to(args.device, dtype)
    text = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(args.device, dtype)
    t = torch.tensor(500, device=args.device)
    image = torch.rand(3, s * 8, s * 8, generator=g)  # the control image, in 0..1 at the output size
    cond = image[None].expand(b, -1, -1, -1).to(args.device, dtype)

    stack = AdapterStack().attach(unet)
    slot = stack.add(units["plain"], name="ctrl")
    call = CallInfo(pipe=SimpleNamespace(unet=unet), batch_size=b // 2, num_images_per_prompt=1, cfg=True,
                    guidance_scale=7.5, device=torch.device(args.device), dtype=dtype, height=s * 8, width=s * 8)

    def use(mode: str) -> None:
        slot.enabled = mode not in ("bare", "diffusers")
        if slot.enabled:
            slot.adapter = units[mode]
            slot.call_inputs = units[mode].begin_call({"image": image}, call)

    def step(mode: str) -> torch.Tensor:
        with torch.no_grad(), stack.sampling(None, cfg=True):
            if mode == "diffusers":
                down, mid = cn(x, t, text, controlnet_cond=cond, return_dict=False)
                return unet(x, t, text, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
            return unet(x, t, text).sample

    modes = ["bare", "diffusers", *units]
    use("plain")
    studio = step("plain").float()
    use("diffusers")
    ref = step("diffusers").float()
    err = (studio - ref).abs().max().item()
    assert err < (2e-2 if dtype == torch.float16 else 1e-4) * max(1.0, ref.abs().max().item()), \
        f"the studio's plain ControlNet differs from diffusers' call by {err}"
    cpu = not args.device.startswith("cuda")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    work: dict[str, list[float]] = {m: [] for m in modes}
    for mode in modes:  # warm-up
        use(mode)
        time_fn(lambda: step(mode), args.device, warmup=2, iters=1)
    for _ in range(args.rounds):
        # interleaved in short blocks, so load from other processes or clock drift hits every configuration alike
        for mode in modes:
            use(mode)
            for _ in range(args.iters):
                t0, c0 = time.perf_counter(), time.process_time()
                step(mode)
                sync(args.device)
                wall[mode].append(time.perf_counter() - t0)
                work[mode].append(time.process_time() - c0)
    stack.detach()
    med = {m: statistics.median(v) for m, v in wall.items()}
    low = {m: min(v) for m, v in wall.items()}
    ref = {m: statistics.median(v) for m, v in (work if cpu else wall).items()}  # what the cost ratios read
    names = {"bare": "bare UNet", "diffusers": "diffusers ControlNet call", "plain": "studio ControlNet (plain unit)"}
    adapters = {a[0] for a in ADAPTERS}
    rows = []
    for m in modes:
        own = (ref[m] - ref["plain"]) / (ref["plain"] - ref["bare"]) if m in adapters else "—"
        rows.append([names.get(m, f"+ Ctrl-Adapter ({m})"), med[m] * 1e3, low[m] * 1e3,
                     *([ref[m] * 1e3] if cpu else []), ref[m] / ref["bare"], own])
    params = {m: sum(p.numel() for p in units[m].adapter.parameters()) for m in units if m != "plain"}
    basis = "CPU time" if cpu else "wall"
    text_out = print_table(
        f"UNet step with ControlNet / Ctrl-Adapter, size {args.size}, batch {b}, {dtype} on {machine(args.device)}",
        ["configuration", "median ms / step", "min ms", *(["median CPU ms"] if cpu else []), f"/ bare ({basis})",
         f"adapter / ControlNet cost ({basis})"], rows)
    cn_params = sum(p.numel() for p in cn.parameters())
    print(f"parameters: ControlNet {cn_params:,}; adapters " + "; ".join(f"{m.split(':')[0]} {n:,}"
                                                                         for m, n in params.items()), flush=True)
    return text_out


# ------------------------------------------------------------------------------------------------ part: train
TRAINED = {"studio": ADAPTERS[0], "studio-light": ADAPTERS[2]}  # worker name -> adapter shape


def worker_studio(args: argparse.Namespace) -> dict[str, Any]:
    from adapter_studio.adapters.ctrl_adapter.training import main
    from adapter_studio.presets import load_preset
    from adapter_studio.train.loop import steps_per_second

    out = Path(args.workdir) / "studio-run"
    mp = ["--mixed_precision", "fp16"] if args.device.startswith("cuda") else []
    heads = HEADS[args.size]
    _, locations, per_location, blocks, _ = TRAINED[args._worker]
    locations = _existing(locations, SimpleNamespace(**load_preset(args.preset).config["unet"]))
    main(["--model", args.preset, "--data_dir", str(Path(args.workdir) / "data"), "--output_dir", str(out),
          "--controlnets", f"[{Path(args.workdir) / 'controlnet'}]", "--preprocessors", "[canny]",
          "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch), "--max_steps",
          str(args.steps), "--checkpointing_steps", str(10**9), "--validation_steps", "0", "--report_to", "none",
          "--num_blocks", str(blocks), "--per_location", str(per_location), "--locations", str(locations),
          "--num_attention_heads", str(heads["num_attention_heads"]),
          "--attention_head_dim", str(heads["attention_head_dim"]), *mp, "--lr_warmup_steps", "0",
          "--resume_from_checkpoint", "null"])
    return {"steps_per_s": steps_per_second(out / "logs" / "loss.jsonl"), "peak_mib": peak_memory(args.device)}


def worker_controlnet(args: argparse.Namespace) -> dict[str, Any]:
    """Training a ControlNet for the target instead (diffusers' train_controlnet.py recipe, its core loop)."""
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDPMScheduler

    from adapter_studio.adapters.ctrl_adapter.training import CtrlAdapterDataset, load_records
    from adapter_studio.presets import load_pipeline

    dev = torch.device(args.device)
    amp = torch.float16 if dev.type == "cuda" else torch.float32
    pipe = load_pipeline(args.preset)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).to(dev, amp)
    controlnet = ControlNetModel.from_pretrained(str(Path(args.workdir) / "controlnet")).to(dev).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = SimpleNamespace(data_dir=str(Path(args.workdir) / "data"), conditioning_columns=None, controlnets=["cn"],
                          caption_column="text")
    ds = CtrlAdapterDataset(load_records(cfg), args.resolution, ["canny"])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.train_batch, shuffle=True, drop_last=True)
    stamps: list[float] = []
    for batch in timed_steps(lambda: loader, args.steps, args.device, stamps):
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(dev, amp)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=dev)
            noisy = sched.add_noise(latents, noise, t)
            ids = pipe.tokenizer(batch["caption"], max_length=77, padding="max_length", truncation=True,
                                 return_tensors="pt").input_ids.to(dev)
            text = text_encoder(ids)[0]
        with torch.autocast(dev.type, dtype=amp, enabled=dev.type == "cuda"):
            down, mid = controlnet(noisy, t, text, controlnet_cond=batch["conditions"][:, 0].to(dev),
                                   return_dict=False)
            pred = unet(noisy, t, text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loop_result(stamps, args.device)


def bench_train(args: argparse.Namespace) -> str:
    from adapter_studio.adapters.ctrl_adapter.training import write_demo_data
    from adapter_studio.presets import load_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        preset, res = preset_file(args.size, Path(tmp), image_encoder=False)
        write_demo_data(Path(tmp) / "data", max(16, 2 * args.train_batch), size=res)
        build_controlnet(load_pipeline(preset).unet).save_pretrained(Path(tmp) / "controlnet")  # the frozen source
        kinds = ("controlnet", *TRAINED) * max(1, min(args.rounds, 2))
        results = fastest(run_training_workers(__file__, kinds, args, tmp, preset, res))
    ref = results["controlnet"]
    rows = training_rows((("training a ControlNet for the target (diffusers-style loop)", ref),
                          *((f"train/ctrl_adapter.py, frozen ControlNet, adapter {TRAINED[k][0]}", results[k])
                            for k in TRAINED)), ref)
    return print_table(f"Ctrl-Adapter training, size {args.size} ({res} px), batch {args.train_batch}, {args.steps} "
                       f"steps on {machine(args.device)}", training_header(args.device), rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="mid", choices=["tiny", "mid", "sd15"])
    ap.add_argument("--part", default="all", choices=["all", "unet", "train"])
    ap.add_argument("--batch", type=int, default=2, help="UNet batch for the step timing (2 = one CFG step)")
    ap.add_argument("--iters", type=int, default=4, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--train_batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    add_worker_args(ap)
    args = ap.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not "modules that should be kept in float32: []" once per cast
    if args._worker:
        run_worker(args, worker_studio if args._worker in TRAINED else worker_controlnet)
        return
    if args.part in ("all", "unet"):
        bench_unet(args)
    if args.part in ("all", "train"):
        bench_train(args)


if __name__ == "__main__":
    main()
