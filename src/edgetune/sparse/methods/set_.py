"""SET: Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018).

Every epoch remove the fraction zeta=0.3 of links with the smallest magnitude and regrow as many
uniformly at random among non-links; new links start at zero (as in the CHT code's SET baseline).
"""

from edgetune.sparse.methods import register_sparse_method

register_sparse_method(
    "set",
    {"topology": "er", "update_interval": 1, "update_unit": "epochs", "zeta": 0.3, "zeta_schedule": "constant",
     "removal": "magnitude", "regrowth": "random", "predictor": "ch3_l3", "percolation": False,
     "skip_step_on_update": False},
    summary="magnitude removal, random regrowth (Mocanu et al. 2018)",
)
