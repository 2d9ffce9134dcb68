"""Per-token next-token losses, shared by evaluation (perplexity, MQAR) and router training (`oryx.routing`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target that is not scored


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [B, T] (float32) of `targets` [B, T] under `logits` [B, T, V]; 0 where a target is
    `IGNORE_INDEX`."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view_as(targets)
