"""MONAI transforms: posterior reconstruction with a KLIP map inside a ``Compose`` pipeline.

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, SaveImaged
    from klip_med.monai import KLIPReconstructd

    pipeline = Compose([
        LoadImaged(keys="img"), EnsureChannelFirstd(keys="img"), Orientationd(keys="img", axcodes="RAS"),
        KLIPReconstructd(keys="img", prior="mri-brain-flair-128", physics="mri:accel=4,center=0.08"),
        SaveImaged(keys="img_recon", output_postfix="recon"),
        SaveImaged(keys="img_klip", output_postfix="klip"),
    ])

``KLIPReconstruct`` is the array version (:mod:`~klip_med.monai.array`: returns one ``MetaTensor``
whose channels are the reconstruction, its std, the KLIP map and, with a null model, the KLIP
z-score; ``.outputs(img)`` gives them as a dict), ``KLIPReconstructd`` the dictionary version
(:mod:`~klip_med.monai.dictionary`: adds ``<key>_recon``, ``<key>_klip``, ``<key>_std`` and
``<key>_klip_z``). Both keep the input's affine and metadata; slice orientation is handled by
:mod:`~klip_med.monai.orientation`. This package is ``klip_med.monai``; it imports the real MONAI with absolute
imports only (``import monai``), so it never shadows it.
"""

from __future__ import annotations

from klip_med.monai.array import KLIPReconstruct
from klip_med.monai.dictionary import KLIPReconstructd
from klip_med.monai.orientation import PRIOR_SLICE_AXCODES

__all__ = ["PRIOR_SLICE_AXCODES", "KLIPReconstruct", "KLIPReconstructd"]
