"""A real training task for the shared loop's tests: a linear attention adapter on the tiny UNet, noise MSE.

The noise target is drawn from the global torch RNG at every step, so exact resume also checks the RNG restore.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dummy_adapters import LinearAttnAdapter
from adapter_studio.presets import load_pipeline
from adapter_studio.stack import AdapterStack
from adapter_studio.train.loop import TrainingTask


class StackModel(nn.Module):
    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.stack = AdapterStack().attach(unet)
        self.stack.add(adapter, name="dummy")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = self.unet(batch["x"], batch["t"], batch["text"]).sample
        return nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


class DummyTask(TrainingTask):
    def build(self):
        unet = load_pipeline(self.cfg.model).unet
        adapter = LinearAttnAdapter(unet, seed=3)
        return StackModel(unet, adapter), adapter

    def dataloader(self):
        g = torch.Generator().manual_seed(0)
        n = 8
        data = [{"x": torch.randn(4, 16, 16, generator=g), "t": torch.randint(0, 1000, (), generator=g),
                 "text": torch.randn(77, 32, generator=g)} for _ in range(n)]
        return torch.utils.data.DataLoader(data, batch_size=self.cfg.train_batch_size, shuffle=True)

    def save_adapter(self, adapter: nn.Module, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, folder / "adapter.safetensors")
