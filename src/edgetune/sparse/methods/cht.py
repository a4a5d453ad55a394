"""CHT: Cannistraci-Hebb Training (Zhang et al., ICLR 2024).

Gradient-free topological regrowth: remove by magnitude (zeta=0.3, cosine), cut dead neurons along
the layer chain (percolation), regrow the top-scoring non-links of the exact CH3-L3 link predictor,
new links at zero; a layer whose removed and regrown links overlap by more than 90% is frozen.
Updates once per epoch until 75% of training; CSTI/ER initial topology with SWI weights.
"""

from edgetune.sparse.methods import register_sparse_method

register_sparse_method(
    "cht",
    {"topology": "er", "update_interval": 1, "update_unit": "epochs", "zeta": 0.3, "zeta_schedule": "cosine",
     "removal": "magnitude", "regrowth": "ch_hard", "predictor": "ch3_l3", "percolation": True,
     "skip_step_on_update": True, "early_stop_overlap": 0.9},
    summary="magnitude removal, CH3-L3 top-k regrowth, percolation, early stop (Zhang et al. 2024)",
)
