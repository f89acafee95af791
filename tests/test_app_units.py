"""The studio's pieces without a server: mix checks, metadata, presets of per-block scales, cancel, video files,
the UI's form <-> mix mapping, the training runner's process handling."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_fixtures import make_image, make_models_dir

SDXL_UNET = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2)
SD15_UNET = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from studio.app.engine import Engine, Limits

    root = tmp_path_factory.mktemp("engine")
    names = make_models_dir(root / "models")
    eng = Engine(model="tiny-sd15", models_dir=root / "models", outputs_dir=root / "outputs",
                 limits=Limits(max_input_pixels=200 * 200, max_steps=50))
    eng.names = names
    eng.root = root
    return eng


def test_block_presets_are_instantstyle_layers():
    from studio.app.units import block_preset_scale, preset_of_scale

    # diffusers' InstantStyle example for SDXL, exactly
    assert block_preset_scale("style only", 1.0, SDXL_UNET) == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert block_preset_scale("style + layout", 0.6, SDXL_UNET) == {"up": {"block_0": [0.0, 0.6, 0.0]},
                                                                    "down": {"block_2": [0.0, 0.6]}}
    # SD1.5: the same relative places (first up block with attention, last down block with attention)
    assert block_preset_scale("style only", 1.0, SD15_UNET) == {"up": {"block_1": [0.0, 1.0, 0.0]}}
    assert block_preset_scale("layout only", 1.0, SD15_UNET) == {"down": {"block_2": [0.0, 1.0]}}
    assert block_preset_scale("all blocks", 0.7, SD15_UNET) == 0.7
    for name in ("all blocks", "style only", "layout only", "style + layout"):
        assert preset_of_scale(block_preset_scale(name, 0.45, SD15_UNET), SD15_UNET) == (name, 0.45)
    assert preset_of_scale({"mid": 0.3}, SD15_UNET) == ("custom", 0.3)


def test_style_preset_touches_exactly_one_attention_layer_of_the_tiny_unet(engine):
    from studio.app.units import block_preset_scale
    from studio.stack import layer_scale

    cfg = engine.unet_config()
    with engine.worker() as w:
        layers = [n for n in w.pipeline.pipe.unet.attn_processors if n.endswith("attn2.processor")]
    scale = block_preset_scale("style only", 0.9, cfg)
    on = {n: layer_scale(scale, n) for n in layers if layer_scale(scale, n)}
    assert on == {"up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor": 0.9}


def test_png_metadata_and_sidecar_round_trip(tmp_path):
    from studio.app.metadata import MIX_CHUNK, read_mix, save_png_with_mix
    from studio.errors import MixError
    from studio.mix import Mix, UnitSpec

    mix = Mix(model="tiny-sd15", units=[UnitSpec("ip", "ip/a.safetensors", scale={"up": {"block_1": [0.0, 1.0]}},
                                                   inputs={"image": ["/x/y.png"]}, sha256="ab" * 32)],
              sampling={"prompt": "a fox", "seed": 3, "steps": 4, "width": 64, "height": 64, "sampler": "DDIM",
                        "guidance": "cfg", "guidance_scale": 7.5, "num_images": 1})
    png = save_png_with_mix(Image.new("RGB", (64, 48), "red"), tmp_path / "out.png", mix)
    assert Image.open(png).text[MIX_CHUNK] == mix.to_json(indent=None)
    assert "Seed: 3" in Image.open(png).text["parameters"]
    assert read_mix(png).to_dict() == mix.to_dict() == read_mix(tmp_path / "out.json").to_dict()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(MixError, match="carries no Adapter Studio settings"):
        read_mix(tmp_path / "plain.png")
    (tmp_path / "junk.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(MixError, match="neither a studio PNG nor a mix JSON"):
        read_mix(tmp_path / "junk.json")


def test_every_problem_of_a_mix_is_named_at_once(engine):
    from studio.errors import MixError
    from studio.mix import Mix, UnitSpec

    agd = UnitSpec("agd", engine.names["agd"])
    bad = Mix(model="tiny-sd15", units=[agd, agd, UnitSpec("nope", "x"), UnitSpec("ip", "missing.bin")],
              sampling={"prompt": "", "steps": 500, "width": 100, "sampler": "Magic"})
    with pytest.raises(MixError) as err:
        engine.complete_mix(bad)
    msg = str(err.value)
    for part in ["2 AGD units are enabled", "family 'nope' is not installed", "'missing.bin' not found",
                 "steps must be an integer in [1, 50]", "width must be a multiple of 8", "sampler 'Magic'",
                 "the prompt is empty"]:
        assert part in msg, (part, msg)
    with pytest.raises(MixError, match="needs an enabled AGD unit"):
        engine.complete_mix(Mix(sampling={"prompt": "x", "guidance": "agd"}))
    with pytest.raises(MixError, match="made for model 'sd15'"):
        engine.complete_mix(Mix(model="sd15", sampling={"prompt": "x"}))
    # an image prompt can stand in for the text prompt; disabled units are dropped; a random seed is drawn
    ref = engine.store_image(make_image(engine.root / "r.png"))
    ok = engine.complete_mix(Mix(units=[UnitSpec("ip", engine.names["ip"], inputs={"image": [str(ref)]}),
                                        UnitSpec("agd", engine.names["agd"], enabled=False)],
                                 sampling={"prompt": "", "seed": -1}))
    assert [u.family for u in ok.units] == ["ip"] and 0 <= ok.sampling["seed"] < 2**32
    assert ok.sampling["guidance"] == "cfg" and ok.units[0].sha256


def test_uploaded_images_are_checked_and_stored_by_content(engine, tmp_path):
    from studio.app.engine import InputImageError

    (tmp_path / "a.png").write_text("hello")
    with pytest.raises(InputImageError, match="not an image"):
        engine.store_image(tmp_path / "a.png", "unit 1 reference")
    with pytest.raises(InputImageError, match="the cap is 0.0 MP|the cap is 0.04 MP"):
        engine.store_image(make_image(tmp_path / "big.png", (300, 300)))
    a = engine.store_image(make_image(tmp_path / "x.png", seed=1))
    Image.open(tmp_path / "x.png").save(tmp_path / "x.bmp")
    assert engine.store_image(tmp_path / "x.bmp") == a and a.parent == engine.inputs_dir


def test_weights_listing_upload_and_path_rules(engine, tmp_path):
    from studio.errors import CheckpointError, MixError

    assert engine.list_weights("ip") == [engine.names["ip"]]
    assert engine.list_weights("agd") == [engine.names["agd"]]
    with pytest.raises(MixError, match="outside the models folder"):
        engine.resolve_weights("../../etc/passwd")
    # a diffusers folder uploaded as a zip is unpacked, checked with the family loader and listed
    src = engine.models_dir / engine.names["agd"]
    with zipfile.ZipFile(tmp_path / "my-agd.zip", "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"my-agd/{f.name}")
    assert engine.add_weights(tmp_path / "my-agd.zip", "agd") == "agd/my-agd"
    assert "agd/my-agd" in engine.list_weights("agd")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(CheckpointError, match="outside the archive"):
        engine.add_weights(tmp_path / "evil.zip", "agd")
    with pytest.raises(CheckpointError):
        engine.add_weights(tmp_path / "my-agd.zip", "ip")  # an AGD folder is no IP-Adapter
    assert not list(engine.models_dir.glob(".upload-*")) and not (engine.root / "escape.txt").exists()


def test_cancel_stops_sampling_at_the_next_step_and_the_engine_keeps_working(engine):
    from studio.app.engine import GenerationCancelled
    from studio.mix import Mix

    seen = []

    def progress(i, n):
        seen.append(i)
        if i == 2:
            engine.cancel("s1")

    with pytest.raises(GenerationCancelled, match="after 3 of 40 steps"):
        engine.generate(Mix(sampling={"prompt": "x", "steps": 40, "width": 64, "height": 64}), session="s1",
                        progress=progress)
    assert seen == [1, 2]
    res = engine.generate(Mix(sampling={"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}))
    assert len(res.images) == 1 and Image.open(res.images[0]).size == (64, 64)


def test_video_files_gif_mp4_webm(tmp_path):
    import cv2

    from studio.app.export import write_video

    frames = [Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)) for i in range(6)]
    out = write_video(frames, tmp_path / "clip", fps=6)
    assert set(out) == {"gif", "mp4", "webm"}
    assert Image.open(out["gif"]).n_frames == 6 and Image.open(out["gif"]).size == (64, 48)
    cap = cv2.VideoCapture(str(out["mp4"]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 64


def test_a_video_model_writes_a_clip_and_a_still_carrying_the_mix(tmp_path):
    from studio.app.engine import Engine
    from studio.app.metadata import read_mix
    from studio.mix import Mix

    eng = Engine(model="tiny-video", models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    res = eng.generate(Mix(model="tiny-video", sampling={"prompt": "a fox", "steps": 2, "seed": 4, "num_frames": 5,
                                                         "fps": 5, "width": 64, "height": 64}))
    assert Image.open(res.videos["gif"]).n_frames == 5 and Image.open(res.videos["gif"]).size == (64, 64)
    assert res.videos["webm"].stat().st_size > 0
    mix = read_mix(res.images[0])
    assert mix.model == "tiny-video" and mix.sampling["num_frames"] == 5 and mix.sampling["fps"] == 5


def test_ui_forms_to_mix_and_back_restore_every_widget(engine):
    from studio.app.ui import StudioApp

    app = StudioApp(engine)
    app.build()
    ref = make_image(engine.root / "ui-ref.png", seed=9)
    u0, u1 = app.units[0], app.units[1]
    v = {app.prompt: "a cat", app.negative: "blur", app.seed: 42, app.steps: 7, app.width: 96, app.height: 64,
         app.sampler: "Euler a", app.guidance: "auto", app.cfg_scale: 6.0, app.count: 2, app.n_units: 3,
         app.frames: 16, app.fps: 8}
    for u in app.units:
        v.update({u.enabled: False, u.family: "ip", u.weights: None, u.weight: 1.0, u.start: 0.0, u.end: 1.0})
        v.update({c: None for c in u.fields.values()})
    v.update({u0.enabled: True, u0.weights: engine.names["ip"], u0.weight: 0.5, u0.start: 0.1, u0.end: 0.9,
              u0.fields[("ip", "image")]: [(str(ref), None)], u0.fields[("ip", "combine")]: "average",
              u0.fields[("ip", "blocks")]: "style only"})
    v.update({u1.enabled: True, u1.family: "agd", u1.weights: engine.names["agd"],
              u1.fields[("agd", "guidance_scale")]: 3.5})
    mix = app.forms_to_mix(v, 3)
    assert mix.sampling["guidance_scale"] == 3.5 and mix.sampling["sampler"] == "Euler a"
    assert mix.units[0].scale == {"up": {"block_1": [0.0, 0.5]}} and mix.units[0].inputs["combine"] == "average"
    assert Path(mix.units[0].inputs["image"][0]).parent == engine.inputs_dir
    assert mix.units[1].inputs == {"guidance_scale": 3.5}
    upd, warnings = app.mix_to_updates(engine.complete_mix(mix))
    assert warnings == []
    assert upd[app.prompt] == "a cat" and upd[app.seed] == 42 and upd[app.width] == 96 and upd[app.count] == 2
    assert upd[u0.enabled] is True and upd[u0.weight] == 0.5 and upd[u0.start] == 0.1
    assert upd[u0.fields[("ip", "blocks")]] == "style only" and upd[u0.fields[("ip", "combine")]] == "average"
    assert upd[u0.fields[("ip", "image")]] == mix.units[0].inputs["image"]
    assert upd[u1.family] == "agd" and upd[u1.fields[("agd", "guidance_scale")]] == 3.5
    assert upd[app.units[2].enabled] is False


def test_training_runner_matches_scripts_and_stops_a_run(tmp_path):
    from studio.app.training_runner import TrainingError, TrainingRunner

    cfgs, scripts = tmp_path / "configs", tmp_path / "scripts"
    cfgs.mkdir()
    scripts.mkdir()
    for name in ("agd", "agd_trajectories", "ip_adapter", "loop"):
        (scripts / f"{name}.py").write_text("")
    (scripts / "slow.py").write_text(
        "import json, os, sys, time\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        "os.makedirs(out + '/logs', exist_ok=True)\n"
        "for step in range(1, 1000):\n"
        "    open(out + '/logs/loss.jsonl', 'a').write(json.dumps({'step': step, 'loss': 1.0 / step}) + '\\n')\n"
        "    time.sleep(0.05)\n")
    for name in ("agd_tiny", "agd_tiny_trajectories", "ip_adapter_sd15", "slow_test", "orphan"):
        (cfgs / f"{name}.yaml").write_text("max_steps: 999\ndata_dir: x\n")
    r = TrainingRunner(configs_dir=cfgs, scripts_dir=scripts, runs_dir=tmp_path / "runs", launcher="python")
    assert {c: r._script_for(c).stem for c in r.configs()} == {
        "agd_tiny": "agd", "agd_tiny_trajectories": "agd_trajectories", "ip_adapter_sd15": "ip_adapter",
        "slow_test": "slow"}
    with pytest.raises(TrainingError, match="does not exist"):
        r.start("slow_test", data_dir=str(tmp_path / "nope"))
    run = r.start("slow_test", data_dir=str(tmp_path))
    assert "--data_dir" in run.command
    with pytest.raises(TrainingError, match="already going"):
        r.start("slow_test")
    deadline = time.time() + 30
    while (r.last_step() or 0) < 3 and time.time() < deadline:
        time.sleep(0.1)
    assert r.status()["state"] == "running" and r.status()["step"] >= 3
    r.stop()
    st = r.status()
    assert st["state"] == "stopped" and run.process.poll() is not None
    assert [x["step"] for x in r.losses()] == list(range(1, st["step"] + 1))


def test_example_presets_are_valid_mixes_that_load_into_the_ui(engine):
    from studio.app.ui import StudioApp
    from studio.app.units import preset_of_scale
    from studio.mix import Mix

    presets = sorted((Path(__file__).resolve().parents[1] / "configs" / "mixes").glob("*.json"))
    assert len(presets) >= 4
    app = StudioApp(engine)
    app.build()
    for path in presets:
        mix = Mix.load(path)
        upd, warnings = app.mix_to_updates(mix)
        assert upd[app.prompt] == mix.sampling["prompt"] and upd[app.n_units] == 3
        assert any("made with model 'sd15'" in w for w in warnings)  # presets are for SD1.5; the test runs tiny
        for i, unit in enumerate(mix.units):
            assert upd[app.units[i].family] == unit.family and upd[app.units[i].enabled] is True
    style = Mix.load(presets[[p.stem for p in presets].index("ip-style-only")])
    assert preset_of_scale(style.units[0].scale, SD15_UNET) == ("style only", 1.0)
