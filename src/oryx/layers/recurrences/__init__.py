"""Linear recurrences as components of a token mixer: one module per recurrence, on the protocol of ``base.Recurrence``.

- ``gated_delta.GatedDeltaNet``: Gated DeltaNet (Oryx-TG, the ``gdn`` baseline), op ``oryx.ops.gated_delta_rule``;
- ``mamba2.Mamba2``: Mamba-2's SSD (Oryx-TM, the ``mamba2`` baseline), op ``oryx.ops.scalar_decay_rule``.

A new recurrence is one module here (its gates, its op call, its pairing with attention) plus one row of the variant
table (``oryx.variants.RECURRENCES``); the mixers (``oryx.layers.mixers``) build the Oryx layer and the
baseline from it.
"""

from oryx.layers.recurrences.base import HeadLayout, Recurrence

__all__ = ["HeadLayout", "Recurrence"]
