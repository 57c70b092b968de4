"""Names the eval command offers, kept free of heavy imports so ``klip-med --help`` stays fast."""

BASELINES = ("posterior_std", "residual", "anoddpm", "eigenscore", "cfs", "brightness", "brightness_dev",
             "centrality")
"""Baselines :func:`klip_med.eval.baselines.compute_baselines` knows, in table order."""

DEFAULT_WINDOWS = ("full", "t:0,0.3", "t:0.3,0.6", "t:0.6,1")
"""KLIP windows filled in every run (normalised diffusion time t / (T - 1); 0 = clean end)."""
