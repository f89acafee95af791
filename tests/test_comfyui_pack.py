"""The ComfyUI node pack without ComfyUI (fast): node interfaces, the diffusers <-> ComfyUI block mapping for the SD1.5
and SDXL layouts, and the pack's nodes called with stand-ins for ComfyUI's objects."""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack imported as ComfyUI imports it, with a `folder_paths` stand-in listing one models folder."""
    models = tmp_path_factory.mktemp("comfy-models")
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.supported_pt_extensions = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
    fp.folder_names_and_paths = {"controlnet": ([str(models / "controlnet")], fp.supported_pt_extensions),
                                 "clip_vision": ([str(models / "clip_vision")], fp.supported_pt_extensions)}

    def files(folder):
        root = Path(fp.folder_names_and_paths[folder][0][0])
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def full_path(folder, name):
        p = Path(fp.folder_names_and_paths[folder][0][0]) / name
        if not p.exists():
            raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")
        return str(p)

    fp.get_filename_list = files
    fp.get_full_path_or_raise = full_path
    saved = sys.modules.get("folder_paths")
    sys.modules["folder_paths"] = fp
    sys.path.insert(0, str(ROOT))
    try:
        import comfyui_adapter_studio

        yield SimpleNamespace(module=comfyui_adapter_studio, fp=fp, models=models)
    finally:
        sys.path.remove(str(ROOT))
        if saved is None:
            sys.modules.pop("folder_paths", None)
        else:
            sys.modules["folder_paths"] = saved


# ---------------------------------------------------------------------------------------------------------------
# interfaces


def test_every_node_declares_a_consistent_interface(pack):
    from adapter_studio.comfy_workflow import node_specs
    from adapter_studio.registry import families

    classes, names = pack.module.NODE_CLASS_MAPPINGS, pack.module.NODE_DISPLAY_NAME_MAPPINGS
    assert set(classes) == set(names)
    for name, cls in classes.items():
        types_ = cls.INPUT_TYPES()
        assert set(types_) <= {"required", "optional"}
        declared = list(types_["required"]) + list(types_.get("optional", {}))
        fn = getattr(cls, cls.FUNCTION)
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        assert [p.name for p in params] == declared, name
        for p in params:  # required inputs have no default; optional ones default to None
            assert (p.default is inspect.Parameter.empty) == (p.name in types_["required"]), (name, p.name)
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) >= 1
        assert isinstance(cls.CATEGORY, str) and cls.CATEGORY.startswith("adapter_studio")
        for key, spec in types_["required"].items():
            assert isinstance(spec, tuple) and (isinstance(spec[0], (str, list))), (name, key)
    # every family with ComfyUI nodes has them in the pack, as its contract says
    bound = {f.name for f in families() if f.comfy_nodes and f.comfy_nodes[0] in classes}
    assert {"ip", "agd"} <= bound
    for fam in families():
        if fam.name in bound:
            loader, apply = node_specs(fam)
            assert classes[loader.class_type].RETURN_TYPES == (loader.outputs[0][1],)
            assert classes[apply.class_type].RETURN_TYPES[0] == "MODEL"
            assert fam.name in classes[apply.class_type].INPUT_TYPES()["required"]


@pytest.fixture(scope="module")
def weights(pack):
    """Tiny IP-Adapter and AGD weights in the stand-in models folder (models/ip, models/agd)."""
    from adapter_studio.adapters.agd import AGDAdapter
    from adapter_studio.adapters.ip_adapter import IPAdapter, save_original
    from adapter_studio.presets import load_pipeline

    unet = load_pipeline("tiny-sd15").unet
    (pack.models / "ip").mkdir(exist_ok=True)
    save_original(IPAdapter.from_unet(unet, image_embed_dim=24), pack.models / "ip" / "tiny-ip.safetensors")
    AGDAdapter.from_unet(unet, hidden_dim=16).save_pretrained(pack.models / "agd" / "tiny-agd")
    return pack.models


def test_loader_and_apply_nodes_return_what_they_declare(pack, weights, sd15_pipe):
    """Called with stand-ins for ComfyUI's MODEL / CLIP_VISION: the tuples have RETURN_TYPES' length, the MODEL is a
    clone carrying attn2 patches, the original is untouched."""
    from comfyui_adapter_studio import block_keys

    nodes = pack.module.NODE_CLASS_MAPPINGS

    class Patcher:
        def __init__(self, patches=None):
            self.model = SimpleNamespace(
                model_config=SimpleNamespace(unet_config=block_keys.comfy_unet_config(sd15_pipe.unet.config)),
                adapter_studio_norm_groups=16, diffusion_model=None, model_sampling=None)
            self.patches = patches or {}

        def clone(self):
            return Patcher({k: list(v) for k, v in self.patches.items()})

        def _add(self, name, fn):
            self.patches.setdefault(name, []).append(fn)

        def set_model_attn2_patch(self, fn):
            self._add("attn2_patch", fn)

        def set_model_attn2_output_patch(self, fn):
            self._add("attn2_output_patch", fn)

    model = Patcher()
    (ip,) = nodes["AdapterStudioIPAdapterLoader"]().load(weights="tiny-ip.safetensors")
    assert len(nodes["AdapterStudioIPAdapterLoader"].RETURN_TYPES) == 1
    cv = SimpleNamespace(encode_image=lambda img: {"image_embeds": torch.randn(img.shape[0], 24)})
    out = nodes["AdapterStudioApplyIPAdapter"]().apply(model=model, ip=ip, clip_vision=cv,
                                                       image=torch.rand(1, 32, 32, 3), combine="concat", blocks="style only", custom_scale="",
                                                       weight=0.7, start_at=0.0, end_at=1.0)
    assert len(out) == len(nodes["AdapterStudioApplyIPAdapter"].RETURN_TYPES) == 1
    assert out[0] is not model and not model.patches
    assert len(out[0].patches["attn2_patch"]) == len(out[0].patches["attn2_output_patch"]) == 1
    (agd,) = nodes["AdapterStudioAGDLoader"]().load(weights="tiny-agd/diffusion_pytorch_model.safetensors")
    (m2,) = nodes["AdapterStudioApplyAGD"]().apply(model=out[0], agd=agd, guidance_scale=5.0, weight=1.0,
                                                   start_at=0.0, end_at=1.0)
    assert len(m2.patches["attn2_output_patch"]) == 2 and len(out[0].patches["attn2_output_patch"]) == 1
    patch = m2.patches["attn2_output_patch"][0].__self__
    attn2 = [n for n in sd15_pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(patch.layers.values()) == sorted(attn2)  # every attn2 of tiny-sd15, keyed by ComfyUI block
    assert ("middle", 0, 0) in patch.layers and ("input", 1, 0) in patch.layers


def test_a_weights_file_of_another_family_is_refused_with_a_readable_error(pack, weights):
    nodes = pack.module.NODE_CLASS_MAPPINGS
    import shutil

    shutil.copytree(pack.models / "agd" / "tiny-agd", pack.models / "ip" / "agd-by-mistake")
    from adapter_studio.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"agd-by-mistake is not IP-Adapter weights .*AGDAdapter.*"
                                              r"it is AGD guidance weights: load it with AdapterStudioAGDLoader"):
        nodes["AdapterStudioIPAdapterLoader"]().load(weights="agd-by-mistake/diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# the block mapping


def _meta_unet(cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


SD15_DIFFUSERS = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                      attention_head_dim=8,
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_DIFFUSERS = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                      attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("layout,cfg,expected,n_params", [
    ("sd15", SD15_DIFFUSERS, {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2": ("input", 1, 0),
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2": ("input", 2, 0),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2": ("input", 4, 0),
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2": ("input", 8, 0),
        "mid_block.attentions.0.transformer_blocks.0.attn2": ("middle", 0, 0),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2": ("output", 3, 0),
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2": ("output", 5, 0),
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2": ("output", 11, 0)}, 686),
    ("sdxl", SDXL_DIFFUSERS, {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2": ("input", 4, 0),
        "down_blocks.1.attentions.1.transformer_blocks.1.attn2": ("input", 5, 1),
        "down_blocks.2.attentions.0.transformer_blocks.9.attn2": ("input", 7, 9),
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2": ("input", 8, 9),
        "mid_block.attentions.0.transformer_blocks.9.attn2": ("middle", 0, 9),
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2": ("output", 0, 0),
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2": ("output", 2, 9),
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2": ("output", 5, 1)}, 1680),
])
def test_block_keys_of_the_sd15_and_sdxl_layouts(layout, cfg, expected, n_params):
    from comfyui_adapter_studio import block_keys

    unet = _meta_unet(cfg)
    layers = block_keys.attention_layers(unet.config)
    # every cross-attention of the real diffusers UNet, in its processor order, and nothing else
    assert list(layers) == [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    for name, key in expected.items():
        assert layers[name] == key
        assert block_keys.block_key(name + ".processor", unet.config) == key
        assert block_keys.layer_for_key(key, unet.config) == name
    assert len(set(layers.values())) == len(layers)
    assert block_keys.attention_layers(unet.config, "attn1")["mid_block.attentions.0.transformer_blocks.0.attn1"] \
        == ("middle", 0, 0)
    # the weight names: every parameter placed, once, in the ldm layout
    sd = unet.state_dict()
    ldm = block_keys.convert_unet_state_dict(sd, unet.config)
    assert len(sd) == len(ldm) == n_params
    assert "input_blocks.0.0.weight" in ldm and "out.2.weight" in ldm and "middle_block.1.proj_in.weight" in ldm
    # ComfyUI's config of this layout round-trips to the same diffusers module tree
    back = _meta_unet(block_keys.diffusers_config(block_keys.comfy_unet_config(unet.config)))
    assert {k: tuple(v.shape) for k, v in back.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    with pytest.raises(ValueError, match="not a spatial attention layer"):
        block_keys.block_key("down_blocks.0.motion_modules.0.transformer_blocks.0.attn1", unet.config)


def test_block_keys_of_the_tiny_presets():
    from comfyui_adapter_studio import block_keys

    from adapter_studio.presets import load_preset

    for preset in ("tiny-sd15", "tiny-sdxl"):
        unet = _meta_unet(load_preset(preset).config["unet"])
        sd = unet.state_dict()
        assert len(block_keys.convert_unet_state_dict(sd, unet.config)) == len(sd)
        cu = block_keys.comfy_unet_config(unet.config)
        back = _meta_unet(block_keys.diffusers_config(cu, norm_num_groups=unet.config.norm_num_groups))
        assert list(back.attn_processors) == list(unet.attn_processors)
