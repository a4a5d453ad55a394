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
from edgetune.models.base import ModelSpec, build_model
from edgetune.recipe import RunConfig, load_recipe
from edgetune.runner import RunResult, resume, run
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer, evaluate

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Config",
    "EdgetuneError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "ShapeError",
    "Callback",
    "TrainState",
    "Registry",
    "SectionContext",
    "register_section",
    "DataBundle",
    "DataConfig",
    "load_dataset",
    "ModelSpec",
    "build_model",
    "RunConfig",
    "load_recipe",
    "RunResult",
    "run",
    "resume",
    "TrainConfig",
    "Trainer",
    "evaluate",
]
