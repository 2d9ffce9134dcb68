"""The optimizer recipe shared by `oryx train` and the MQAR runner: AdamW with weight decay off the parameters the
modules tag, and the learning-rate schedule (linear warm-up, then cosine).

    optimizer = adamw(model, lr=6e-3, weight_decay=0.1)          # betas (0.9, 0.95), as the paper
    for group in optimizer.param_groups: group["lr"] = 6e-3 * lr_factor(step, total, 0.1, 0.1)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oryx.layers.common import no_decay_names


def split_decay(
    model: nn.Module, decay_embeddings: bool = True
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decayed, not decayed) parameters by name. Not decayed: what the modules tag (`no_weight_decay`: norm weights,
    the recurrences' decay, step and skip parameters), biases, and the embedding when `decay_embeddings` is False. The
    tied LM head is the embedding and appears once."""
    tagged = no_decay_names(model)
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = {}, {}
    for name, param in model.named_parameters():
        skip = name in tagged or (id(param) in embedding and not decay_embeddings)
        (no_decay if skip else decay)[name] = param
    return decay, no_decay


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = True,
) -> torch.optim.AdamW:
    """AdamW over two groups: `split_decay`'s decayed parameters at `weight_decay`, the others at 0."""
    decay, no_decay = split_decay(model, decay_embeddings)
    groups = [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over `warmup_ratio` of the steps, then cosine from 1 down to `min_ratio` at the last step."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
