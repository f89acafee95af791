"""The family contract in the core: registry, per-block scales, the typed mix (v2, v1 migration) and the layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter_studio import (AdapterStack, Family, Mix, MixError, StudioError, UnitSpec, WeightsFile, apply_mix,
                            get_family)
from adapter_studio.block_scale import check_scale_fits, layer_scale
from adapter_studio.mix import Sampling
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import families, register_family, unregister_family
from dummy_adapters import LinearAttnAdapter

ROOT = Path(__file__).resolve().parent.parent


def test_installed_families_come_from_entry_points():
    names = [f.name for f in families()]
    assert {"ip", "agd"} <= set(names)
    assert names.index("ip") < names.index("agd"), "display order follows Family.order"
    agd = get_family("agd")
    assert agd.guidance == "agd" and agd.field("guidance_scale").target == "guidance"
    assert get_family("ip").prompts_by_image == "image"
    with pytest.raises(MixError, match="unknown adapter family 'nope'; installed: .*agd.*ip"):
        get_family("nope")
    with pytest.raises(TypeError):
        register_family("ip")  # type: ignore[arg-type]


def test_family_weights_dict_and_required_files():
    fam = Family("two", "Two files", loader=lambda w, pipe: w,
                 weights=(WeightsFile("controlnet", "ControlNet"), WeightsFile("adapter", "Adapter", required=False)))
    assert fam.load({"controlnet": "cn"}, None) == {"controlnet": "cn", "adapter": None}
    assert fam.load("cn", None) == {"controlnet": "cn", "adapter": None}, "a plain path names the first file"
    with pytest.raises(MixError, match="needs controlnet"):
        fam.load({"adapter": "a"}, None)
    with pytest.raises(MixError, match="unknown weights \\['lora'\\]; this family loads controlnet, adapter"):
        fam.load({"controlnet": "cn", "lora": "x"}, None)


# ---------------------------------------------------------------------------------------------------------------
# per-block scales


def test_a_per_block_list_must_match_its_block(sd15_pipe):
    """diffusers refuses a list longer (or shorter) than the block; so does the stack, naming the count."""
    ad = LinearAttnAdapter(sd15_pipe.unet)
    stack = AdapterStack().attach(sd15_pipe.unet)
    with pytest.raises(StudioError, match="up block_1 lists 3 values; the block has 2 attention layers"):
        stack.add(ad, scale={"up": {"block_1": [0.0, 1.0, 0.0]}})
    with pytest.raises(StudioError, match="names down block_2, which has no attention layer"):
        stack.add(ad, scale={"down": {"block_2": 1.0}})
    slot = stack.add(ad, scale={"up": {"block_1": [0.0, 1.0]}})
    with pytest.raises(StudioError, match="lists 1 values"):
        slot.scale = {"up": {"block_1": [1.0]}}
    assert slot.scale == {"up": {"block_1": [0.0, 1.0]}}, "a refused scale leaves the slot as it was"
    stack.detach()


def test_video_per_block_scales_name_spatial_and_motion_layers_apart():
    unet = load_pipeline("tiny-video").unet
    layers = list(unet.attn_processors)
    spatial = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    motion = "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1.processor"
    assert spatial in layers and motion in layers
    assert layer_scale({"up": {"block_1": 0.7}}, spatial) == 0.7
    assert layer_scale({"up": {"block_1": 0.7}}, motion) == 0.0, "a spatial per-block scale never reaches motion"
    both = {"up": {"block_1": [0.7, 0.2]}, "motion": {"up": {"block_1": [0.5, 0.1]}}}
    assert layer_scale(both, motion) == 0.5 and layer_scale(both, spatial) == 0.7
    assert layer_scale({"motion": 0.3}, motion) == 0.3 and layer_scale({"motion": 0.3}, spatial) == 0.0
    assert layer_scale(0.4, motion) == 0.4
    check_scale_fits(both, layers)
    with pytest.raises(StudioError, match="motion up block_1 lists 3 values"):
        check_scale_fits({"motion": {"up": {"block_1": [1.0, 1.0, 1.0]}}}, layers)


# ---------------------------------------------------------------------------------------------------------------
# the mix


V1_MIX = {
    "format": "adapter-studio/mix", "version": 1, "model": "tiny-sd15",
    "sampling": {"prompt": "a cat", "negative_prompt": "", "seed": 7, "steps": 4, "width": 64, "height": 64,
                 "sampler": "DDIM", "guidance": "cfg", "guidance_scale": 5, "num_images": 1, "something_old": True},
    "units": [{"family": "ip", "weights": "ip/x.safetensors", "name": "ref", "enabled": True, "scale": 0.7,
               "start": 0.0, "end": 1.0, "inputs": {"image": ["a.png"]}, "sha256": "ab" * 32}],
}


def test_v1_mixes_are_migrated_and_written_as_v2():
    mix = Mix.from_dict(V1_MIX)
    assert mix.sampling == Sampling(prompt="a cat", seed=7, steps=4, width=64, height=64, guidance="cfg",
                                    guidance_scale=5.0)
    assert isinstance(mix.sampling.guidance_scale, float)
    unit = mix.units[0]
    assert unit.weights_paths() == {"weights": "ip/x.safetensors"} and unit.sha256 == "ab" * 32
    d = mix.to_dict()
    assert d["version"] == 2 and "something_old" not in d["sampling"]
    assert Mix.from_dict(json.loads(json.dumps(d))) == mix
    with pytest.raises(MixError, match="sampling: unknown keys \\['something_old'\\]"):
        Mix.from_dict({**d, "sampling": {**d["sampling"], "something_old": 1}})
    with pytest.raises(MixError, match="unknown keys \\['sample_mask'\\]"):  # version 1 had no per-sample switch
        Mix.from_dict({**V1_MIX, "units": [{**V1_MIX["units"][0], "sample_mask": [True]}]})


def test_sampling_is_typed_with_defaults_in_the_schema():
    s = Sampling()
    assert (s.steps, s.sampler, s.guidance, s.guidance_scale, s.num_images, s.seed) == (20, "DDIM", "auto", 7.5, 1, -1)
    assert s.width is None and s.num_frames is None
    bad = Sampling(steps=2.5, width=100, sampler="Heun++", guidance_scale=float("nan"), prompt=3)  # type: ignore
    problems = " | ".join(bad.problems())
    for needle in ("steps must be an integer", "width must be a multiple of 8", "sampler 'Heun++' is not one of",
                   "guidance_scale must be a number", "prompt must be text"):
        assert needle in problems
    with pytest.raises(MixError, match="steps must be an integer"):
        Mix.from_dict({"version": 2, "sampling": {"steps": 2.5}})
    assert Mix.from_dict({"version": 2, "sampling": {"steps": 20.0}}).sampling.steps == 20


def test_sample_mask_and_weights_dict_round_trip_and_reach_the_stack(sd15_pipe, tmp_path):
    torch.save(LinearAttnAdapter(sd15_pipe.unet, seed=4).state_dict(), tmp_path / "dummy.pt")
    seen = {}

    def load(weights, pipe):
        seen.update(weights)
        ad = LinearAttnAdapter(pipe.unet)
        ad.load_state_dict(torch.load(weights["weights"], weights_only=True))
        return ad

    register_family(Family("dummy-mask", "Dummy", loader=load))
    try:
        mix = Mix(units=[UnitSpec(family="dummy-mask", weights={"weights": "dummy.pt"}, name="d",
                                  sample_mask=[True, False], sha256={"weights": "00" * 32})])
        back = Mix.from_json(mix.to_json())
        assert back == mix
        sp = StudioPipeline(sd15_pipe)
        apply_mix(back, sp, base_dir=tmp_path)
        assert seen == {"weights": str(tmp_path / "dummy.pt")}, "relative weights resolve under base_dir"
        assert list(sp.stack["d"].sample_mask) == [True, False]
        with pytest.raises(MixError, match="sample_mask"):
            Mix.from_dict({"version": 2, "units": [{"family": "x", "sample_mask": [1, 0]}]})
    finally:
        unregister_family("dummy-mask")


# ---------------------------------------------------------------------------------------------------------------
# layering


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package inside adapter_studio
                out.add("." * node.level + (node.module or ""))
            else:
                out.add(node.module or "")
    return out


UPPER = ("adapter_studio.adapters", "adapter_studio.pipelines", "adapter_studio.webapp", "adapter_studio.train",
         "gradio")


def test_the_core_imports_no_family_pipeline_or_app():
    core = sorted((ROOT / "studio").glob("*.py"))
    assert core and not any(p.is_dir() and (p / "__init__.py").exists() for p in (ROOT / "studio").iterdir()), \
        "the core is flat: a subpackage would hide in the package of the core"
    for path in core:
        for name in _imports(path):
            assert not name.startswith(UPPER) and not name.startswith(("adapters", "pipelines", "webapp", "train")), \
                f"{path.name} imports {name}"
            assert not name.startswith(".."), f"{path.name} reaches above the core with {name}"
    # and at run time: importing every core module loads no upper layer
    code = ("import sys, importlib, pathlib\n"
            f"for p in sorted(pathlib.Path({str(ROOT / 'studio')!r}).glob('*.py')):\n"
            "    if p.stem != '__main__':  # runs the command line\n"
            "        importlib.import_module('adapter_studio' + ('' if p.stem == '__init__' else '.' + p.stem))\n"
            f"bad = [m for m in sys.modules if m.startswith({UPPER!r})]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_families_and_pipelines_do_not_import_the_app():
    for folder in ("adapters", "pipelines", "train"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                assert not name.startswith(("adapter_studio.webapp", "gradio")), f"{path} imports {name}"
    # the generic wrapper names no family (a family-specific pipeline such as image-to-video may import its family)
    path = ROOT / "pipelines" / "studio_pipeline.py"
    assert not any(n.startswith("adapter_studio.adapters") for n in _imports(path)), f"{path} names a family"


def test_one_namespace_no_generic_top_level_packages():
    code = ("import importlib.util, adapter_studio.adapters.ip_adapter\n"
            "assert [importlib.util.find_spec(n) for n in ('studio', 'adapters', 'pipelines', 'train', 'webapp')] "
            "== [None] * 5\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_shared_file_readers_give_one_clear_error(tmp_path):
    from adapter_studio.files import input_image, input_path, read_state_dict

    (tmp_path / "t.bin").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(StudioError, match="cannot read Thing weights .*t.bin.*truncated"):
        read_state_dict(tmp_path / "t.bin", "Thing weights")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(StudioError, match="holds a list, not a state dict of Thing weights"):
        read_state_dict(tmp_path / "list.pt", "Thing weights")
    (tmp_path / "a.txt").write_text("not an image")
    assert input_path("a.txt", tmp_path, "x") == tmp_path / "a.txt"
    with pytest.raises(MixError, match="input 'ref': a.txt is not an image PIL can read"):
        input_image("a.txt", tmp_path, "ref")
    with pytest.raises(MixError, match="input 'ref': 'nope.png' does not exist"):
        input_image("nope.png", tmp_path, "ref")
