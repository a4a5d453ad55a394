"""The training loop, its config, checkpoints and DDP support. Knows no method: methods are callbacks."""

from edgetune.train.checkpoint import CheckpointManager
from edgetune.train.config import CheckpointConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from edgetune.train.loop import Trainer, evaluate, resolve_device

__all__ = [
           "CheckpointConfig",
           "CheckpointManager",
           "OptimizerConfig",
           "ScheduleConfig",
           "TrainConfig",
           "Trainer",
           "evaluate",
           "resolve_device",
]
