"""Per-slice centring: the patient's own KL level taken out of a slice's z-scores.

Healthy patients differ in how much KL their reconstructions carry everywhere (a patient random
effect: acquisition, head size, contrast, noise). Measured on the LGG FLAIR patients
(BENCHMARKS.md, calibration): the median in-body z of a test patient's healthy slices reached +1.47
under a model fitted on the dev patients, whose own medians lay in [-1.02, +0.68], so such a
patient's blocks were flagged at twice the nominal rate and most of its slices at the family-wise
level. A model fitted on more patients cannot fix this: the next patient may lie further out.

The model is a random intercept on the log block density: a slice's level adds the same amount to
every block's log density in a window. With ``centring="slice"`` each window's residuals (log
density minus the family's expected value) have their median over the slice's in-body blocks
removed before they are standardised and the windows combined::

    z_w(b) = (r_w(b) - median_{b' inside} r_w(b')) / s_w(b),   r_w(b) = log d_w(b) - m_w(b)

(the median estimates the slice's level, robust to a lesion covering less than half the body;
centring z-scores instead of residuals would leave a shift that differs with each position's
spread). The families' means and spreads are fitted on level-free healthy slices (each window's
in-body median removed), and the reference distribution, the Stouffer scale and the slice level on
held-out healthy slices centred exactly as a scored slice is, so p-values keep their meaning: a flag says "this block carries more KL than
the rest of this slice, by more than healthy slices show", not "this patient carries more KL than
the calibration patients". The price: a shift that raises the whole slice (a global artefact, a
scan unlike every calibration scan) no longer raises its blocks' z; the dataset-level score of such
a scan must come from the uncentred map (``klip`` in nats) or a model with ``centring="none"``.

A slice with fewer than :data:`MIN_CENTRE_BLOCKS` in-body blocks is left as it is (its median
would be noise); fitting and scoring apply the same rule.
"""

from __future__ import annotations

import numpy as np

from klip_med.errors import expect

CENTRINGS = ("none", "slice")
"""``none``: z-scores against the calibration patients as they are; ``slice``: each window's median
over the slice's in-body blocks removed (see the module docstring)."""
MIN_CENTRE_BLOCKS = 8
"""A slice needs at least this many in-body blocks for its median to be removed."""
DEFAULT_CENTRING = "none"
"""What a fit uses unless told otherwise (``klip-med calibrate``, ``eval --null lopo``, :func:`fit_null`)."""


def slice_levels(z: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Each window's median over the in-body blocks of one slice, (W,); zeros when fewer than
    :data:`MIN_CENTRE_BLOCKS` blocks are inside.

    Args:
        z: (W, gh, gw) per-window values (residual log densities). inside: (gh, gw) bool in-body blocks.
    """
    z = np.asarray(z, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    expect(z.ndim == 3 and inside.shape == z.shape[1:], "inside", f"a (gh, gw) = {z.shape[1:]} block mask",
           inside.shape)
    if int(inside.sum()) < MIN_CENTRE_BLOCKS:
        return np.zeros(z.shape[0])
    return np.median(z[:, inside], axis=1)


def centre_slice(z: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``z`` (W, gh, gw) with each window's in-body median removed (:func:`slice_levels`); a new array."""
    return np.asarray(z, dtype=np.float64) - slice_levels(z, inside)[:, None, None]


def level_free(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The healthy log densities a slice-centred model's families are fitted on: ``values``
    (W, N, gh, gw) with each image's per-window in-body median removed (``present`` (N, gh, gw)); a
    new array. (Any constant per image and window would do: scoring removes the median of the
    residuals again, so only the families' spreads depend on it, and they no longer hold the
    between-patient level.)"""
    out = np.array(values, dtype=np.float64)
    for k in range(out.shape[1]):
        out[:, k] = centre_slice(out[:, k], present[k])
    return out
