"""The studio under misuse and load: errors that leave the form clean, labels that follow a loaded mix, cancel of a
queued generation, integers never rounded, upload errors naming the user's file, short logs, the pixel×step budget,
the prompt's token count, non-images refused on drop, the random-weights notice, and the adapter cache.

One app is served in-process on 127.0.0.1 for the API and browser checks, on the tiny model with an empty models
folder (a loaded mix may name weights it lacks: the UI warns and loads it anyway).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from app_fixtures import free_port, make_image

from adapter_studio.adapter import AttentionAdapter
from adapter_studio.errors import MixError
from adapter_studio.family import Family
from adapter_studio.mix import Mix, UnitSpec

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from adapter_studio.webapp.engine import Engine

    root = tmp_path_factory.mktemp("hardening")
    return Engine(model="tiny-sd15", models_dir=root / "models", outputs_dir=root / "outputs")


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    from adapter_studio.webapp.training_runner import TrainingRunner
    from adapter_studio.webapp.ui import CSS, build_app, theme

    root = tmp_path_factory.mktemp("served")
    demo = build_app(engine, TrainingRunner(runs_dir=root / "runs"), mixes_dir=root / "mixes")
    demo.queue(max_size=16, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=theme(),
                css=CSS, allowed_paths=[str(engine.outputs_dir)])
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", root=root)
    finally:
        demo.close()


def _form_values(g: Any, prompt: str = "a fox") -> dict[Any, Any]:
    """Every Generate-tab widget's value: a plain request with no unit enabled."""
    v = {g.prompt: prompt, g.negative: "", g.seed: 1, g.steps: 2, g.width: 64, g.height: 64, g.sampler: "DDIM",
         g.guidance: "auto", g.cfg_scale: 5.0, g.count: 1, g.n_units: 3, g.frames: 16, g.fps: 8}
    for u in g.units:
        v.update({u.enabled: False, u.family: "ip", u.weight: 1.0, u.start: 0.0, u.end: 1.0})
        v.update({c: None for c in [*u.weights, *u.fields.values()]})
    return v


# ---------------------------------------------------------------------------------------------------- item 9, 12
def test_errors_log_one_line_for_user_input_and_the_trace_for_a_bug_and_page_events_only_toast(caplog):
    from adapter_studio.webapp.handlers import friendly_errors, toast_errors

    def bad_input() -> None:
        raise MixError("steps must be a whole number, got 2.5")

    def bug() -> None:
        raise KeyError("oops")

    caplog.set_level(logging.INFO, logger="adapter_studio.app")
    with pytest.raises(gr.Error) as err:
        friendly_errors(bad_input)()
    assert err.value.print_exception is False, "Gradio must not print a trace of a user error"
    [user] = caplog.records
    assert "steps must be a whole number" in user.getMessage() and user.exc_info is None
    caplog.clear()
    with pytest.raises(gr.Error, match="Internal error") as err:
        friendly_errors(bug)()
    assert err.value.print_exception is False  # the trace is in our log once, not twice
    [internal] = caplog.records
    assert internal.exc_info is not None and internal.levelno == logging.ERROR
    # a page event: no exception (which would mark every output with an "Error" badge), nothing updated
    with pytest.warns(UserWarning, match="whole number"):  # gr.Warning outside a served event
        assert toast_errors(bad_input)() == gr.skip()


# ---------------------------------------------------------------------------------------------------- item 10
def test_a_loaded_mix_labels_every_unit_tab_with_its_family(engine):
    from adapter_studio.webapp.ui import StudioApp

    app = StudioApp(engine)
    app.build()
    g = app.generate
    mix = Mix(units=[UnitSpec("agd", "agd/a", inputs={"guidance_scale": 3.0})], sampling=SMALL)
    upd, _ = g.mix_to_updates(mix, ["ip", "ip", "agd", "ip", "ip", "ip"])
    labels = [upd[u.tab]["label"] for u in g.units]
    assert labels[:3] == ["● Unit 1 · AGD", "○ Unit 2 · IP-Adapter", "○ Unit 3 · AGD"], labels
    assert all(upd[u.enabled] is False for u in g.units[1:]), "units the mix leaves off are switched off"


# ---------------------------------------------------------------------------------------------------- item 11
def test_cancel_reaches_a_queued_generation_which_then_does_not_run(engine, capsys):
    from adapter_studio.webapp.engine import GenerationCancelled
    from adapter_studio.webapp.ui import StudioApp

    app = StudioApp(engine)
    app.build()
    g = app.generate
    page = SimpleNamespace(session_hash="page-1")
    assert g.cancel(page) == gr.skip()  # the run info stays
    assert "Nothing to cancel" in capsys.readouterr().out  # the toast (printed outside a served event)
    ticket = g.queue_job(page)  # Generate clicked; its generation waits in the queue
    said = g.cancel(page)
    assert "1 queued generation(s) cancelled: they will not run" in said
    assert "1 queued generation(s) cancelled" in capsys.readouterr().out
    outputs_before = sorted(engine.outputs_dir.rglob("*.png"))
    v = {**_form_values(g), g.ticket: ticket}
    assert g.generate_ui(v, page, progress=lambda *a, **k: None) == gr.skip(), "the last result stays on screen"
    assert sorted(engine.outputs_dir.rglob("*.png")) == outputs_before, "it did not run"

    # one running, one queued, on the same page: Cancel reaches both and says so
    started, release = threading.Event(), threading.Event()
    errors: list[Exception] = []

    def progress(i: int, n: int) -> None:
        started.set()
        release.wait(30)

    def run() -> None:
        try:
            engine.generate(Mix(sampling={**SMALL, "steps": 30}), session="page-2", progress=progress)
        except GenerationCancelled as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    queued = engine.queue("page-2")
    assert started.wait(60)
    what = engine.cancel("page-2")
    release.set()
    worker.join(60)
    assert (what.running, what.queued) == (1, 1) and "stopping 1 running" in what.message().lower()
    assert errors and not errors[0].before_start
    with pytest.raises(GenerationCancelled) as err:
        engine.generate(Mix(sampling=SMALL), session="page-2", ticket=queued)
    assert err.value.before_start
    assert engine.generate(Mix(sampling=SMALL), session="page-2").images, "the next Generate runs"


# ---------------------------------------------------------------------------------------------------- item 12
def test_integers_are_never_rounded_and_budget_refusals_come_back_through_the_api(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served.url, verbose=False)
    with pytest.raises(AppError, match=r"steps must be a whole number, got 2\.5"):
        client.predict("a fox", "", 1, 2.5, 64, 64, "DDIM", "auto", 7.5, 1, "[]", [], api_name="/generate")
    with pytest.raises(AppError, match=r"2048×2048 px × 20 steps × 1 image\(s\) = 83\.9 M pixel-steps, over this "
                                       r"server's budget of 7\.9 M"):
        client.predict("a fox", "", 1, 20, 2048, 2048, "DDIM", "auto", 7.5, 1, "[]", [], api_name="/generate")


def test_a_refused_upload_names_the_users_file_not_the_servers_staging_copy(engine, tmp_path):
    from adapter_studio.errors import CheckpointError

    junk = tmp_path / "my-ip-adapter.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError) as err:
        engine.add_weights(junk, "ip")
    assert "my-ip-adapter.safetensors" in str(err.value) and ".upload-" not in str(err.value), str(err.value)
    assert not list(engine.models_dir.rglob("*.safetensors")), "nothing kept"


# ---------------------------------------------------------------------------------------------------- item 13
def test_the_pixel_step_budget_is_by_device_and_names_what_would_fit(engine):
    from adapter_studio.webapp.limits import DEVICE_PIXEL_STEPS, Limits

    assert engine.device == "cpu" and engine.pixel_step_budget == DEVICE_PIXEL_STEPS["cpu"] == 512 * 512 * 30
    assert Limits().pixel_step_budget("cuda:1") == DEVICE_PIXEL_STEPS["cuda"] > DEVICE_PIXEL_STEPS["cpu"]
    assert Limits(max_pixel_steps=0).pixel_step_budget("cpu") == 0  # no budget
    with pytest.raises(MixError) as err:
        engine.complete_mix(Mix(sampling={"prompt": "x", "width": 2048, "height": 2048, "steps": 20}))
    msg = str(err.value)
    assert "budget of 7.9 M pixel-steps per request on cpu (app.py --max-pixel-steps)" in msg, msg
    assert "what fits: 1 step(s) at 2048×2048 or 624×624 px at 20 steps" in msg, msg
    with pytest.raises(MixError, match="or 3 image\\(s\\) at this size and steps"):
        engine.complete_mix(Mix(sampling={"prompt": "x", "width": 512, "height": 512, "steps": 10,
                                          "num_images": 4}))
    engine.complete_mix(Mix(sampling={"prompt": "x", "width": 512, "height": 512, "steps": 30}))  # just fits

    import importlib.util

    spec = importlib.util.spec_from_file_location("studio_app", Path(__file__).resolve().parents[1] / "app.py")
    app_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_py)
    assert app_py.parse_args(["--max-pixel-steps", "8M"]).max_pixel_steps == 8_000_000
    assert app_py.parse_args([]).max_pixel_steps is None  # by device


# ---------------------------------------------------------------------------------------------------- item 14
def test_the_prompt_token_count_uses_the_pipelines_tokenizer_and_a_long_prompt_is_logged_short(engine, caplog):
    with engine.pool.borrow() as sp:
        tok = sp.pipe.tokenizer
    short = engine.prompt_tokens("a red fox")
    assert short.count == len(tok("a red fox").input_ids) - 2 and short.limit == tok.model_max_length - 2
    assert not short.over and short.cut == ""
    long_prompt = "a red fox in the snow " * 1000
    long = engine.prompt_tokens(long_prompt)
    assert long.over and long.count == len(tok(long_prompt).input_ids) - 2 and long.cut

    caplog.set_level(logging.INFO, logger="adapter_studio.app")
    res = engine.generate(Mix(sampling={**SMALL, "prompt": long_prompt}))
    assert f"prompt cut to its first {long.limit} tokens" in res.info
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate:")]
    assert len(line) < 300 and f"{len(long_prompt)} chars" in line and f"cut at {long.limit}" in line


# ---------------------------------------------------------------------------------------------------- item 15
def test_the_page_says_when_the_model_has_random_weights_and_how_to_use_a_real_one(engine):
    from adapter_studio.webapp.ui import model_notice

    notice = model_notice(engine)
    assert "random weights" in notice and "python app.py --model sd15" in notice and "diffusers-folder" in notice
    assert model_notice(SimpleNamespace(preset=SimpleNamespace(source="pretrained"), model="sd15")) is None


# ---------------------------------------------------------------------------------------------------- item 18
class ScaleAdapter(AttentionAdapter):
    """A test adapter: a learned linear map added to every cross-attention output."""

    family = "cachetest"
    target = "attn2"

    def __init__(self, layers: dict[str, int]):
        super().__init__()
        self.names = list(layers)
        self.proj = nn.ModuleList(nn.Linear(width, width, bias=False) for width in layers.values())

    def layer_names(self) -> list[str]:
        return self.names

    def contribution(self, layer, attn, hidden_states, encoder_hidden_states, state, ctx):
        return self.proj[self.names.index(layer)](hidden_states)


def _layers(unet: nn.Module) -> dict[str, int]:
    return {name: unet.get_submodule(name[: -len(".processor")]).to_out[0].out_features
            for name in unet.attn_processors if name.endswith("attn2.processor")}


def test_a_second_call_reuses_the_loaded_adapter_and_a_changed_file_reloads(engine):
    from adapter_studio.registry import register_family, unregister_family
    from adapter_studio.webapp.adapter_cache import AdapterCache, module_bytes

    with engine.pool.borrow() as sp:
        layers = _layers(sp.pipe.unet)
    loads: list[str] = []

    def load(weights: dict[str, str | None], pipe: Any) -> ScaleAdapter:
        loads.append(weights["weights"])
        adapter = ScaleAdapter(_layers(pipe.unet))
        adapter.load_state_dict(load_file(weights["weights"]))
        return adapter

    def write(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        save_file({f"proj.{i}.weight": torch.randn(w, w, generator=g) * 0.3 for i, w in enumerate(layers.values())},
                  str(folder / "a.safetensors"))

    folder = engine.models_dir / "cachetest"
    folder.mkdir(parents=True, exist_ok=True)
    write(1)
    fam = register_family(Family(name="cachetest", label="Cache test", loader=load))
    try:
        unit = UnitSpec("cachetest", "cachetest/a.safetensors")
        first = engine.generate(Mix(units=[unit], sampling=SMALL))
        again = engine.generate(Mix(units=[unit], sampling=SMALL))
        assert len(loads) == 1, "the second call takes the kept adapter"
        assert first.mix.units[0].sha256 == again.mix.units[0].sha256
        assert _pixels(first.images[0]) == _pixels(again.images[0]), "a kept adapter samples the same"
        write(2)  # the file changes on disk: a new sha256
        changed = engine.generate(Mix(units=[unit], sampling=SMALL))
        assert len(loads) == 2 and changed.mix.units[0].sha256 != first.mix.units[0].sha256
        assert _pixels(changed.images[0]) != _pixels(first.images[0])

        # each call gets its own copy (stacks of pipelines sampling concurrently never share a module); the cache
        # is bounded by the bytes of parameters, least recently used out first
        paths, sha = {"weights": str(folder / "a.safetensors")}, {"weights": "s1"}
        with engine.pool.borrow() as sp:
            cache = AdapterCache(max_bytes=10**9)
            one, two = cache.get(fam, paths, sha, "m", sp.pipe), cache.get(fam, paths, sha, "m", sp.pipe)
            assert one is not two and one.proj[0].weight.data_ptr() != two.proj[0].weight.data_ptr()
            size = module_bytes(one)
            small = AdapterCache(max_bytes=size * 3 // 2)
            for key in ("s1", "s2", "s1"):
                small.get(fam, paths, {"weights": key}, "m", sp.pipe)
            assert len(small) == 1 and small.bytes == size
            calls = len(loads)
            small.get(fam, paths, {"weights": "s1"}, "m", sp.pipe)
            assert len(loads) == calls, "the most recent one stayed"
    finally:
        unregister_family("cachetest")


def _pixels(path: Path) -> bytes:
    from PIL import Image

    return Image.open(path).convert("RGB").tobytes()


# ---------------------------------------------------------------------------------------------------- browser
def test_browser_form_stays_clean_labels_follow_a_loaded_mix_tokens_count_and_non_images_are_refused(
        served, engine, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ref = make_image(tmp_path / "ref.png", (64, 64))
    fake = tmp_path / "notes.png"
    fake.write_text("meeting notes, not a picture")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "adapter-studio/mix", "version": 7}))
    agd = UnitSpec("agd", "agd/a", inputs={"guidance_scale": 3.0})
    five = Mix(units=[UnitSpec("ip", "ip/a.safetensors"), UnitSpec("ip", "ip/a.safetensors", enabled=False),
                      UnitSpec("ip", "ip/a.safetensors", enabled=False), agd, UnitSpec("agd", "agd/a", enabled=False)],
               sampling={**SMALL, "prompt": "five units", "guidance": "agd"}).save(tmp_path / "five.json")
    typed = "a small red fox"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(served.url)
            expect(page.locator("#model-notice")).to_contain_text("has random weights")
            expect(page.locator("#model-notice")).to_contain_text("python app.py --model sd15")

            # the token count follows the typing, and shows the cut of a long prompt
            page.locator("#prompt textarea").press_sequentially(typed)
            count = engine.prompt_tokens(typed).count
            expect(page.locator("#prompt-tokens")).to_contain_text(f"Prompt: {count} / 75 tokens", timeout=10_000)
            page.locator("#prompt textarea").fill("fox " * 100)
            expect(page.locator("#prompt-tokens")).to_contain_text("cut after 75", timeout=10_000)

            # a file named like an image that is none: refused when dropped, named, and gone from the gallery
            page.locator(".unit-images input[type=file]").first.set_input_files([str(ref), str(fake)])
            expect(page.get_by_text("'notes.png' is not an image").first).to_be_visible(timeout=15_000)
            expect(page.locator(".unit-images").first.locator("img")).to_have_count(1)

            # a bad settings file: a toast, and not one "Error" badge left on the form
            settings = page.locator("#settings-file")
            settings.locator("input[type=file]").set_input_files(str(bad))
            expect(page.get_by_text("mix version 7 is not supported").first).to_be_visible(timeout=15_000)
            expect(page.locator("[data-testid=status-tracker] .error")).to_have_count(0)

            # a mix whose unit 4 (a tab not shown yet) is AGD: its tab says so once everything has arrived
            settings.get_by_role("button", name="Clear").click()
            settings.locator("input[type=file]").set_input_files(str(five))
            expect(page.locator("#prompt textarea")).to_have_value("five units", timeout=15_000)
            page.wait_for_timeout(1000)  # a late event must not relabel it
            labels = page.locator("button", has_text="Unit 4 ·")
            assert set(labels.all_inner_texts()) == {"● Unit 4 · AGD"}, labels.all_inner_texts()
            expect(page.locator("[data-testid=status-tracker] .error")).to_have_count(0)
        finally:
            browser.close()


def test_stop_waits_for_the_training_process_not_just_the_launcher(tmp_path):
    """The one-process launcher dies at once on SIGTERM while its child checkpoints: "stopped" only after both."""
    from adapter_studio.family import Family, TrainingScript
    from adapter_studio.registry import register_family, unregister_family
    from adapter_studio.webapp.training_runner import TrainingRunner

    cfgs, scripts = tmp_path / "configs", tmp_path / "scripts"
    cfgs.mkdir()
    scripts.mkdir()
    (cfgs / "grp_test.yaml").write_text("max_steps: 9\n")
    # a "launcher" that starts a "trainer" in its process group; the trainer answers SIGTERM by "checkpointing" (1 s)
    (scripts / "child.py").write_text(
        "import os, signal, sys, time\n"
        "out = sys.argv[1]\n"
        "def on_term(*_):\n"
        "    time.sleep(1.0)\n"
        "    open(os.path.join(out, 'checkpointed'), 'w').write('yes')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "open(os.path.join(out, 'started'), 'w').write('yes')\n"
        "while True:\n"
        "    time.sleep(0.05)\n")
    (scripts / "launcher.py").write_text(
        "import subprocess, sys, time\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        f"subprocess.Popen([sys.executable, {str(scripts / 'child.py')!r}, out])\n"
        "while True:\n"
        "    time.sleep(0.05)\n")
    register_family(Family(name="grpfam", label="Group family", loader=lambda weights, pipe: None, order=1,
                           training=(TrainingScript("scripts/launcher.py", "grp_*.yaml", data_key=None),)))
    try:
        r = TrainingRunner(configs_dir=cfgs, root=tmp_path, runs_dir=tmp_path / "runs", launcher="python")
        run = r.start("grp_test")
        deadline = time.time() + 20
        while not (run.output_dir / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        r.stop()
        assert (run.output_dir / "checkpointed").exists(), "stop returned before the trainer finished its checkpoint"
        assert r.status()["state"] == "stopped"
    finally:
        unregister_family("grpfam")
