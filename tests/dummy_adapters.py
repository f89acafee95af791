"""Small adapters used by the foundation tests: real nn.Modules run through the real stack."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapter_studio.adapter import AttentionAdapter, ResidualAdapter
from adapter_studio.context import ForwardContext


def attention_layers(unet: nn.Module, target: str) -> dict[str, nn.Module]:
    """`{processor name: Attention module}` of the UNet's spatial attn1 / attn2 layers."""
    out = {}
    for name in unet.attn_processors:
        if f".{target}.processor" in name and "motion_modules" not in name:
            out[name] = unet.get_submodule(name[: -len(".processor")])
    return out


class LinearAttnAdapter(AttentionAdapter):
    """Adds `W_l @ hidden_states` (+ the mean text token through `V_l` for attn2) at every layer l of `target`."""

    family = "dummy"

    def __init__(self, unet: nn.Module, target: str = "attn2", seed: int = 0, std: float = 0.05):
        super().__init__()
        self.target = target
        layers = attention_layers(unet, target)
        self.names = list(layers)
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.ModuleList()
        self.text = nn.ModuleList()
        for attn in layers.values():
            lin = nn.Linear(attn.to_q.in_features, attn.to_out[0].out_features)
            nn.init.normal_(lin.weight, std=std, generator=g)
            nn.init.normal_(lin.bias, std=std, generator=g)
            self.proj.append(lin)
            txt = nn.Linear(attn.to_k.in_features, attn.to_out[0].out_features, bias=False)
            nn.init.normal_(txt.weight, std=std, generator=g)
            self.text.append(txt)
        self.prepared: list[ForwardContext] = []

    def layer_names(self) -> list[str]:
        return self.names

    def prepare(self, inputs: dict[str, Any], ctx: ForwardContext) -> Any:
        self.prepared.append(ctx)
        return inputs

    def contribution(self, layer, attn, hidden_states, encoder_hidden_states, state, ctx):
        i = self.names.index(layer)
        out = self.proj[i](hidden_states)
        if encoder_hidden_states is not None and self.target == "attn2":
            out = out + self.text[i](encoder_hidden_states.mean(1, keepdim=True))
        return out


class ConstantResidualAdapter(ResidualAdapter):
    """Residuals = learned constants broadcast over the batch (shapes of the UNet's down-block outputs)."""

    family = "dummy-residual"

    def __init__(self, shapes: list[tuple[int, ...]], mid_shape: tuple[int, ...], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.down = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes])
        self.mid = nn.Parameter(torch.randn(mid_shape, generator=g) * 0.1)

    def residuals(self, inputs, ctx, call):
        n = call.sample.shape[0]
        return [d.expand(n, *d.shape) for d in self.down], self.mid.expand(n, *self.mid.shape)
