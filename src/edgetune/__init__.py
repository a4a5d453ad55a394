"""edgetune: make pretrained networks cheap to adapt and personalize for on-device use.

Public API (stable): recipes and runs, the training loop and its hooks, datasets, models, errors.
Method families (``edgetune.sparse``, ...) export their own verbs.
"""

from edgetune.core.config import Config
from edgetune.core.errors import CheckpointError, ConfigError, DataError, EdgetuneError, ShapeError
from edgetune.core.hooks import Callback, TrainState
from edgetune.core.registry import Registry
from edgetune.core.sections import SectionContext, register_section
from edgetune.data.base import DataBundle, DataConfig, load_dataset
from edgetune.data.batches import DictDataset
from edgetune.models.base import ModelSpec, build_model
from edgetune.models.source import LoadedModel
from edgetune.recipe import RunConfig, load_recipe
from edgetune.runner import RunResult, resume, run
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer, evaluate
from edgetune.train.tasks import Task, get_task

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataBundle",
    "DataConfig",
    "DataError",
    "DictDataset",
    "EdgetuneError",
    "LoadedModel",
    "ModelSpec",
    "Registry",
    "RunConfig",
    "RunResult",
    "SectionContext",
    "ShapeError",
    "Task",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "__version__",
    "build_model",
    "evaluate",
    "get_task",
    "load_dataset",
    "load_recipe",
    "register_section",
    "resume",
    "run",
]
