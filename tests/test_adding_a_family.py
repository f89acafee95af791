"""docs/adding_a_family.md: its minimal family, run as written, works through the registry, a mix and the pipeline."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_studio import IncompatibleAdapterError, Mix, UnitSpec, apply_mix, families
from adapter_studio.pipelines import StudioPipeline
from adapter_studio.presets import load_pipeline
from adapter_studio.registry import unregister_family

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding_a_family.md"


@pytest.fixture
def offset_family():
    code = re.search(r"## A minimal family.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {"__name__": "offset_family"}
    exec(compile(code, str(DOC), "exec"), scope)
    yield scope
    unregister_family("offset")


def _gen(sp: StudioPipeline) -> np.ndarray:
    return sp("a red house", num_inference_steps=3, height=64, width=64, output_type="np",
              generator=torch.Generator().manual_seed(0)).images


def test_the_documented_family_runs_through_a_mix(offset_family, sd15_pipe, tmp_path):
    assert "offset" in [f.name for f in families()]
    adapter = offset_family["OffsetAdapter"].from_unet(sd15_pipe.unet)
    with torch.no_grad():
        for i, p in enumerate(adapter.offsets):
            p.copy_(torch.linspace(-0.5, 0.5, p.shape[0]) * (i + 1))
    adapter.save(tmp_path / "offset.safetensors")
    sp = StudioPipeline(sd15_pipe)
    base = _gen(sp)
    mix = Mix(units=[UnitSpec(family="offset", weights="offset.safetensors", inputs={"strength": 0.0}, name="o")])
    apply_mix(Mix.from_json(mix.to_json()), sp, base_dir=tmp_path)
    assert np.array_equal(_gen(sp), base), "strength 0 adds exactly nothing"
    mix.units[0].inputs = {"strength": 1.5}
    apply_mix(mix, sp, base_dir=tmp_path)
    loaded = sp.stack["o"].adapter
    want = dict(zip(adapter.names, adapter.offsets))
    assert sorted(loaded.names) == sorted(want)
    assert all(torch.equal(p, want[n]) for n, p in zip(loaded.names, loaded.offsets)), "weights round-trip"
    assert not np.allclose(_gen(sp), base, atol=1e-3)


def test_the_documented_family_refuses_another_base_model(offset_family, tmp_path):
    xl = load_pipeline("tiny-sdxl")
    offset_family["OffsetAdapter"].from_unet(load_pipeline("tiny-sd15").unet).save(tmp_path / "sd15.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="this UNet has"):
        offset_family["FAMILY"].load(str(tmp_path / "sd15.safetensors"), xl)
