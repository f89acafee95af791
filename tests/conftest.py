import os

# Spinning OpenMP workers wait for a core the other process holds: with 2 cores and a second process (the app, an
# accelerate worker) busy, a two-thread loop ran 40x slower without this. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _studio_cache(tmp_path_factory):
    os.environ.setdefault("ADAPTER_STUDIO_CACHE", str(tmp_path_factory.mktemp("studio-cache")))


@pytest.fixture
def sd15_pipe():
    from adapter_studio.presets import load_pipeline

    return load_pipeline("tiny-sd15")


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 77, 32, generator=g))
