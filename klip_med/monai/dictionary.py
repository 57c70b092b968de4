"""``KLIPReconstructd``: the MONAI dictionary transform, :class:`~klip_med.monai.array.KLIPReconstruct`
applied to keys of a data dictionary."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from klip_med.errors import expect
from klip_med.monai.array import KLIPReconstruct


class KLIPReconstructd(MapTransform):
    """Dictionary version of :class:`KLIPReconstruct`: adds the reconstruction, KLIP map and std.

    Args:
        keys: the image key(s) to reconstruct (each as in :class:`KLIPReconstruct`).
        prior, physics: as in :class:`KLIPReconstruct`.
        recon_keys, klip_keys, std_keys, klip_z_keys: where the outputs go, one per key; default
            ``"<key>_recon"``, ``"<key>_klip"``, ``"<key>_std"``, ``"<key>_klip_z"`` (the last only
            when a null model applies).
        allow_missing_keys: skip keys absent from the data instead of raising MONAI's ``KeyError``
            (which names the key and this transform, as every MONAI dictionary transform does).
        **options: the keyword options of :class:`KLIPReconstruct` (``samples``, ``steps``,
            ``sampler``, ``windows``, ``block_size``, ``normalization``, ``seed``, ``device``,
            ``measure``, ``intensity``, ``mr_scale``, ``slice_axcodes``, ``all_windows``, ``null``).

    The outputs are ``MetaTensor`` s with the input's affine and metadata; save each with its own
    ``SaveImaged(keys=..., output_postfix=...)`` so their file names differ. The input is unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prior: Any,
        physics: Any,
        *,
        recon_keys: KeysCollection | None = None,
        klip_keys: KeysCollection | None = None,
        std_keys: KeysCollection | None = None,
        klip_z_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reconstruct = KLIPReconstruct(prior, physics, **options)
        self.recon_keys = self._output_keys(recon_keys, "recon")
        self.klip_keys = self._output_keys(klip_keys, "klip")
        self.std_keys = self._output_keys(std_keys, "std")
        self.klip_z_keys = self._output_keys(klip_z_keys, "klip_z")

    def _output_keys(self, given: KeysCollection | None, suffix: str) -> tuple[Hashable, ...]:
        if given is None:
            return tuple(f"{key}_{suffix}" for key in self.keys)
        names = ensure_tuple(given)
        expect(len(names) == len(self.keys), f"{suffix}_keys",
               f"one output key per input key ({len(self.keys)})", list(names))
        return tuple(names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, recon_key, klip_key, std_key, z_key in self.key_iterator(
                d, self.recon_keys, self.klip_keys, self.std_keys, self.klip_z_keys):
            out = self.reconstruct.outputs(d[key])
            d[recon_key], d[klip_key], d[std_key] = out["recon"], out["klip"], out["std"]
            if "klip_z" in out:
                d[z_key] = out["klip_z"]
        return d
