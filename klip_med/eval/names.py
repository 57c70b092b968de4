"""Names the eval command offers, kept free of heavy imports so ``klip-med --help`` stays fast."""

BASELINES = ("posterior_std", "residual", "anoddpm", "eigenscore", "cfs", "dlsr", "diffguard", "monai_likelihood",
             "brightness", "brightness_dev", "centrality")
"""Baselines :func:`klip_med.eval.baselines.compute_baselines` knows, in table order."""

POST_HOC = ("anoddpm", "eigenscore", "cfs", "dlsr", "diffguard", "monai_likelihood")
"""Baselines computed from the posterior mean alone (as the eval cache stores it, float16), each with
its own random generator: the benchmark adds them to a cached slice without sampling it again."""

SHIFTS = ("bright", "hypo", "texture", "star", "metal")
"""Inserted shift kinds of ``klip-med eval --lesions inserted --shift`` (:mod:`klip_med.data.selection`)."""

DEFAULT_WINDOWS = ("t:0.1,1", *(f"t:{k / 10:g},{(k + 1) / 10:g}" for k in range(1, 10)))
"""The windows of ``klip-med run`` (:data:`klip_med.pipeline.RUN_WINDOWS`, written out here so that
``klip-med --help`` needs no torch import; a test keeps them equal): the default of ``klip-med eval``
(normalised diffusion time u = t / (T - 1); 0 = clean end)."""

READOUTS = ("denoised", "tstat")
"""Further KLIP read-outs of the sampling pass (``klip-med eval --readouts``; :mod:`klip_med.eval.readouts`):
``denoised`` rows ``klip_dn[<window>]`` (the KL split over pixels by the denoiser), ``tstat`` rows
``klip_t[<window>]`` (a t-statistic over the posterior samples)."""
