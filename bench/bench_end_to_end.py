"""End to end: one whole image (prompt encoding, reference image encoding, `--steps` steps, VAE decode, PIL out)
with IP-Adapter + AGD (one UNet pass per step) through `StudioPipeline`, eager vs compiled, against CFG.

    python bench/bench_end_to_end.py --device cuda --size sd15 --json e2e.json   # SD1.5 shapes, fp16, 512 px
    python bench/bench_end_to_end.py --device cpu --size tiny --steps 4 --iters 2  # tiny-sd15, 64 px, minutes

Sizes: `sd15` builds a StableDiffusionPipeline from configs with random weights directly on the device (nothing is
downloaded): the SD1.5 UNet (bench.common.SD15_UNET), SD1.5's AutoencoderKL, a ViT-L/14-sized CLIP text encoder
(with the code-written tiny CLIP tokenizer), a ViT-H/14-sized CLIP image encoder, DDIM, no safety checker; an
IP-Adapter "base" (4 tokens) and an AGD adapter (hidden 320), both with random weights. `tiny`: the tiny-sd15 preset.

Rows, all from this one run, each after a warm-up call, median of `--iters` calls, batch 1, one PIL image out:
CFG eager through plain diffusers (no stack attached: the baseline, UNet batch 2 per step); CFG eager through
StudioPipeline (adapters off: the stack's own cost); IP+AGD eager (UNet batch 1 per step); IP+AGD compiled
(`StudioPipeline.compile`, the same as `compile=True`: inductor, and CUDA graphs on CUDA) with its first call
(compile) timed apart and its image compared with the eager one (max abs pixel difference, 0-255); CFG compiled
(unless `--skip-compiled-cfg`); with `--compile-vae`, IP+AGD compiled with the VAE decoder compiled too (diffusers'
`vae.decode = torch.compile(vae.decode)`, same backend and mode). `--budget-s` skips the parts that are left once
exceeded.

StudioPipeline keeps the scheduler's timesteps on the host (the default DDIM's step then reads nothing back from the
GPU); the plain diffusers row keeps them on the GPU, as diffusers does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import SD15_UNET, machine, print_table, sync  # noqa: E402

TARGET_S = 0.25  # the issue's target: an IP + AGD image in <= 0.25 s end to end (SD1.5, 512 px, 25 steps, GPU)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_IMAGE = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
AGD_HIDDEN = {"tiny": 32, "sd15": 320}

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def build_pipeline(size: str, device: str, dtype: torch.dtype):
    """The StableDiffusionPipeline of `size` on `device` in `dtype` (random weights, image encoder included)."""
    if size == "tiny":
        from adapter_studio.presets import load_pipeline

        return load_pipeline("tiny-sd15").to(device=device, dtype=dtype)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from adapter_studio.tokenizer import tiny_clip_tokenizer

    # the tokenizer's files go to a fresh folder: the GPU machine may have no writable cache in $HOME
    tok = tiny_clip_tokenizer(folder=Path(tempfile.mkdtemp(prefix="e2e-tok-")))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run: no minutes of CPU init for ~1.4 B parameters
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SD15_IMAGE))
    for m in (unet, vae, text_encoder, image_encoder):
        m.to(dtype=dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=CLIPImageProcessor(), image_encoder=image_encoder,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_adapters(pipe, size: str, std: float):
    """IP-Adapter base (4 tokens) and AGD for `pipe.unet`, random weights (AGD's zero-initialised out_proj too)."""
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import IPAdapter

    torch.manual_seed(1)
    ip = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim, projection="base",
                             init_from_unet=False)
    agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=AGD_HIDDEN[size])
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0.0, std)
        for b in agd.blocks:
            b.out_proj.weight.normal_(0.0, std)
    return ip, agd


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class Bench:
    def __init__(self, args):
        self.args = args
        self.results: dict[str, Any] = {"parts": {}, "notes": [], "errors": {}}

    def over_budget(self, what: str, need_s: float = 0.0) -> bool:
        used = time.perf_counter() - T0
        if used + need_s > self.args.budget_s:
            note = (f"skipped {what}: {used:.0f} s used" + (f" + ~{need_s:.0f} s needed" if need_s else "")
                    + f" > --budget-s {self.args.budget_s:g}")
            log(note)
            self.results["notes"].append(note)
            return True
        return False

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.results, indent=2, default=str))

    def measure(self, key: str, label: str, call: Callable[[], Any], compiled: bool = False,
                ref: Any = None) -> Any:
        """Time `call` (one image per call): warm-up (for compiled: the first call, timed apart, then one more
        warm-up), then the median of `--iters` calls. Returns the warm-up call's image."""
        dev, iters = self.args.device, self.args.iters
        entry: dict[str, Any] = {"label": label}
        log(f"{label}: warm-up{' (compile)' if compiled else ''} ...")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)  # numpy's NaN cast warning, every time
            sync(dev)
            t = time.perf_counter()
            image = call().images[0]
            sync(dev)
            first = time.perf_counter() - t
        for w in caught:  # shown as usual (they were only recorded to spot non-finite pixels)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        bad = [str(w.message) for w in caught if "invalid value" in str(w.message)]
        if bad:
            entry["non_finite"] = bad[0]
            self.results["notes"].append(f"{label}: non-finite pixels in the image ({bad[0]})")
        px = pixels(image)
        entry.update(first_call_s=first, pixel_mean=float(px.mean()), pixel_std=float(px.std()))
        if compiled:
            entry["compile_first_call_s"] = first
            call()  # CUDA graph trees record on early calls: one more before timing
            sync(dev)
        if ref is not None:
            d = np.abs(px - pixels(ref))
            entry.update(max_abs_pixel_diff=int(d.max()), mean_abs_pixel_diff=float(d.mean()))
        times = []
        for i in range(iters):
            if i > 0 and self.over_budget(f"the remaining timed calls of {label} ({i} of {iters} done)"):
                break
            sync(dev)
            t = time.perf_counter()
            call()
            sync(dev)
            times.append(time.perf_counter() - t)
        entry.update(s_per_image=statistics.median(times), times_s=times)
        self.results["parts"][key] = entry
        log(f"{label}: {entry['s_per_image']:.4f} s/image (median of {len(times)}), first call {first:.3f} s"
            + (f", max abs pixel diff vs eager {entry['max_abs_pixel_diff']}" if ref is not None else ""))
        self.save()
        return image

    def part(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run one part; an error is recorded and printed, and the run goes on with the next part."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others' numbers
            traceback.print_exc()
            sys.stderr.flush()
            self.results["errors"][key] = f"{type(e).__name__}: {e}"
            log(f"{key} FAILED: {type(e).__name__}: {e}")
            self.save()
            return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp16", "fp32"], help="auto: fp16 on CUDA, else fp32")
    ap.add_argument("--height", type=int, default=None, help="image side in pixels (default: 512 sd15, 64 tiny)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per row (median)")
    ap.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale, and AGD's w")
    ap.add_argument("--std", type=float, default=0.02, help="std of the random IP weights and AGD out_proj")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--mode", default="auto", help="torch.compile mode; auto = reduce-overhead (CUDA graphs) on CUDA")
    ap.add_argument("--skip-compiled", action="store_true", help="eager rows only (e.g. a CPU check of sd15)")
    ap.add_argument("--skip-compiled-cfg", action="store_true")
    ap.add_argument("--compile-vae", action="store_true", help="also IP+AGD with the VAE decoder compiled")
    ap.add_argument("--tol", type=float, default=None,
                    help="max abs pixel difference (0-255) compiled vs eager counted as equal (default 8 fp16, 2 fp32)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining parts once this is exceeded")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the parts of an IP+AGD image (encoders, sampling loop, VAE decode)")
    ap.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(args.dtype,
                                                               torch.float16 if args.device == "cuda" else torch.float32)
    side = args.height or (512 if args.size == "sd15" else 64)
    tol = args.tol if args.tol is not None else (8.0 if dtype == torch.float16 else 2.0)
    import diffusers
    import transformers

    where = machine(args.device)
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    b = Bench(args)
    b.results.update(machine=where, versions=versions, size=args.size, dtype=str(dtype), height=side, width=side, steps=args.steps,
                     iters=args.iters, guidance_scale=args.guidance_scale, backend=args.backend, mode=args.mode,
                     tolerance_pixels=tol, target_s=TARGET_S)
    log(f"end-to-end benchmark: {where}, size {args.size}, {dtype}, {side}x{side} px, {args.steps} steps, "
        f"{args.iters} timed calls per row, budget {args.budget_s:g} s ({versions})")

    from PIL import Image

    from adapter_studio.pipelines.studio_pipeline import StudioPipeline

    t = time.perf_counter()
    pipe = build_pipeline(args.size, args.device, dtype)
    sync(args.device)
    b.results["build_s"] = time.perf_counter() - t
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters())
              for n in ("unet", "vae", "text_encoder", "image_encoder")}
    b.results["params"] = counts
    log(f"pipeline built in {b.results['build_s']:.1f} s: " + ", ".join(f"{n} {c / 1e6:.1f} M" for n, c in counts.items()))
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    prompt = "a photo of a cat on a red sofa, high quality"
    common = dict(num_inference_steps=args.steps, height=side, width=side, output_type="pil")

    def gen():
        return torch.Generator(args.device).manual_seed(0)

    images: dict[str, Any] = {}
    # 1. the baseline: plain diffusers, no stack attached yet
    images["cfg_plain"] = b.part("cfg_plain", lambda: b.measure(
        "cfg_plain", "CFG eager, plain diffusers", lambda: pipe(prompt, guidance_scale=args.guidance_scale,
                                                               generator=gen(), **common)))
    sp = StudioPipeline(pipe)
    ip, agd = make_adapters(pipe, args.size, args.std)
    ip_slot = sp.add(ip, name="ip", image=reference)
    agd_slot = sp.add(agd, name="agd")
    b.results["adapter_params"] = {"ip": sum(p.numel() for p in ip.parameters()),
                                   "agd": sum(p.numel() for p in agd.parameters())}

    def call(mode: str, **overrides: Any):
        ip_slot.enabled = agd_slot.enabled = mode == "ip+agd"
        return sp(prompt, guidance="agd" if mode == "ip+agd" else "cfg", guidance_scale=args.guidance_scale,
                  generator=gen(), **{**common, **overrides})

    # 2. CFG through the wrapper with every adapter off, 3. IP + AGD eager
    if not b.over_budget("CFG eager through StudioPipeline"):
        images["cfg_eager"] = b.part("cfg_eager", lambda: b.measure(
            "cfg_eager", "CFG eager, StudioPipeline (adapters off)", lambda: call("cfg"), ref=images.get("cfg_plain")))
    if not b.over_budget("IP+AGD eager"):
        images["ipagd_eager"] = b.part("ipagd_eager", lambda: b.measure(
            "ipagd_eager", "IP+AGD eager", lambda: call("ip+agd")))
    # 4. compiled
    if args.skip_compiled:
        b.results["notes"].append("compiled rows skipped (--skip-compiled)")
    elif not b.over_budget("IP+AGD compiled"):
        opts = dict(backend=args.backend, mode=args.mode)
        sp.compile(**opts)  # what StudioPipeline(pipe, compile=opts) does
        log(f"compiled the stack ({opts}; mode auto = {'reduce-overhead' if args.device == 'cuda' else 'default'})")
        b.part("ipagd_compiled", lambda: b.measure(
            "ipagd_compiled", "IP+AGD compiled", lambda: call("ip+agd"), compiled=True, ref=images.get("ipagd_eager")))
        if args.skip_compiled_cfg:
            b.results["notes"].append("compiled CFG skipped (--skip-compiled-cfg)")
        else:
            first = b.results["parts"].get("ipagd_compiled", {}).get("compile_first_call_s", 0.0)
            if not b.over_budget("CFG compiled", need_s=first):
                b.part("cfg_compiled", lambda: b.measure(
                    "cfg_compiled", "CFG compiled, StudioPipeline (adapters off)", lambda: call("cfg"), compiled=True,
                    ref=images.get("cfg_eager")))
        if args.compile_vae:
            first = b.results["parts"].get("ipagd_compiled", {}).get("compile_first_call_s", 0.0)
            if not b.over_budget("IP+AGD compiled with the VAE decoder compiled", need_s=first):
                mode = ("reduce-overhead" if args.device == "cuda" else None) if args.mode == "auto" else args.mode
                pipe.vae.decode = torch.compile(pipe.vae.decode, backend=args.backend, fullgraph=True,
                                                **({"mode": mode} if mode else {}))
                b.part("ipagd_compiled_vae", lambda: b.measure(
                    "ipagd_compiled_vae", "IP+AGD compiled, VAE decoder compiled", lambda: call("ip+agd"),
                    compiled=True, ref=images.get("ipagd_eager")))
    if args.breakdown and not b.over_budget("the breakdown"):
        b.part("breakdown", lambda: breakdown(b, sp, pipe, reference, prompt, call, common))
    report(b, args, where, dtype, side, tol)
    b.results["total_s"] = time.perf_counter() - T0
    b.save()
    log(f"done in {b.results['total_s']:.1f} s")


def breakdown(b: Bench, sp: Any, pipe: Any, reference: Any, prompt: str, call: Callable[[str], Any],
              common: dict[str, Any]) -> None:
    """Where one IP + AGD image's time goes (as the pipeline is now: compiled if it was compiled): the prompt's and
    the reference's encoders, the sampling call without the decode (latents out), the VAE decode; the rest of the
    sampling call per step is the UNet step plus what runs between steps (scheduler, callbacks, the pre-hook)."""
    dev, iters, steps = b.args.device, b.args.iters, b.args.steps

    @torch.no_grad()
    def median_s(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(iters):
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    device = pipe.unet.device
    pixels_in = pipe.feature_extractor(reference, return_tensors="pt").pixel_values.to(device, pipe.image_encoder.dtype)
    latents = call("ip+agd", output_type="latent").images
    parts = {
        "text encoder (prompt)": median_s(lambda: pipe.encode_prompt(prompt, device, 1, False)),
        "image encoder (reference)": median_s(lambda: pipe.image_encoder(pixels_in)),
        f"sampling call, latents out ({steps} steps, both encoders included)":
            median_s(lambda: call("ip+agd", output_type="latent")),
        "VAE decode + to PIL": median_s(lambda: pipe.image_processor.postprocess(
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample, output_type="pil")),
    }
    key = f"sampling call, latents out ({steps} steps, both encoders included)"
    per_step = (parts[key] - parts["text encoder (prompt)"] - parts["image encoder (reference)"]) / steps
    b.results["breakdown_s"] = dict(parts, per_step_in_the_loop=per_step)
    rows = [[k, v * 1e3] for k, v in parts.items()]
    rows.append(["per step inside the sampling call (UNet step + scheduler + between-step work)", per_step * 1e3])
    print_table(f"Where an IP+AGD image's time goes ({'compiled' if sp.stack.compiled else 'eager'})",
                ["part", "ms"], rows)
    b.save()


def report(b: Bench, args, where: str, dtype: torch.dtype, side: int, tol: float) -> None:
    parts, r = b.results["parts"], b.results
    s = {k: v["s_per_image"] for k, v in parts.items()}
    base = s.get("cfg_plain")
    passes = {"cfg_plain": "2 (batch 2)", "cfg_eager": "2 (batch 2)", "cfg_compiled": "2 (batch 2)",
              "ipagd_eager": "1 (batch 1)", "ipagd_compiled": "1 (batch 1)", "ipagd_compiled_vae": "1 (batch 1)"}
    rows = []
    for key in ("cfg_plain", "cfg_eager", "ipagd_eager", "ipagd_compiled", "ipagd_compiled_vae", "cfg_compiled"):
        if key == "ipagd_compiled_vae" and not args.compile_vae:
            continue
        if key not in parts:
            why = r["errors"].get(key, "skipped")
            rows.append([key, passes[key], "-", "-", "-", "-", "-", why])
            continue
        p = parts[key]
        diff = "-"
        if "max_abs_pixel_diff" in p:
            diff = f"{p['max_abs_pixel_diff']} (mean {p['mean_abs_pixel_diff']:.3g})"
        notes = []
        if "compiled" in key and "max_abs_pixel_diff" in p:
            notes.append(f"{'within' if p['max_abs_pixel_diff'] <= tol else 'OUTSIDE'} tolerance {tol:g}")
        if key == "cfg_eager" and "max_abs_pixel_diff" in p:
            notes.append("vs plain diffusers")
        if p["pixel_std"] == 0:
            notes.append("flat image")
        if "non_finite" in p:
            notes.append("NON-FINITE pixels")
        rows.append([p["label"], passes[key], p["s_per_image"], p["s_per_image"] / base if base else "-",
                     f"{p['compile_first_call_s']:.4g}" if "compile_first_call_s" in p else "-",
                     f"{p['pixel_mean']:.1f} / {p['pixel_std']:.1f}", diff, "; ".join(notes) or "-"])
    print_table(f"End to end, one {side}x{side} image, {args.steps} steps, batch 1, PIL out (VAE decode included), "
                f"size {args.size}, {dtype}, on {where}",
                ["mode", "UNet passes / step", "s / image", "vs CFG eager (plain)", "first call (compile) s",
                 "pixel mean / std", "max abs pixel diff vs eager", "notes"], rows)

    def ratio(a: str, c: str) -> float | None:
        return s[a] / s[c] if a in s and c in s else None

    ratios = {"IP+AGD compiled / CFG eager": ratio("ipagd_compiled", "cfg_plain"),
              "IP+AGD compiled / IP+AGD eager": ratio("ipagd_compiled", "ipagd_eager"),
              "IP+AGD compiled: VAE decoder compiled too / not": ratio("ipagd_compiled_vae", "ipagd_compiled"),
              "IP+AGD eager / CFG eager": ratio("ipagd_eager", "cfg_plain"),
              "CFG compiled / CFG eager": ratio("cfg_compiled", "cfg_plain"),
              "CFG eager: StudioPipeline (adapters off) / plain diffusers": ratio("cfg_eager", "cfg_plain")}
    r["ratios"] = ratios
    best_key = min((k for k in ("ipagd_compiled_vae", "ipagd_compiled", "ipagd_eager") if k in s), key=s.get,
                   default=None)
    rows = [[k, f"{v:.3f}" if v is not None else "not measured"] for k, v in ratios.items()]
    if best_key is None:
        verdict = "not measured"
    else:
        met = s[best_key] <= TARGET_S
        verdict = (f"{'MET' if met else 'NOT MET'}: {s[best_key]:.3f} s ({parts[best_key]['label']}"
                   f"{', the target is for sd15 at 512 px, 25 steps on a GPU' if (args.size, side, args.steps) != ('sd15', 512, 25) else ''})")
        r["target_met"] = met
        r["target_measured_on"] = best_key
    r["target"] = verdict
    rows.append([f"target: IP + AGD image in <= {TARGET_S} s end to end", verdict])
    print_table(f"Ratios and target ({where})", ["what", "value"], rows)
    for note in r["notes"]:
        print(f"note: {note}", flush=True)
    for key, err in r["errors"].items():
        print(f"error in {key}: {err}", flush=True)


if __name__ == "__main__":
    main()
