"""Synthetic lesions with exact ground-truth masks, inserted into real 2D slices.

Arrays: an image is a numpy array of shape (H, W) (torch tensors are refused: pass
``tensor.numpy()``). It is read as float32 and never modified; every function returns a new
float32 image. Pixel (row, col) has its centre at (row, col). ``pixel_spacing_mm`` is the
(row, column) spacing in mm, or one number for square pixels. All randomness comes from the
``numpy.random.Generator`` passed in: the same generator state and arguments give the same lesion.

Mask definition (the ground truth AUROCs are computed against)
    Each insertion is built from noiseless *profiles* P in [0, 1]: the shape with its soft sigmoid
    rim, before texture. The mask is the union over components of ``P >= 0.5``, the half-maximum
    contour. For round lesions that is exactly the pixels within the boundary radius r(theta) of
    the centre, so its area is pi * diameter**2 / 4 up to the irregularity (+<= 1 %) and pixel
    discretisation. Texture never enters the mask. A FLAIR lesion's oedema ring is a component
    (the mask is lesion + oedema, like the FLAIR "whole tumour"); a star's mask is its arms; a
    metal source's mask is the object; a cavity's and a texture change's mask is their disc.

Contrast
    ``contrast`` is the mean inserted change (output - input) over the lesion *core*: the pixels
    where the main profile is >= 0.9 of its maximum. The amplitude is scaled so that this holds
    exactly (FLAIR: before clipping to ``intensity_range``). Metal and a FLAIR cavity replace the
    pixel values (by ``density_hu`` / the fluid ``level``), so their ``contrast`` is measured; a texture
    change has zero mean change over its mask (``params['mean_change_in_mask']``, measured after
    clipping) and std ``params['amplitude']``.

Outside the mask (the soft-edge tolerance)
    The change is at most ``|amplitude| * (1 + 3 * texture) * P`` with P < 0.5, falling off like
    ``exp(-distance_beyond_boundary / edge_mm)``; wherever every profile is below
    ``SUPPORT = 1e-3`` the output equals the input (as float32) bit for bit.
"""

from klip_med.data.lesions.artefacts import (
    STAR_ARMS_RANGE,
    STAR_CONTRAST_RANGE,
    STAR_CONTRAST_RANGE_HU,
    STAR_DIAMETER_RANGE_MM,
    TEXTURE_AMPLITUDE_RANGE,
    TEXTURE_AMPLITUDE_RANGE_HU,
    TEXTURE_DIAMETER_RANGE_MM,
    insert_star,
    insert_texture,
)
from klip_med.data.lesions.ct import (
    CT_CONTRAST_RANGE_HU,
    CT_DIAMETER_RANGE_MM,
    CT_HYPERDENSE_RANGE_HU,
    CT_HYPODENSE_RANGE_HU,
    CT_SOFT_TISSUE_HU,
    CT_SOFT_TISSUE_SMOOTH_MM,
    METAL_DENSITY_RANGE_HU,
    METAL_DIAMETER_RANGE_MM,
    insert_ct_lesion,
    insert_metal,
    soft_tissue_mask_ct,
)
from klip_med.data.lesions.geometry import (
    CORE_LEVEL,
    MASK_LEVEL,
    SUPPORT,
    Inserted,
    Lesion,
    largest_inscribed_radius_mm,
)
from klip_med.data.lesions.mr import (
    FLAIR_CAVITY_LEVEL_RANGE,
    FLAIR_CONTRAST_RANGE,
    FLAIR_DIAMETER_RANGE_MM,
    head_region,
    insert_flair_cavity,
    insert_flair_lesion,
)

__all__ = [
    "CORE_LEVEL", "CT_CONTRAST_RANGE_HU", "CT_DIAMETER_RANGE_MM", "CT_HYPERDENSE_RANGE_HU", "CT_HYPODENSE_RANGE_HU",
    "CT_SOFT_TISSUE_HU", "CT_SOFT_TISSUE_SMOOTH_MM", "FLAIR_CAVITY_LEVEL_RANGE", "FLAIR_CONTRAST_RANGE",
    "FLAIR_DIAMETER_RANGE_MM", "Inserted", "Lesion", "MASK_LEVEL", "METAL_DENSITY_RANGE_HU",
    "METAL_DIAMETER_RANGE_MM", "STAR_ARMS_RANGE", "STAR_CONTRAST_RANGE", "STAR_CONTRAST_RANGE_HU",
    "STAR_DIAMETER_RANGE_MM", "SUPPORT", "TEXTURE_AMPLITUDE_RANGE", "TEXTURE_AMPLITUDE_RANGE_HU",
    "TEXTURE_DIAMETER_RANGE_MM", "head_region", "insert_ct_lesion", "insert_flair_cavity", "insert_flair_lesion",
    "insert_metal", "insert_star", "insert_texture", "largest_inscribed_radius_mm", "soft_tissue_mask_ct",
]
