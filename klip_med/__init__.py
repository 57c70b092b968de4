"""klip_med: diffusion posterior reconstruction of CT / MRI with KLIP out-of-distribution maps.

KLIP (Kheirandish, Hong, Fridovich-Keil, CVPR 2026) scores how hard the measurements push a
diffusion posterior sampler away from the path its prior would have taken, as the KL divergence
between the two sampling chains, restricted to windows of diffusion time and to spatial blocks.

Subpackages:
    score     the estimator (pure tensor math + a streaming accumulator)
    sampling  posterior samplers emitting one StepEvent per step
    physics   CT / MRI forward operators over deepinv.physics
    priors    diffusion priors (an analytic Gaussian prior for tests and ground truth)
"""

from klip_med.errors import KLIPMedError

__version__ = "0.1.0"

__all__ = ["KLIPMedError", "__version__"]
