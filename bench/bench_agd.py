"""AGD benchmark: sampling speed AGD vs CFG, image fidelity to CFG, disk per trajectory, training steps/s.

    python bench/bench_agd.py --device cpu --size tiny                 # all parts (trains a tiny adapter first)
    python bench/bench_agd.py --device cuda --size sd15 --part speed,train,disk

Parts (all measured in this one run, against a baseline from the same run):

* `speed`: wall time of a full StudioPipeline call (prompt encoding + `--steps` denoising steps, latents out: the
  VAE decode is the same for both and left out unless `--decode`), CFG (2 UNet passes per step as one doubled
  batch) vs AGD (1 pass + the adapter), same UNet, same steps, round-robin. Target ratio AGD/CFG <= 0.55.
* `fidelity` (`--size tiny` only): trains an AGD adapter on tiny-sd15 trajectories (or takes `--adapter`), then
  decodes images for the same prompts and seeds with CFG, AGD and the conditional prediction alone (no guidance)
  and reports MSE / PSNR of AGD and of no-guidance against CFG.
* `disk`: bytes per trajectory of `adapter_studio.adapters.agd.trajectories` (fp16) for this size at `--steps`
  steps, every k.
* `train`: distillation steps/s (one student pass with the adapter + backward + AdamW) on synthetic records of this
  size, and for tiny the shared loop's own steps/s from the fidelity run.

Sizes: tiny (tiny-sd15 preset), mid (SD1.5-shaped UNet at ~1/5 width), sd15 (the real SD1.5 UNet config, random
weights, nothing downloaded).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_unet, machine, print_table, sync  # noqa: E402

HIDDEN = {"tiny": 32, "mid": 64, "sd15": 320}  # AGD hidden width per size (upstream uses 320 on SD)
TEXT = {"mid": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)}


def build_pipeline(size: str, device: str, dtype: torch.dtype):
    """tiny-sd15's pipeline; for mid/sd15 with that size's UNet and a text encoder of its cross-attention width."""
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    if size != "tiny":
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        tok = pipe.tokenizer
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                         max_position_embeddings=77, **TEXT[size])).eval()
        pipe.unet = build_unet(size, "cpu", torch.float32)
    return pipe.to(device=device, dtype=dtype)


def part_speed(args, pipe, rows: list) -> None:
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.pipelines.studio_pipeline import StudioPipeline

    sp = StudioPipeline(pipe)
    slot = sp.add(AGDAdapter.from_unet(pipe.unet, hidden_dim=HIDDEN[args.size]), name="agd")
    h = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = ["a photo of a cat"] * args.batch

    def call(mode: str):
        slot.enabled = mode == "agd"
        # "cond": one plain pass per step, no adapter (guidance off): the floor AGD's ratio can reach
        return sp(prompts, guidance="cfg" if mode == "cond" else mode, guidance_scale=1.0 if mode == "cond" else 7.5,
                  num_inference_steps=args.steps, height=h, width=h,
                  generator=torch.Generator(args.device).manual_seed(0),
                  output_type="pil" if args.decode else "latent")

    modes = ("cfg", "agd", "cond")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for mode in modes:
        call(mode)  # warm-up
    for _ in range(args.repeats):
        for mode in modes:
            sync(args.device)
            t = time.perf_counter()
            call(mode)
            sync(args.device)
            times[mode].append(time.perf_counter() - t)
    cfg_t, agd_t, cond_t = (statistics.median(times[m]) for m in modes)
    params = sum(p.numel() for p in slot.adapter.parameters())
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    rows.append(["CFG (2 passes/step)", f"{args.steps}", f"{cfg_t:.3f}", f"{cfg_t / args.steps * 1000:.1f}", "1.00", "-"])
    rows.append(["AGD (1 pass/step)", f"{args.steps}", f"{agd_t:.3f}", f"{agd_t / args.steps * 1000:.1f}",
                 f"{agd_t / cfg_t:.3f}", f"{params:,} ({100 * params / unet_params:.1f}% of the UNet)"])
    rows.append(["no guidance, no adapter (1 pass/step)", f"{args.steps}", f"{cond_t:.3f}",
                 f"{cond_t / args.steps * 1000:.1f}", f"{cond_t / cfg_t:.3f}", "- (AGD's floor)"])
    slot.enabled = True
    sp.remove("agd")
    sp.stack.detach()


def part_disk(args, pipe, rows: list) -> None:
    from adapter_studio.adapters.agd.trajectories import Layout

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(args.steps)
    for k in sorted({1, args.every_k}):
        lay = Layout(latent=(pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
                     prompt=(77, pipe.unet.config.cross_attention_dim), records=math.ceil(len(sched.timesteps) / k))
        b = lay.bytes_per_trajectory
        rows.append([f"{args.steps} steps, every {k}", f"{lay.records}", f"{b / 2**10:.1f}",
                     f"{b * 10_000 / 2**30:.2f}"])


def part_train(args, pipe, rows: list) -> None:
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.agd.training import AGDStudent

    unet = pipe.unet.to(torch.float32 if args.device == "cpu" else pipe.unet.dtype)
    adapter = AGDAdapter.from_unet(unet, hidden_dim=HIDDEN[args.size]).to(args.device)
    student = AGDStudent(unet, adapter)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    s, b = unet.config.sample_size, args.train_batch
    g = torch.Generator().manual_seed(0)
    batch = {"x_t": torch.randn(b, 4, s, s, generator=g), "eps_cfg": torch.randn(b, 4, s, s, generator=g),
             "timestep": torch.randint(0, 1000, (b,), generator=g).float(), "w": torch.rand(b, generator=g) * 7 + 1,
             "prompt_embeds": torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    autocast = torch.autocast("cuda", dtype=torch.float16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = student(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(args.device)
    t = time.perf_counter()
    for _ in range(args.train_iters):
        step()
    sync(args.device)
    sps = args.train_iters / (time.perf_counter() - t)
    rows.append([f"synthetic records, batch {b}", f"{sps:.2f}", f"{sps * b:.1f}"])
    student.stack.detach()


def part_fidelity(args, rows: list, train_rows: list) -> None:
    """Train (or load) a tiny AGD adapter, then compare decoded images against CFG for the same seeds."""
    import numpy as np

    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.pipelines.studio_pipeline import StudioPipeline
    from adapter_studio.presets import load_pipeline
    from adapter_studio.adapters.agd.training import AGDTask, AGDTrainConfig
    from adapter_studio.adapters.agd.trajectories import TrajectoryConfig, generate_to_disk
    from adapter_studio.train.config import config_from_dict
    from adapter_studio.train.loop import steps_per_second, train

    import yaml

    work = Path(tempfile.mkdtemp(prefix="bench-agd-"))
    adapter_path = args.adapter
    if adapter_path is None:
        tvals = yaml.safe_load((ROOT / "configs/train/agd_tiny_trajectories.yaml").read_text())
        tcfg = config_from_dict(TrajectoryConfig, {**tvals, "output_dir": str(work / "traj"), "device": args.device})
        t0 = time.perf_counter()
        generate_to_disk(tcfg, log=lambda *a: None)
        gen_s = time.perf_counter() - t0
        vals = yaml.safe_load((ROOT / "configs/train/agd_tiny.yaml").read_text())
        vals.update(output_dir=str(work / "run"), trajectories=str(work / "traj"), validation_steps=0,
                    max_steps=args.train_steps, learning_rate=args.lr, checkpointing_steps=10**9)
        result = train(config_from_dict(AGDTrainConfig, vals), AGDTask)
        adapter_path = result["final"]
        sps = steps_per_second(work / "run" / "logs" / "loss.jsonl")
        train_rows.append([f"train/agd.py loop on tiny trajectories, batch {vals['train_batch_size']}", f"{sps:.2f}",
                           f"{sps * vals['train_batch_size']:.1f}"])
        train_rows.append([f"trajectory generation ({tcfg.num_trajectories} traj x {tcfg.num_inference_steps} "
                           "CFG steps)", f"{tcfg.num_trajectories / gen_s:.2f} traj/s", "-"])
    sp = StudioPipeline(load_pipeline("tiny-sd15").to(args.device))
    slot = sp.add(AGDAdapter.from_pretrained(adapter_path), name="agd")
    prompts = ["a photo of a cat", "a red car in the city", "a green robot", "portrait of a dog, sketch"]

    def images(mode: str, w: float) -> np.ndarray:
        slot.enabled = mode == "agd"
        out = []
        for i, p in enumerate(prompts):
            r = sp(p, guidance="agd" if mode == "agd" else "cfg", guidance_scale=w if mode != "cond" else 1.0,
                   num_inference_steps=args.fid_steps, generator=torch.Generator(args.device).manual_seed(100 + i),
                   output_type="np")
            out.append(r.images[0])
        return np.stack(out).astype(np.float64)

    for w in args.fid_w:
        ref = images("cfg", w)
        for mode, label in (("agd", "AGD (1 pass)"), ("cond", "no guidance (1 pass)")):
            mse = float(((images(mode, w) - ref) ** 2).mean())
            psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
            rows.append([f"{w:g}", label, f"{mse:.5f}", f"{psnr:.2f}"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "mid", "sd15"])
    ap.add_argument("--part", default="speed,fidelity,disk,train")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of a call")
    ap.add_argument("--batch", type=int, default=1, help="prompts per sampling call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", action="store_true", help="include the VAE decode in the timed call")
    ap.add_argument("--every_k", type=int, default=2)
    ap.add_argument("--train_batch", type=int, default=4)
    ap.add_argument("--train_iters", type=int, default=10)
    ap.add_argument("--train_steps", type=int, default=300, help="tiny adapter training steps (fidelity)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--adapter", default=None, help="a trained tiny AGD adapter folder (skips training)")
    ap.add_argument("--fid_steps", type=int, default=20)
    ap.add_argument("--fid_w", type=float, nargs="+", default=[3.0, 7.5])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    parts = set(args.part.split(","))
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    print(f"# AGD benchmark: {machine(args.device)}, size {args.size}, dtype {dtype}\n")
    pipe = build_pipeline(args.size, args.device, dtype)
    train_rows: list = []
    if "speed" in parts:
        rows: list = []
        part_speed(args, pipe, rows)
        print_table(f"Sampling call, batch {args.batch}, {args.steps} steps ({'with' if args.decode else 'without'} "
                    "VAE decode)", ["mode", "steps", "call s", "ms/step", "ratio vs CFG", "adapter params"], rows)
    if "disk" in parts:
        rows = []
        part_disk(args, pipe, rows)
        print_table("Disk per trajectory (fp16 x_t + eps_cfg per record, prompt embeds once)",
                    ["recording", "records", "KiB / trajectory", "GiB / 10k trajectories"], rows)
    if "fidelity" in parts and args.size == "tiny":
        rows = []
        part_fidelity(args, rows, train_rows)
        print_table(f"Fidelity to CFG images (tiny-sd15, {args.fid_steps} steps, same seeds, pixels in [0, 1])",
                    ["w", "one-pass sampler", "MSE vs CFG", "PSNR dB"], rows)
    if "train" in parts:
        part_train(args, build_pipeline(args.size, args.device, dtype), train_rows)
    if train_rows:
        print_table("Training", ["what", "steps/s", "records/s"], train_rows)


if __name__ == "__main__":
    main()
