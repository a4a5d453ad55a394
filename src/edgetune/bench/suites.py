"""Foundation bench suites: importing this module registers ``pretrained``, ``loop-overhead`` and ``hf-parity``."""

from edgetune.bench import hf_parity, loop_overhead, pretrained  # noqa: F401  (registration on import)

__all__: list[str] = []
