"""Checkpoints of Oryx 0.1.0 (before recurrences became components) load through a key remap.

Oryx 0.1.0 kept a recurrence's parameters on its mixer (`mixer.A_log`, `mixer.a_proj.weight`, ...) and the Mamba-2
baseline's projections fused (`mixer.in_proj` = [z; x; B; C; dt] rows, `mixer.out_proj`). Now they live in
`mixer.recurrence.*`, and the Mamba-2 baseline has the layout of every recurrent baseline (`oryx.layers.mixers.
RecurrentMixer`): `qkv_proj` = [C; B; x] rows (its q, k, v), `g_proj` = z, `recurrence.dt_proj` = dt and `o_proj`,
with the conv's channels in the same [C; B; x] order. `upgrade_state` maps an old name → tensor mapping (the model's
state dict, or each of AdamW's moments) to the new names; `upgrade_optimizer_state` does it for a full optimizer
state dict as `torch.distributed.checkpoint.state_dict` writes it (keyed by parameter name).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

_RECURRENCE_KEY = re.compile(r"^(?P<mixer>(.*\.)?mixer)\.(?P<name>A_log|dt_bias|D|(a|b|dt)_proj\.weight)$")
_MAMBA2_KEY = re.compile(r"^(?P<mixer>(.*\.)?mixer)\.(?P<name>in_proj|out_proj)\.weight$")
_CONV_KEY = re.compile(r"^(?P<mixer>(.*\.)?mixer)\.conv_weight$")


Transform = Callable[[torch.Tensor], torch.Tensor]


def is_legacy(keys: Iterable[str]) -> bool:
    """Whether parameter names are in the 0.1.0 layout."""
    return any(_RECURRENCE_KEY.match(k) or _MAMBA2_KEY.match(k) for k in keys)


def _rows(*picks: int, sizes: list[int]) -> Transform:
    """The row blocks ``picks`` (indices into blocks of ``sizes`` rows), concatenated in that order."""
    return lambda t: torch.cat([t.split(sizes)[i] for i in picks])


def _remap(key: str, config: Any) -> list[tuple[str, Transform]]:
    """What the 0.1.0 tensor ``key`` became: (new key, how to cut it from the old tensor) pairs."""
    keep: Transform = lambda t: t
    d_inner, n = config.mamba_expand * config.hidden_size, config.mamba_d_state
    if m := _RECURRENCE_KEY.match(key):
        return [(f"{m['mixer']}.recurrence.{m['name']}", keep)]
    if (m := _MAMBA2_KEY.match(key)) and m["name"] == "out_proj":
        return [(f"{m['mixer']}.o_proj.weight", keep)]
    if m:  # in_proj rows [z, x, B, C, dt]
        sizes = [d_inner, d_inner, n, n, d_inner // config.mamba_head_dim]
        return [
            (f"{m['mixer']}.g_proj.weight", _rows(0, sizes=sizes)),
            (f"{m['mixer']}.qkv_proj.weight", _rows(3, 2, 1, sizes=sizes)),
            (f"{m['mixer']}.recurrence.dt_proj.weight", _rows(4, sizes=sizes)),
        ]
    if _CONV_KEY.match(key) and config.variant == "mamba2":  # channels [x, B, C] -> [C, B, x]
        return [(key, _rows(2, 1, 0, sizes=[d_inner, n, n]))]
    return [(key, keep)]


def upgrade_state(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The 0.1.0 names (and Mamba-2's fused rows) of ``state`` mapped to the current layout; other keys unchanged."""
    return {new: cut(tensor) for key, tensor in state.items() for new, cut in _remap(key, config)}


def upgrade_optimizer_state(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """A full (name-keyed) AdamW state dict in the 0.1.0 layout mapped to the current one: each moment cut like its
    parameter, a split parameter's step count kept by every part, the groups' parameter names renamed."""
    upgraded = {
        new: {field: value if field == "step" else cut(value) for field, value in entry.items()}
        for name, entry in state["state"].items()
        for new, cut in _remap(name, config)
    }
    groups = [
        {**group, "params": [new for old in group["params"] for new, _ in _remap(old, config)]}
        for group in state["param_groups"]
    ]
    return {"state": upgraded, "param_groups": groups}
