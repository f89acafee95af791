"""IP-Adapter speed and memory.

    python bench/bench_ip_adapter.py --device cuda --size sd15            # both parts
    python bench/bench_ip_adapter.py --device cpu --size mid --part unet

Part `unet`: median time of one UNet step (batch 2 = one CFG step) for the bare UNet, the UNet with the studio's
IP-Adapter (inputs encoded once per call, as in a pipeline call), the same with the folding of `to_q`/`to_out`
switched off, and diffusers' own `IPAdapterAttnProcessor2_0` with the same weights (loaded through
`unet._load_ip_adapter_weights`, image embeddings projected inside the UNet as diffusers does). All on one UNet,
measured round-robin in one run; outputs checked equal (studio vs diffusers) before timing.

Part `train`: steps/s and peak memory of `train/ip_adapter.py` (embedding cache on; fp16 frozen weights + autocast
on CUDA) against a plain loop in the reference script's style (fp32 UNet, image encoder every step, diffusers'
IP processors, AdamW, no accelerate) on the same generated data and batch. Each runs in its own process (peak RSS
on CPU, `max_memory_allocated` on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (add_worker_args, build_unet, fastest, loop_result, machine, peak_memory,  # noqa: E402
                          preset_file, print_table, run_training_workers, run_worker, time_fn, timed_steps,
                          training_header, training_rows)


# ------------------------------------------------------------------------------------------------ part: unet
def bench_unet(args: argparse.Namespace) -> str:
    from adapter_studio.adapters.ip_adapter import IPAdapter, original_state_dict
    from adapter_studio.adapters.ip_adapter import attention as ipa
    from adapter_studio.context import CallInfo
    from adapter_studio.stack import AdapterStack

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):  # random init on the device: seconds instead of a minute for SD1.5 on a CPU
        unet = build_unet(args.size, args.device, dtype)
    cfg = unet.config
    embed_dim = {"tiny": 24, "mid": 256, "sd15": 1024}[args.size]
    torch.manual_seed(1)
    adapter = IPAdapter.from_unet(unet, embed_dim, projection=args.projection,
                                 **({"resampler_dim": cfg.cross_attention_dim} if args.projection == "plus" else {}))
    with torch.no_grad():
        for p in adapter.image_proj.parameters():
            p.normal_(0, 0.05)
    adapter.to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    b = args.batch
    x = torch.randn(b, 4, cfg.sample_size, cfg.sample_size, generator=g).to(args.device, dtype)
    text = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(args.device, dtype)
    t = torch.tensor(500, device=args.device)
    if args.projection == "base":
        pos = torch.randn(1, 1, embed_dim, generator=g)
    else:
        pos = torch.randn(1, 1, 257, embed_dim, generator=g)
    neg = torch.randn_like(pos)
    pos, neg = pos.to(args.device, dtype), neg.to(args.device, dtype)

    original = dict(unet.attn_processors)
    stack = AdapterStack()
    stack.add(adapter, name="ip")
    call = CallInfo(pipe=None, batch_size=b // 2, num_images_per_prompt=1, cfg=True, guidance_scale=7.5,
                    device=torch.device(args.device), dtype=dtype)

    # diffusers' own processors with the same weights (added once, toggled below)
    unet._load_ip_adapter_weights([original_state_dict(adapter)], low_cpu_mem_usage=False)
    unet.to(args.device, dtype)
    diffusers_procs, diffusers_proj = dict(unet.attn_processors), unet.encoder_hid_proj
    half = [-1] * (pos.ndim - 1)
    embeds = [torch.cat([neg.expand(b // 2, *half), pos.expand(b // 2, *half)])]  # [negatives; positives], as diffusers

    def use(mode: str) -> None:
        stack.detach()
        # the projection first: a plus projection holds attention layers of its own, which set_attn_processor counts
        unet.encoder_hid_proj = diffusers_proj if mode == "diffusers" else None
        unet.config.encoder_hid_dim_type = "ip_image_proj" if mode == "diffusers" else None
        unet.set_attn_processor(dict(diffusers_procs if mode == "diffusers" else original))
        if mode.startswith("studio"):
            stack.attach(unet)
            stack["ip"].call_inputs = adapter.begin_call({"image_embeds": pos, "negative_image_embeds": neg}, call)

    folded = ipa.use_folded

    def step(mode: str):
        with torch.no_grad():
            if mode == "diffusers":
                return unet(x, t, text, added_cond_kwargs={"image_embeds": embeds}).sample
            if mode.startswith("studio"):
                ipa.use_folded = folded if mode == "studio" else (lambda attn, n: False)
                try:
                    with stack.sampling(None, cfg=True):
                        return unet(x, t, text).sample
                finally:
                    ipa.use_folded = folded
            return unet(x, t, text).sample

    modes = {"bare diffusers UNet": "bare", "studio IP-Adapter": "studio",
             "studio IP-Adapter, unfolded": "studio-unfolded", "diffusers IP-Adapter processor": "diffusers"}
    outs = {}
    for mode in modes.values():
        use(mode)
        outs[mode] = step(mode).float()
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    for m in ("studio", "studio-unfolded"):
        err = (outs[m] - outs["diffusers"]).abs().max().item()
        assert err < tol * max(1.0, outs["diffusers"].abs().max().item()), f"{m} differs from diffusers by {err}"
    times: dict[str, list[float]] = {k: [] for k in modes}
    for name, mode in modes.items():  # warm-up
        use(mode)
        time_fn(lambda: step(mode), args.device, warmup=2, iters=1)
    for _ in range(args.rounds):
        # interleaved in short blocks, so load from other processes or clock drift hits every configuration alike
        for name, mode in modes.items():
            use(mode)
            for _ in range(args.iters):
                times[name].append(time_fn(lambda: step(mode), args.device, warmup=0, iters=1))
    use("bare")
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    bare, diff = med["bare diffusers UNet"], med["diffusers IP-Adapter processor"]
    rows = [[name, med[name] * 1e3, low[name] * 1e3, med[name] / bare, med[name] / diff,
             low[name] / low["bare diffusers UNet"]] for name in modes]
    return print_table(
        f"UNet step with IP-Adapter ({args.projection}), size {args.size}, batch {b}, {dtype} on {machine(args.device)}",
        ["configuration", "median ms / step", "min ms", "median / bare", "median / diffusers IP", "min / bare min"],
        rows)


# ------------------------------------------------------------------------------------------------ part: train
def _build_on_device(device: str) -> None:
    """Build the random-weight models on the device (seconds instead of minutes for SD1.5 + ViT-H on a CPU)."""
    import adapter_studio.presets as presets

    plain = presets.load_pipeline

    def load_pipeline(*a: Any, **k: Any) -> Any:
        with torch.device(device):
            return plain(*a, **k)

    presets.load_pipeline = load_pipeline


def worker_studio(args: argparse.Namespace) -> dict[str, Any]:
    from adapter_studio.adapters.ip_adapter.training import main
    from adapter_studio.train.loop import steps_per_second

    out = Path(args.workdir) / "studio-run"
    # (mixed_precision "no" is the default; passed as text YAML would read it as the boolean false)
    mp = ["--mixed_precision", "fp16"] if args.device.startswith("cuda") else []
    main(["--model", args.preset, "--data_dir", str(Path(args.workdir) / "data"), "--output_dir", str(out),
          "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch), "--max_steps",
          str(args.steps), "--checkpointing_steps", str(10**9), "--validation_steps", "0", "--report_to", "none",
          "--cache_image_embeds", "true", *mp, "--export_original", "false",
          "--lr_warmup_steps", "0", "--resume_from_checkpoint", "null"])
    return {"steps_per_s": steps_per_second(out / "logs" / "loss.jsonl"), "peak_mib": peak_memory(args.device)}


def worker_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The reference script's loop: fp32 UNet with diffusers' IP processors, image encoder every step."""
    import random

    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from adapter_studio.adapters.ip_adapter import IPAdapter, original_state_dict
    from adapter_studio.adapters.ip_adapter.training import IPAdapterDataset, load_records
    from types import SimpleNamespace

    from adapter_studio.presets import load_pipeline

    dev = torch.device(args.device)
    pipe = load_pipeline(args.preset)
    unet, vae, text_encoder, image_encoder = pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder
    ad = IPAdapter.from_unet(unet, image_encoder.config.projection_dim)
    unet._load_ip_adapter_weights([original_state_dict(ad)], low_cpu_mem_usage=False)
    for m in (unet, vae, text_encoder, image_encoder):
        m.requires_grad_(False).to(dev)
    params = list(unet.encoder_hid_proj.parameters())
    for proc in unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            params += list(proc.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = SimpleNamespace(data_dir=str(Path(args.workdir) / "data"), data_json=None, caption_column="text")
    ds = IPAdapterDataset(load_records(cfg), pipe.tokenizer, pipe.feature_extractor, args.resolution)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.train_batch, shuffle=True, drop_last=True)
    stamps: list[float] = []
    for batch in timed_steps(lambda: loader, args.steps, args.device, stamps):
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=dev)
            noisy = sched.add_noise(latents, noise, t)
            embeds = image_encoder(batch["clip_pixels"]).image_embeds
            keep = torch.tensor([random.random() >= 0.05 for _ in range(len(embeds))], device=dev)
            embeds = embeds * keep[:, None]
            text = text_encoder(batch["input_ids"])[0]
        pred = unet(noisy, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loop_result(stamps, args.device)


def bench_train(args: argparse.Namespace) -> str:
    from adapter_studio.adapters.ip_adapter.training import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        preset, res = preset_file(args.size, Path(tmp))
        write_demo_data(Path(tmp) / "data", max(16, 2 * args.train_batch), size=res)
        kinds = ("reference", "studio") * (2 if args.rounds > 1 else 1)
        results = fastest(run_training_workers(__file__, kinds, args, tmp, preset, res))
    ref = results["reference"]
    rows = training_rows((("reference-style loop (fp32, no cache)", ref),
                          ("train/ip_adapter.py (cache" + (", fp16 frozen + autocast)" if args.device.startswith("cuda")
                                                          else ")"), results["studio"])), ref)
    return print_table(f"IP-Adapter training, size {args.size} ({res} px), batch {args.train_batch}, "
                       f"{args.steps} steps on {machine(args.device)}", training_header(args.device), rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="mid", choices=["tiny", "mid", "sd15"])
    ap.add_argument("--part", default="all", choices=["all", "unet", "train"])
    ap.add_argument("--projection", default="base", choices=["base", "plus"])
    ap.add_argument("--batch", type=int, default=2, help="UNet batch for the step timing (2 = one CFG step)")
    ap.add_argument("--iters", type=int, default=5, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--train_batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    add_worker_args(ap)
    args = ap.parse_args(argv)
    if args._worker:
        if args.device.startswith("cuda"):
            _build_on_device(args.device)
        run_worker(args, worker_studio if args._worker == "studio" else worker_reference)
        return
    if args.part in ("all", "unet"):
        bench_unet(args)
    if args.part in ("all", "train"):
        bench_train(args)


if __name__ == "__main__":
    main()
