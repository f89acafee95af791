"""Real ComfyUI 0.3.64 with the node pack: /object_info, each node's patch against the studio, exported workflows run
through POST /prompt, bad weights refused while the server keeps serving.

ComfyUI runs in its own venv, built once and cached outside the clone (tests/comfyui_env.py: ~4 min the first time,
instant after). The server is started from the cached source with a temporary --base-directory (the pack linked into
its custom_nodes, the tiny-sd15 checkpoint in its models); the parity checks run in the same venv as a script
(tests/comfyui_parity.py) while the server starts.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_env  # noqa: E402
from comfyui_harness import ComfyUI, make_models  # noqa: E402

from adapter_studio import Mix  # noqa: E402
from adapter_studio.comfy_workflow import export_comfy, node_specs  # noqa: E402
from adapter_studio.registry import families  # noqa: E402

#: parity tolerance: largest difference between ComfyUI's and the studio's final latents, relative to their largest
#: value (float32 on the CPU; measured ~1e-6, from the two attention implementations' rounding)
REL_TOL = 1e-5
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    t0 = time.time()
    env_dir = comfyui_env.ensure()
    TIMINGS["venv (build or cache)"] = time.time() - t0
    tmp = tmp_path_factory.mktemp("comfyui")
    server = ComfyUI(tmp, env_dir)
    server.env["OMP_NUM_THREADS"] = "1"  # tiny tensors: one thread is fastest, and the 2 cores are shared
    server.start()  # ComfyUI imports while the models are written
    t1 = time.time()
    server.weights = make_models(server.base / "models", tmp / "weights")
    parity = subprocess.Popen([str(comfyui_env.python(env_dir)), str(Path(__file__).parent / "comfyui_parity.py"),
                               str(env_dir / "ComfyUI"), str(comfyui_env.REPO), str(server.base / "models")],
                              cwd=tmp, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.wait_ready()
    TIMINGS["server ready"] = time.time() - t1
    server.parity_proc = parity
    server.tmp_dir = tmp
    try:
        yield server
    finally:
        server.stop()
        if parity.poll() is None:
            parity.kill()
        TIMINGS["total"] = time.time() - t0
        print("\nComfyUI timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def parity(comfy):
    out, err = comfy.parity_proc.communicate(timeout=300)
    assert comfy.parity_proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _bound_families():
    return [f for f in families() if f.comfy_nodes]


def test_object_info_lists_every_pack_node_with_its_types(comfy):
    info = comfy.get("/object_info")
    for fam in _bound_families():
        for spec in node_specs(fam):
            assert spec.class_type in info, f"{spec.class_type} ({fam.label}) is missing from /object_info"
            node = info[spec.class_type]
            assert node["output"] == [t for _, t in spec.outputs]
            assert node["output_name"] == [n for n, _ in spec.outputs]
            assert node["category"] == spec.category and node["display_name"] == spec.display_name
            for sock in spec.inputs:
                where = node["input"]["required" if sock.required else "optional"]
                assert sock.name in where, (spec.class_type, sock.name)
                declared = where[sock.name][0]
                if sock.type == "COMBO":
                    assert isinstance(declared, list)
                else:
                    assert declared == sock.type, (spec.class_type, sock.name, declared)
    # the loaders list the files of their models folders
    assert info["AdapterStudioIPAdapterLoader"]["input"]["required"]["weights"][0] == ["tiny-ip.safetensors"]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["tiny-sd15.safetensors"]
    assert "AdapterStudioCLIPVisionLoader" in info


def test_key_mapping_agrees_with_comfyui(parity):
    for layout in ("sd15", "sdxl"):
        assert parity[f"keymap_{layout}"]["compared"] > 200 and parity[f"keymap_{layout}"]["differ"] == []
    assert parity["loaded"] == "UNetModel"  # tiny-sd15 through CheckpointLoader's own detection


@pytest.mark.parametrize("case", ["plain", "ip", "ip_mask_window", "ip_style_only", "agd", "ctrl", "i2v"])
def test_each_patch_on_comfyuis_unet_gives_the_studios_output(parity, case):
    r = parity[case]
    assert r["max_abs"] <= REL_TOL * r["scale"], r
    if case != "plain":  # and the adapter did change the output, by far more than the tolerance
        assert r["effect"] >= 100 * max(r["max_abs"], 1e-6), r
    if case == "i2v":  # frame 0 is the image's latent
        assert r["frame0"] <= 1e-4, r


def _mix(units, model="tiny-sd15", **sampling):
    s = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 3, "steps": 2, "width": 64, "height": 64,
         "sampler": "Euler", "guidance": "auto", "guidance_scale": 4.0, **sampling}
    return Mix.from_dict({"version": 2, "model": model, "sampling": s, "units": units})


def _outputs(comfy, history):
    items = [img for out in history["outputs"].values() for img in out.get("images", [])]
    assert items, history
    return items, [comfy.view(item) for item in items]


@pytest.fixture(scope="module")
def mix_dir(comfy):
    d = comfy.tmp_dir / "mix"
    d.mkdir()
    Image.new("RGB", (40, 48), (200, 30, 30)).save(d / "ref.png")
    Image.new("L", (64, 64), 255).save(d / "mask.png")
    Image.effect_noise((64, 64), 60).convert("RGB").save(d / "hint.png")
    for name, path in comfy.weights.items():
        if name in ("ip", "agd", "controlnet", "i2v"):
            dest = d / Path(path).name
            (shutil.copytree if Path(path).is_dir() else shutil.copyfile)(path, dest)
    return d


UNITS = {
    "ip": [{"family": "ip", "weights": "tiny-ip.safetensors", "scale": 0.8,
            "inputs": {"image": "ref.png", "mask": "mask.png"}}],
    "agd": [{"family": "agd", "weights": "tiny-agd", "inputs": {"guidance_scale": 5.0}}],
    "ip+agd": [{"family": "ip", "weights": "tiny-ip.safetensors", "scale": 0.5, "end": 0.6,
                "inputs": {"image": "ref.png"}},
               {"family": "agd", "weights": "tiny-agd"}],
    "ctrl": [{"family": "ctrl", "weights": {"controlnet": "tiny-cn"}, "scale": 0.9,
              "inputs": {"image": "hint.png", "preprocessor": "none", "conditioning_scale": 0.8}}],
    "ctrl+ip": [{"family": "ctrl", "weights": {"controlnet": "tiny-cn"}, "inputs": {"image": "hint.png"}},
                {"family": "ip", "weights": "tiny-ip.safetensors", "inputs": {"image": "ref.png"}}],
    "i2v": [{"family": "i2v", "weights": "tiny-i2v", "inputs": {"image": "ref.png", "fsp_sharp_ratio": 0.5}}],
}
MODELS = {"i2v": "tiny-video"}
SAMPLING = {"i2v": {"num_frames": 4, "fps": 4}}


@pytest.mark.parametrize("name", list(UNITS))
def test_exported_api_workflow_runs_through_prompt(comfy, mix_dir, name):
    mix = _mix(UNITS[name], MODELS.get(name, "tiny-sd15"), **SAMPLING.get(name, {}))
    export = export_comfy(mix, base_dir=mix_dir)
    export.write(comfy.base)  # input/ and models/ into the ComfyUI folder, as a user copies them
    h = comfy.run(export.api)
    assert h["status"]["status_str"] == "success", json.dumps(h["status"])[:3000]
    (item,), (data,) = _outputs(comfy, h)
    if name == "i2v":  # a video file of the clip's frames
        import imageio.v3 as iio

        frames = iio.imread(io.BytesIO(data), extension=Path(item["filename"]).suffix, index=None)
        assert frames.shape[:3] == (4, 64, 64), frames.shape
    else:
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    # the UI workflow declares, per node, the widgets /object_info says it has
    info = comfy.get("/object_info")
    for node in export.ui["nodes"]:
        spec = info[node["type"]]["input"]
        entries = {**spec["required"], **spec.get("optional", {})}
        widgets = 0
        for key, entry in entries.items():
            if isinstance(entry[0], list) or entry[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                opts = entry[1] if len(entry) > 1 else {}
                widgets += 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))
        assert len(node["widgets_values"]) == widgets, node["type"]
        for inp in node["inputs"]:
            assert inp["name"] in entries and entries[inp["name"]][0] == inp["type"], (node["type"], inp)


def test_weights_of_another_family_fail_readably_and_the_server_keeps_serving(comfy, mix_dir):
    agd_dir = Path(comfy.weights["agd"])
    shutil.copytree(agd_dir, comfy.base / "models" / "ip" / "agd-by-mistake")
    export = export_comfy(_mix(UNITS["ip"]), base_dir=mix_dir)
    export.write(comfy.base)
    bad = json.loads(json.dumps(export.api))
    loader = next(n for n in bad.values() if n["class_type"] == "AdapterStudioIPAdapterLoader")
    loader["inputs"]["weights"] = "agd-by-mistake/diffusion_pytorch_model.safetensors"
    h = comfy.run(bad)
    assert h["status"]["status_str"] == "error"
    err = next(m[1] for m in h["status"]["messages"] if m[0] == "execution_error")
    assert err["node_type"] == "AdapterStudioIPAdapterLoader"
    assert "agd-by-mistake is not IP-Adapter weights" in err["exception_message"]
    assert "it is AGD guidance weights: load it with AdapterStudioAGDLoader" in err["exception_message"]
    assert comfy.get("/system_stats")["system"]
    ok = comfy.run(export.api)
    assert ok["status"]["status_str"] == "success"
