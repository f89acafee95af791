"""The I2V-Adapter in the studio served for real on `tiny-video`: `/generate` with an i2v unit through gradio_client
(frame 0 is the input image up to the VAE, the mix and its files record the unit, the exported Python reproduces
the clip), and a headless Chromium uploading a first image into an I2V unit and playing the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from app_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
SIDE, FRAMES = 64, 16  # /generate takes no frame count: the mix schema's default (16) applies
WEIGHTS = "i2v/tiny-i2v"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from adapter_studio.adapters.i2v_adapter import I2VAdapter
    from adapter_studio.presets import load_pipeline
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, build_app, theme

    root = tmp_path_factory.mktemp("i2v-studio")
    pipe = load_pipeline("tiny-video")
    adapter = I2VAdapter.from_unet(pipe.unet, base_model="tiny-video")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh adapter adds nothing: random weights stand in for a trained one
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    adapter.save_pretrained(root / "models" / WEIGHTS)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    first = root / "first.png"
    Image.fromarray((np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1) * 255).astype(np.uint8)).save(first)
    engine = Engine(model="tiny-video", models_dir=root / "models", outputs_dir=root / "outputs")
    demo = build_app(engine, TrainingRunner(runs_dir=root / "runs"), mixes_dir=root / "mixes")
    demo.queue(max_size=16, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS,
                allowed_paths=[str(engine.outputs_dir)])
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", engine=engine, root=root, first=first, vae=pipe.vae)
    demo.close()


@pytest.fixture(scope="module")
def generated(studio, tmp_path_factory):
    """One `/generate` call with an I2V unit: the still (frame 0), the recorded mix and the clip's files."""
    from gradio_client import Client, handle_file

    client = Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    unit = {"family": "i2v", "weights": WEIGHTS, "inputs": {"image": "first.png", "fsp_sharp_ratio": 0.5,
                                                            "fsp_blur_sigma": 18.0}}
    gallery, mix_json = client.predict("a ball rolling", "", 31, 3, SIDE, SIDE, "DDIM", "auto", 7.5, 1,
                                       json.dumps([unit]), [handle_file(str(studio.first))], api_name="/generate")
    clip = {p.suffix[1:]: p for p in studio.engine.outputs_dir.glob("20*/*-31-*")
            if p.suffix in (".gif", ".mp4", ".webm")}
    return SimpleNamespace(client=client, stills=[Path(g["image"]) for g in gallery], mix=json.loads(mix_json),
                           mix_json=mix_json, clip=clip, day=clip["mp4"].parent)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _gif_frames(path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, index=None, plugin="pillow", mode="RGB").astype(np.int16)


def test_generate_with_an_i2v_unit_starts_the_clip_at_the_first_image(studio, generated):
    from adapter_studio.adapters.i2v_adapter import encode_first_frame
    from adapter_studio.mix import file_sha256
    from adapter_studio.webapp.metadata import read_mix

    # frame 0 is the input image up to the tiny VAE's round trip (random weights: far from the raw input)
    with torch.no_grad():
        latent = encode_first_frame(studio.vae, Image.open(studio.first), SIDE, SIDE)
        decoded = studio.vae.decode(latent / studio.vae.config.scaling_factor).sample[0]
    round_trip = (decoded / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255
    (still,) = generated.stills
    assert still.suffix == ".png" and Image.open(still).size == (SIDE, SIDE)
    err = np.abs(_pixels(still) - round_trip)
    assert err.max() <= 1.0, err.max()
    assert np.abs(_pixels(studio.first) - round_trip).mean() > 10 * err.mean() + 1, "compared to the round trip"

    mix = generated.mix
    assert (mix["model"], mix["sampling"]["num_frames"], mix["sampling"]["fps"]) == ("tiny-video", FRAMES, 8)
    (unit,) = mix["units"]
    assert unit["family"] == "i2v" and unit["weights"] == {"weights": WEIGHTS}
    assert unit["sha256"] == {"weights": file_sha256(studio.root / "models" / WEIGHTS)}
    assert (unit["inputs"]["fsp_sharp_ratio"], unit["inputs"]["fsp_blur_sigma"]) == (0.5, 18.0)
    assert Path(unit["inputs"]["image"]).is_file(), "the first image is kept in the input store"

    # the clip: GIF / MP4 / WebM of all frames, frame 0 the still; the mix sits beside them in the still's sidecar
    assert set(generated.clip) == {"gif", "mp4", "webm"}
    gif = _gif_frames(generated.clip["gif"])
    assert gif.shape == (FRAMES, SIDE, SIDE, 3)
    assert np.abs(gif[0] - _pixels(still)).mean() < 12, "GIF palette quantisation only (256 colours)"
    assert np.abs(gif[1:] - gif[:1]).mean() > 1, "the other frames are generated"
    sidecar = generated.day / still.with_suffix(".json").name  # gradio_client hands back a copy of the still
    assert sidecar.is_file() and sidecar.parent == generated.clip["mp4"].parent
    assert read_mix(sidecar).units[0].family == "i2v" and read_mix(sidecar).to_dict() == read_mix(still).to_dict()


def test_each_video_file_has_its_mix_in_a_sidecar_of_its_own_name(generated):
    assert generated.clip["mp4"].with_suffix(".json").is_file()


def test_the_exported_python_reproduces_the_clip(studio, generated, tmp_path):
    from adapter_studio.webapp.outputs import write_video

    script = generated.client.predict(generated.mix_json, api_name="/export_python")
    # the script as exported, then every frame of the clip kept for the comparison
    keep = "\nimport numpy as np\nnp.save('frames.npy', np.stack([np.asarray(f) for f in result.frames[0]]))\n"
    (tmp_path / "reproduce.py").write_text(script + keep)
    proc = subprocess.run([sys.executable, "reproduce.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(_pixels(tmp_path / "mix-31.png"), _pixels(generated.stills[0]))
    frames = np.load(tmp_path / "frames.npy")
    assert frames.shape == (FRAMES, SIDE, SIDE, 3)
    # the app wrote its clip with write_video: the same frames give the same GIF
    again = write_video([Image.fromarray(f) for f in frames], tmp_path / "again", fps=8)
    assert np.array_equal(_gif_frames(again["gif"]), _gif_frames(generated.clip["gif"]))


def test_browser_first_image_into_an_i2v_unit_then_a_playable_video(studio, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # the settings (size, steps, frames, unit 0 = I2V-Adapter with its weights) come from a mix file; the first
    # image is uploaded into the unit's own field
    settings = {"version": 2, "model": "tiny-video",
                "sampling": {"prompt": "a ball rolling", "seed": 5, "steps": 2, "width": SIDE, "height": SIDE,
                             "num_frames": 6, "fps": 6},
                "units": [{"family": "i2v", "weights": WEIGHTS}]}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(studio.url)
            page.locator("#settings-file input[type=file]").set_input_files(str(tmp_path / "settings.json"))
            expect(page.locator("#prompt textarea")).to_have_value("a ball rolling", timeout=30_000)
            expect(page.locator("#unit-0-family input")).to_have_value("I2V-Adapter")
            expect(page.locator("#unit-0-weights input")).to_have_value(WEIGHTS)
            field = page.locator(".block", has_text="First frame").locator("input[type=file]").first
            field.set_input_files(str(studio.first))
            expect(page.locator(".block", has_text="First frame").locator("img").first).to_be_visible(timeout=30_000)
            page.click("#generate-btn")
            expect(page.locator("#run-info")).to_contain_text("Done", timeout=120_000)
            expect(page.locator("#run-info")).to_contain_text("1 unit(s)")
            video = page.locator("#result-video video")
            expect(video).to_be_attached(timeout=30_000)
            page.wait_for_function("() => { const v = document.querySelector('#result-video video');"
                                   " return v && (v.readyState > 0 || v.duration > 0); }", timeout=30_000)
            state = page.evaluate("() => { const v = document.querySelector('#result-video video');"
                                  " return {ready: v.readyState, duration: v.duration, src: v.currentSrc}; }")
            assert state["ready"] > 0 and state["duration"] > 0 and state["src"].endswith(".mp4"), state
            page.get_by_role("tab", name="Files").click()
            links = page.locator("a[download]").evaluate_all("(as) => as.map(a => a.getAttribute('download'))")
            assert any(t.endswith(".gif") for t in links) and any(t.endswith(".mp4") for t in links), links
            page.screenshot(path=str(tmp_path / "i2v-studio.png"), full_page=True)
        finally:
            browser.close()
    from adapter_studio.webapp.metadata import read_mix

    (sidecar,) = studio.engine.outputs_dir.glob("20*/*-5-*.json")
    (unit,) = read_mix(sidecar).units
    assert unit.family == "i2v" and np.array_equal(_pixels(unit.inputs["image"]), _pixels(studio.first)), \
        "the uploaded image is the unit's first frame"
