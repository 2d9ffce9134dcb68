"""Training: `TrainConfig` (settings), `train` (the loop, exact resume, DDP/FSDP2), checkpoints and the report.

>>> from oryx.training import TrainConfig, train
>>> result = train(TrainConfig(steps=100, out_dir="runs/try"))
"""

from oryx.checkpoint import CheckpointError
from oryx.training.config import ConfigError, TrainConfig
from oryx.training.trainer import TrainingDiverged, TrainingInterrupted, TrainResult, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "train",
]
