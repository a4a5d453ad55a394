"""The sparse family's bench suites: ``sparse`` (link prediction and train-step speed), ``sparse-predictors``
(exact predictors 1024² to 16384², beside the official code when given) and ``sparse-quality``."""

from edgetune.sparse.bench import predictors as _predictors  # noqa: F401  (registers its suite)
from edgetune.sparse.bench import quality as _quality  # noqa: F401  (registers its suite)
from edgetune.sparse.bench import suite as _suite  # noqa: F401  (registers its suite)
