"""The README's Python API block runs as written (paths swapped for files this test saves)."""

import re
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import IPAdapter, save_original
    from adapter_studio.presets import load_pipeline

    pipe = load_pipeline("tiny-sd15")
    ip = IPAdapter.from_unet(pipe.unet, image_embed_dim=pipe.image_encoder.config.projection_dim)
    (tmp_path / "models" / "ip").mkdir(parents=True)
    save_original(ip, tmp_path / "models" / "ip" / "ip-adapter_sd15.bin")
    AGDAdapter.from_unet(pipe.unet).save_pretrained(tmp_path / "runs" / "agd_tiny" / "final")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "ref.png")

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace("num_inference_steps=25", "num_inference_steps=2, height=64, width=64")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    image = scope["image"]
    assert image.size == (64, 64)
    assert set(scope["pipe"].stack.slots) == {"style", "agd"}
    assert scope["pipe"].guidance_mode() == "agd"
