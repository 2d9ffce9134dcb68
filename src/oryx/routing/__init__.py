"""Dynamic mode selection: the model decides where to attend, under an attention budget.

    router = train_router(model, windows)               # oryx train-router RUN_DIR does this on the run's data
    model.attach_router(router)
    out = model(input_ids, schedule="router:budget=0.05")
    out.modes                                            # [B, T], at most 5 % + one unit in attention per prefix

The pieces: the budget rule and its threshold calibration (`budget`), the router head and its file (`router`), the
routing decision inside a forward for the `router:`, `entropy:` and `random:` schedules (`policies`), and router
training with the language model frozen (`training`). docs/design.md §15 explains the design.
"""

from oryx.routing.budget import RoutingState, calibrate_threshold, decide
from oryx.routing.router import ROUTER_FILE, Router, RouterConfig, load_router, save_router, seen_before

__all__ = [
    "ROUTER_FILE",
    "Router",
    "RouterConfig",
    "RoutingState",
    "calibrate_threshold",
    "decide",
    "load_router",
    "save_router",
    "seen_before",
]
