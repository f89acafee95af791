"""The studio on the embedded default, the trained toy model (`toy-sd15`, models/toy): what `make run` serves, an
IP-Adapter unit driven in a headless Chromium whose output takes the reference's colour (read back with the toy
world's own judge, `toyworld.metrics.analyze`), and the example mixes `configs/mixes/toy-*.json`, which load on their
models from any working directory and name only files shipped in models/toy.

One app is served in-process on 127.0.0.1 for the module, on toy-sd15 with the checkout's models folder and mix
presets (read only: nothing here writes under models/ or configs/).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from app_fixtures import free_port, stop_server

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
IP = "toy/ip-adapter"
TOY_MIXES = {"toy-agd", "toy-ctrl-mask", "toy-i2v", "toy-ip-reference"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _scene(color: str):
    from adapter_studio.toyworld.scenes import Scene

    return Scene(shape="circle", color=color, size="large", position="center", ground="white")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from adapter_studio.toyworld.scenes import render
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, build_app, theme

    root = tmp_path_factory.mktemp("toy-studio")
    engine = Engine(model="toy-sd15", models_dir=MODELS, outputs_dir=root / "outputs")
    demo = build_app(engine, TrainingRunner(runs_dir=root / "runs"), mixes_dir=REPO / "configs" / "mixes")
    demo.queue(max_size=16, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS,
                allowed_paths=[str(engine.outputs_dir)])
    refs = {}
    for color in ("red", "blue"):
        refs[color] = root / f"ref-{color}.png"
        render(_scene(color), 64).save(refs[color])
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", engine=engine, root=root, refs=refs)
    demo.close()


def _browser(p):
    return p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)


def _generate_and_read(page, path: Path):
    """Press Generate, wait for the result, fetch the first output picture as the page shows it into `path`, and
    return it (RGB) with the mix it carries."""
    from playwright.sync_api import expect

    from adapter_studio.webapp.metadata import read_mix

    page.click("#generate-btn")
    expect(page.locator("#run-info")).to_contain_text("Done", timeout=120_000)
    expect(page.locator("#run-info")).to_contain_text("1 unit(s)")
    img = page.locator("#result-gallery img").first
    expect(img).to_be_visible()
    path.write_bytes(page.request.get(img.get_attribute("src")).body())
    return Image.open(path).convert("RGB"), read_mix(path)


def test_browser_ip_unit_on_the_toy_model_paints_the_reference_colour(studio, tmp_path):
    """Empty prompt, one IP-Adapter unit (the toy weights) and a rendered reference: the picture has the reference's
    colour, for two references of different colours (a model that always paints one colour fails)."""
    from playwright.sync_api import expect, sync_playwright

    from adapter_studio.toyworld.metrics import analyze

    example = studio.engine.preset.config["prompt_example"]
    seen = {}
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            for color, ref in studio.refs.items():
                assert analyze(Image.open(ref)).color == color  # the judge reads the reference right
                page.goto(studio.url)
                expect(page.locator("#model-notice")).to_contain_text("trained on a toy world of shapes")
                expect(page.locator("#model-notice")).to_contain_text(example)
                expect(page.locator("#prompt textarea")).to_have_attribute("placeholder", example)
                page.fill("#seed input", "1")
                page.locator("#unit-0-enable input[type=checkbox]").check()
                page.locator("#unit-0-weights input").click()
                page.get_by_role("option", name=IP, exact=True).click()
                expect(page.locator("#unit-0-weights input")).to_have_value(IP)
                page.fill("#unit-0-weight input[type=number]", "1")  # the scale the toy IP-Adapter was trained at
                page.locator("#unit-0-weight input[type=number]").press("Enter")
                page.locator(".unit-images input[type=file]").first.set_input_files(str(ref))
                expect(page.locator(".unit-images img").first).to_be_visible(timeout=30_000)
                out, mix = _generate_and_read(page, tmp_path / f"out-{color}.png")
                assert (mix.model, mix.sampling.prompt, mix.sampling.seed) == ("toy-sd15", "", 1)
                assert [(u.weights, u.scale) for u in mix.units] == [({"weights": IP}, 1.0)]
                assert out.size == (studio.engine.default_size,) * 2 == (64, 64)
                seen[color] = analyze(out).color
            page.screenshot(path=str(tmp_path / "toy-studio.png"), full_page=True)
        finally:
            browser.close()
    assert seen == {color: color for color in studio.refs}, seen


def test_browser_toy_ip_preset_loads_with_its_example_reference_and_generates(studio, tmp_path):
    """The example mix `toy-ip-reference` from the presets dropdown: its weights and its reference picture (named
    relative to the models folder) land in the form, and Generate paints the reference's colour."""
    from playwright.sync_api import expect, sync_playwright

    from adapter_studio.mix import Mix
    from adapter_studio.toyworld.metrics import analyze

    mix = Mix.load(REPO / "configs" / "mixes" / "toy-ip-reference.json")
    ref_color = analyze(Image.open(MODELS / mix.units[0].inputs["image"][0])).color
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(studio.url)
            page.get_by_role("combobox", name="Mix presets").click()
            page.get_by_role("option", name="toy-ip-reference", exact=True).click()
            page.get_by_role("button", name="Load preset").click()
            expect(page.locator("#unit-0-weights input")).to_have_value(IP, timeout=30_000)
            expect(page.locator("#unit-0-family input")).to_have_value("IP-Adapter")
            expect(page.locator(".unit-images img").first).to_be_visible(timeout=30_000)
            expect(page.locator("#seed input")).to_have_value(str(mix.sampling.seed))
            out, ran = _generate_and_read(page, tmp_path / "preset-out.png")
            assert ran.units[0].weights == {"weights": IP} and ran.sampling.seed == mix.sampling.seed
        finally:
            browser.close()
    assert analyze(out).color == ref_color


def test_make_run_serves_the_trained_toy_model(tmp_path):
    """`make run`'s own command line (from `make -n`, on a free port, outputs in a temp folder) serves toy-sd15: the
    page names it and says what it is, and a prompt of the toy world comes back in its colour."""
    from gradio_client import Client

    from adapter_studio.toyworld.metrics import analyze

    port = free_port()
    dry = subprocess.run(["make", "-n", "-B", "run", f"PORT={port}", f"ARGS=--outputs-dir {tmp_path / 'outputs'}"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    [line] = [x for x in dry.splitlines() if " app.py " in x]
    assert "--model" not in line, "make run serves app.py's default model"
    log = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen(shlex.split(line), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        config, deadline = None, time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as resp:
                    config = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.5)
        assert config is not None, (tmp_path / "app.log").read_text()[-3000:]
        props = [c.get("props", {}) for c in config["components"]]
        assert any("model <code>toy-sd15</code>" in str(p.get("value")) for p in props), "the header names it"
        by_id = {p["elem_id"]: p for p in props if p.get("elem_id")}
        notice = by_id["model-notice"]["value"]
        assert "`toy-sd15` is a tiny model trained on a toy world of shapes" in notice
        assert "random weights" not in notice
        assert by_id["prompt"]["placeholder"] == "a large red circle in the center on a white background"
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        gallery, mix = client.predict("a large red circle in the center on a white background", "", 0, 20, 64, 64,
                                      "DDIM", "auto", 3.0, 1, "[]", [], api_name="/generate")
        assert json.loads(mix)["model"] == "toy-sd15"
        assert analyze(Image.open(gallery[0]["image"])).color == "red", "a trained model draws what it is told"
    finally:
        stop_server(proc, log)


def _input_paths(family, inputs):
    """The file paths a unit's JSON inputs name (its image fields, one path or a list)."""
    out = []
    for f in family.fields:
        if f.target == "inputs" and f.kind in ("image", "images") and f.key in inputs:
            val = inputs[f.key]
            out += val if isinstance(val, list) else [val]
    return out


def test_example_mixes_load_on_their_models_from_any_working_directory(tmp_path, monkeypatch):
    """Each `configs/mixes/toy-*.json` names weights and pictures relative to the models folder, all shipped in
    models/toy; `apply_mix(..., base_dir=models)` loads it on its model's pipeline (from another working directory),
    and two sampling steps of it run."""
    import torch

    from adapter_studio.mix import Mix, apply_mix
    from adapter_studio.pipelines import StudioPipeline
    from adapter_studio.presets import available_presets
    from adapter_studio.registry import get_family
    from adapter_studio.webapp.export import call_arguments

    paths = sorted((REPO / "configs" / "mixes").glob("toy-*.json"))
    assert {p.stem for p in paths} == TOY_MIXES
    monkeypatch.chdir(tmp_path)
    pipes: dict[str, StudioPipeline] = {}
    for path in paths:
        mix = Mix.load(path)
        assert mix.model in available_presets() and mix.model.startswith("toy-"), path.name
        for unit in mix.units:
            fam = get_family(unit.family)
            named = [*fam.weights_dict(unit.weights).values(), *_input_paths(fam, unit.inputs)]
            for name in filter(None, named):
                assert not Path(name).is_absolute() and name.startswith("toy/"), (path.name, name)
                assert (MODELS / name).exists(), f"{path.name} names {name}, missing from models/"
        if mix.model not in pipes:
            pipes[mix.model] = StudioPipeline.from_preset(mix.model)
        sp = pipes[mix.model]
        assert apply_mix(mix, sp, base_dir=MODELS) == [u.name for u in mix.units], path.name
        s = mix.sampling
        s.steps, s.num_images = 2, 1
        sp.set_sampler(s.sampler)
        out = sp(**call_arguments(s), generator=[torch.Generator().manual_seed(0)])
        first = out.frames[0][0] if hasattr(out, "frames") else out.images[0]
        assert first.size == (64, 64), path.name
