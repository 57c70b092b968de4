"""Data: manifests of real data (validated, checksummed), synthetic lesions with exact masks, phantoms.

    from klip_med.data import read_manifest, insert_ct_lesion, ct_phantom
"""

from klip_med.data.lesions import (
    Inserted,
    Lesion,
    insert_ct_lesion,
    insert_flair_lesion,
    insert_metal,
    insert_star,
)
from klip_med.data.manifest import Manifest, ManifestItem, read_manifest, resolve_data_root
from klip_med.data.phantom import Phantom, ct_phantom, mr_phantom, phantom_with_lesion

__all__ = [
    "Inserted",
    "Lesion",
    "Manifest",
    "ManifestItem",
    "Phantom",
    "ct_phantom",
    "insert_ct_lesion",
    "insert_flair_lesion",
    "insert_metal",
    "insert_star",
    "mr_phantom",
    "phantom_with_lesion",
    "read_manifest",
    "resolve_data_root",
]
