"""The one composing attention processor the studio installs on every attention layer."""

from __future__ import annotations

from typing import Any

import torch


class ComposingAttnProcessor:
    """Runs the layer's original processor once, then adds every attached adapter's gated contribution.

    The original processor (SDPA, xformers, a LoRA-aware or any custom one) is kept as `base`, so whatever the
    UNet did before attach it still does. With no adapter acting on this layer in this forward, the base output
    is returned untouched, which keeps a detached, zero-scaled or out-of-window stack bit-identical to the plain UNet.
    """

    def __init__(self, base: Any, layer: str, stack: Any):
        """`base`: the layer's original processor; `layer`: its processor name; `stack`: the `AdapterStack` whose
        `context` and `slots_for_layer` it reads (not imported here: the stack imports this module)."""
        self.base = base
        self.layer = layer
        self.stack = stack

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask, **kwargs)
        if getattr(self.stack, "static", False):
            return self._static(out, attn, hidden_states, encoder_hidden_states)
        ctx = self.stack.context
        slots = self.stack.slots_for_layer(self.layer)
        if ctx is None or not slots:
            return out
        for slot in slots:
            gate = slot.gate_for_layer(self.layer)
            if gate is None:
                continue
            contrib = slot.adapter.contribution(self.layer, attn, hidden_states, encoder_hidden_states, slot.state, ctx)
            if isinstance(gate, float):  # the same for every sample: one fused kernel
                out = torch.add(out, contrib, alpha=gate)
            else:
                out = out + slot.gate_tensor(gate, contrib, ctx) * contrib
        return out

    def _static(self, out: torch.Tensor, attn: torch.nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Compiled mode: every enabled adapter on this layer runs and is multiplied by its gate tensor (zero where
        it is off), so the traced graph has no branch on scales, windows or masks (`AdapterStack.compile`)."""
        ctx = self.stack.context
        if ctx is None:
            return out
        for slot, i in self.stack._static_layers.get(self.layer, ()):
            contrib = slot.adapter.contribution(self.layer, attn, hidden_states, encoder_hidden_states, slot.state, ctx)
            gate = slot._static_gates[i]
            if gate.shape[0] != contrib.shape[0]:  # video: [N] -> [N * frames], (b f) order
                gate = gate.repeat_interleave(contrib.shape[0] // gate.shape[0])
            out = out + gate.to(contrib.dtype).view(-1, *([1] * (contrib.ndim - 1))) * contrib
        return out
