"""Shared pieces of the benchmarks: model configs by size, a timer, a table printer, and the training parts'
worker processes (launching them, their hidden arguments, their timing and the table of their results).

Sizes: `tiny` (the tiny-sd15 preset), `mid` (an SD1.5-shaped UNet at about a tenth of its width, for CPU runs) and
`sd15` (the real SD1.5 UNet config with random weights: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
MID_UNET = dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, sample_size=32)

# the other models of a preset per size (`tiny` is the tiny-sd15 preset's own): mid = small ones at MID_UNET's widths;
# sd15 = SD1.5's text encoder and VAE, ViT-H/14 (what IP-Adapter SD1.5 uses)
IMAGE_ENCODERS = {
    "mid": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                patch_size=14, projection_dim=256),
    "sd15": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=1024),
}
TEXT_ENCODERS = {
    "mid": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=256),
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768),
}
VAES = {
    "mid": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 128, 128],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=1, norm_num_groups=32, sample_size=256),
    "sd15": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=512),
}


def unet_config(size: str) -> dict[str, Any]:
    if size == "sd15":
        return dict(SD15_UNET)
    if size == "mid":
        return dict(MID_UNET)
    if size == "tiny":
        from adapter_studio.presets import load_preset

        return dict(load_preset("tiny-sd15").config["unet"])
    raise SystemExit(f"--size must be tiny, mid or sd15, got {size!r}")


def build_unet(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: an SD1.5 UNet takes many seconds to fill on a CPU
        unet = UNet2DConditionModel(**unet_config(size))
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def build_controlnet(unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A ControlNet made from `unet` with random weights in its zero-initialised convolutions (else it adds zeros)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in cn.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return cn.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, warmup: int = 3, iters: int = 10, back_to_back: bool = False) -> float:
    """Median seconds of `fn()` over `iters` runs after `warmup` runs.

    `back_to_back`: the runs are queued one after another with one wait for the device at the end, as a sampling
    loop runs its steps (the CPU's work for one call overlaps the GPU's for the last); the median of 3 such rounds.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if back_to_back:
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times.append((time.perf_counter() - t) / iters)
        return statistics.median(times)
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """Print (and return) a Markdown table."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def preset_file(size: str, folder: Path, image_encoder: bool = True) -> tuple[str, int]:
    """A model preset for `size` (random weights, built from the configs above) and its image resolution.

    Returns `(preset, resolution)`: for `tiny` the preset name `"tiny-sd15"` and 64; else the path of a YAML preset
    written to `folder` (with an image encoder only if `image_encoder`) and the UNet's sample size x 8.
    """
    import yaml

    from adapter_studio.presets import load_preset

    if size == "tiny":
        return "tiny-sd15", 64
    base = load_preset("tiny-sd15").config
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config(size).items()}
    cfg = {k: v for k, v in base.items() if k not in ("unet", "vae", "text_encoder", "image_encoder")}
    cfg.update(name=f"bench-{size}", unet=unet, vae=VAES[size], text_encoder=TEXT_ENCODERS[size],
               resolution=unet["sample_size"] * 8)
    if image_encoder:
        cfg.update(image_encoder=IMAGE_ENCODERS[size])
    path = folder / f"bench-{size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), unet["sample_size"] * 8


# ------------------------------------------------------------------------------------------------ training workers
# A bench's training part runs each loop ("kind") in a process of its own: the bench script again, with the hidden
# arguments of `add_worker_args`; the worker prints its result as a last line `RESULT {json}`.

def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """Add the hidden arguments the training part passes to its worker processes (`--_worker KIND`, `--workdir`,
    `--preset`, `--resolution`) to `ap`; not shown in `--help`. Returns None."""
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--resolution", type=int, default=0, help=argparse.SUPPRESS)


def run_worker(args: argparse.Namespace, worker: Callable[[argparse.Namespace], dict[str, Any]]) -> dict[str, Any]:
    """In a worker process: seed torch with 0, run `worker(args)` and print its result as the `RESULT {json}` line
    that `run_training_workers` reads. Returns that result."""
    torch.manual_seed(0)
    result = worker(args)
    print("RESULT " + json.dumps(result), flush=True)
    return result


def run_training_workers(script: str, kinds: Iterable[str], args: argparse.Namespace, workdir: str, preset: str,
                         resolution: int, extra: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Run `script --_worker KIND` in a fresh process for each entry of `kinds`, in order (a kind may come more than
    once: one run each time), with `args`' device, size, train_batch and steps, the hidden worker arguments and
    `extra`; `workdir`'s `studio-run` folder is removed after each run. Exits with the worker's output when one fails.

    Returns each kind's results (the dicts its `RESULT` lines carry), in the order they ran.
    """
    results: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        cmd = [sys.executable, script, "--_worker", kind, "--device", args.device, "--size", args.size,
               "--workdir", workdir, "--preset", preset, "--resolution", str(resolution), "--train_batch",
               str(args.train_batch), "--steps", str(args.steps), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode:
            raise SystemExit(f"{kind} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results.setdefault(kind, []).append(json.loads(line[len("RESULT "):]))
        shutil.rmtree(Path(workdir) / "studio-run", ignore_errors=True)
    return results


def fastest(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Returns, for each kind of `run_training_workers`' results, its run with the most `steps_per_s` (the first of
    equals)."""
    return {kind: max(runs, key=lambda r: r["steps_per_s"]) for kind, runs in results.items()}


def peak_memory(device: str) -> float:
    """Returns this process's peak memory in MiB: `max_memory_allocated` on CUDA, else peak RSS (Linux)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_steps(batches: Callable[[], Iterable[T]], steps: int, device: str, stamps: list[float]) -> Iterator[T]:
    """Yield `steps` batches, taking a fresh pass over `batches()` whenever one runs out. When the caller asks for the
    next batch (its step is done), wait for the device and append the time to `stamps`: one stamp per step.

    Returns an iterator over the batches; `loop_result(stamps, device)` reads the stamps afterwards.
    """
    step = 0
    while step < steps:
        for batch in batches():
            yield batch
            sync(device)
            stamps.append(time.time())
            step += 1
            if step >= steps:
                break


def loop_result(stamps: list[float], device: str) -> dict[str, float]:
    """A worker's result from its step end times: returns `{"steps_per_s", "peak_mib"}`, the rate skipping the first
    (warm-up) step as the training loop's `steps_per_second` does, and `peak_memory(device)`. Needs 3 stamps or more.
    """
    rate = (len(stamps) - 2) / (stamps[-1] - stamps[1])
    return {"steps_per_s": rate, "peak_mib": peak_memory(device)}


def training_header(device: str) -> list[str]:
    """Returns the header of a training table: loop, steps / s, ratio, peak memory ("peak CUDA MiB" on CUDA, else
    "peak RSS MiB"), ratio."""
    mem = "peak CUDA MiB" if device.startswith("cuda") else "peak RSS MiB"
    return ["loop", "steps / s", "ratio", mem, "ratio"]


def training_rows(runs: Iterable[tuple[str, dict[str, Any]]], ref: dict[str, Any]) -> list[list[Any]]:
    """Returns one table row per `(label, result)` of `runs`: label, steps/s and its ratio to `ref`'s, peak MiB and its
    ratio to `ref`'s (`ref` is the reference loop's result, usually one of `runs`)."""
    return [[name, r["steps_per_s"], r["steps_per_s"] / ref["steps_per_s"], r["peak_mib"],
             r["peak_mib"] / ref["peak_mib"]] for name, r in runs]
