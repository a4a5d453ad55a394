"""Static sparse training: a fixed random (Erdos-Renyi) mask, never updated. The baseline every DST
method must beat (Mocanu et al. 2018 and Evci et al. 2020 use it as "static")."""

from edgetune.sparse.methods import register_sparse_method

register_sparse_method(
    "static",
    {"topology": "er", "update_interval": 1, "update_unit": "epochs", "zeta": 0.3, "zeta_schedule": "constant",
     "removal": "magnitude", "regrowth": "none", "predictor": "ch3_l3", "percolation": False,
     "skip_step_on_update": False},
    summary="fixed random sparse mask (no topology updates)",
)
