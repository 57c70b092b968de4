"""MONAI transforms: posterior reconstruction with a KLIP map inside a ``Compose`` pipeline.

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, SaveImaged
    from klip_med.monai import KLIPReconstructd

    pipeline = Compose([
        LoadImaged(keys="img"), EnsureChannelFirstd(keys="img"), Orientationd(keys="img", axcodes="RAS"),
        KLIPReconstructd(keys="img", prior="mri-brain-flair-128", physics="mri:accel=4,center=0.08"),
        SaveImaged(keys="img_recon", output_postfix="recon"),
        SaveImaged(keys="img_klip", output_postfix="klip"),
    ])

``KLIPReconstruct`` is the array version (returns a dict of ``MetaTensor``), ``KLIPReconstructd``
the dictionary version (adds ``<key>_recon``, ``<key>_klip``, ``<key>_std``). Both keep the input's
affine and metadata. This package is ``klip_med.monai``; it imports the real MONAI with absolute
imports only (``import monai``), so it never shadows it.
"""

from __future__ import annotations

from klip_med.monai.transforms import PRIOR_SLICE_AXCODES, KLIPReconstruct, KLIPReconstructd

__all__ = ["PRIOR_SLICE_AXCODES", "KLIPReconstruct", "KLIPReconstructd"]
