"""The inference cache: per layer, the short-conv window, the KV cache and the recurrent state.

Oryx keeps *both* token-mixing states current on every token, whatever its mode (DESIGN.md §3.1): the KV cache holds
the keys and values of linear-mode tokens too, and the recurrent state has absorbed attention-mode tokens too. A switch
therefore needs no conversion: the next token simply reads whichever state its mode selects.

Per layer (Oryx; baselines keep only the parts their mixer has):
    conv       [B, C, W-1]   the last W-1 inputs of the shared K/V short conv
    key, value [B, Tc, H, d] attention's view of every cached token (keys after RoPE)
    recurrent  [B, H, K, V]  the linear recurrence's state, float32
Per cache: key_mask [B, Tc] (False where a position was padding) and num_real [B] (real tokens so far, which gives the
rotary position of the next token of every row).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from oryx.configuration import OryxConfig


@dataclass
class LayerState:
    conv: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _fingerprint(config: OryxConfig) -> tuple:
    return (config.variant, config.num_hidden_layers, config.hidden_size, config.head_dim, config.conv_size)


class OryxCache:
    """Generation cache of an Oryx model (or a baseline). Created empty; every forward with it appends to it.

    Used as `model(input_ids, modes=..., cache=cache)` (or `past_key_values=cache`); the forward advances it in
    place and also returns it. `reorder_cache` serves beam search. Cropping is impossible (a recurrent state cannot be
    rewound), so assisted decoding is refused by `generate`.
    """

    is_compileable = False

    def __init__(self, config: OryxConfig):
        self.fingerprint = _fingerprint(config)
        self.layers = [LayerState() for _ in range(config.num_hidden_layers)]
        self.key_mask: torch.Tensor | None = None  # [B, Tc] bool
        self.num_real: torch.Tensor | None = None  # [B] long
        self.seq_len = 0

    @property
    def is_linear(self) -> list[bool]:
        return [layer.key is None for layer in self.layers]

    @property
    def batch_size(self) -> int | None:
        return None if self.num_real is None else self.num_real.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of positions (padding included) the cache has consumed."""
        return self.seq_len

    def check_compatible(self, config: OryxConfig, batch_size: int) -> None:
        if self.fingerprint != _fingerprint(config):
            raise ValueError(
                f"this cache was built for a different model (variant, layers, hidden, head_dim, conv = "
                f"{self.fingerprint}) than this one ({_fingerprint(config)}); create a new cache for this model"
            )
        if self.batch_size is not None and self.batch_size != batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows but input_ids has {batch_size}")

    def advance(self, new_mask: torch.Tensor) -> None:
        """Record that a forward consumed the positions of `new_mask` [B, T] (True = real token)."""
        if self.num_real is None:
            self.num_real = torch.zeros(new_mask.shape[0], dtype=torch.long, device=new_mask.device)
            self.key_mask = new_mask.new_zeros(new_mask.shape[0], 0)
        self.key_mask = torch.cat([self.key_mask, new_mask], dim=1)
        self.num_real = self.num_real + new_mask.sum(1)
        self.seq_len += new_mask.shape[1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows (beam search): every tensor of every layer, KV and recurrent alike."""
        for layer in self.layers:
            for name, tensor in layer.tensors().items():
                setattr(layer, name, tensor.index_select(0, beam_idx.to(tensor.device)))
        if self.num_real is not None:
            self.num_real = self.num_real.index_select(0, beam_idx.to(self.num_real.device))
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by each kind of state, summed over layers: {"kv", "recurrent", "conv"}."""
        total = {"kv": 0, "recurrent": 0, "conv": 0}
        for layer in self.layers:
            for name, tensor in layer.tensors().items():
                kind = "kv" if name in ("key", "value") else name
                total[kind] += tensor.numel() * tensor.element_size()
        return total
