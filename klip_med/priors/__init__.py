"""Diffusion priors. For now: the analytic Gaussian prior (ground truth for the estimator)."""

from klip_med.priors.gaussian import GaussianPrior

__all__ = ["GaussianPrior"]
