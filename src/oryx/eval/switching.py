"""The switching curve (paper Figure 3): token-level perplexity against position, for each mode alone and for a
switch between the modes at given positions, both ways.

For a switch at p, tokens 0…p−1 run in one mode and p…L−1 in the other. Their prefix is exactly the no-switch run of
the first mode, so it is computed once: each no-switch run goes through the sequence segment by segment with an
`OryxCache`, and at every switch position a copy of the cache continues in the other mode. This also exercises what
makes switching free in Oryx: both states advanced over every token (docs/design.md §9.1).

Any schedule can be measured beside them (`schedules=`, e.g. several switches in one sequence,
`spans:attn@0,linear@100,attn@228`, or random chunks): its per-position NLL in one full forward, and its *excess*,
the NLL of each token minus the NLL the same token has in the no-switch run of the mode it is in, averaged per
position. The excess isolates what switching costs from the two modes' own difference: 0 when a token is predicted
as well as if the whole sequence had run in its mode.

Curves are per-position means of the negative log-likelihood over many validation windows; `smoothed_perplexity`
applies a trailing moving average (so a jump stays at or after its switch) and exponentiates.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oryx.cache import OryxCache
from oryx.configuration import ATTN, LINEAR
from oryx.eval.perplexity import autocast, token_nll, window, window_indices
from oryx.schedule import Spans, parse

MODE_NAME = {ATTN: "attn", LINEAR: "linear"}


def curve_name(first: int, second: int | None = None, at: int | None = None) -> str:
    """`attn`, `linear`, or e.g. `attn->linear@128` for a switch at position 128."""
    if second is None:
        return MODE_NAME[first]
    return f"{MODE_NAME[first]}->{MODE_NAME[second]}@{at}"


@dataclass
class SwitchingCurves:
    """Mean NLL per position of every curve, `nll[name]` of length `length` (position t predicts token t+1); for each
    extra schedule, its mean NLL `schedules[spec]` and its mean excess over the no-switch runs `excess[spec]`."""

    length: int
    switch_at: list[int]
    windows: int
    nll: dict[str, np.ndarray]
    schedules: dict[str, np.ndarray] = field(default_factory=dict)
    excess: dict[str, np.ndarray] = field(default_factory=dict)

    def smoothed_perplexity(self, smooth: int) -> dict[str, np.ndarray]:
        """exp of the trailing `smooth`-position moving average of each curve's NLL."""
        return {name: np.exp(_trailing_mean(values, smooth)) for name, values in self.nll.items()}

    def summary(self, span: int) -> dict[str, dict[str, float]]:
        """For each switch: perplexity over the `span` positions after it, for the switch and both no-switch curves."""
        out = {}
        for at in self.switch_at:
            window_ = slice(at, min(self.length, at + span))
            for first, second in ((ATTN, LINEAR), (LINEAR, ATTN)):
                out[curve_name(first, second, at)] = {
                    "switch": float(np.exp(self.nll[curve_name(first, second, at)][window_].mean())),
                    f"{MODE_NAME[first]}_only": float(np.exp(self.nll[curve_name(first)][window_].mean())),
                    f"{MODE_NAME[second]}_only": float(np.exp(self.nll[curve_name(second)][window_].mean())),
                }
        return out

    def schedule_summary(self, span: int) -> dict[str, dict]:
        """Per extra schedule: its perplexity, the no-switch runs' perplexity on the same tokens in the same modes, the
        excess in percent; for a `spans` schedule also both over the `span` positions after each of its switches."""
        out: dict[str, dict] = {}
        for spec, nll in self.schedules.items():
            reference = nll - self.excess[spec]
            entry: dict = {
                "perplexity": float(np.exp(nll.mean())),
                "no_switch": float(np.exp(reference.mean())),
                "excess_percent": float(100 * np.expm1(self.excess[spec].mean())),
            }
            schedule = parse(spec)
            if isinstance(schedule, Spans):
                entry["after_switch"] = {
                    str(pos): {
                        "switch": float(np.exp(nll[pos : pos + span].mean())),
                        "no_switch": float(np.exp(reference[pos : pos + span].mean())),
                    }
                    for pos, _ in schedule.switches[1:]
                    if pos < self.length
                }
            out[spec] = entry
        return out

    def to_json(self, smooth: int) -> dict:
        return {
            "length": self.length,
            "switch_at": self.switch_at,
            "windows": self.windows,
            "smooth": smooth,
            "positions": list(range(self.length)),
            "nll": {name: values.round(6).tolist() for name, values in self.nll.items()},
            "perplexity_smoothed": {n: v.round(4).tolist() for n, v in self.smoothed_perplexity(smooth).items()},
            "after_switch": self.summary(max(1, smooth)),
            "schedules": {
                spec: {"nll": nll.round(6).tolist(), "excess": self.excess[spec].round(6).tolist(), **summary}
                for (spec, nll), summary in zip(
                    self.schedules.items(), self.schedule_summary(max(1, smooth)).values(), strict=True
                )
            },
        }

    def save(self, out_dir: str | Path, smooth: int, title: str = "") -> tuple[Path, Path]:
        """Write `switching.json` and `switching.png` (and `schedules.png` with extra schedules) into `out_dir`;
        returns the paths of the first two."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out / "switching.json", out / "switching.png"
        json_path.write_text(json.dumps(self.to_json(smooth)))
        plot(self, png_path, smooth, title)
        if self.schedules:
            plot_schedules(self, out / "schedules.png", smooth, title)
        return json_path, png_path


def _trailing_mean(values: np.ndarray, window_size: int) -> np.ndarray:
    """Mean of values[max(0, t−w+1) : t+1] for every t."""
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    t = np.arange(1, len(values) + 1)
    start = np.maximum(0, t - max(1, window_size))
    return (csum[t] - csum[start]) / (t - start)


@torch.no_grad()
def switching_curves(
    model: torch.nn.Module,
    tokens,
    length: int,
    switch_at: list[int],
    *,
    windows: int = 64,
    batch_size: int = 16,
    precision: str = "fp32",
    schedules: Sequence[str] = (),
    seed: int = 0,
) -> SwitchingCurves:
    """Per-position NLL of attention-only, linear-only, and both switch directions at every position of `switch_at`;
    and of every schedule in `schedules`, with its excess over the no-switch runs.

    Args:
        model: an Oryx `OryxForCausalLM` (both modes), in eval mode.
        tokens: 1-D token stream; `windows` windows of `length` targets, spread evenly over it, are scored.
        length: L, positions per sequence (the model's training length is a good choice).
        switch_at: switch positions, each in (0, L).
        windows: sequences averaged.
        schedules: schedule specs (`oryx.schedule`); `tail:attn=N` counts from the window's end, `chunks` draws are
            seeded by `seed`.

    Returns:
        SwitchingCurves with 2 + 2·len(switch_at) curves of length L, and one per schedule.

    Raises:
        ValueError: a single-mode model, a switch position outside (0, L), a bad schedule spec, too few windows.
    """
    config = model.config
    if set(config.supported_modes) != {ATTN, LINEAR}:
        raise ValueError(f"the switching curve needs both modes; variant {config.variant!r} has only one")
    points = sorted(set(switch_at))
    if not points or points[0] <= 0 or points[-1] >= length:
        raise ValueError(f"switch positions must lie in (0, {length}), got {switch_at}")
    specs = {str(parse(spec)): parse(spec) for spec in schedules}
    indices = window_indices(len(tokens), length, windows * length)
    n = len(indices)
    if n < windows:
        raise ValueError(f"{len(tokens)} tokens give only {n} windows of {length + 1}; asked for {windows}")
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    excess: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)

    def add(name: str, start: int, nll: torch.Tensor, into: dict[str, torch.Tensor] = sums) -> None:
        into.setdefault(name, torch.zeros(length, dtype=torch.float64, device=device))
        into[name][start : start + nll.shape[1]] += nll.double().sum(0)

    for first in range(0, n, batch_size):
        batch = [window(tokens, int(i), length) for i in indices[first : first + batch_size]]
        ids = torch.from_numpy(np.stack(batch)).to(device)  # [rows, L+1]
        no_switch: dict[int, list[torch.Tensor]] = {ATTN: [], LINEAR: []}  # per-token NLL of each mode alone
        for base, other in ((ATTN, LINEAR), (LINEAR, ATTN)):
            cache, start = OryxCache(config), 0
            for stop in [*points, length]:
                nll = _segment_nll(model, ids, base, start, stop, cache, precision)
                no_switch[base].append(nll)
                add(curve_name(base), start, nll)
                for at in points:  # every switch after this segment shares it as its prefix
                    if at >= stop:
                        add(curve_name(base, other, at), start, nll)
                if stop < length:
                    branch = copy.deepcopy(cache)
                    add(
                        curve_name(base, other, stop),
                        stop,
                        _segment_nll(model, ids, other, stop, length, branch, precision),
                    )
                start = stop
        alone = {mode: torch.cat(parts, dim=1) for mode, parts in no_switch.items()}
        for spec, schedule in specs.items():
            modes = schedule.modes(len(batch), length, generator=generator, prompt_length=length).to(device)
            with autocast(ids.device, precision):
                nll = token_nll(model, ids[:, :-1], ids[:, 1:], modes)
            add(spec, 0, nll)
            add(spec, 0, nll - torch.where(modes == ATTN, alone[ATTN], alone[LINEAR]), into=excess)
    mean = {name: (total / n).cpu().numpy() for name, total in sums.items()}
    return SwitchingCurves(
        length=length,
        switch_at=points,
        windows=n,
        nll={name: values for name, values in mean.items() if name not in specs},
        schedules={spec: mean[spec] for spec in specs},
        excess={spec: (total / n).cpu().numpy() for spec, total in excess.items()},
    )


def _segment_nll(
    model: torch.nn.Module, ids: torch.Tensor, mode: int, start: int, stop: int, cache: OryxCache, precision: str
) -> torch.Tensor:
    """NLL [rows, stop − start] of positions start…stop−1 of `ids` [rows, L+1] in `mode`, continuing `cache`."""
    modes = torch.full((ids.shape[0], stop - start), mode, dtype=torch.long, device=ids.device)
    with autocast(ids.device, precision):
        return token_nll(model, ids[:, start:stop], ids[:, start + 1 : stop + 1], modes, cache=cache)


def plot(curves: SwitchingCurves, path: str | Path, smooth: int, title: str = "") -> None:
    """Top: perplexity against position, both no-switch curves and the switches, one panel per direction (as in
    Figure 3). Bottom: each switch relative to the no-switch curve of the mode it switches to, which removes the
    text's own ups and downs (shared by all curves) and shows how fast a switch settles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = curves.smoothed_perplexity(smooth)
    x = np.arange(curves.length)
    skip = min(curves.length // 8, max(smooth, 8))  # the first positions have little context and dwarf the rest
    shown = np.concatenate([v[skip:] for v in ppl.values()])
    low, high = np.percentile(shown, 0.5), np.percentile(shown, 99.5)
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True, height_ratios=(3, 2))
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(curves.switch_at)))
    relative_shown: list[np.ndarray] = []
    for column, (first, second) in enumerate(((ATTN, LINEAR), (LINEAR, ATTN))):
        top, bottom = axes[0, column], axes[1, column]
        top.plot(x, ppl[curve_name(ATTN)], color="tab:red", lw=1.6, label="attention only")
        top.plot(x, ppl[curve_name(LINEAR)], color="tab:blue", lw=1.6, label="linear only")
        target = ppl[curve_name(second)]
        for at, color in zip(curves.switch_at, colors, strict=True):
            switched = ppl[curve_name(first, second, at)]
            top.plot(x[at:], switched[at:], color=color, lw=1.1, ls="--", label=f"switch at {at}")
            bottom.plot(x[at:], 100 * (switched[at:] / target[at:] - 1), color=color, lw=1.2, label=f"switch at {at}")
            for ax in (top, bottom):
                ax.axvline(at, color=color, lw=0.6, ls=":")
        no_switch = 100 * (ppl[curve_name(first)] / target - 1)
        relative_shown.append(no_switch[skip:])
        bottom.plot(x, no_switch, color="0.6", lw=1, label=f"{MODE_NAME[first]} only")
        bottom.axhline(0, color="k", lw=0.8)
        top.set_title(f"{MODE_NAME[first]} → {MODE_NAME[second]}")
        top.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        bottom.set_xlabel("token position")
        bottom.set_ylabel(f"% above {MODE_NAME[second]} only")
        bottom.set_xlim(skip, curves.length - 1)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    spread = max(1.0, float(np.abs(np.concatenate(relative_shown)).max()))
    for ax in axes[1]:
        ax.set_ylim(-1.15 * spread, 1.15 * spread)
    axes[0, 0].set_ylabel(f"perplexity (trailing mean of NLL over {smooth} positions)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(title or f"switching curve ({curves.windows} validation sequences)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_schedules(curves: SwitchingCurves, path: str | Path, smooth: int, title: str = "") -> None:
    """Top: perplexity against position of every extra schedule beside both no-switch curves. Bottom: each schedule's
    excess over the no-switch run of the mode each token is in (in %, trailing mean over `smooth` positions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(curves.length)
    skip = min(curves.length // 8, max(smooth, 8))
    ppl = curves.smoothed_perplexity(smooth)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=(3, 2))
    top.plot(x, ppl[curve_name(ATTN)], color="tab:red", lw=1.6, label="attention only")
    top.plot(x, ppl[curve_name(LINEAR)], color="tab:blue", lw=1.6, label="linear only")
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, len(curves.schedules)))
    for (spec, nll), color in zip(curves.schedules.items(), colors, strict=True):
        top.plot(x, np.exp(_trailing_mean(nll, smooth)), color=color, lw=1.1, ls="--", label=spec)
        excess = 100 * np.expm1(_trailing_mean(curves.excess[spec], smooth))
        bottom.plot(x, excess, color=color, lw=1.2, label=spec)
    bottom.axhline(0, color="k", lw=0.8)
    top.set_ylabel(f"perplexity (trailing mean of NLL over {smooth} positions)")
    bottom.set_ylabel("% above no-switch, same modes")
    bottom.set_xlabel("token position")
    bottom.set_xlim(skip, curves.length - 1)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
    fig.suptitle(title or f"schedules ({curves.windows} validation sequences)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
