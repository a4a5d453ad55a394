"""CHTss: CHTs with sigmoid gradual density decay (Zhang et al., NeurIPS 2025, arXiv 2501.19107).

Training starts at ``initial_density`` (default: 5x the target, capped at 0.5) and decays to
``density`` along the sigmoid schedule of the official LLM scheduler; at each update every layer is
first pruned to the scheduled density by relative importance, then a CHTs step (soft removal, CH
regrowth with the node-based CH2-L3n predictor) runs at that density.

Defaults are the MLP/Transformer settings (zeta 0.3 cosine, T 1 -> 3, one update per epoch, ER). The
official LLM runs used zeta 0.1, T 1 -> 9, an update every 100 steps, BRF (r=0.3) and 50% -> target:
``sparse.zeta=0.1 sparse.temperature=[1,9] sparse.update_interval=100 sparse.update_unit=steps
sparse.topology=brf sparse.initial_density=0.5``.
"""

from edgetune.sparse.methods import register_sparse_method

register_sparse_method(
    "chtss",
    {"topology": "er", "update_interval": 1, "update_unit": "epochs", "zeta": 0.3, "zeta_schedule": "cosine",
     "removal": "soft_magnitude", "regrowth": "ch_soft", "predictor": "ch2_l3n", "percolation": True,
     "skip_step_on_update": True,
     "initial_density": lambda cfg: min(max(cfg.density, 0.5), 5 * cfg.density) if cfg.density < 0.5 else cfg.density},
    summary="CHTs + sigmoid density decay from an initial to the final density (Zhang et al. 2025)",
)
