"""Decoding steps replayed from CUDA graphs: `generate(..., cuda_graphs=True)`.

Eager decoding launches about a hundred kernels per layer for every token, so it is host-bound. `StaticDecoder`
removes the host from the loop (benchmarks/RESULTS.md has the measured tokens/s). The decoder drives the model: it
calls the model's forward for each step, telling it on the host which modes the step holds (`active_modes`), and
`generate(cuda_graphs=True)` hands it every step after the prompt:

1. After the prompt, the cache is made static (`OryxCache.make_static`): every buffer is preallocated to the
   generation's length, the KV append writes at a device-side index, and attention reads all positions under a
   validity mask. A step then reads and writes fixed tensors only.
2. The recurrent and conv states, which the mixers return as new tensors, are copied back into fixed buffers at the
   end of every step, so the next step (eager or replayed) reads them at the same address.
3. Each kind of step (all rows linear, all attention, or mixed) runs eagerly twice as warm-up (kernel selection,
   autotuning, lazy initialisation), is then captured once, and replayed for every later token of that kind. A
   replay only copies the new token ids and modes into the graph's input buffers.

Without CUDA the same fixed-buffer step runs eagerly (no graphs): that path is what the CPU tests compare with the
ordinary cache token by token. Beam search is refused (a static cache cannot reorder rows in place).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from oryx.cache import OryxCache
from oryx.variants import ATTN, LINEAR

WARMUP_STEPS = 2  # eager steps of a kind before it is captured


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [B, 1] long, copied into before each replay
    modes: torch.Tensor  # [B, 1] long
    logits: torch.Tensor  # [B, 1, V], rewritten by each replay


class StaticDecoder:
    """One-token steps of an `OryxForCausalLM` over a prefilled cache, made static to `capacity` positions.

    `attach(cache)` after the prompt, then `step(input_ids, modes)` per token (or `StaticDecoder(model, capacity,
    cache=cache)` at once)."""

    def __init__(
        self, model: nn.Module, capacity: int, cache: OryxCache | None = None, use_graphs: bool | None = None
    ) -> None:
        device = model.device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this model is on {device}")
        self.model, self.capacity = model, capacity
        self.cache: OryxCache | None = None
        self._graphs: dict[tuple[bool, bool], _Graph] = {}
        self._eager_steps: Counter[tuple[bool, bool]] = Counter()
        if cache is not None:
            self.attach(cache)

    def attach(self, cache: OryxCache) -> None:
        """Make the prefilled `cache` static and step it from now on."""
        cache.make_static(self.capacity)
        self.cache = cache
        # The fixed homes of the states the mixers replace every step (see 2. above).
        self._states = [
            (layer, name, getattr(layer, name))
            for layer in cache.layers
            for name in ("conv", "recurrent")
            if getattr(layer, name) is not None
        ]

    def step(self, input_ids: torch.Tensor, modes: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, 1, V] of one token per row; `modes` [B, 1] on the host (None = the model's default mode)."""
        if self.cache is None:
            raise ValueError("the decoder has no cache yet: attach(cache) after the prompt")
        B = input_ids.shape[0]
        if modes is None:
            modes = torch.full((B, 1), self.model.config.default_mode, dtype=torch.long)
        if modes.device.type != "cpu":
            modes = modes.cpu()  # the step's kind is decided on the host, before anything is launched
        if tuple(modes.shape) != (B, 1):
            raise ValueError(f"modes has shape {list(modes.shape)} but a decoding step needs {[B, 1]}")
        kind = (bool((modes == ATTN).any()), bool((modes == LINEAR).any()))
        if not set(modes.unique().tolist()) <= set(self.model.config.supported_modes):
            raise ValueError(f"modes {modes.unique().tolist()} not supported by {self.model.config.variant!r}")
        device = self.cache.num_real.device
        modes = modes.to(device, torch.long)
        if kind in self._graphs:
            return self._replay(self._graphs[kind], input_ids, modes)
        if self.use_graphs and self._eager_steps[kind] >= WARMUP_STEPS:
            self._graphs[kind] = self._capture(kind, input_ids, modes)
            return self._replay(self._graphs[kind], input_ids, modes)
        self._eager_steps[kind] += 1
        if not self.use_graphs:
            return self._run(kind, input_ids, modes)
        # Warm-up on a side stream, as torch.cuda.graphs asks (lazy handles and workspaces stay off the main stream).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._run(kind, input_ids, modes)
        torch.cuda.current_stream().wait_stream(side)
        return logits

    def _run(self, kind: tuple[bool, bool], input_ids: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
        """The model's forward on the static cache, then the replaced states copied home (steps 1-2 above)."""
        logits = self.model(
            input_ids=input_ids, modes=modes, cache=self.cache, use_cache=True, active_modes=kind
        ).logits
        for layer, name, home in self._states:
            home.copy_(getattr(layer, name))
            setattr(layer, name, home)
        return logits

    def _capture(self, kind: tuple[bool, bool], input_ids: torch.Tensor, modes: torch.Tensor) -> _Graph:
        """Record one step; nothing runs, so the host-side counters the forward advanced are put back."""
        counters = self.cache.seq_len, [layer.kv_len for layer in self.cache.layers]
        static_ids, static_modes = input_ids.clone(), modes.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):  # a private memory pool: the kinds of step replay in any order
            logits = self._run(kind, static_ids, static_modes)
        self.cache.seq_len = counters[0]
        for layer, kv_len in zip(self.cache.layers, counters[1], strict=True):
            layer.kv_len = kv_len
        return _Graph(graph, static_ids, static_modes, logits)

    def _replay(self, captured: _Graph, input_ids: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
        self.cache.check_room()
        captured.input_ids.copy_(input_ids)
        captured.modes.copy_(modes)
        captured.graph.replay()
        self.cache.seq_len += 1  # what the replayed forward did on the device, mirrored on the host
        for layer in self.cache.layers:
            if layer.write_index is not None:
                layer.kv_len += 1
        return captured.logits.clone()
