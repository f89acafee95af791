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
    from adapter_studio.webapp.engine import Engine, Limits

    root = tmp_path_factory.mktemp("engine")
    names = make_models_dir(root / "models")
    eng = Engine(model="tiny-sd15", models_dir=root / "models", outputs_dir=root / "outputs",
                 limits=Limits(max_input_pixels=200 * 200, max_steps=50))
    eng.names = names
    eng.root = root
    return eng


def test_block_presets_are_instantstyle_layers():
    from adapter_studio.block_scale import block_preset_scale, preset_of_scale

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
    from adapter_studio.block_scale import block_preset_scale, layer_scale

    cfg = engine.unet_config()
    with engine.pool.borrow() as sp:
        layers = [n for n in sp.pipe.unet.attn_processors if n.endswith("attn2.processor")]
    scale = block_preset_scale("style only", 0.9, cfg)
    on = {n: layer_scale(scale, n) for n in layers if layer_scale(scale, n)}
    assert on == {"up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor": 0.9}


def test_png_metadata_and_sidecar_round_trip(tmp_path):
    from adapter_studio.webapp.metadata import MIX_CHUNK, read_mix, save_png_with_mix
    from adapter_studio.errors import MixError
    from adapter_studio.mix import Mix, UnitSpec

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
    from adapter_studio.errors import MixError
    from adapter_studio.mix import Mix, UnitSpec

    agd = UnitSpec("agd", engine.names["agd"])
    bad = Mix(model="tiny-sd15", units=[agd, agd, UnitSpec("nope", "x"), UnitSpec("ip", "missing.bin")],
              sampling={"prompt": "", "steps": 500, "width": 100, "sampler": "Magic"})
    with pytest.raises(MixError) as err:
        engine.complete_mix(bad)
    msg = str(err.value)
    for part in ["2 guidance units are enabled (AGD guidance, AGD guidance)", "family 'nope' is not installed",
                 "'missing.bin' not found", "steps must be an integer in [1, 50]", "width must be a multiple of 8",
                 "sampler 'Magic'", "the prompt is empty"]:
        assert part in msg, (part, msg)
    with pytest.raises(MixError, match="needs an enabled AGD guidance unit"):
        engine.complete_mix(Mix(sampling={"prompt": "x", "guidance": "agd"}))
    with pytest.raises(MixError, match="made for model 'sd15'"):
        engine.complete_mix(Mix(model="sd15", sampling={"prompt": "x"}))
    # an image prompt can stand in for the text prompt; disabled units are dropped; a random seed is drawn
    ref = engine.inputs.store(make_image(engine.root / "r.png"))
    ok = engine.complete_mix(Mix(units=[UnitSpec("ip", engine.names["ip"], inputs={"image": [str(ref)]}),
                                        UnitSpec("agd", engine.names["agd"], enabled=False)],
                                 sampling={"prompt": "", "seed": -1}))
    assert [u.family for u in ok.units] == ["ip"] and 0 <= ok.sampling.seed < 2**32
    assert ok.sampling.guidance == "cfg" and ok.sampling.width == ok.sampling.height == engine.default_size
    assert ok.units[0].weights == {"weights": engine.names["ip"]}  # recorded mixes hold the dict forms
    assert set(ok.units[0].sha256) == {"weights"} and len(ok.units[0].sha256["weights"]) == 64


def test_uploaded_images_are_checked_and_stored_by_content(engine, tmp_path):
    from adapter_studio.webapp.stores import InputImageError

    (tmp_path / "a.png").write_text("hello")
    with pytest.raises(InputImageError, match="not an image"):
        engine.inputs.store(tmp_path / "a.png", "unit 1 reference")
    with pytest.raises(InputImageError, match="the cap is 0.0 MP|the cap is 0.04 MP"):
        engine.inputs.store(make_image(tmp_path / "big.png", (300, 300)))
    a = engine.inputs.store(make_image(tmp_path / "x.png", seed=1))
    Image.open(tmp_path / "x.png").save(tmp_path / "x.bmp")
    assert engine.inputs.store(tmp_path / "x.bmp") == a and a.parent == engine.inputs_dir


def test_weights_listing_upload_and_path_rules(engine, tmp_path):
    from adapter_studio.errors import CheckpointError, MixError

    assert engine.list_weights("ip") == [engine.names["ip"]]
    assert engine.list_weights("agd") == [engine.names["agd"]]
    with pytest.raises(MixError, match="outside the models folder"):
        engine.weights.resolve("../../etc/passwd")
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
    from adapter_studio.webapp.engine import GenerationCancelled
    from adapter_studio.mix import Mix

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
    import imageio.v3 as iio

    from adapter_studio.webapp.outputs import write_video

    frames = [Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)) for i in range(6)]
    out = write_video(frames, tmp_path / "clip", fps=6)
    assert set(out) == {"gif", "mp4", "webm"}
    assert Image.open(out["gif"]).n_frames == 6 and Image.open(out["gif"]).size == (64, 48)
    for fmt, codec in (("mp4", "h264"), ("webm", "vp8")):
        meta = iio.immeta(out[fmt], plugin="FFMPEG")
        assert meta["fps"] == 6 and meta["codec"].startswith(codec), meta
        assert iio.imread(out[fmt], plugin="FFMPEG", index=None).shape == (6, 48, 64, 3)


def test_a_video_model_writes_a_clip_and_a_still_carrying_the_mix(tmp_path):
    from adapter_studio.mix import VIDEO_DEFAULTS, Mix
    from adapter_studio.webapp.engine import Engine
    from adapter_studio.webapp.metadata import read_mix

    eng = Engine(model="tiny-video", models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    res = eng.generate(Mix(model="tiny-video", sampling={"prompt": "a fox", "steps": 2, "seed": 4, "num_frames": 5,
                                                         "fps": 5, "width": 64, "height": 64}))
    assert Image.open(res.videos["gif"]).n_frames == 5 and Image.open(res.videos["gif"]).size == (64, 64)
    assert res.videos["webm"].stat().st_size > 0
    mix = read_mix(res.images[0])
    assert mix.model == "tiny-video" and mix.sampling.num_frames == 5 and mix.sampling.fps == 5
    # frames and fps left unset: the schema's video defaults, recorded
    res = eng.generate(Mix(model="tiny-video", sampling={"prompt": "a fox", "steps": 1, "seed": 4, "width": 64,
                                                         "height": 64}))
    assert (res.mix.sampling.num_frames, res.mix.sampling.fps) == (VIDEO_DEFAULTS["num_frames"], VIDEO_DEFAULTS["fps"])


def test_ui_forms_to_mix_and_back_restore_every_widget(engine):
    from adapter_studio.webapp.ui import StudioApp

    app = StudioApp(engine)
    app.build()
    g = app.generate
    ref = make_image(engine.root / "ui-ref.png", seed=9)
    u0, u1 = g.units[0], g.units[1]
    v = {g.prompt: "a cat", g.negative: "blur", g.seed: 42, g.steps: 7, g.width: 96, g.height: 64,
         g.sampler: "Euler a", g.guidance: "auto", g.cfg_scale: 6.0, g.count: 2, g.n_units: 3,
         g.frames: 16, g.fps: 8}
    for u in g.units:
        v.update({u.enabled: False, u.family: "ip", u.weight: 1.0, u.start: 0.0, u.end: 1.0})
        v.update({c: None for c in [*u.weights, *u.fields.values()]})
    v.update({u0.enabled: True, u0.weights[0]: engine.names["ip"], u0.weight: 0.5, u0.start: 0.1, u0.end: 0.9,
              u0.fields[("ip", "image")]: [(str(ref), None)], u0.fields[("ip", "combine")]: "average",
              u0.fields[("ip", "blocks")]: "style only"})
    v.update({u1.enabled: True, u1.family: "agd", u1.weights[0]: engine.names["agd"],
              u1.fields[("agd", "guidance_scale")]: 3.5})
    mix = g.forms_to_mix(v, 3)
    assert mix.sampling.guidance_scale == 3.5 and mix.sampling.sampler == "Euler a"
    assert mix.units[0].weights == {"weights": engine.names["ip"]}
    assert mix.units[0].scale == {"up": {"block_1": [0.0, 0.5]}} and mix.units[0].inputs["combine"] == "average"
    assert Path(mix.units[0].inputs["image"][0]).parent == engine.inputs_dir
    assert mix.units[1].inputs == {"guidance_scale": 3.5}
    upd, warnings = g.mix_to_updates(engine.complete_mix(mix))
    assert warnings == []
    assert upd[g.prompt] == "a cat" and upd[g.seed] == 42 and upd[g.width] == 96 and upd[g.count] == 2
    assert upd[u0.enabled] is True and upd[u0.weight] == 0.5 and upd[u0.start] == 0.1
    assert upd[u0.weights[0]]["value"] == engine.names["ip"]
    assert upd[u0.fields[("ip", "blocks")]] == "style only" and upd[u0.fields[("ip", "combine")]] == "average"
    assert upd[u0.fields[("ip", "custom_scale")]]["visible"] is False
    assert upd[u0.fields[("ip", "image")]] == mix.units[0].inputs["image"]
    assert upd[u1.family] == "agd" and upd[u1.fields[("agd", "guidance_scale")]] == 3.5
    assert upd[g.units[2].enabled] is False
    # the UI is built from the families: the guidance choices and the header name them, nothing is hard-wired
    assert [c[1] for c in g.guidance.choices] == ["auto", "cfg", "agd"]


def test_a_v1_mix_in_a_png_still_loads_runs_and_restores_the_ui(engine, tmp_path):
    """Mix version 1 (sampling an untyped object, one weights path and one sha256 string per unit) as the studio used
    to write it into PNGs: read, migrated, run (recorded as version 2 with dict weights) and shown in the UI."""
    from PIL import PngImagePlugin

    from adapter_studio.webapp.metadata import MIX_CHUNK, read_mix
    from adapter_studio.webapp.ui import StudioApp

    v1 = ('{"format": "adapter-studio/mix", "version": 1, "model": "tiny-sd15", '
          '"sampling": {"prompt": "an old fox", "negative_prompt": "", "seed": 9, "steps": 2, "width": 64, '
          '"height": 64, "sampler": "DDIM", "guidance": "agd", "guidance_scale": 4.0, "num_images": 1}, '
          '"units": [{"family": "agd", "weights": "%s", "name": "agd0", "enabled": true, "scale": 0.7, '
          '"start": 0.0, "end": 1.0, "inputs": {"guidance_scale": 4.0}, "sha256": "%s"}]}'
          % (engine.names["agd"], "abc" * 21 + "d"))
    info = PngImagePlugin.PngInfo()
    info.add_text(MIX_CHUNK, v1)
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "v1.png", pnginfo=info)
    mix = read_mix(tmp_path / "v1.png")
    assert mix.sampling.prompt == "an old fox" and mix.sampling.guidance == "agd" and mix.sampling.seed == 9
    assert mix.units[0].weights == engine.names["agd"] and mix.units[0].sha256 == "abc" * 21 + "d"
    res = engine.generate(mix)
    rec = read_mix(res.images[0])
    assert rec.to_dict()["version"] == 2 and rec.units[0].weights == {"weights": engine.names["agd"]}
    assert rec.units[0].sha256["weights"] != "abc" * 21 + "d" and rec.sampling.guidance_scale == 4.0
    app = StudioApp(engine)
    app.build()
    g = app.generate
    upd, warnings = g.mix_to_updates(mix)
    assert upd[g.prompt] == "an old fox" and upd[g.units[0].family] == "agd" and upd[g.units[0].weight] == 0.7
    assert upd[g.units[0].weights[0]]["value"] == engine.names["agd"]
    assert any("changed since this mix was made" in w for w in warnings), warnings  # the recorded hash differs


def test_training_runner_takes_scripts_from_the_families_and_stops_a_run(tmp_path):
    from adapter_studio.family import Family, TrainingScript, WeightsFile
    from adapter_studio.registry import register_family, unregister_family
    from adapter_studio.webapp.training_runner import TrainingError, TrainingRunner

    # the installed families' entries pick the checkout's scripts: first glob match, families then entries in order
    real = TrainingRunner()
    picks = {c: (real.entry_for(c)[1].script, real.data_key(c))
             for c in ("agd_tiny", "agd_tiny_trajectories", "ip_adapter_tiny")}
    assert picks == {"agd_tiny": ("train/agd.py", "trajectories"),
                     "agd_tiny_trajectories": ("train/agd_trajectories.py", None),
                     "ip_adapter_tiny": ("train/ip_adapter.py", "data_dir")}

    cfgs, scripts = tmp_path / "configs", tmp_path / "scripts"
    cfgs.mkdir()
    scripts.mkdir()
    (scripts / "record.py").write_text("")
    (scripts / "slow.py").write_text(
        "import json, os, sys, time\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        "os.makedirs(out + '/logs', exist_ok=True)\n"
        "for step in range(1, 1000):\n"
        "    open(out + '/logs/loss.jsonl', 'a').write(json.dumps({'step': step, 'loss': 1.0 / step}) + '\\n')\n"
        "    time.sleep(0.05)\n")
    for name in ("slow_test", "slow_test_record", "orphan"):
        (cfgs / f"{name}.yaml").write_text("max_steps: 999\n")
    # a family of two weights files whose training makes the second (as Ctrl trains its adapter, not its ControlNet)
    fam = register_family(Family(name="slowfam", label="Slow family", loader=lambda weights, pipe: None, order=1,
                                 weights=(WeightsFile("base", "Base"), WeightsFile("adapter", "Adapter", folder="slowad")),
                                 training=(TrainingScript("scripts/record.py", "slow_*_record.yaml", data_key=None,
                                                          produces_adapter=False),
                                           TrainingScript("scripts/slow.py", "slow_*.yaml", data_key="data_root",
                                                          weights="adapter"))))
    try:
        r = TrainingRunner(configs_dir=cfgs, root=tmp_path, runs_dir=tmp_path / "runs", launcher="python")
        assert r.configs() == ["slow_test", "slow_test_record"]  # no family's glob takes "orphan"
        assert r.entry_for("slow_test_record")[1].script == "scripts/record.py"
        with pytest.raises(TrainingError, match="'orphan' not found"):
            r.start("orphan")
        with pytest.raises(TrainingError, match="takes no data folder"):
            r.start("slow_test_record", data_dir=str(tmp_path))
        with pytest.raises(TrainingError, match="does not exist"):
            r.start("slow_test", data_dir=str(tmp_path / "nope"))
        run = r.start("slow_test", data_dir=str(tmp_path))
        assert run.family is fam and run.command[run.command.index("--data_root") + 1] == str(tmp_path.resolve())
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
        with pytest.raises(TrainingError, match="no final adapter yet"):
            r.add_to_models(tmp_path / "models")
        (run.output_dir / "final").mkdir()
        (run.output_dir / "final" / "config.json").write_text("{}")
        assert r.add_to_models(tmp_path / "models") == f"slowad/{run.output_dir.name}"
        assert (tmp_path / "models" / "slowad" / run.output_dir.name / "config.json").is_file()
        # a run whose entry makes no adapter (a trajectory recorder) is refused by "Add to models"
        rec = r.start("slow_test_record", output_dir=str(tmp_path / "rec"))
        rec.process.wait(30)
        (rec.output_dir / "final").mkdir()
        with pytest.raises(TrainingError, match="does not make an adapter"):
            r.add_to_models(tmp_path / "models")
    finally:
        unregister_family("slowfam")


def test_example_presets_are_valid_mixes_that_load_into_the_ui(engine):
    from adapter_studio.block_scale import preset_of_scale
    from adapter_studio.mix import Mix
    from adapter_studio.webapp.ui import StudioApp

    presets = sorted((Path(__file__).resolve().parents[1] / "configs" / "mixes").glob("*.json"))
    assert len(presets) >= 4
    app = StudioApp(engine)
    app.build()
    g = app.generate
    for path in presets:
        mix = Mix.load(path)
        upd, warnings = g.mix_to_updates(mix)
        assert upd[g.prompt] == mix.sampling.prompt and upd[g.n_units] == 3
        # the presets are for SD1.5 or the toy model; the test runs tiny-sd15, so each says what it was made for
        assert any(f"made with model '{mix.model}'" in w for w in warnings)
        for i, unit in enumerate(mix.units):
            assert upd[g.units[i].family] == unit.family and upd[g.units[i].enabled] is True
    style = Mix.load(presets[[p.stem for p in presets].index("ip-style-only")])
    assert preset_of_scale(style.units[0].scale, SD15_UNET) == ("style only", 1.0)


def test_a_shared_folder_lists_each_familys_weights_for_that_family_only(tmp_path):
    """models/toy holds every family's weights side by side, and a whole pipeline folder: each dropdown lists only
    the folders whose config names a class it loads (it listed all of them, the first being the default)."""
    import shutil

    from adapter_studio.webapp.engine import Engine

    shipped = Path(__file__).resolve().parents[1] / "models" / "toy"
    models = tmp_path / "models"
    shutil.copytree(shipped, models / "toy")
    (models / "shared.safetensors").write_bytes(b"")  # a loose file: still listed for every family
    eng = Engine(model="tiny-sd15", models_dir=models, outputs_dir=tmp_path / "outputs")
    assert eng.list_weights("ip") == ["shared.safetensors", "toy/ip-adapter"]
    assert eng.list_weights("agd") == ["shared.safetensors", "toy/agd"]
    assert eng.list_weights("i2v") == ["shared.safetensors", "toy/i2v-adapter"]
    assert eng.list_weights("ctrl", 0) == ["shared.safetensors", "toy/controlnet-mask"]
    assert eng.list_weights("ctrl", 1) == ["shared.safetensors", "toy/ctrl-adapter-mask"]
    assert not any("toy-sd15" in name for name in eng.list_weights(None))  # a pipeline is a model, not weights
