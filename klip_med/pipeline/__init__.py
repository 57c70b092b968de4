"""Reconstruct and score: the composition every user surface shares.

- :mod:`~klip_med.pipeline.settings`: :class:`KLIPSettings`, windows (:func:`parse_window`, the
  defaults of ``klip-med run``), the check that each window holds a sampling step.
- :mod:`~klip_med.pipeline.reconstruct`: one slice or a batch of slices -> :class:`SliceResult`.
- :mod:`~klip_med.pipeline.volume`: a whole volume, resumably, to the output set (``klip-med run``).
- :mod:`~klip_med.pipeline.calibrate`: reconstruct healthy images and fit a null model.
- :mod:`~klip_med.pipeline.demo`: the bundled cases of ``klip-med demo``.

    from klip_med import priors
    from klip_med.pipeline import KLIPSettings, parse_window, reconstruct_image

    prior = priors.load("mri-brain-flair-128")
    out, y = reconstruct_image(prior, image, "mri:accel=4,center=0.08,noise=0.01", KLIPSettings())
"""

from klip_med.pipeline.reconstruct import (
    SliceResult,
    reconstruct_batch,
    reconstruct_image,
    reconstruct_measurement,
)
from klip_med.pipeline.settings import (
    CALIBRATED_WINDOWS,
    RUN_WINDOWS,
    SAMPLERS,
    KLIPSettings,
    check_windows,
    default_windows,
    make_sampler,
    parse_window,
)
from klip_med.pipeline.volume import RunOptions, baseline_name, run_volume

__all__ = [
    "CALIBRATED_WINDOWS",
    "KLIPSettings",
    "RUN_WINDOWS",
    "RunOptions",
    "SAMPLERS",
    "SliceResult",
    "baseline_name",
    "check_windows",
    "default_windows",
    "make_sampler",
    "parse_window",
    "reconstruct_batch",
    "reconstruct_image",
    "reconstruct_measurement",
    "run_volume",
]
