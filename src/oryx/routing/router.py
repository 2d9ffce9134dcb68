"""The router: a small head that scores every token with the gain of attention over the linear mode, and its file.

It reads layer 0 of an Oryx model, where nothing depends on any token's mode: the layer's input is the embedding, and
both states advance on every token, so the linear branch's output (the recurrence over every token) is the same
whatever the modes. Token t's features are therefore causal and free to compute in parallel:

    f_t = [x_t ; o_t ; r_t]   x_t [D]: layer 0's mixer input (the normed embedding), o_t [D]: its linear branch's
                              output (all heads, before the gated norm), which has seen tokens 0 … t, and r_t: 1
                              if token t's id occurred earlier in the row, else 0 (`seen_before`; routers trained
                              before it, `seen_before=False`, read [x_t ; o_t])
    s_t = MLP((f_t − μ) / σ) · σ_Δ + μ_Δ      Linear(2D + 1 → width) → GELU → Linear(width → 1)

Why r_t: a fixed-size state forgets, and what it forgets most is an exact earlier token, which attention reads back
at once. A repeated id (a query key on MQAR, a name again in prose: the cue of an induction head) marks where that
read pays, and neither x_t nor o_t says reliably that the id came before. Across the forwards of one sequence (prefill,
then decoding) the ids seen so far are kept in the cache's routing state (`RoutingState.seen_ids`).

With the default training (`oryx.routing.training`), s_t predicts Δ_t = nll_linear(t) − nll_attention(t), in nats:
the gain of reading position t in attention for the prediction made there. μ, σ standardise the features and μ_Δ,
σ_Δ undo the targets' standardisation; all four are buffers fixed at training time. The router also keeps the scores
of calibration windows ([n, T], NaN after a row's end), from which the threshold of any budget is found
(`oryx.routing.budget.calibrate_threshold`).

Stored as `router.safetensors` next to the model's weights (its config as JSON in the file's metadata); the folder's
checksum manifest lists it, and `OryxForCausalLM.from_pretrained` attaches it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from oryx.routing.budget import OWN, PREVIOUS, calibrate_threshold, calibration_rows

ROUTER_FILE = "router.safetensors"
FORMAT = "oryx-router-1"

__all__ = ["ROUTER_FILE", "Router", "RouterConfig", "load_router", "save_router", "seen_before", "store_router"]


@dataclass
class RouterConfig:
    """What a router is and how it was made.

    hidden_size: D of the model it reads; variant: that model's variant; width: the head's hidden width;
    method: "regression" or "straight-through" (`oryx.routing.training`); seen_before: whether it reads r_t (False
    in the files written before it); trained: a record of its training (data, windows, steps, final loss), for
    reports.
    """

    hidden_size: int
    variant: str
    width: int = 32
    method: str = "regression"
    seen_before: bool = False
    trained: dict[str, Any] = field(default_factory=dict)


def seen_before(
    input_ids: torch.Tensor, real: torch.Tensor | None = None, seen_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T] bool: True where the row's token id occurred at an earlier real position of the row.

    input_ids [B, T]; real [B, T] bool (False at padding, which is never seen and marks nothing; None: all real);
    seen_ids [B, V] bool: the ids of the row's earlier forwards (a prefill before this decoding step), updated in
    place with this forward's real ids; None for a forward that starts its sequences.
    """
    B, T = input_ids.shape
    ids = input_ids.long()
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    # Sort each row by (id, position): an id's later occurrences then follow its first one. Padding sorts last.
    key = torch.where(real, ids * T + torch.arange(T, device=ids.device), torch.iinfo(torch.long).max)
    ordered, index = key.sort(dim=1)
    repeat = torch.zeros_like(real)
    repeat[:, 1:] = ordered[:, 1:] // T == ordered[:, :-1] // T
    seen = torch.zeros_like(real).scatter(1, index, repeat) & real
    if seen_ids is not None:
        seen |= seen_ids.gather(1, ids) & real
        rows = torch.arange(B, device=ids.device)[:, None].expand(B, T)
        seen_ids[rows[real], ids[real]] = True
    return seen


class Router(nn.Module):
    """Scores [B, T] (predicted nats of gain from attention) of layer 0's input x [B, T, D], linear output
    o [B, T, H, d] and, when `config.seen_before`, the seen-before bits [B, T]; see the module docstring."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        width = 2 * config.hidden_size + int(config.seen_before)
        self.net = nn.Sequential(nn.Linear(width, config.width), nn.GELU(), nn.Linear(config.width, 1))
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.register_buffer("calibration", torch.zeros(0, 0))  # [n, T] scores of calibration windows, NaN-padded
        self._thresholds: dict[tuple[float, int], float] = {}

    @staticmethod
    def features(x: torch.Tensor, o_linear: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, 2D (+ 1)] float32: the mixer input x [B, T, D] beside the linear branch's output o [B, T, H, d]
        (and the seen-before bits [B, T], when given)."""
        parts = [x.float(), o_linear.flatten(2).float()]
        if seen is not None:
            parts.append(seen.to(device=x.device, dtype=torch.float32)[..., None])
        return torch.cat(parts, dim=-1)

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Scores [...] of raw features [..., 2D (+ 1)] (`features`)."""
        head = self.net[0]
        features = features.to(device=head.weight.device, dtype=head.weight.dtype)
        standard = self.net((features - self.feature_mean) / self.feature_std).squeeze(-1)
        return standard * self.target_std + self.target_mean

    def forward(self, x: torch.Tensor, o_linear: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.seen_before != (seen is not None):
            needs = "needs the seen-before bits" if self.config.seen_before else "reads no seen-before bits"
            raise ValueError(f"this router {needs} (RouterConfig.seen_before={self.config.seen_before})")
        return self.score_features(self.features(x, o_linear, seen))

    def set_calibration(self, scores: torch.Tensor) -> None:
        """Keep `scores` [n, T] (NaN after a row's end) as the calibration windows; forgets cached thresholds."""
        self.calibration = scores.detach().float().cpu()
        self._thresholds.clear()

    def threshold(self, budget: float, chunk: int = 1) -> float:
        """τ(budget) of token units (`chunk` = 1) or of chunks (scored by the chunk before), from the calibration
        windows; cached."""
        key = (budget, chunk)
        if key not in self._thresholds:
            if self.calibration.numel() == 0:
                raise ValueError("this router has no calibration windows; retrain it with oryx train-router")
            rows = calibration_rows(self.calibration)
            self._thresholds[key] = calibrate_threshold(rows, budget, chunk, OWN if chunk == 1 else PREVIOUS)
        return self._thresholds[key]

    def check_model(self, model_config: Any) -> None:
        """ValueError unless this router reads a model of `model_config`'s variant and width."""
        own = (self.config.variant, self.config.hidden_size)
        theirs = (model_config.variant, model_config.hidden_size)
        if own != theirs:
            raise ValueError(
                f"this router was trained for a {own[0]!r} model of width {own[1]}, not a {theirs[0]!r} model of "
                f"width {theirs[1]}; train one for this model with oryx train-router"
            )


def save_router(router: Router, folder: str | os.PathLike[str]) -> Path:
    """Write `folder/router.safetensors` atomically (its config in the metadata); returns its path. The caller
    records it in the folder's manifest (`store_router` does both)."""
    path = Path(folder) / ROUTER_FILE
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in router.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{ROUTER_FILE}-")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "config": json.dumps(asdict(router.config))})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_router(path: str | os.PathLike[str]) -> Router:
    """The router stored in `path` (a `router.safetensors` file), on the CPU, in eval mode.

    Raises:
        ValueError: the file is not a router file of this format.
    """
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an Oryx router file (format {metadata.get('format')!r}, not {FORMAT!r})")
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a dict)
    router = Router(RouterConfig(**json.loads(metadata["config"])))
    router.calibration = tensors["calibration"]  # its shape is the file's, not the empty default's
    router.load_state_dict(tensors)
    return router.eval()


def store_router(router: Router, folder: str | os.PathLike[str]) -> Path:
    """Save `router` into a verified model or checkpoint folder (replacing its router, if any) and add it to the
    folder's checksum manifest; the other files the manifest lists are checked first and stay as they are (the
    language model is not touched).

    Raises:
        CheckpointError: the folder's manifest is missing, or another file it lists is damaged.
    """
    from oryx.manifest import verify_manifest, write_manifest

    listed = verify_manifest(folder, ignore=(ROUTER_FILE,))
    path = save_router(router, folder)
    write_manifest(folder, names=sorted({*listed, ROUTER_FILE}))
    return path
