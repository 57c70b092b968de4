"""Clinical I/O: DICOM / NIfTI in with geometry, DICOM / NIfTI / PNG out on the source grid.

Read:      :func:`read_dicom_series`, :func:`read_nifti` -> :class:`Volume`
           (float32 (Z, H, W) pixels, 4x4 voxel->LPS affine, source datasets);
           :func:`read_input` (what ``klip-med run`` reads: DICOM, NIfTI or .npz) -> :class:`RunInput`.
Resample:  :func:`working_grid` / :func:`to_source_grid` (source <-> prior's in-plane grid),
           :func:`resample_to` (one volume onto another's grid through patient space).
Volumes:   :func:`iter_slice_batches`, :func:`map_slices`, :func:`pool_volume_map`.
Write:     :func:`write_derived_series`, :func:`write_parametric_map`, :func:`write_seg`,
           :func:`write_ood_seg`, :func:`write_fractional_seg`, :func:`write_secondary_captures`,
           :func:`write_nifti`, :func:`write_figure`, :func:`write_report` -- all atomic, never
           touching the inputs. The whole output set of a run: :mod:`klip_med.io.outputs`.
"""

from klip_med._atomic import atomic_path
from klip_med.io.batch import (
    SliceBatch,
    blocks_to_voxels,
    iter_slice_batches,
    map_slices,
    pool_volume_map,
)
from klip_med.io.dicom import validate
from klip_med.io.dicom.parametric_map import NATS_PER_PIXEL, read_parametric_map, write_parametric_map
from klip_med.io.dicom.read import read_dicom_series
from klip_med.io.dicom.secondary_capture import fuse_heatmap, write_secondary_captures
from klip_med.io.dicom.seg import (
    ANATOMY_CATEGORY,
    ANATOMY_TYPE,
    read_seg,
    seg_label_values,
    write_fractional_seg,
    write_ood_seg,
    write_seg,
)
from klip_med.io.dicom.series import write_derived_series
from klip_med.io.figures import write_figure, write_report
from klip_med.io.inputs import RunInput, read_input
from klip_med.io.nifti import read_nifti, write_nifti
from klip_med.io.resample import resample_inplane, resample_to, to_source_grid, working_grid
from klip_med.io.volume import Volume, lps_to_ras, ras_to_lps

__all__ = [
    "ANATOMY_CATEGORY",
    "ANATOMY_TYPE",
    "NATS_PER_PIXEL",
    "RunInput",
    "SliceBatch",
    "Volume",
    "atomic_path",
    "blocks_to_voxels",
    "fuse_heatmap",
    "iter_slice_batches",
    "lps_to_ras",
    "map_slices",
    "pool_volume_map",
    "ras_to_lps",
    "read_dicom_series",
    "read_input",
    "read_nifti",
    "read_parametric_map",
    "read_seg",
    "resample_inplane",
    "resample_to",
    "seg_label_values",
    "to_source_grid",
    "validate",
    "working_grid",
    "write_derived_series",
    "write_figure",
    "write_report",
    "write_fractional_seg",
    "write_nifti",
    "write_ood_seg",
    "write_parametric_map",
    "write_secondary_captures",
    "write_seg",
]
