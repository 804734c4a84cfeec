"""Is a model's output a plain linear head? The fused loss and the online teacher compute logits themselves then.

A head is plain when `logits = softcap(base_model(...).last_hidden_state @ W.T + b)`: an `nn.Linear` output
embedding and no logit scale (`logit_scale` / `logits_scaling` in the config, which the chunked path does not apply).
"""

from __future__ import annotations

import torch
from torch import nn

_SCALE_KEYS = ("logit_scale", "logits_scaling")


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when its logits are plain `hidden @ W.T (+ b)` (softcap aside), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in _SCALE_KEYS)
    return head if isinstance(head, nn.Linear) and not scaled else None


def softcap_of(model: nn.Module) -> float | None:
    """The final logit soft-capping `c` (logits = c tanh(z / c)), or None."""
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def head_of(model: nn.Module) -> tuple[torch.Tensor, float | None] | None:
    """The output head of an HF causal LM as (weight [V, H], final logit softcap or None), or None.

    None means the fused loss cannot reproduce the model's logits or their gradients (no plain linear
    head, a head bias, or a logit scale the fused path does not apply): use the dense path then.
    """
    head = linear_head(model)
    if head is None or head.bias is not None:
        return None
    return head.weight, softcap_of(model)
