"""Rules added on top of the built-in ones, one file each; importing this package registers them.

The built-in removal, regrowth, topology, weight-init and density-schedule rules register at the bottom
of their modules (removal.py, regrowth.py, topology.py, init.py, schedules.py); see
:mod:`edgetune.sparse.strategies` for the registries and the signatures.
"""

from edgetune.sparse.rules import em_s, mest, swi_out  # noqa: F401  (registration)
