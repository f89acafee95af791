import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _studio_cache(tmp_path_factory):
    os.environ.setdefault("ADAPTER_STUDIO_CACHE", str(tmp_path_factory.mktemp("studio-cache")))


@pytest.fixture
def sd15_pipe():
    from studio.presets import load_pipeline

    return load_pipeline("tiny-sd15")


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 77, 32, generator=g))
