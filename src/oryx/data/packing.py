"""Fixed-length training windows from a flat token stream, in a deterministic, resumable order.

The stream (documents already joined by ``<|endoftext|>``) is cut into ``N = (len - 1) // T`` windows of
``T + 1`` tokens; window ``i`` is ``tokens[i*T : i*T + T + 1]``, so consecutive windows share one token and
every token but the first is a target exactly once per epoch. Each epoch visits the windows in a permutation
seeded by ``(seed, epoch)`` and drops the last partial batch, so every batch has the same shape.

The position in the data is two integers (epoch, batch within the epoch). ``state_dict()`` returns it with the
settings it depends on; after ``load_state_dict()`` the next batch is exactly the one an uninterrupted run
would have drawn, on every rank.

>>> data = PackedDataset(load_tokens("prose:train", tok), seq_len=1024, batch_size=8, seed=0)
>>> batch = next(data)                          # [8, 1025] int64
>>> inputs, targets = batch[:, :-1], batch[:, 1:]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch


class TokenSequence(Protocol):
    """What the packer needs from a token stream: a length and contiguous slices (np.memmap, TokenShards)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> np.ndarray: ...


class PackedDataset:
    """An endless iterator of ``[batch_size, seq_len + 1]`` int64 windows with a serialisable position.

    Args:
        tokens: the flat token stream (e.g. from ``load_tokens``).
        seq_len: tokens per training sequence ``T`` (each window holds ``T + 1`` for the shifted targets).
        batch_size: windows per batch on this rank.
        seed: seeds the per-epoch permutation.
        shuffle: ``False`` visits windows in stream order (for evaluation).
        rank, world_size: data parallelism; rank ``r`` takes rows ``[r*B, (r+1)*B)`` of each global batch
            of ``world_size * batch_size`` windows, so ranks never see the same window in an epoch.

    Raises:
        ValueError: the stream is too short for one global batch, or a bad argument.
    """

    def __init__(
        self,
        tokens: TokenSequence,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.num_windows = (len(tokens) - 1) // seq_len
        global_batch = batch_size * world_size
        if self.num_windows < global_batch:
            raise ValueError(
                f"{len(tokens):,d} tokens make {self.num_windows} windows of {seq_len + 1}, fewer than one "
                f"global batch of {global_batch}; use more data or a smaller seq_len/batch_size"
            )
        self.batches_per_epoch = self.num_windows // global_batch
        self.epoch = 0
        self.step = 0  # batches already drawn in this epoch
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    def _window_order(self) -> np.ndarray:
        """The window indices of the current epoch, in visiting order (cached per epoch)."""
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len + 1]`` batch of this rank; epochs roll over without end."""
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        start = (self.step * self.world_size + self.rank) * self.batch_size
        windows = self._window_order()[start : start + self.batch_size]
        t = self.seq_len
        rows = [self.tokens[i * t : i * t + t + 1] for i in windows.tolist()]
        self.step += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        """The data position (plain ints and bools, JSON-serialisable) and the settings it is valid for."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            ValueError: the state was saved with other data or settings, so the position would mean other
                batches.
        """
        for key in ("seed", "shuffle", "seq_len", "batch_size", "world_size", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r}, but this dataset has "
                    f"{getattr(self, key)!r}; resume with the same data and settings"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
