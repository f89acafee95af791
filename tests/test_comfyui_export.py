"""A studio mix as a ComfyUI workflow (fast, no ComfyUI): API and UI format, the files it needs, refusals, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

from adapter_studio import Family, Mix, MixError
from adapter_studio.comfy_workflow import export_comfy, node_specs
from adapter_studio.registry import get_family, register_family, unregister_family


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory):
    """A folder with a reference image, a mask, tiny IP-Adapter and AGD weights, and mixes using them."""
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import IPAdapter, save_original
    from adapter_studio.presets import load_pipeline

    d = tmp_path_factory.mktemp("mix")
    unet = load_pipeline("tiny-sd15").unet
    save_original(IPAdapter.from_unet(unet, image_embed_dim=24), d / "tiny-ip.safetensors")
    AGDAdapter.from_unet(unet, hidden_dim=16).save_pretrained(d / "tiny-agd")
    Image.new("RGB", (40, 48), (200, 30, 30)).save(d / "ref.png")
    Image.new("RGB", (40, 48), (0, 90, 200)).save(d / "ref2.png")
    Image.new("L", (64, 64), 255).save(d / "mask.png")
    return d


def mix(**units) -> Mix:
    sampling = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 5, "steps": 3, "width": 64,
                "height": 64, "sampler": "Euler", "guidance": "auto", "guidance_scale": 4.0}
    return Mix.from_dict({"version": 2, "model": "tiny-sd15", "sampling": sampling,
                          "units": [u for _, u in sorted(units.items())]})


IP = {"family": "ip", "weights": "tiny-ip.safetensors", "scale": 0.7, "start": 0.0, "end": 0.8,
      "inputs": {"image": ["ref.png", "ref2.png"], "mask": "mask.png", "combine": "average"}}
AGD = {"family": "agd", "weights": "tiny-agd", "inputs": {"guidance_scale": 6.0}}


def _by_class(api: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for node in api.values():
        out.setdefault(node["class_type"], []).append(node)
    return out


def _check_links(api: dict, ui: dict) -> None:
    """Every API link names an existing node's output; the UI links agree with the API's and with the nodes."""
    for nid, node in api.items():
        assert set(node) == {"class_type", "inputs", "_meta"}
        for value in node["inputs"].values():
            if isinstance(value, list):
                src, index = value
                assert isinstance(src, str) and src in api and isinstance(index, int) and index >= 0
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert set(map(str, nodes)) == set(api)
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid and nodes[dst]["inputs"][dst_slot]["type"] == typ
        name = nodes[dst]["inputs"][dst_slot]["name"]
        assert api[str(dst)]["inputs"][name] == [str(src), src_slot]
    assert ui["last_link_id"] == len(ui["links"]) and ui["last_node_id"] == max(nodes)
    positions = [tuple(n["pos"]) for n in ui["nodes"]]
    assert len(set(positions)) == len(positions), "no two nodes on top of each other"
    for n in ui["nodes"]:  # inputs flow left to right
        for inp in n["inputs"]:
            src = next(link[1] for link in ui["links"] if link[0] == inp["link"])
            assert nodes[src]["pos"][0] < n["pos"][0]


def test_ip_and_agd_mix_as_api_and_ui_workflow(mix_dir):
    m = mix(a=IP, b=AGD)
    ex = export_comfy(m, base_dir=mix_dir)
    api, ui = ex.api, ex.ui
    _check_links(api, ui)
    by = _by_class(api)
    assert [n["inputs"]["ckpt_name"] for n in by["CheckpointLoaderSimple"]] == ["tiny-sd15.safetensors"]
    assert sorted(n["inputs"]["text"] for n in by["CLIPTextEncode"]) == ["a red cube", "blurry"]
    (ks,) = by["KSampler"]
    # AGD replaces CFG: one pass per step, w on the AGD node
    assert ks["inputs"]["cfg"] == 1.0 and ks["inputs"]["seed"] == 5 and ks["inputs"]["steps"] == 3
    assert (ks["inputs"]["sampler_name"], ks["inputs"]["scheduler"]) == ("euler", "normal")
    (agd,) = by["AdapterStudioApplyAGD"]
    assert agd["inputs"]["guidance_scale"] == 6.0 and agd["inputs"]["weight"] == 1.0
    (ip,) = by["AdapterStudioApplyIPAdapter"]
    assert ip["inputs"]["weight"] == 0.7 and ip["inputs"]["end_at"] == 0.8 and ip["inputs"]["combine"] == "average"
    # the chain: checkpoint -> IP -> AGD -> KSampler
    ckpt_id = next(k for k, v in api.items() if v["class_type"] == "CheckpointLoaderSimple")
    ip_id = next(k for k, v in api.items() if v["class_type"] == "AdapterStudioApplyIPAdapter")
    agd_id = next(k for k, v in api.items() if v["class_type"] == "AdapterStudioApplyAGD")
    assert ip["inputs"]["model"] == [ckpt_id, 0] and agd["inputs"]["model"] == [ip_id, 0]
    assert ks["inputs"]["model"] == [agd_id, 0]
    # two reference images batched, the mask through ImageToMask, CLIP vision from the pack's loader
    (batch,) = by["ImageBatch"]
    assert ip["inputs"]["image"][0] == next(k for k, v in api.items() if v is batch)
    (tomask,) = by["ImageToMask"]
    assert tomask["inputs"]["channel"] == "red"
    assert [n["inputs"]["clip_name"] for n in by["AdapterStudioCLIPVisionLoader"]] == \
        ["tiny-sd15-image-encoder.safetensors"]
    loads = sorted(n["inputs"]["image"] for n in by["LoadImage"])
    assert all(f"input/{name}" in ex.files for name in loads) and len(loads) == 3
    assert by["AdapterStudioIPAdapterLoader"][0]["inputs"]["weights"] == "tiny-ip.safetensors"
    assert by["AdapterStudioAGDLoader"][0]["inputs"]["weights"] == "tiny-agd/diffusion_pytorch_model.safetensors"
    assert ex.files["models/ip/tiny-ip.safetensors"] == str(mix_dir / "tiny-ip.safetensors")
    assert ex.files["models/agd/tiny-agd"] == str(mix_dir / "tiny-agd")
    assert by["SaveImage"] and by["VAEDecode"] and by["EmptyLatentImage"][0]["inputs"] == \
        {"width": 64, "height": 64, "batch_size": 1}
    # UI: widgets in INPUT_TYPES order, the KSampler's seed followed by its control widget
    ks_ui = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    assert ks_ui["widgets_values"] == [5, "fixed", 3, 1.0, "euler", "normal", 1.0]
    _, apply_spec = node_specs(get_family("ip"))
    ip_ui = next(n for n in ui["nodes"] if n["type"] == "AdapterStudioApplyIPAdapter")
    assert ip_ui["widgets_values"] == [ip["inputs"][s.name] for s in apply_spec.inputs if s.widget]
    assert [i["name"] for i in ip_ui["inputs"]] == ["model", "ip", "clip_vision", "image", "mask"]


def test_cfg_mix_and_per_block_scale(mix_dir):
    unit = {**IP, "scale": {"up": {"block_1": [0.0, 0.9, 0.0]}}, "inputs": {"image": "ref.png"}}
    ex = export_comfy(mix(a=unit), base_dir=mix_dir, checkpoint="my-sd15.safetensors", clip_vision="vit-h.safetensors")
    by = _by_class(ex.api)
    assert by["KSampler"][0]["inputs"]["cfg"] == 4.0
    assert by["CheckpointLoaderSimple"][0]["inputs"]["ckpt_name"] == "my-sd15.safetensors"
    assert by["AdapterStudioCLIPVisionLoader"][0]["inputs"]["clip_name"] == "vit-h.safetensors"
    ip = by["AdapterStudioApplyIPAdapter"][0]["inputs"]
    assert ip["blocks"] == "custom" and json.loads(ip["custom_scale"]) == unit["scale"] and ip["weight"] == 1.0
    assert "mask" not in ip and "ImageBatch" not in by


def test_write_and_zip_carry_the_workflow_and_its_files(mix_dir, tmp_path):
    ex = export_comfy(mix(a=IP, b=AGD), base_dir=mix_dir)
    out = ex.write(tmp_path / "out")
    assert json.loads((out / "workflow_api.json").read_text()) == ex.api
    assert json.loads((out / "workflow.json").read_text()) == ex.ui
    assert (out / "models/agd/tiny-agd/config.json").is_file() and (out / "models/ip/tiny-ip.safetensors").is_file()
    assert len(list((out / "input").glob("adapter_studio_*.png"))) == 3
    assert "comfyui_adapter_studio" in (out / "README.txt").read_text()
    names = zipfile.ZipFile(ex.write_zip(tmp_path / "z" / "w.zip")).namelist()
    assert {"workflow.json", "workflow_api.json", "README.txt", "models/ip/tiny-ip.safetensors",
            "models/agd/tiny-agd/config.json"} <= set(names)


def test_refusals_name_what_comfyui_cannot_take(mix_dir):
    register_family(Family(name="nonodes", label="No Nodes", loader=lambda w, p: None))
    try:
        with pytest.raises(MixError, match=r"the No Nodes family \('nonodes'\) has no ComfyUI nodes"):
            export_comfy(mix(a=IP, b={"family": "nonodes", "weights": "x"}), base_dir=mix_dir)
        # a disabled unit of such a family is left out
        export_comfy(mix(a=IP, b={"family": "nonodes", "weights": "x", "enabled": False}), base_dir=mix_dir)
    finally:
        unregister_family("nonodes")
    with pytest.raises(MixError, match="sample_mask"):
        export_comfy(mix(a={**IP, "sample_mask": [True, False]}), base_dir=mix_dir)
    with pytest.raises(MixError, match=r"inputs \['image_embeds'\] have no socket"):
        export_comfy(mix(a={**IP, "inputs": {"image": "ref.png", "image_embeds": "e.safetensors"}}), base_dir=mix_dir)
    with pytest.raises(MixError, match="'Reference images' \\(image\\) is required"):
        export_comfy(mix(a={**IP, "inputs": {}}), base_dir=mix_dir)
    with pytest.raises(MixError, match="replaces classifier-free guidance"):
        m = mix(b=AGD)
        m.sampling.guidance = "cfg"
        export_comfy(m, base_dir=mix_dir)
    m = mix(a=IP)
    m.sampling.seed = -1
    with pytest.raises(MixError, match="seed is -1"):
        export_comfy(m, base_dir=mix_dir)
    with pytest.raises(MixError, match="'nope.png' does not exist"):
        export_comfy(mix(a={**IP, "inputs": {"image": "nope.png"}}), base_dir=mix_dir)


def test_command_line(mix_dir, tmp_path):
    (mix_dir / "m.json").write_text(mix(a=IP, b=AGD).to_json())
    r = subprocess.run([sys.executable, "-m", "adapter_studio", "export-comfy", str(mix_dir / "m.json"),
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "workflow_api.json").is_file() and "workflow.json" in r.stdout
    r = subprocess.run([sys.executable, "-m", "adapter_studio", "export-comfy", str(mix_dir / "m.json"),
                        str(tmp_path / "z"), "--zip"], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "z" / "m-comfyui.zip").is_file()
    (mix_dir / "bad.json").write_text(mix(a={**IP, "sample_mask": [False]}).to_json())
    r = subprocess.run([sys.executable, "-m", "adapter_studio", "export-comfy", str(mix_dir / "bad.json"),
                        str(tmp_path / "b")], capture_output=True, text=True)
    assert r.returncode == 2 and "sample_mask" in r.stderr and "Traceback" not in r.stderr
