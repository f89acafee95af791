"""IP-Adapter checks that need a GPU (skipped on a machine without CUDA, where there is nothing to check)."""

import numpy as np
import pytest
import torch

from test_ip_adapter import _img, _random_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_half_precision_matches_diffusers_on_cuda(tmp_path, kind):
    from adapter_studio.adapters.ip_adapter import load_ip_adapter, save_original
    from adapter_studio.pipelines import StudioPipeline
    from adapter_studio.presets import load_pipeline

    path = save_original(_random_adapter(load_pipeline("tiny-sd15"), kind), tmp_path / "ip.bin")
    dpipe = load_pipeline("tiny-sd15").to("cuda", torch.float16)
    dpipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.bin", image_encoder_folder=None)
    studio = StudioPipeline(load_pipeline("tiny-sd15").to("cuda", torch.float16))
    studio.add(load_ip_adapter(path, studio.pipe.unet, studio.pipe.image_encoder), "ip", image=_img(0))
    kw = dict(num_inference_steps=3, output_type="np", height=64, width=64)
    ref = dpipe("a cat", ip_adapter_image=_img(0), generator=torch.Generator().manual_seed(0), **kw).images
    out = studio("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    studio.stack["ip"].scale = 0.0
    bare = studio("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 1e-2 < np.abs(bare - ref).max()


def test_mixed_precision_training_with_validation_on_cuda(tmp_path):
    from adapter_studio.adapters.ip_adapter.training import main, write_demo_data

    data = write_demo_data(tmp_path / "data", 8, size=48)
    out = tmp_path / "run"
    result = main(["--config", "configs/train/ip_adapter_tiny.yaml", "--output_dir", str(out), "--data_dir",
                   str(data), "--make_demo_data", "0", "--max_steps", "4", "--train_batch_size", "4",
                   "--mixed_precision", "fp16", "--checkpointing_steps", "2", "--validation_steps", "2",
                   "--validation_num_inference_steps", "2", "--report_to", "none"])
    assert result["step"] == 4 and all(np.isfinite(result["losses"]))
    assert (out / "validation" / "step-000004.png").is_file() and (out / "final" / "ip_adapter.safetensors").is_file()
