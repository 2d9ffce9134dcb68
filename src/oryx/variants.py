"""The variant table: every model family Oryx builds, in one place.

A *recurrence* (a linear token mixer: its op in ``oryx.ops`` and its module in ``oryx.layers.recurrences``) gives two
families: the Oryx multi-mixer that pairs it with softmax attention, and its single-mixer baseline. With the
Transformer that is the whole zoo:

    recurrence                Oryx variant (family)   baseline (variant = family)
    Gated DeltaNet            tg (oryx-tg)            gdn
    Mamba-2 (SSD)             tm (oryx-tm)            mamba2
    Kimi Delta Attention      tk (oryx-tk)            kda
    (softmax attention only)  -                       transformer

Presets, ``OryxConfig.is_oryx`` / ``supported_modes``, a baseline's one mode, the families of the MQAR and retrieval
runners, the CLI choices and the tests' parametrisations are all read from ``VARIANTS``. Adding a recurrence means
writing its op (with its reference and tests), its module, and one row of ``RECURRENCES`` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

ATTN, LINEAR = 0, 1  # the two modes of a token: softmax attention, or the layer's linear recurrence
MODE_NAMES = {ATTN: "attn", LINEAR: "linear"}


@dataclass(frozen=True)
class RecurrenceEntry:
    """One recurrence and the two variants built from it."""

    oryx: str  # the Oryx variant, e.g. "tg"; its preset family is "oryx-tg"
    baseline: str  # the single-mixer baseline's variant and preset family, e.g. "gdn"
    module: str  # "module:Class" of its recurrence (oryx.layers.recurrences), imported when a model is built


RECURRENCES: tuple[RecurrenceEntry, ...] = (
    RecurrenceEntry("tg", "gdn", "oryx.layers.recurrences.gated_delta:GatedDeltaNet"),  # Gated DeltaNet
    RecurrenceEntry("tm", "mamba2", "oryx.layers.recurrences.mamba2:Mamba2"),  # Mamba-2 (SSD)
    RecurrenceEntry("tk", "kda", "oryx.layers.recurrences.kimi_delta:KimiDelta"),  # Kimi Delta Attention
)


@dataclass(frozen=True)
class Variant:
    """A model family: the value of ``OryxConfig.variant`` and the family part of its preset names."""

    name: str  # config.variant
    family: str  # preset family: "oryx-tg", "gdn", ...
    modes: tuple[int, ...]  # the modes a token may take: (ATTN, LINEAR) for Oryx, one mode for a baseline
    recurrence_path: str | None  # "module:Class" of its recurrence; None for the Transformer

    @property
    def recurrence(self) -> Any:
        """The recurrence module class (a subclass of `oryx.layers.recurrences.Recurrence`), or None. The table
        names it rather than importing it, so that the config, which reads this table, depends on no layer."""
        if self.recurrence_path is None:
            return None
        module, _, name = self.recurrence_path.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def is_oryx(self) -> bool:
        """True for the multi-mixer variants, False for the single-mixer baselines."""
        return len(self.modes) == 2

    @property
    def default_mode(self) -> int:
        """Attention for Oryx (the paper's default), the only mode for a baseline."""
        return self.modes[0]


def _table() -> dict[str, Variant]:
    """The Oryx variants first, then the Transformer and the recurrences' baselines."""
    oryx = [Variant(e.oryx, f"oryx-{e.oryx}", (ATTN, LINEAR), e.module) for e in RECURRENCES]
    baselines = [Variant(e.baseline, e.baseline, (LINEAR,), e.module) for e in RECURRENCES]
    transformer = Variant("transformer", "transformer", (ATTN,), None)
    return {v.name: v for v in (*oryx, transformer, *baselines)}


VARIANTS: dict[str, Variant] = _table()
FAMILIES: dict[str, Variant] = {v.family: v for v in VARIANTS.values()}


def variant(name: str) -> Variant:
    """The table row of variant ``name`` ("tg", "gdn", ...); ValueError naming the choices otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def oryx_variants() -> list[str]:
    """The multi-mixer variants, in table order ("tg", "tm", "tk")."""
    return [name for name, v in VARIANTS.items() if v.is_oryx]


def family_names() -> list[str]:
    """Every preset family, the baselines first and the Oryx families last (the order of comparison tables)."""
    return sorted(FAMILIES, key=lambda f: FAMILIES[f].is_oryx)
