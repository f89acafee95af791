"""Helpers for the studio app tests: adapter weights made fresh for the tiny models, test images, a served app."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _randomize(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def make_models_dir(root: Path) -> dict[str, str]:
    """Write a random IP-Adapter (original single-file format) and AGD adapter (diffusers folder) for tiny-sd15,
    plus an IP-Adapter made for tiny-sdxl (a file for another base model). Returns their names in the folder."""
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import IPAdapter, save_original
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    (root / "ip").mkdir(parents=True, exist_ok=True)
    (root / "agd").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ip = IPAdapter.from_unet(pipe.unet, pipe.image_encoder.config.projection_dim, projection="base",
                            init_from_unet=False)
    save_original(_randomize(ip, 1, 0.2), root / "ip" / "tiny-ip.safetensors")
    agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=16)
    _randomize(agd, 2, 0.2).save_pretrained(root / "agd" / "tiny-agd")
    xl = load_pipeline("tiny-sdxl")
    ip_xl = IPAdapter.from_unet(xl.unet, xl.image_encoder.config.projection_dim if xl.image_encoder is not None else 24,
                               projection="base", init_from_unet=False)
    other = root.parent / "other-base"
    other.mkdir(exist_ok=True)
    save_original(ip_xl, other / "ip-for-sdxl.safetensors")
    return {"ip": "ip/tiny-ip.safetensors", "agd": "agd/tiny-agd", "ip_sdxl_file": str(other / "ip-for-sdxl.safetensors")}


def make_image(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc, log) -> None:
    """Stop a served app's process (SIGTERM, then SIGKILL after 20 s) and close its log file."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()
