"""Method callbacks outside edgetune's loop: a user's plain PyTorch loop, or the Hugging Face ``Trainer``.

:class:`MethodStepper` drives any edgetune :class:`~edgetune.core.hooks.Callback` from a loop you wrote
(one ``stepper.step()`` after ``optimizer.step()``). The Hugging Face adapter,
``edgetune.integrations.hf_trainer.EdgetuneTrainerCallback``, lives in its own module because it imports
``transformers`` (``pip install 'edgetune[hf]'``).
"""

from edgetune.integrations.stepper import MethodStepper, unwrap_model, unwrap_optimizer

__all__ = ["MethodStepper", "unwrap_model", "unwrap_optimizer"]
