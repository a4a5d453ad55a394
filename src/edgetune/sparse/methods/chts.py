"""CHTs: Cannistraci-Hebb Training with soft rules (Zhang et al., NeurIPS 2025, arXiv 2501.19107).

Removal samples the links to keep with probability proportional to |w|^T, T rising linearly 1 -> 3
(exploration early, near-hard magnitude late); regrowth samples non-links with probability
proportional to their CH score (CH3-L3 exact on small layers; ``predictor: ch2_l3n`` for the
GPU-friendly node-based approximation); percolation; updates once per epoch, zeta=0.3 cosine.
"""

from edgetune.sparse.methods import register_sparse_method

register_sparse_method(
    "chts",
    {"topology": "er", "update_interval": 1, "update_unit": "epochs", "zeta": 0.3, "zeta_schedule": "cosine",
     "removal": "soft_magnitude", "regrowth": "ch_soft", "predictor": "ch3_l3", "percolation": True,
     "skip_step_on_update": True},
    summary="soft magnitude removal, soft CH regrowth, percolation (Zhang et al. 2025)",
)
