"""Real ComfyUI for the tests: a temporary ComfyUI tree around the cached venv, the pack, tiny models, a server.

`ComfyUI(tmp)` lays out `tmp/base` (ComfyUI's --base-directory: custom_nodes with the pack linked in, models, input,
output, user), `tmp/site` (PYTHONPATH: this checkout's `adapter_studio`, see comfyui_env.overlay) and starts
`main.py --cpu` on a free loopback port from the cached, untouched ComfyUI source. Nothing is written to the cache.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_env  # noqa: E402

REPO = comfyui_env.REPO
PACK = REPO / "comfyui_adapter_studio"


def make_models(models: Path, weights: Path | None = None) -> dict[str, Path]:
    """tiny-sd15 as ComfyUI files in `models` (checkpoint, CLIP vision) and tiny adapters (random, seeded, non-zero
    so their effect shows): in `models/<family>/` for the parity script, and in `weights` (when given) as a user's
    files that an export copies into ComfyUI."""
    sys.path.insert(0, str(REPO))
    from comfyui_adapter_studio.tiny_models import write_checkpoint

    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import save_original
    from adapter_studio.adapters.i2v_adapter import I2VAdapter
    from adapter_studio.adapters.ip_adapter.adapter import IPAdapter
    from adapter_studio.presets import build_tiny_controlnet, load_pipeline

    out = write_checkpoint("tiny-sd15", models)
    pipe = load_pipeline("tiny-sd15")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        ip = IPAdapter.from_unet(pipe.unet, image_embed_dim=pipe.image_encoder.config.projection_dim)
        for p in ip.image_proj.parameters():
            p.data.normal_(0.0, 0.3)
        agd = AGDAdapter.from_unet(pipe.unet, hidden_dim=32, base_model="tiny-sd15")
        for p in agd.parameters():
            p.data.normal_(0.0, 0.2)
        video_unet = load_pipeline("tiny-video").unet
        i2v = I2VAdapter.from_unet(video_unet)
        for p in i2v.parameters():
            p.data.normal_(0.0, 0.2)
        cn = build_tiny_controlnet()
        for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:  # zero convs: make them act
            for p in block.parameters():
                p.data.normal_(0.0, 0.2)
    (models / "ip").mkdir(parents=True, exist_ok=True)
    save_original(ip, models / "ip" / "tiny-ip.safetensors")
    agd.save_pretrained(models / "agd" / "tiny-agd")
    cn.save_pretrained(models / "controlnet" / "tiny-cn")
    i2v.save_pretrained(models / "i2v" / "tiny-i2v")
    out["i2v"] = models / "i2v" / "tiny-i2v"
    out["ip"], out["agd"] = models / "ip" / "tiny-ip.safetensors", models / "agd" / "tiny-agd"
    out["controlnet"] = models / "controlnet" / "tiny-cn"
    if weights is not None:
        weights.mkdir(parents=True, exist_ok=True)
        out["ip"] = save_original(ip, weights / "tiny-ip.safetensors")
        agd.save_pretrained(weights / "tiny-agd")
        out["agd"] = weights / "tiny-agd"
        cn.save_pretrained(weights / "tiny-cn")
        out["controlnet"] = weights / "tiny-cn"
        i2v.save_pretrained(weights / "tiny-i2v")
        out["i2v"] = weights / "tiny-i2v"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_env(site: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               ADAPTER_STUDIO_CACHE=str(cache), PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
    return env


class ComfyUI:
    """A ComfyUI server on a free port with the pack installed (`with ComfyUI(tmp) as c: c.get("/object_info")`)."""

    def __init__(self, tmp: Path, env_dir: Path):
        self.tmp, self.env_dir = tmp, env_dir
        self.base = tmp / "base"
        self.site = comfyui_env.overlay(tmp / "site")
        for d in ("custom_nodes", "models", "input", "output", "user", "temp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes" / PACK.name).symlink_to(PACK)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.env = comfy_env(self.site, tmp / "studio-cache")

    def start(self) -> "ComfyUI":
        cmd = [str(comfyui_env.python(self.env_dir)), str(self.env_dir / "ComfyUI" / "main.py"), "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(self.base),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--preview-method", "none"]
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=self.env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 240.0) -> None:
        t = time.time()
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ComfyUI":
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- HTTP
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def run(self, prompt: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
        """POST /prompt and wait for its /history entry (status success or error)."""
        r = self.post("/prompt", {"prompt": prompt, "client_id": "adapter-studio-tests"})
        if "prompt_id" not in r:
            raise AssertionError(f"/prompt refused the workflow: {json.dumps(r)[:3000]}")
        pid = r["prompt_id"]
        t = time.time()
        while time.time() - t < timeout:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                if h[pid]["status"].get("status_str") in ("success", "error"):
                    return h[pid]
            time.sleep(0.3)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def view(self, item: dict[str, Any]) -> bytes:
        q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": item.get("type", "output")})
        return self.get(f"/view?{q}")
