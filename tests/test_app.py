"""The studio served for real: gradio_client against the named endpoints, a headless Chromium, the queue, bad input.

One app is served in-process on 127.0.0.1 (a free port) for the whole module, on the tiny model, with a models
folder holding an IP-Adapter and an AGD adapter freshly initialised and saved with the families' own save functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from app_fixtures import free_port, make_image, make_models_dir

REPO = Path(__file__).resolve().parents[1]
W, H = 128, 96  # not square: a swapped width/height shows


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from adapter_studio.webapp.engine import Engine, Limits
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, build_app, theme

    root = tmp_path_factory.mktemp("studio")
    names = make_models_dir(root / "models")
    engine = Engine(model="tiny-sd15", models_dir=root / "models", outputs_dir=root / "outputs", max_concurrency=2,
                    limits=Limits(max_input_pixels=256 * 256))
    demo = build_app(engine, TrainingRunner(runs_dir=root / "runs"), mixes_dir=root / "mixes")
    demo.queue(max_size=64, default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS,
                allowed_paths=[str(engine.outputs_dir)])
    ref = make_image(root / "ref.png", (64, 64), seed=3)
    ref2 = make_image(root / "ref2.png", (40, 56), seed=4)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", engine=engine, names=names, root=root, ref=ref, ref2=ref2)
    demo.close()


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    from gradio_client import Client

    return Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _generate(client, units, images=(), prompt="a red fox", seed=11, n=2, guidance="auto", scale=7.5):
    from gradio_client import handle_file

    gallery, mix_json = client.predict(prompt, "", seed, 4, W, H, "DDIM", guidance, scale, n, json.dumps(units),
                                       [handle_file(str(p)) for p in images], api_name="/generate")
    return [Path(g["image"]) for g in gallery], json.loads(mix_json)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_with_no_unit_ip_agd_and_both(studio, client):
    from adapter_studio.webapp.metadata import read_mix
    from adapter_studio.mix import file_sha256

    ip = {"family": "ip", "weights": studio.names["ip"], "scale": 0.8, "inputs": {"image": ["ref.png", "ref2.png"]}}
    agd = {"family": "agd", "weights": studio.names["agd"], "inputs": {"guidance_scale": 4.0}}
    sha = {"ip": file_sha256(studio.root / "models" / studio.names["ip"]),
           "agd": file_sha256(studio.root / "models" / studio.names["agd"])}
    outs = {}
    for name, units in {"none": [], "ip": [ip], "agd": [agd], "both": [ip, agd]}.items():
        paths, mix = _generate(client, units, images=[studio.ref, studio.ref2])
        assert len(paths) == 2
        assert mix["sampling"]["seed"] == 11 and mix["sampling"]["num_images"] == 2
        assert [u["family"] for u in mix["units"]] == [u["family"] for u in units]
        assert mix["sampling"]["guidance"] == ("agd" if "agd" in name or name == "both" else "cfg")
        if mix["sampling"]["guidance"] == "agd":
            assert mix["sampling"]["guidance_scale"] == 4.0
        for i, p in enumerate(paths):
            assert p.suffix == ".png" and Image.open(p).size == (W, H)
            one = read_mix(p)  # the mix travels inside the PNG (text chunk) ...
            assert one.sampling.seed == 11 + i and one.sampling.num_images == 1
            assert one.sampling.prompt == "a red fox" and one.model == "tiny-sd15"
            for u in one.units:
                assert u.weights == {"weights": studio.names[u.family]}, "weights recorded in their dict form"
                assert u.sha256 == {"weights": sha[u.family]}, "weights hash recorded"
                if u.family == "ip":
                    assert len(u.inputs["image"]) == 2 and all(Path(x).is_file() for x in u.inputs["image"])
            sidecars = list(studio.engine.outputs_dir.rglob(p.name.replace(".png", ".json")))
            assert sidecars and json.loads(sidecars[0].read_text()) == one.to_dict()  # ... and in a sidecar JSON
        outs[name] = [_pixels(p) for p in paths]
    # each adapter really acts: same seed, different pictures; the two images of a batch differ (seed + i)
    for a, b in [("none", "ip"), ("none", "agd"), ("ip", "both"), ("agd", "both")]:
        assert np.abs(outs[a][0] - outs[b][0]).mean() > 1.0, (a, b)
    assert np.abs(outs["none"][0] - outs["none"][1]).mean() > 1.0


def test_an_output_reproduces_from_its_own_metadata_and_from_the_python_export(studio, client, tmp_path):
    from gradio_client import handle_file

    ip = {"family": "ip", "weights": studio.names["ip"], "scale": {"up": {"block_1": [0.0, 1.0]}},
          "inputs": {"image": [0]}}
    paths, _ = _generate(client, [ip], images=[studio.ref], seed=5, n=2, prompt="a blue house")
    mix_json = client.predict(handle_file(str(paths[1])), api_name="/read_settings")
    assert json.loads(mix_json)["sampling"]["seed"] == 6
    again, _ = client.predict(mix_json, [], api_name="/generate_mix")
    again = Path(again[0]["image"])
    # image 2 of the batch regenerated alone: the same up to the float rounding of a batch of 2 vs 1 (<= 1/255)
    assert np.abs(_pixels(again) - _pixels(paths[1])).max() <= 1
    twice, _ = client.predict(mix_json, [], api_name="/generate_mix")
    assert np.array_equal(_pixels(twice[0]["image"]), _pixels(again)), "a single-image mix reproduces bit-exactly"

    script = client.predict(mix_json, api_name="/export_python")
    (tmp_path / "reproduce.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "reproduce.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(_pixels(tmp_path / "mix-6.png"), _pixels(again)), "the exported script reproduces it"

    # the ComfyUI workflow of the same mix: both formats, the reference image and the IP weights it reads
    import zipfile

    zpath = client.predict(mix_json, api_name="/export_comfy")
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
        api = json.loads(z.read("workflow_api.json"))
        ui = json.loads(z.read("workflow.json"))
    classes = {node["class_type"] for node in api.values()}
    assert {"KSampler", "AdapterStudioIPAdapterLoader", "AdapterStudioApplyIPAdapter"} <= classes
    assert next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]["seed"] == 6
    assert len(ui["nodes"]) == len(api) and any(n.startswith("input/") for n in names)
    assert any(n.startswith("models/ip/") for n in names)


def test_sample_mask_switches_a_unit_per_image_and_is_recorded(studio, client):
    """One batch, two mixes: the unit acts on image 1 only; each image's own mix says whether it acted."""
    from gradio_client.exceptions import AppError

    from adapter_studio.webapp.metadata import read_mix

    ip = {"family": "ip", "weights": studio.names["ip"], "inputs": {"image": [0]}}
    plain, _ = _generate(client, [], seed=21, n=2)
    masked, mix = _generate(client, [{**ip, "sample_mask": [True, False]}], images=[studio.ref], seed=21, n=2)
    assert mix["units"][0]["sample_mask"] == [True, False]
    assert np.abs(_pixels(masked[0]) - _pixels(plain[0])).mean() > 1.0, "the unit acts on image 1"
    assert np.abs(_pixels(masked[1]) - _pixels(plain[1])).max() <= 1, "and not on image 2"
    assert [read_mix(p).units[0].sample_mask for p in masked] == [[True], [False]]
    again, _ = client.predict(json.dumps(mix), [], api_name="/generate_mix")
    assert np.array_equal(_pixels(again[1]["image"]), _pixels(masked[1]))
    with pytest.raises(AppError, match="sample_mask has 3 entries; the call makes 2 image"):
        _generate(client, [{**ip, "sample_mask": [True, False, True]}], images=[studio.ref], n=2)
    with pytest.raises(AppError, match="sample_mask"):
        _generate(client, [{**ip, "sample_mask": "yes"}], images=[studio.ref], n=2)


def test_ten_concurrent_requests_all_complete_through_the_queue(studio, client):
    from gradio_client import handle_file

    # a mix of unit sets, so adapters load while the second pipeline of the pool is being built
    unit_sets = [[], [{"family": "ip", "weights": studio.names["ip"], "inputs": {"image": [0]}}],
                 [{"family": "agd", "weights": studio.names["agd"]}]]
    jobs = [client.submit(f"prompt {i}", "", 100 + i, 3, 64, 64, "Euler", "auto", 5.0, 1, json.dumps(unit_sets[i % 3]),
                          [handle_file(str(studio.ref))], api_name="/generate") for i in range(10)]
    results = [j.result(timeout=240) for j in jobs]
    seeds = []
    for i, (gallery, mix_json) in enumerate(results):
        assert len(gallery) == 1 and Image.open(gallery[0]["image"]).size == (64, 64)
        mix = json.loads(mix_json)
        assert mix["sampling"]["prompt"] == f"prompt {i}"
        seeds.append(mix["sampling"]["seed"])
    assert seeds == [100 + i for i in range(10)]
    assert 1 <= studio.engine.pool.made <= 2, "never more pipelines than --max-concurrency"


def test_bad_input_gets_a_readable_error_and_the_server_keeps_serving(studio, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    big = make_image(tmp_path / "big.png", (300, 300))
    ip = {"family": "ip", "weights": studio.names["ip"], "inputs": {"image": [0]}}
    cases = [
        (dict(units=[ip], images=[not_image]), "not an image"),
        (dict(units=[ip], images=[big]), "cap"),
        (dict(units=[], prompt="  "), "prompt is empty"),
        (dict(units=[{"family": "agd", "weights": studio.names["agd"]}], guidance="cfg"), "replaces classifier-free"),
        (dict(units=[{"family": "ip", "weights": "../other-base/ip-for-sdxl.safetensors",
                      "inputs": {"image": [0]}}], images=[studio.ref]), "outside the models folder"),
        (dict(units=[{"family": "ip", "weights": studio.names["ip"]}]), "reference images required"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(AppError) as err:
            _generate(client, n=1, **kwargs)
        msg = str(err.value)
        assert expected in msg and "Traceback" not in msg, msg
    # a file for another base model copied into the models folder by hand: the family's CheckpointError, readable
    stray = studio.root / "models" / "ip" / "stray-sdxl.safetensors"
    stray.write_bytes(Path(studio.names["ip_sdxl_file"]).read_bytes())
    try:
        with pytest.raises(AppError, match="another base model"):
            _generate(client, [{"family": "ip", "weights": "ip/stray-sdxl.safetensors", "inputs": {"image": [0]}}],
                      images=[studio.ref], n=1)
    finally:
        stray.unlink()
    before = sorted(p.name for p in (studio.root / "models").rglob("*"))
    with pytest.raises(AppError, match="another base model"):
        client.predict(handle_file(studio.names["ip_sdxl_file"]), "ip", api_name="/upload_weights")
    assert sorted(p.name for p in (studio.root / "models").rglob("*")) == before, "a rejected upload is not kept"
    paths, mix = _generate(client, [ip], images=[studio.ref], n=1)  # and the next request works
    assert len(paths) == 1 and mix["units"][0]["family"] == "ip"


def test_upload_weights_lists_them_for_their_family(studio, client, tmp_path):
    from gradio_client import handle_file

    src = studio.root / "models" / studio.names["ip"]
    copy = tmp_path / "my ip adapter.safetensors"
    copy.write_bytes(src.read_bytes())
    name = client.predict(handle_file(str(copy)), "ip", api_name="/upload_weights")
    assert name == "ip/my_ip_adapter.safetensors"
    assert name in json.loads(client.predict("ip", api_name="/list_weights"))
    assert name not in json.loads(client.predict("agd", api_name="/list_weights"))
    fams = {f["family"]: f for f in json.loads(client.predict(api_name="/families"))}
    assert {"ip", "agd"} <= set(fams) and fams["agd"]["guidance"] == "agd"


def test_browser_fill_prompt_enable_unit_generate_and_restore_settings(studio, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(studio.url)
            page.fill("#prompt textarea", "a watercolor fox")
            page.locator("#unit-0-enable input[type=checkbox]").check()
            page.locator(".unit-images input[type=file]").first.set_input_files(str(studio.ref))
            page.wait_for_timeout(500)
            page.click("#generate-btn")
            expect(page.locator("#run-info")).to_contain_text("Done", timeout=90_000)
            expect(page.locator("#run-info")).to_contain_text("1 unit(s)")
            img = page.locator("#result-gallery img").first
            expect(img).to_be_visible()
            assert page.evaluate("(el) => el.naturalWidth", img.element_handle()) == studio.engine.default_size
            page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
            assert (tmp_path / "studio.png").stat().st_size > 10_000

            # "load settings from image": a PNG made by another request restores prompt, seed and the units
            from gradio_client import Client

            c = Client(studio.url, verbose=False, download_files=str(tmp_path))
            gallery, _ = c.predict("a castle at night", "", 77, 3, W, H, "DDIM", "auto", 7.5, 1,
                                   json.dumps([{"family": "agd", "weights": studio.names["agd"], "scale": 0.6,
                                                "inputs": {"guidance_scale": 3.5}}]), [], api_name="/generate")
            page.locator("#settings-file input[type=file]").set_input_files(gallery[0]["image"])
            expect(page.locator("#prompt textarea")).to_have_value("a castle at night", timeout=30_000)
            expect(page.locator("#seed input")).to_have_value("77")
            expect(page.locator("#unit-0-family input")).to_have_value("AGD guidance")
            expect(page.locator("#unit-0-weights input")).to_have_value(studio.names["agd"])
            page.wait_for_timeout(500)  # no late event (family change) may reset what was loaded
            expect(page.locator("#unit-0-weights input")).to_have_value(studio.names["agd"])
            expect(page.locator("#unit-0-weight input[type=number]")).to_have_value("0.6")

            # bad input in the UI: a readable toast, no trace
            page.fill("#prompt textarea", "")
            page.locator("#unit-0-enable input[type=checkbox]").uncheck()
            page.click("#generate-btn")
            expect(page.get_by_text("the prompt is empty").first).to_be_visible(timeout=30_000)
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "studio-error.png"))
        finally:
            browser.close()


def test_train_tab_runs_a_real_config_in_the_background_and_its_adapter_generates(studio, client):
    started = json.loads(client.predict(
        "agd_tiny", "", "", 4, "--trajectories null --validation_steps 2 --validation_inference_steps 2 "
        "--train_batch_size 2 --checkpointing_steps 100", api_name="/train_start"))
    assert started["state"] == "running"
    deadline = time.time() + 240
    while time.time() < deadline:
        st = json.loads(client.predict(api_name="/train_status"))
        if st["state"] != "running":
            break
        time.sleep(1.0)
    assert st["state"] == "finished", (st, Path(st["output_dir"], "logs", "console.log").read_text()[-3000:])
    losses = [json.loads(x) for x in Path(st["output_dir"], "logs", "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and st["loss"] == pytest.approx(losses[-1]["loss"])
    assert Path(st["output_dir"], "validation", "latest.png").is_file()
    name = json.loads(client.predict(api_name="/train_add_to_models"))["name"]
    paths, mix = _generate(client, [{"family": "agd", "weights": name, "inputs": {"guidance_scale": 3.0}}], n=1)
    assert mix["units"][0]["weights"] == {"weights": name} and mix["sampling"]["guidance"] == "agd"
