"""Diffusion priors: learned MONAI UNet priors (shipped and user-trained) and the analytic Gaussian prior.

    from klip_med import priors
    prior = priors.load("mri-brain-flair-128")     # a shipped prior, offline
    prior = priors.load("runs/my-prior")            # any folder with config.json + weights.safetensors
"""

from klip_med.priors.config import PriorConfig
from klip_med.priors.diffusion import DiffusionPrior, load_prior_dir, save_prior_dir
from klip_med.priors.gaussian import GaussianPrior
from klip_med.priors.intensity import IntensityRule
from klip_med.priors.registry import available, describe, load, model_card

__all__ = [
    "DiffusionPrior",
    "GaussianPrior",
    "IntensityRule",
    "PriorConfig",
    "available",
    "describe",
    "load",
    "load_prior_dir",
    "model_card",
    "save_prior_dir",
]
