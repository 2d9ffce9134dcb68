"""The inference cache: per layer, the short-conv window, the KV cache and the recurrent state.

Oryx keeps *both* token-mixing states current on every token, whatever its mode (docs/design.md §9.1): the KV cache
holds the keys and values of linear-mode tokens too, and the recurrent state has absorbed attention-mode tokens too. A
switch therefore needs no conversion: the next token simply reads whichever state its mode selects.

Per layer (Oryx; baselines keep only the parts their mixer has):
    conv       [B, C, W-1]   the last W-1 inputs of the shared K/V short conv
    key, value [B, Tc, H, d] attention's view of every cached token (keys after RoPE)
    recurrent  [B, H, K, V]  the linear recurrence's state, float32
Per cache: key_mask [B, Tc] (False where a position was padding), num_real [B] (real tokens so far, which gives the
rotary position of the next token of every row), the modes of every cached position, and an adaptive schedule's
budget counts (`routing`, `oryx.routing.budget.RoutingState`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oryx.configuration import OryxConfig
from oryx.routing.budget import RoutingState


@dataclass
class LayerState:
    """One layer's cache. The KV cache lives in buffers that grow geometrically, so appending a token costs O(1)
    amortised (a `torch.cat` per token would copy the whole cache every step); `key`/`value` are views of the
    filled part."""

    conv: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None
    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None
    kv_len: int = 0
    write_index: torch.Tensor | None = None  # [1] long on the device: set once the cache is static (make_static)

    @property
    def key(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, : self.kv_len]

    @property
    def value(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, : self.kv_len]

    def append_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, T, H, d] and return every cached key and value, these included (a static cache: one
        token written at the device-side index, and the whole fixed-size buffers returned)."""
        if self.write_index is not None:
            self.key_buffer.index_copy_(1, self.write_index, k)
            self.value_buffer.index_copy_(1, self.write_index, v)
            self.kv_len += 1
            return self.key_buffer, self.value_buffer
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Differentiable use of a cache (rare): in-place writes would break autograd, so concatenate.
            keys = k if self.key is None else torch.cat([self.key, k], dim=1)
            values = v if self.value is None else torch.cat([self.value, v], dim=1)
            self.key_buffer, self.value_buffer, self.kv_len = keys, values, keys.shape[1]
            return keys, values
        end = self.kv_len + k.shape[1]
        if self.key_buffer is None or end > self.key_buffer.shape[1]:
            capacity = max(end, 2 * (0 if self.key_buffer is None else self.key_buffer.shape[1]), 64)
            self.key_buffer = _grow(self.key_buffer, self.kv_len, capacity, k)
            self.value_buffer = _grow(self.value_buffer, self.kv_len, capacity, v)
        self.key_buffer[:, self.kv_len : end] = k
        self.value_buffer[:, self.kv_len : end] = v
        self.kv_len = end
        return self.key, self.value

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("conv", "recurrent", "key_buffer", "value_buffer")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _grow(buffer: torch.Tensor | None, filled: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    """A buffer of `capacity` positions holding the first `filled` positions of `buffer`, zeros after them: a static
    cache's attention reads the spare positions under a mask, and a masked softmax weight of 0 times an uninitialised
    NaN would still be NaN."""
    grown = like.new_zeros(like.shape[0], capacity, *like.shape[2:])
    if buffer is not None:
        grown[:, :filled] = buffer[:, :filled]
    return grown


def static_kv_buffer(buffer: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    """A static cache's KV buffer: [B, capacity, H, d], a view of storage laid out [capacity, B, H, d], holding the
    first `filled` positions of `buffer` [B, T, H, d] and zeros after them (see `_grow`). Each decoding step writes one
    position of every row, which this layout keeps in one contiguous block; batch-major, the rows of a 128k-token
    cache lie hundreds of MiB apart (benchmarks/gpu.py decode times both)."""
    storage = buffer.new_zeros(capacity, buffer.shape[0], *buffer.shape[2:])
    storage[:filled] = buffer[:, :filled].transpose(0, 1)
    return storage.transpose(0, 1)


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
        self.key_mask: torch.Tensor | None = None  # [B, Tc] bool ([B, capacity] once static)
        self.num_real: torch.Tensor | None = None  # [B] long
        self.seq_len = 0
        self.write_index: torch.Tensor | None = None  # [1] long: the next position, once static
        self.routing: RoutingState | None = None  # the budget counts of an adaptive schedule (oryx.routing)
        self._modes: list[torch.Tensor] = []  # the modes of every forward so far, [B, T] each

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

    @property
    def is_static(self) -> bool:
        return self.write_index is not None

    @property
    def capacity(self) -> int | None:
        return None if self.key_mask is None or not self.is_static else self.key_mask.shape[1]

    def make_static(self, capacity: int) -> None:
        """Preallocate every buffer to `capacity` positions so that each later one-token step reads and writes fixed
        tensors only (what a CUDA graph replays): the KV append writes at a device-side index, attention reads all
        `capacity` keys under the validity mask (position-major buffers: `static_kv_buffer`), and the counters
        advance in place. Call after the prompt."""
        if self.num_real is None:
            raise ValueError("make_static needs a prefilled cache: run the prompt through the model first")
        if capacity <= self.seq_len:
            raise ValueError(f"capacity {capacity} leaves no room: the cache already holds {self.seq_len} positions")
        device = self.num_real.device
        self.write_index = torch.tensor([self.seq_len], dtype=torch.long, device=device)
        key_mask = self.key_mask.new_zeros(self.key_mask.shape[0], capacity)
        key_mask[:, : self.seq_len] = self.key_mask
        self.key_mask = key_mask
        for layer in self.layers:
            if layer.key_buffer is not None:
                layer.key_buffer = static_kv_buffer(layer.key_buffer, layer.kv_len, capacity)
                layer.value_buffer = static_kv_buffer(layer.value_buffer, layer.kv_len, capacity)
                layer.write_index = self.write_index

    def check_room(self) -> None:
        """ValueError when a static cache has no position left for another token."""
        if self.seq_len >= self.capacity:
            raise ValueError(f"the static cache is full ({self.capacity} positions); make_static with more capacity")

    @property
    def modes(self) -> torch.Tensor | None:
        """The modes [B, seq_len] of every position consumed so far (None once static: a CUDA graph records none)."""
        if self.is_static or not self._modes:
            return None
        return torch.cat(self._modes, dim=1)

    def advance(self, new_mask: torch.Tensor, modes: torch.Tensor | None = None) -> None:
        """Record that a forward consumed the positions of `new_mask` [B, T] (True = real token) in `modes` [B, T]."""
        if modes is not None and not self.is_static:
            self._modes.append(modes)
        if self.is_static:  # one real token, every counter advanced in place (no new tensors)
            self.key_mask.index_fill_(1, self.write_index, True)
            self.num_real.add_(1)
            self.write_index.add_(1)
            self.seq_len += 1
            return
        if self.num_real is None:
            self.num_real = torch.zeros(new_mask.shape[0], dtype=torch.long, device=new_mask.device)
            self.key_mask = new_mask.new_zeros(new_mask.shape[0], 0)
        self.key_mask = torch.cat([self.key_mask, new_mask], dim=1)
        self.num_real = self.num_real + new_mask.sum(1)
        self.seq_len += new_mask.shape[1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows (beam search): every tensor of every layer, KV and recurrent alike."""
        if self.is_static:
            raise ValueError("a static cache (cuda_graphs=True) cannot reorder rows; use beam search without it")
        for layer in self.layers:
            for name, tensor in layer.tensors().items():
                setattr(layer, name, tensor.index_select(0, beam_idx.to(tensor.device)))
        if self.num_real is not None:
            self.num_real = self.num_real.index_select(0, beam_idx.to(self.num_real.device))
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))
        self._modes = [m.index_select(0, beam_idx.to(m.device)) for m in self._modes]
        if self.routing is not None:
            self.routing.reorder(beam_idx.cpu().numpy())

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated for each kind of state, summed over layers: {"kv", "recurrent", "conv"} (the KV buffers
        include their spare capacity)."""
        total = {"kv": 0, "recurrent": 0, "conv": 0}
        for layer in self.layers:
            for name, tensor in layer.tensors().items():
                kind = "kv" if name in ("key_buffer", "value_buffer") else name
                total[kind] += tensor.numel() * tensor.element_size()
        return total
