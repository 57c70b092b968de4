"""The KLIP estimator: pure tensor math plus one streaming accumulator.

Nothing here knows about samplers, priors or physics; samplers speak to it through
:class:`StepEvent` only.
"""

from klip_med.score.accumulator import KLIPAccumulator, KLIPMaps, klip_pixel_map
from klip_med.score.blocks import (
    BlockScores,
    ImageScore,
    blocks_inside_mask,
    image_score,
    pool_blocks,
)
from klip_med.score.events import StepEvent, StepObserver
from klip_med.score.kl import COMBINES, NORMALIZATIONS, squared_change, step_pixel_kl
from klip_med.score.recorder import TrajectoryRecorder
from klip_med.score.windows import (
    FULL,
    Window,
    check_windows_cover_steps,
    normalized_time,
    sigmas_from_alphas_cumprod,
    timestep_at,
    window_from_normalized_time,
    window_from_step_indices,
)

__all__ = [
    "BlockScores",
    "COMBINES",
    "FULL",
    "ImageScore",
    "KLIPAccumulator",
    "KLIPMaps",
    "NORMALIZATIONS",
    "StepEvent",
    "StepObserver",
    "TrajectoryRecorder",
    "Window",
    "blocks_inside_mask",
    "check_windows_cover_steps",
    "normalized_time",
    "image_score",
    "klip_pixel_map",
    "pool_blocks",
    "sigmas_from_alphas_cumprod",
    "squared_change",
    "step_pixel_kl",
    "timestep_at",
    "window_from_normalized_time",
    "window_from_step_indices",
]
