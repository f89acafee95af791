"""The shipped toy models do their jobs: fast versions of bench/quality.py's measures on held-out scenes, each against
the same model without the adapter (or chance), by a margin stated in the test. docs/quality.md has the full-size
numbers these margins were set under (the small runs here land near them; the margins leave room for that).

Pictures are read back with `toyworld.metrics.analyze`, itself tested exact on rendered scenes (test_toyworld.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_studio.toyworld import quality
from adapter_studio.toyworld.quality import CHANCE

MODELS = Path(__file__).resolve().parents[1] / "models" / "toy"
N, STEPS = 24, 12


@pytest.fixture(scope="module")
def sp():
    from adapter_studio.pipelines import StudioPipeline

    return StudioPipeline.from_preset("toy-sd15")


def test_base_model_draws_the_caption(sp):
    res = quality.base_model(sp, n=N, steps=STEPS)
    s = res.scores
    assert s["color"] >= CHANCE["color"] + 0.5, s
    assert s["shape"] >= CHANCE["shape"] + 0.1, s  # shapes come out rounded: the weakest of the three
    assert s["position"] >= CHANCE["position"] + 0.4, s


def test_ip_adapter_carries_the_reference(sp):
    from adapter_studio.adapters.ip_adapter import load_ip_adapter

    ip = load_ip_adapter(str(MODELS / "ip-adapter"), sp.pipe.unet, sp.pipe.image_encoder)
    s = quality.ip_adapter(sp, ip, n=48, steps=20).scores  # fewer samples or steps land too near the bar
    assert s["color_ip"] >= s["color_none"] + 0.25, s
    assert s["color_ip"] >= CHANCE["color"] + 0.25, s


def test_ctrl_adapter_follows_the_mask(sp):
    from adapter_studio.adapters.ctrl_adapter import load_ctrl_adapter

    ctrl = load_ctrl_adapter(str(MODELS / "controlnet-mask"), adapter=str(MODELS / "ctrl-adapter-mask"),
                             unet=sp.pipe.unet)
    s = quality.ctrl_adapter(sp, ctrl, n=N, steps=STEPS).scores
    assert s["iou_ctrl"] >= s["iou_none"] + 0.04, s  # the captions already say where and how big


def test_agd_is_closer_to_cfg_than_one_unguided_pass(sp):
    from adapter_studio.adapters.agd import AGDAdapter

    s = quality.agd(sp, AGDAdapter.from_pretrained(str(MODELS / "agd")), n=N, steps=STEPS).scores
    assert s["psnr_to_cfg_agd"] >= s["psnr_to_cfg_unguided"] + 1.0, s


def test_i2v_adapter_starts_from_the_frame_and_keeps_it():
    from adapter_studio.adapters.i2v_adapter import load_i2v_adapter
    from adapter_studio.pipelines import StudioPipeline

    video = StudioPipeline.from_preset("toy-video")
    i2v = load_i2v_adapter(str(MODELS / "i2v-adapter"), video.pipe.unet)
    s = quality.i2v_adapter(video, i2v, n=4, steps=STEPS).scores
    assert s["frame0_psnr_i2v"] >= s["frame0_psnr_none"] + 5.0, s
    assert s["neighbour_psnr_i2v"] >= s["neighbour_psnr_none"] + 2.0, s
