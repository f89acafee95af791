"""Shared pieces of the benchmarks: UNet configs by size, a timer, a table printer.

Sizes: `tiny` (the tiny-sd15 preset), `mid` (an SD1.5-shaped UNet at about a tenth of its width, for CPU runs) and
`sd15` (the real SD1.5 UNet config with random weights: nothing is downloaded).
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
MID_UNET = dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, sample_size=32)


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
