"""Oryx: multi-mixer language models that switch between softmax attention and a linear recurrence per token."""

ATTN = 0
LINEAR = 1

__version__ = "0.1.0"
