"""Mode schedules: which tokens use attention (`oryx.ATTN`) and which the linear recurrence (`oryx.LINEAR`).

A schedule maps absolute positions to modes. It is written as a short spec string, so that it works on the
command line and in configs (docs/design.md §6, docs/paper.md §4.2):

    attn                          every token in attention
    linear                        every token in the linear recurrence
    chunks:size=128,p_attn=0.25   training mix: chunks of `size` absolute positions (chunk = pos // size),
                                  each attention with probability `p_attn`, drawn independently per sequence
                                  (both parameters optional, defaults shown)
    spans:linear@0,attn@1536      switch points: each mode holds from its position on (positions strictly
                                  increasing, the first at 0)
    tail:attn=64                  linear everywhere except the last N prompt tokens and every generated token

Adaptive schedules: the model decides the modes while it reads the tokens (`oryx.routing`), so they work where a
model runs (`model(input_ids, schedule=...)`, `model.generate(schedule=...)`, every `oryx eval` runner), not in
`modes()`. Each keeps attention on at most its budget plus one unit at every prefix (a unit is one token, or a
chunk of `chunk` positions whose mode is decided from the tokens before it):

    router:budget=0.05[,chunk=128]         the model's trained router (`oryx train-router`): attention where its
                                          predicted gain is above the threshold of that budget
    entropy:threshold=2.5[,budget=0.1]     training-free: attention at position t+1 while the linear mode's
                                          next-token entropy at t is above the threshold (nats)
    random:budget=0.1[,chunk=16,seed=0]    the control: units drawn at random (seeded), under the same budget rule

The grammar is kept tight: kinds, keys and mode names are lower case and exactly those above (no aliases such
as `attention`; a near miss gets a "did you mean" hint). Whitespace around any part is ignored. A bad spec
raises `ValueError` naming the bad part and showing the grammar. `str(schedule)` is the canonical spec, and
`parse(str(s)) == s`.

    >>> s = parse("spans:linear@0,attn@4")
    >>> s.modes(2, 6)
    tensor([[1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0]])

All layers of a model use the same `[B, T]` modes tensor: draw it once per batch, not once per layer.
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Generator, Tensor

from oryx.configuration import ATTN, LINEAR  # not `from oryx`: oryx/__init__ imports this module early

__all__ = [
    "GRAMMAR",
    "Adaptive",
    "Chunks",
    "Entropy",
    "Fixed",
    "Random",
    "Router",
    "Schedule",
    "Spans",
    "Tail",
    "attention_fraction",
    "attention_scores",
    "parse",
]

GRAMMAR = (
    "attn | linear | chunks:size=N,p_attn=P | spans:MODE@POS,... | tail:attn=N | router:budget=B[,chunk=N] | "
    "entropy:threshold=H[,budget=B] | random:budget=B[,chunk=N,seed=S]"
)
MODE_NAMES: dict[str, int] = {"attn": ATTN, "linear": LINEAR}
_NAME_OF_MODE = {mode: name for name, mode in MODE_NAMES.items()}
Device = torch.device | str | None


class Schedule(ABC):
    """A map from absolute token position to mode. Subclasses are frozen dataclasses, one per spec kind."""

    #: True when `modes` depends only on its arguments (not on a random generator).
    deterministic: bool = True

    def modes(
        self,
        batch: int,
        length: int,
        offset: int = 0,
        generator: Generator | None = None,
        prompt_length: int | None = None,
        device: Device = None,
    ) -> Tensor:
        """Modes of absolute positions `offset … offset+length−1` for `batch` sequences.

        Args:
            batch: B, number of sequences.
            length: T, number of positions.
            offset: absolute position of the first one (the prompt length for the first generated token).
            generator: random source for `chunks` (ignored by the deterministic kinds); None uses torch's
                global RNG.
            prompt_length: P, number of prompt tokens; required by `tail`, ignored by the other kinds, so
                generation code may always pass it.
            device: where the result lives (default CPU).

        Returns:
            LongTensor [B, T] of `oryx.ATTN` (0) / `oryx.LINEAR` (1).
        """
        for name, value in (("batch", batch), ("length", length), ("offset", offset)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if prompt_length is not None and prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        out = self._modes(batch, length, offset, generator, prompt_length, device)
        return out.expand(batch, length).clone() if out.dim() == 1 else out

    @abstractmethod
    def _modes(
        self,
        batch: int,
        length: int,
        offset: int,
        generator: Generator | None,
        prompt_length: int | None,
        device: Device,
    ) -> Tensor:
        """The kind's rule, arguments already checked: LongTensor [B, T], or [T] when all rows are equal."""

    def attention_fraction(self, length: int, offset: int = 0, prompt_length: int | None = None) -> float:
        """Expected fraction of positions `offset … offset+length−1` in attention (p_attn for `chunks`)."""
        return attention_fraction(self.modes(1, length, offset, prompt_length=prompt_length))

    @abstractmethod
    def __str__(self) -> str:
        """The canonical spec string; `parse(str(s)) == s`."""


def _positions(length: int, offset: int, device: Device) -> Tensor:
    """Absolute positions [T]."""
    return torch.arange(offset, offset + length, device=device)


@dataclass(frozen=True)
class Fixed(Schedule):
    """One mode for every token: spec `attn` or `linear`."""

    mode: int

    def __post_init__(self) -> None:
        if self.mode not in _NAME_OF_MODE:
            raise ValueError(f"mode must be {ATTN} (attn) or {LINEAR} (linear), got {self.mode!r}")

    def _modes(
        self,
        batch: int,
        length: int,
        offset: int,
        generator: Generator | None,
        prompt_length: int | None,
        device: Device,
    ) -> Tensor:
        return torch.full((batch, length), self.mode, dtype=torch.long, device=device)

    def __str__(self) -> str:
        return _NAME_OF_MODE[self.mode]


@dataclass(frozen=True)
class Chunks(Schedule):
    """Training mix: chunk `pos // size` is attention with probability `p_attn`, drawn afresh per sequence.

    Each call draws one Bernoulli per (row, chunk) for the chunks it covers. So evaluating a long range in
    pieces with `offset` is *not* the same as evaluating it at once: a chunk cut by a piece boundary is drawn
    twice, and the two pieces need not agree. Draw the whole sequence's modes once and slice them instead.
    With the same generator state, the same call gives the same draws.
    """

    size: int = 128
    p_attn: float = 0.25
    deterministic = False

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise ValueError(f"chunk size must be an integer, got {self.size!r}")
        if self.size <= 0:
            raise ValueError(f"chunk size must be > 0, got {self.size}")
        if not 0.0 <= self.p_attn <= 1.0:  # also rejects NaN
            raise ValueError(f"p_attn must be in [0, 1], got {self.p_attn!r}")
        object.__setattr__(self, "p_attn", float(self.p_attn))

    def _modes(
        self,
        batch: int,
        length: int,
        offset: int,
        generator: Generator | None,
        prompt_length: int | None,
        device: Device,
    ) -> Tensor:
        if length == 0:
            return torch.empty((batch, 0), dtype=torch.long, device=device)
        first, last = offset // self.size, (offset + length - 1) // self.size
        draw_device = generator.device if generator is not None else device
        is_attn = torch.rand(batch, last - first + 1, generator=generator, device=draw_device) < self.p_attn
        chunk_modes = torch.where(is_attn, ATTN, LINEAR).to(device=device, dtype=torch.long)  # [B, n_chunks]
        index = _positions(length, offset, chunk_modes.device) // self.size - first  # [T]
        return chunk_modes[:, index]

    def attention_fraction(self, length: int, offset: int = 0, prompt_length: int | None = None) -> float:
        return float(self.p_attn)

    def __str__(self) -> str:
        return f"chunks:size={self.size},p_attn={float(self.p_attn)!r}"


@dataclass(frozen=True)
class Spans(Schedule):
    """Switch points: `switches[i] = (pos, mode)`; `mode` holds from `pos` until the next switch.

    Positions are strictly increasing and the first is 0. Spec `spans:linear@0,attn@1536`.
    """

    switches: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "switches", tuple((int(pos), int(mode)) for pos, mode in self.switches))
        if not self.switches:
            raise ValueError("spans needs at least one MODE@POS")
        previous = None
        for pos, mode in self.switches:
            if mode not in _NAME_OF_MODE:
                raise ValueError(f"span mode must be {ATTN} (attn) or {LINEAR} (linear), got {mode!r}")
            if pos < 0:
                raise ValueError(f"span position must be >= 0, got {pos}")
            if previous is not None and pos <= previous:
                raise ValueError(f"span positions must be strictly increasing, got {pos} after {previous}")
            previous = pos
        if self.switches[0][0] != 0:
            raise ValueError(f"the first span must start at position 0, got {self.switches[0][0]}")

    def _modes(
        self,
        batch: int,
        length: int,
        offset: int,
        generator: Generator | None,
        prompt_length: int | None,
        device: Device,
    ) -> Tensor:
        starts = torch.tensor([pos for pos, _ in self.switches], device=device)
        span_modes = torch.tensor([mode for _, mode in self.switches], dtype=torch.long, device=device)
        span = torch.searchsorted(starts, _positions(length, offset, device), right=True) - 1  # [T], >= 0
        return span_modes[span]

    def __str__(self) -> str:
        return "spans:" + ",".join(f"{_NAME_OF_MODE[mode]}@{pos}" for pos, mode in self.switches)


@dataclass(frozen=True)
class Tail(Schedule):
    """Linear except the last `attn` prompt tokens and every generated token: attention iff pos >= P − attn.

    Needs `prompt_length=P` in `modes`. Spec `tail:attn=64`.
    """

    attn: int

    def __post_init__(self) -> None:
        if isinstance(self.attn, bool) or not isinstance(self.attn, int):
            raise ValueError(f"tail attn must be an integer, got {self.attn!r}")
        if self.attn < 0:
            raise ValueError(f"tail attn must be >= 0, got {self.attn}")

    def _modes(
        self,
        batch: int,
        length: int,
        offset: int,
        generator: Generator | None,
        prompt_length: int | None,
        device: Device,
    ) -> Tensor:
        if prompt_length is None:
            raise ValueError(
                f"schedule '{self}' needs the prompt length: call modes(..., prompt_length=P); "
                "positions >= P - N are attention"
            )
        is_attn = _positions(length, offset, device) >= prompt_length - self.attn  # [T]
        return torch.where(is_attn, ATTN, LINEAR)

    def __str__(self) -> str:
        return f"tail:attn={self.attn}"


def _check_budget(budget: object, what: str = "budget") -> float:
    """A fraction of tokens in [0, 1] (NaN, inf and bools refused)."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0.0 <= budget <= 1.0:
        raise ValueError(f"{what} must be a fraction of the tokens in [0, 1] (e.g. 0.05 for 5 %), got {budget!r}")
    return float(budget)


def _check_chunk(chunk: object) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer number of positions (1 = every token), got {chunk!r}")
    return chunk


class Adaptive(Schedule):
    """A schedule whose modes the model decides while it reads the tokens (`oryx.routing`), under a budget: at every
    prefix of positions 0 … t, at most ceil(budget · (t + 1)) + `chunk` tokens are in attention.

    The decision is made per *unit*: a token (`chunk` = 1) or a chunk of `chunk` absolute positions. A unit's mode
    depends only on tokens up to it (a chunk's, only on tokens before it), so a prefill followed by decoding takes
    the same modes as one forward over the whole sequence. `modes()` cannot give them: pass the schedule to the model
    (`model(input_ids, schedule=...)`, `generate(schedule=...)`).
    """

    budget: float | None
    chunk: int

    def _modes(
        self,
        batch: int,
        length: int,
        offset: int,
        generator: Generator | None,
        prompt_length: int | None,
        device: Device,
    ) -> Tensor:
        raise ValueError(
            f"schedule '{self}' is adaptive: the model decides its modes while it reads the tokens, so they cannot "
            "be listed in advance; pass it to the model instead: model(input_ids, schedule=...) or "
            "model.generate(input_ids, schedule=...)"
        )

    def attention_fraction(self, length: int, offset: int = 0, prompt_length: int | None = None) -> float:
        """The budget (the realised fraction is what a forward's `out.modes` holds); NaN without one."""
        return math.nan if self.budget is None else self.budget


@dataclass(frozen=True)
class Router(Adaptive):
    """The model's router (`oryx.routing.Router`, trained by `oryx train-router`): attention on the units whose
    predicted gain of attention over the linear mode is above the threshold that realises `budget` on the router's
    calibration windows. Token units score a token from its own layer-0 features; a chunk of `chunk` positions takes
    the mean score of the chunk before it (the first chunk is linear). Spec `router:budget=0.05[,chunk=128]`."""

    budget: float
    chunk: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", _check_budget(self.budget))
        _check_chunk(self.chunk)

    def __str__(self) -> str:
        return f"router:budget={self.budget!r}" + (f",chunk={self.chunk}" if self.chunk != 1 else "")


@dataclass(frozen=True)
class Entropy(Adaptive):
    """Training-free: position t+1 is attention while the linear mode's next-token entropy at position t is above
    `threshold` (nats), within `budget` when given. A prefill reads the entropies from a look-ahead forward in linear
    mode; during generation each token's mode comes from the entropy of the distribution the model just produced.
    Spec `entropy:threshold=2.5[,budget=0.1]`."""

    threshold: float
    budget: float | None = None
    chunk = 1

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold < math.inf:
            raise ValueError(f"entropy threshold must be a finite number of nats >= 0, got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))
        if self.budget is not None:
            object.__setattr__(self, "budget", _check_budget(self.budget))

    def __str__(self) -> str:
        return f"entropy:threshold={self.threshold!r}" + (f",budget={self.budget!r}" if self.budget is not None else "")


@dataclass(frozen=True)
class Random(Adaptive):
    """The control: every unit draws a uniform score from a generator seeded by (`seed`, batch row), and the units
    above the threshold that realises `budget` (under the same budget rule as the router) are attention. Spec
    `random:budget=0.1[,chunk=16,seed=0]`."""

    budget: float
    chunk: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", _check_budget(self.budget))
        _check_chunk(self.chunk)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"random seed must be an integer in [0, 2^32), got {self.seed!r}")

    def __str__(self) -> str:
        chunk = f",chunk={self.chunk}" if self.chunk != 1 else ""
        return f"random:budget={self.budget!r}{chunk}" + (f",seed={self.seed}" if self.seed else "")


def attention_fraction(modes: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of tokens in attention.

    Args:
        modes: [B, T] modes (0 = attention, 1 = linear).
        mask: optional [B, T] attention mask (nonzero / True = real token, 0 = padding); padding is not
            counted.

    Returns:
        attention tokens / counted tokens, or NaN when no token is counted.
    """
    is_attn = modes == ATTN
    if mask is not None:
        if mask.shape != modes.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != modes shape {tuple(modes.shape)}")
        real = mask.bool()
        is_attn = is_attn & real
        total = int(real.sum())
    else:
        total = modes.numel()
    return int(is_attn.sum()) / total if total else math.nan


def attention_scores(modes: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Query-key pairs that attention scores for `modes` [B, T] of sequences from position 0 (per head and layer):
    Σ over attention rows of the keys at or before them (with a [B, T] `mask`, real keys only). The ideal cost of
    attention rows, which block-sparse kernels approach for rows in aligned blocks (`oryx.ops.count_score_elements`
    counts what the reference kernel computes)."""
    real = torch.ones_like(modes, dtype=torch.bool) if mask is None else mask.bool()
    keys = real.long().cumsum(1)  # real keys up to each position
    return int(keys[(modes == ATTN) & real].sum())


def _error(spec: str, message: str) -> ValueError:
    return ValueError(f"{message} in {spec!r}; expected one of: {GRAMMAR}")


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key_values(spec: str, kind: str, params: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """`k=v,k=v` -> {k: v}, rejecting unknown, duplicate and malformed items."""
    out: dict[str, str] = {}
    if not params:
        return out
    for item in params.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise _error(spec, f"bad {kind} parameter {item.strip()!r} (expected KEY=VALUE)")
        if key not in allowed:
            raise _error(spec, f"unknown {kind} key {key!r}{_hint(key, allowed)}")
        if key in out:
            raise _error(spec, f"duplicate {kind} key {key!r}")
        out[key] = value
    return out


def _make(spec: str, factory: Callable[..., Schedule], *args: object) -> Schedule:
    """`factory(*args)`, its value checks reported against the spec."""
    try:
        return factory(*args)
    except ValueError as e:
        raise _error(spec, str(e)) from None


def _int(spec: str, what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _error(spec, f"{what} must be an integer, got {text!r}") from None


def _float(spec: str, what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _error(spec, f"{what} must be a number, got {text!r}") from None


def parse(spec: str | Schedule) -> Schedule:
    """Parse a schedule spec (see the module docstring); a `Schedule` is returned as-is.

    Raises:
        ValueError: naming the bad part of the spec and showing the grammar.
    """
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"schedule spec must be a str or Schedule, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise _error(spec, "empty schedule spec")
    kind, _, params = (part.strip() for part in text.partition(":"))
    if kind in MODE_NAMES:
        if params:
            raise _error(spec, f"schedule kind {kind!r} takes no parameters, got {params!r}")
        return Fixed(MODE_NAMES[kind])
    if kind == "chunks":
        values = _key_values(spec, kind, params, ("size", "p_attn"))
        size = _int(spec, "chunk size", values["size"]) if "size" in values else Chunks.size
        p_attn = _float(spec, "p_attn", values["p_attn"]) if "p_attn" in values else Chunks.p_attn
        return _make(spec, Chunks, size, p_attn)
    if kind == "spans":
        if not params:
            raise _error(spec, "spans needs at least one MODE@POS")
        switches = []
        for item in params.split(","):
            name, at, pos = (part.strip() for part in item.partition("@"))
            if not at or not name or not pos:
                raise _error(spec, f"bad span {item.strip()!r} (expected MODE@POS, e.g. attn@1536)")
            if name not in MODE_NAMES:
                hint = _hint(name, MODE_NAMES) or f" (modes: {', '.join(MODE_NAMES)})"
                raise _error(spec, f"unknown span mode {name!r}{hint}")
            switches.append((_int(spec, "span position", pos), MODE_NAMES[name]))
        return _make(spec, Spans, tuple(switches))
    if kind == "tail":
        values = _key_values(spec, kind, params, ("attn",))
        if "attn" not in values:
            raise _error(spec, "tail needs attn=N (the number of prompt tokens in attention)")
        return _make(spec, Tail, _int(spec, "tail attn", values["attn"]))
    if kind in ("router", "random"):
        keys = ("budget", "chunk") if kind == "router" else ("budget", "chunk", "seed")
        values = _key_values(spec, kind, params, keys)
        if "budget" not in values:
            raise _error(spec, f"{kind} needs budget=B (the fraction of tokens in attention, e.g. 0.05)")
        args = [_float(spec, "budget", values["budget"])]
        args.append(_int(spec, "chunk", values["chunk"]) if "chunk" in values else 1)
        if kind == "random":
            args.append(_int(spec, "seed", values["seed"]) if "seed" in values else 0)
        return _make(spec, Router if kind == "router" else Random, *args)
    if kind == "entropy":
        values = _key_values(spec, kind, params, ("threshold", "budget"))
        if "threshold" not in values:
            raise _error(spec, "entropy needs threshold=H (nats of the linear mode's next-token entropy)")
        budget = _float(spec, "budget", values["budget"]) if "budget" in values else None
        return _make(spec, Entropy, _float(spec, "entropy threshold", values["threshold"]), budget)
    kinds = (*MODE_NAMES, "chunks", "spans", "tail", "router", "entropy", "random")
    raise _error(spec, f"unknown schedule kind {kind!r}{_hint(kind, kinds)}")
