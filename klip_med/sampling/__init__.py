"""Posterior samplers that emit one :class:`~klip_med.score.StepEvent` per step."""

from klip_med.sampling.base import PosteriorSampler, SampleResult, StepPlan, plan_steps
from klip_med.sampling.ddpm import DPSSampler, ScoreGuidedSampler
from klip_med.sampling.dds import DDSSampler
from klip_med.sampling.prior import EpsilonPrior
from klip_med.sampling.schedule import VPSchedule, linear_beta_alphas_cumprod

__all__ = [
    "DDSSampler",
    "DPSSampler",
    "EpsilonPrior",
    "PosteriorSampler",
    "SampleResult",
    "ScoreGuidedSampler",
    "StepPlan",
    "VPSchedule",
    "linear_beta_alphas_cumprod",
    "plan_steps",
]
