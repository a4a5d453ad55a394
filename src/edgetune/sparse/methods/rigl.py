"""RigL: Rigging the Lottery (Evci et al., ICML 2020).

Every 100 steps until 75% of training: remove the smallest-magnitude links (fraction zeta=0.3 with
cosine decay) and regrow the same number where the dense gradient of the current batch is largest;
new links start at zero and the optimizer step of the update batch is skipped (rigl-torch).
"""

from edgetune.sparse.methods import register_sparse_method

register_sparse_method(
    "rigl",
    {"topology": "er", "update_interval": 100, "update_unit": "steps", "zeta": 0.3, "zeta_schedule": "cosine",
     "removal": "magnitude", "regrowth": "gradient", "predictor": "ch3_l3", "percolation": False,
     "skip_step_on_update": True},
    summary="magnitude removal, dense-gradient regrowth (Evci et al. 2020)",
)
