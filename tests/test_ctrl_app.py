"""A Ctrl unit in the studio, served for real: `/generate` through gradio_client (plain ControlNet and Ctrl-Adapter
from the models folder, the unit in the mix, the PNG metadata and the exported Python), and the Generate tab in a
headless Chromium (family, control image, live preprocessor preview, result).

One app is served in-process on 127.0.0.1 for the module, on the tiny model, with a models folder holding a tiny
ControlNet (`models/controlnet/`) and a Ctrl-Adapter from it to the tiny model (`models/ctrl/`), both random.
"""

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
from PIL import Image, ImageDraw

from app_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
W, H = 128, 96
CN = "controlnet/tiny-cn"
ADAPTER = "ctrl/tiny-ctrl"


def _shapes_image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    """A picture with clear edges (a square and a circle), so the canny preview and the control are not empty."""
    im = Image.new("RGB", size, (30, 30, 120))
    draw = ImageDraw.Draw(im)
    draw.rectangle((10, 10, 50, 60), fill=(230, 200, 40))
    draw.ellipse((70, 30, 115, 80), fill=(220, 40, 40))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from adapter_studio.adapters.ctrl_adapter import CtrlAdapterModel
    from adapter_studio.adapters.ctrl_adapter.training import demo_controlnet
    from adapter_studio.presets import load_pipeline
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, build_app, theme

    root = tmp_path_factory.mktemp("ctrl-studio")
    models = root / "models"
    cn = demo_controlnet(0)
    cn.save_pretrained(models / CN)
    torch.manual_seed(0)
    CtrlAdapterModel.for_models(cn, load_pipeline("tiny-sd15").unet, num_blocks=1, num_attention_heads=4,
                                attention_head_dim=8).save_pretrained(models / ADAPTER)
    engine = Engine(model="tiny-sd15", models_dir=models, outputs_dir=root / "outputs")
    demo = build_app(engine, TrainingRunner(runs_dir=root / "runs"), mixes_dir=root / "mixes")
    demo.queue(max_size=16, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS,
                allowed_paths=[str(engine.outputs_dir)])
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", engine=engine, root=root,
                          photo=_shapes_image(root / "photo.png"),
                          square=_shapes_image(root / "square.png", (engine.default_size,) * 2))
    demo.close()


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    from gradio_client import Client

    return Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _generate(client, units, images=(), seed=5):
    from gradio_client import handle_file

    gallery, mix_json = client.predict("a house by a lake", "", seed, 4, W, H, "DDIM", "auto", 7.5, 1,
                                       json.dumps(units), [handle_file(str(p)) for p in images], api_name="/generate")
    return Path(gallery[0]["image"]), json.loads(mix_json)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_with_a_ctrl_unit_records_and_reproduces_it(studio, client, tmp_path):
    from adapter_studio.mix import file_sha256
    from adapter_studio.webapp.metadata import read_mix

    fams = {f["family"]: f for f in json.loads(client.predict(api_name="/families"))}
    ctrl = fams["ctrl"]
    assert [w["folder"] for w in ctrl["weights"]] == ["controlnet", "ctrl", "controlnet", "controlnet"]
    assert ctrl["training"][0]["script"] == "train/ctrl_adapter.py" and ctrl["formats_written"] == ["diffusers",
                                                                                                    "folder"]
    assert CN in json.loads(client.predict("ctrl", api_name="/list_weights"))

    plain = {"family": "ctrl", "weights": {"controlnet": CN}, "scale": 0.9, "start": 0.0, "end": 0.75,
             "inputs": {"image": [0], "preprocessor": "canny", "conditioning_scale": 0.8}}
    adapted = {"family": "ctrl", "weights": {"controlnet": CN, "adapter": ADAPTER},
               "inputs": {"image": [0], "preprocessor": "canny", "skip_latents": "on"}}
    bare, _ = _generate(client, [])
    outs = {}
    for name, unit in (("plain", plain), ("adapted", adapted)):
        path, mix = _generate(client, [unit], images=[studio.photo])
        assert np.abs(_pixels(path) - _pixels(bare)).mean() > 1.0, f"the {name} unit changes the image"
        (u,) = mix["units"]
        assert u["family"] == "ctrl" and u["weights"]["controlnet"] == CN
        assert u["sha256"]["controlnet"] == file_sha256(studio.root / "models" / CN)
        assert u["inputs"]["preprocessor"] == "canny" and Path(u["inputs"]["image"][0]).is_file()
        recorded = read_mix(path).units[0]  # the unit travels inside the PNG
        assert recorded.weights == u["weights"] and recorded.inputs == u["inputs"] and recorded.end == u["end"]
        outs[name] = (path, mix)
    assert outs["adapted"][1]["units"][0]["weights"]["adapter"] == ADAPTER
    assert np.abs(_pixels(outs["adapted"][0]) - _pixels(outs["plain"][0])).mean() > 1.0

    # the mix reproduces the output, through /generate_mix and through the exported Python script
    path, mix = outs["adapted"]
    again, _ = client.predict(json.dumps(mix), [], api_name="/generate_mix")
    assert np.array_equal(_pixels(again[0]["image"]), _pixels(path))
    script = client.predict(json.dumps(mix), api_name="/export_python")
    (tmp_path / "reproduce.py").write_text(script)
    proc = subprocess.run([sys.executable, "reproduce.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(_pixels(tmp_path / f"mix-{mix['sampling']['seed']}.png"), _pixels(path))


def test_browser_ctrl_unit_with_preview_generates(studio, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1200})
            page.goto(studio.url)
            page.fill("#prompt textarea", "a house by a lake")
            page.locator("#unit-0-enable input[type=checkbox]").check()
            page.locator("#unit-0-family input").click()
            page.get_by_role("option", name="Ctrl-Adapter / ControlNet").click()
            expect(page.locator("#unit-0-weights input")).to_have_value(CN, timeout=30_000)
            page.locator(".unit-images:visible input[type=file]").first.set_input_files(str(studio.square))
            # the preview (a Gradio image next to the control image, found by its label) shows the upload ...
            label = page.get_by_text("Control image — preview", exact=True)
            preview = page.locator(".block", has=label).locator("img")
            expect(preview).to_be_visible(timeout=30_000)
            assert page.evaluate("(el) => el.naturalWidth", preview.element_handle()) > 0, "a non-empty preview"
            shown = preview.get_attribute("src")
            # ... and follows the preprocessor: canny edges once it is chosen
            page.locator(".block", has=page.get_by_text("Preprocessor", exact=True)).locator("input").click()
            page.get_by_role("option", name="canny", exact=True).click()
            expect(preview).not_to_have_attribute("src", shown, timeout=30_000)
            page.click("#generate-btn")
            expect(page.locator("#run-info")).to_contain_text("Done", timeout=120_000)
            expect(page.locator("#run-info")).to_contain_text("1 unit(s)")
            img = page.locator("#result-gallery img").first
            expect(img).to_be_visible()
            assert page.evaluate("(el) => el.naturalWidth", img.element_handle()) == studio.engine.default_size
            page.screenshot(path=str(tmp_path / "ctrl-studio.png"), full_page=True)

            # "load settings from image": an output of a Ctrl-Adapter unit restores the family and both weights
            from gradio_client import Client

            client = Client(studio.url, verbose=False, download_files=str(tmp_path))
            unit = {"family": "ctrl", "weights": {"controlnet": CN, "adapter": ADAPTER}, "scale": 0.7,
                    "inputs": {"image": [0], "preprocessor": "canny"}}
            path, _ = _generate(client, [unit], images=[studio.photo])
            page.locator("#settings-file input[type=file]").set_input_files(str(path))
            expect(page.locator("#unit-0-family input")).to_have_value("Ctrl-Adapter / ControlNet", timeout=30_000)
            expect(page.locator("#unit-0-weights input")).to_have_value(CN)
            expect(page.locator("#unit-0-weights-1 input")).to_have_value(ADAPTER)
            expect(page.locator("#unit-0-weight input[type=number]")).to_have_value("0.7")
        finally:
            browser.close()
