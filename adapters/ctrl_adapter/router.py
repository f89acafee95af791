"""Fusing several conditions: each through its own ControlNet, then weighted per residual before the shared adapter.

* `sum`: every present condition with weight 1 (diffusers' `MultiControlNetModel`; the plain-ControlNet default);
* `equal`: 1 / (number of present conditions) (the release's `equal_weights` router);
* `router`: a learned `CtrlRouter` — per ControlNet residual one logit per condition, softmax over the conditions
  present for that sample (an absent condition is masked out, as the release masks it with -1e6).

"Present" is per sample (and per frame): a condition without a control image there, outside its step window, with
conditioning scale 0, or on the unconditional half in guess mode is absent.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from adapter_studio.errors import StudioError

FUSIONS = ("sum", "equal", "router")


class RouterWeights(nn.Module):
    """One residual's logits `[K]`: a bias-free `Linear(1, K)` applied to the constant 1 (the release's
    `SimpleWeights`, key `wg.weight` `[K, 1]`)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(1, num_experts, bias=False)

    def forward(self) -> torch.Tensor:
        return self.wg.weight[:, 0]


class CtrlRouter(ModelMixin, ConfigMixin):
    """Learned fusion weights: `down_blocks_router.{i}.wg.weight` `[K, 1]` per ControlNet down residual i and
    `mid_block_router.wg.weight`, the release's `ControlNetRouter` (router_type `simple_weights`) layout.

    Args:
        num_experts: number of conditions K.
        num_routers: number of ControlNet down residuals (12 for SD1.5).
        add_mid_block_router: a router for the mid residual (else it is fused with equal weights).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_experts: int = 2, num_routers: int = 12, add_mid_block_router: bool = True):
        super().__init__()
        self.down_blocks_router = nn.ModuleList([RouterWeights(num_experts) for _ in range(num_routers)])
        self.mid_block_router = RouterWeights(num_experts) if add_mid_block_router else None
        for p in self.parameters():  # a new router starts as equal fusion: the softmax of zero logits
            nn.init.zeros_(p)

    def logits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`([num_routers, K], [K] or None)`."""
        down = torch.stack([r() for r in self.down_blocks_router])
        return down, (self.mid_block_router() if self.mid_block_router is not None else None)


def fusion_weights(present: torch.Tensor, num_residuals: int, fusion: str, router: CtrlRouter | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights of each condition, for each ControlNet residual.

    Args:
        present: `[n, K]` bools, which conditions are present for each row (rows with none are the caller's to skip).
        num_residuals: ControlNet down residuals.
        fusion: one of `FUSIONS`.
        router: the learned router (`fusion="router"`).

    Returns:
        `([num_residuals, n, K], [n, K])`: down and mid weights; absent conditions get exactly 0.
    """
    mask = present.to(dtype)
    n, k = present.shape
    if fusion == "sum":
        w = mask
        return w.expand(num_residuals, n, k), w
    if fusion == "equal":
        w = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return w.expand(num_residuals, n, k), w
    if fusion != "router":
        raise StudioError(f"Ctrl-Adapter fusion {fusion!r} is not one of {', '.join(FUSIONS)}")
    if router is None:
        raise StudioError("fusion='router' needs a router (a `router/` folder beside the Ctrl-Adapter weights)")
    if router.config.num_experts != k or len(router.down_blocks_router) != num_residuals:
        raise StudioError(f"the router weighs {router.config.num_experts} conditions over "
                          f"{len(router.down_blocks_router)} residuals; this unit has {k} conditions and the "
                          f"ControlNets give {num_residuals} residuals")
    down_logits, mid_logits = router.logits()
    neg = torch.finfo(down_logits.dtype).min
    absent = ~present.to(down_logits.device)
    down = torch.softmax(down_logits[:, None, :].expand(-1, n, -1).masked_fill(absent, neg), dim=-1)
    if mid_logits is None:
        mid = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    else:
        mid = torch.softmax(mid_logits[None, :].expand(n, -1).masked_fill(absent, neg), dim=-1)
    # a row whose conditions are all absent would be uniform: zero it like the others
    keep = present.any(dim=1).to(down.device, down.dtype)[:, None]
    return (down * keep).to(dtype), (mid.to(keep) * keep).to(dtype)
