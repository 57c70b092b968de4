"""The output set of ``klip-med demo`` and ``klip-med run``: one writer for both.

In the output folder ``DIR`` (every file written atomically; inputs never touched):

=================== =====================================================================
``summary.json``    scores (nats), windows, top blocks, threshold, prior + config provenance,
                    physics, settings and seed, timings, package versions, file list
``recon.nii.gz``    posterior mean on the source grid, physical units (HU / MR signal)
``klip.nii.gz``     KLIP map of the first window, nats per *source* pixel (block sums kept)
``klip_windows/``   further windows (``klip_<k>_<window>.nii.gz``), same units
``report.png``      the highest-scoring slice: input | baseline | posterior mean | posterior std |
                    KLIP over the posterior mean (truth mask contour cyan, OOD mask dashed lime)
``dicom/``          only for DICOM sources: ``recon/`` (derived series), ``klip_pm.dcm``
                    (Parametric Map), ``klip_seg.dcm`` (binary SEG of the OOD mask),
                    ``klip_sc.dcm`` (RGB Secondary Capture of the heat map over the source slice;
                    a volume gets one per slice in ``klip_sc/``)
=================== =====================================================================

Units. Scores (``score``, ``top_blocks``, the threshold) are block densities of the map on the
prior's working grid: nats per working pixel, the units of :class:`klip_med.pipeline.SliceResult`.
Maps written on the source grid (NIfTI, Parametric Map, report) are in nats per source pixel:
resampled with ``kind="density"``, so a region's sum in nats is the same on both grids.

OOD mask (``klip_seg.dcm``): the blocks inside the body flagged by ``--threshold``
(:mod:`klip_med.calibration.thresholds`).

With a null model, ``klip_z.nii.gz`` holds the block z-scores on the source grid (0 outside the
body) and ``summary.json`` the z-score and p-value of the top blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from klip_med.calibration.thresholds import flag_blocks
from klip_med.io.dicom.output_set import write_dicom_outputs
from klip_med.io.json_files import package_versions, write_json
from klip_med.io.resample import to_source_grid
from klip_med.io.volume import Volume
from klip_med.score.blocks import block_to_pixels


@dataclass
class VolumeResult:
    """Per-slice results of a run stacked in slice order, on the prior's working grid.

    Attributes:
        recon, recon_std, baseline: float32 ``(Z, h, w)`` in prior units ([-1, 1]): posterior mean,
            posterior std over the samples, measurement-domain baseline (zero-filled / FBP).
        klip, klip_sample_std: float32 ``(n_windows, Z, h, w)``, nats per working pixel.
        body: bool ``(Z, h, w)``, body mask of each posterior mean.
        densities: float32 ``(Z, gh, gw)``, first-window block densities (nats per working pixel).
        inside: bool ``(Z, gh, gw)``, blocks inside the body.
        slices: one JSON-ready record per slice (score, top blocks, seconds, network calls).
        block_size: block side in working pixels.
    """

    recon: np.ndarray
    recon_std: np.ndarray
    baseline: np.ndarray
    klip: np.ndarray
    klip_sample_std: np.ndarray
    body: np.ndarray
    densities: np.ndarray
    inside: np.ndarray
    slices: list[dict[str, Any]]
    block_size: int
    zscores: np.ndarray | None = None
    """float64 ``(Z, gh, gw)`` null z-scores of the first-window blocks (None without a null model)."""



def ood_mask(result: VolumeResult, flagged: np.ndarray) -> np.ndarray:
    """bool ``(Z, h, w)``: pixels of the ``flagged`` blocks (from :func:`flag_blocks`)."""
    return block_to_pixels(flagged, result.block_size, result.recon.shape[1:])



def _to_physical(rule, values: np.ndarray, scale: float | None) -> np.ndarray:
    return rule.to_physical(values, scale)


def _physical_std(rule, std: np.ndarray, scale: float | None) -> np.ndarray:
    gain = float(rule.to_physical(np.float32(1.0), scale) - rule.to_physical(np.float32(0.0), scale))
    return (std * gain).astype(np.float32)


def _source_rows_cols(block: dict[str, Any], source: Volume, work: tuple[int, int]) -> dict[str, Any]:
    """A working-grid block as source-grid pixel ranges and its centre in LPS mm."""
    H, W = source.shape[1:]
    sr, sc = H / work[0], W / work[1]
    r0, c0, size = block["row"], block["col"], block["size"]
    rows = [int(round(r0 * sr)), int(round(min(r0 + size, work[0]) * sr))]
    cols = [int(round(c0 * sc)), int(round(min(c0 + size, work[1]) * sc))]
    centre = np.array([block["slice"], (rows[0] + rows[1] - 1) / 2, (cols[0] + cols[1] - 1) / 2])
    return {"source_rows": rows, "source_cols": cols,
            "centre_lps_mm": [round(float(v), 2) for v in source.voxel_to_patient(centre)]}


def _volume_top_blocks(result: VolumeResult, n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` in-body blocks ranked by null z-score when there is one, else by density."""
    rank = np.where(result.inside, result.zscores if result.zscores is not None else result.densities, -np.inf)
    dens = np.where(result.inside, result.densities, -np.inf)
    order = np.argsort(rank.ravel(), kind="stable")[::-1][:n]
    out = []
    for flat in order:
        if not np.isfinite(rank.ravel()[flat]):
            break
        k, i, j = (int(v) for v in np.unravel_index(flat, dens.shape))
        b = result.block_size
        out.append({"slice": k, "row": i * b, "col": j * b, "size": b,
                    "nats_per_pixel": float(dens[k, i, j])})
    return out



def write_output_set(
    out: str | os.PathLike[str],
    source: Volume,
    result: VolumeResult,
    *,
    rule,
    mr_scale: float | None,
    threshold: str | float,
    summary: dict[str, Any],
    truth_mask: np.ndarray | None = None,
    baseline_name: str = "baseline",
    window_labels: list[str] | None = None,
    title: str = "",
    null=None,
) -> dict[str, Any]:
    """Write the whole output set (see the module docstring) and return the completed summary.

    Args:
        out: the output folder (exists).
        source: the volume the outputs sit on (source grid, ``(Z, H, W)``); with DICOM sources the
            ``dicom/`` objects reference its instances.
        result: per-slice results on the working grid.
        rule, mr_scale: the prior's intensity rule and the volume's MR scale (None for CT).
        threshold: OOD threshold spec (:func:`klip_med.calibration.thresholds.parse_threshold`).
        summary: what the caller knows (input, prior, physics, settings, timings); completed here.
        truth_mask: optional bool ``(Z, H, W)`` known lesion mask on the source grid.
        baseline_name: e.g. ``"zero-filled"`` or ``"FBP"``.
        window_labels: labels of the windows, in the order of ``result.klip``.
        null: the null model ``result.zscores`` came from (None: none applies).
    """
    from klip_med.io.figures import write_report
    from klip_med.io.nifti import write_nifti

    out = Path(out)
    work = tuple(result.recon.shape[1:])
    recon_src = to_source_grid(_to_physical(rule, result.recon, mr_scale), source)
    std_src = to_source_grid(_physical_std(rule, result.recon_std, mr_scale), source)
    base_src = to_source_grid(_to_physical(rule, result.baseline, mr_scale), source)
    klip_src = [to_source_grid(result.klip[w], source, kind="density") for w in range(result.klip.shape[0])]
    flagged, threshold_info = flag_blocks(result, threshold, null)
    mask_work = ood_mask(result, flagged)
    mask_src = to_source_grid(mask_work.astype(np.uint8), source, kind="label").astype(bool)

    files: dict[str, Any] = {"summary": "summary.json", **summary.get("outputs", {})}
    files["recon_nifti"] = write_nifti(recon_src, out / "recon.nii.gz", source).name
    labels = window_labels or [f"window{w}" for w in range(len(klip_src))]
    files["klip_nifti"] = [write_nifti(klip_src[0], out / "klip.nii.gz", source).name]
    if len(klip_src) > 1:
        (out / "klip_windows").mkdir(exist_ok=True)
    for w in range(1, len(klip_src)):
        safe = "".join(c if c.isalnum() else "_" for c in labels[w]).strip("_")
        path = write_nifti(klip_src[w], out / "klip_windows" / f"klip_{w}_{safe}.nii.gz", source)
        files["klip_nifti"].append(str(path.relative_to(out)))

    z_src = z_slice_max = None
    if null is not None and result.zscores is not None:
        z_slice_max = np.where(result.inside, result.zscores, -np.inf).max(axis=(1, 2))  # (Z,) in-body maxima
        z_in = np.where(result.inside, result.zscores, 0.0).astype(np.float32)  # blocks outside the body: 0
        z_src = to_source_grid(block_to_pixels(z_in, result.block_size, work), source, kind="label")
        files["klip_z_nifti"] = write_nifti(z_src, out / "klip_z.nii.gz", source).name

    scores = np.array([s["score"]["max"] for s in result.slices])
    best = int(np.argmax(scores))
    if z_src is not None:  # with a null model the report shows the slice with the highest z-score
        best = int(np.argmax(z_slice_max))
    files["report"] = write_report(
        out / "report.png",
        truth=source.pixels[best], baseline=base_src[best], recon=recon_src[best], std=std_src[best],
        klip=klip_src[0][best], truth_mask=None if truth_mask is None else truth_mask[best],
        ood_mask=mask_src[best], spacing=source.spacing[1:], modality=summary.get("input", {}).get("modality"),
        rule=rule, baseline_name=baseline_name, zmap=None if z_src is None else z_src[best],
        title=(f"{title} slice {best}: score {scores[best]:.3g} nats/pixel"
               + (f", max null z {float(z_slice_max[best]):.2f}"
                  if z_src is not None else "")) if title else "",
    ).name
    if source.is_dicom:
        files.update(write_dicom_outputs(out / "dicom", source, recon_src, klip_src[0], mask_src))

    top = _volume_top_blocks(result)
    for block in top:
        block.update(_source_rows_cols(block, source, work))
        if null is not None and result.zscores is not None:
            z = float(result.zscores[block["slice"], block["row"] // result.block_size, block["col"] // result.block_size])
            n_slice = int(result.inside[block["slice"]].sum())
            block.update({"null_z": z, "block_p": float(null.p_values(np.array(z))),
                          "slice_p": float(null.family_p(z, n_slice))})
    for record in result.slices:
        for block in record["top_blocks"]:
            block.update(_source_rows_cols({**block, "slice": record["slice"]}, source, work))
    summary = dict(summary)
    summary["score"] = {
        "max_nats_per_pixel": float(scores[best]),
        "slice": best,
        "topk_mean_nats_per_pixel": float(result.slices[best]["score"]["topk_mean"]),
        "statistic": "block density (nats per working pixel), max over blocks inside the body",
    }
    summary["top_blocks"] = top
    summary["threshold"] = {**threshold_info, "source_pixels_flagged": int(mask_src.sum())}
    if z_slice_max is not None:
        summary["null"] = null_levels(null, result, z_slice_max)
    if truth_mask is not None and bool(truth_mask.any()):
        body_src = to_source_grid(result.body.astype(np.uint8), source, kind="label").astype(bool)
        heat = klip_src[0]
        outside = body_src & ~truth_mask
        summary["truth"] = {
            "mask_pixels": int(truth_mask.sum()),
            "klip_mean_inside_nats_per_source_pixel": float(heat[truth_mask].mean()),
            "klip_mean_outside_in_body_nats_per_source_pixel":
                float(heat[outside].mean()) if bool(outside.any()) else None,
            "ood_mask_covers_fraction_of_truth": float((mask_src & truth_mask).sum() / truth_mask.sum()),
        }
    summary["slices"] = result.slices
    summary["units"] = {
        "scores": "nats per pixel of the prior's working grid (block densities)",
        "klip.nii.gz / klip_pm.dcm / report heat map": "nats per source pixel (sums kept across grids)",
        "recon.nii.gz / dicom/recon": rule.unit,
        "working_grid": list(work),
        "block_size_working_pixels": result.block_size,
    }
    summary["versions"] = package_versions()
    summary["outputs"] = files
    write_json(out / "summary.json", summary)
    return summary


def null_levels(null, result: VolumeResult, z_slice_max: np.ndarray) -> dict[str, Any]:
    """The null model's verdict at the three levels: per block, per slice, per volume (``summary["null"]``).

    ``slice_p[k]``: how often a healthy slice with as many in-body blocks as slice ``k`` reaches its
    largest z-score; ``volume_p``: the same for the whole input (all in-body blocks); both corrected
    for the number of blocks (:mod:`klip_med.calibration.levels`). ``block_p_of_max`` is the
    uncorrected per-block p-value of each slice's largest z (not a statement about the slice).
    """
    counts = result.inside.sum(axis=(1, 2)).astype(int)
    finite = np.isfinite(z_slice_max)
    slice_p = [float(null.family_p(z, n)) if ok else None for z, n, ok in zip(z_slice_max, counts, finite, strict=True)]
    volume_p = float(null.family_p(float(z_slice_max[finite].max()), int(counts.sum()), volume=True)) if finite.any() else None
    return {
        "source": null.source, "n_images": null.n_images, "conditioning": null.conditioning,
        "centring": null.centring,
        "conditions": null.conditions, "effective_fraction": null.effective_fraction,
        "max_z_per_slice": [round(float(v), 4) if ok else None for v, ok in zip(z_slice_max, finite, strict=True)],
        "in_body_blocks_per_slice": counts.tolist(),
        "block_p_of_max_per_slice": [float(v) if ok else None for v, ok in
                                     zip(null.p_values(np.where(finite, z_slice_max, 0.0)), finite, strict=True)],
        "slice_p": slice_p,
        "volume_p": volume_p,
        "meaning": {
            "z": f"log block density standardised against healthy reconstructions ({null.conditioning} conditioning"
                 + ("; each window's median over the slice's in-body blocks removed first, so a flag means more "
                    "than the rest of this slice" if null.centring == "slice" else "") + ")",
            "block_p": "fraction of healthy blocks at least as extreme (per block, not corrected for the number of "
                       "blocks)",
            "slice_p": "how often a healthy slice with as many in-body blocks reaches this slice's largest z "
                       "(corrected for the number of blocks)",
            "volume_p": "how often a healthy volume with as many in-body blocks reaches this volume's largest z",
        },
    }


def one_line(summary: dict[str, Any]) -> str:
    """E.g. ``image score 3.98 nats/pixel; top blocks (r32,c56) 3.98 (z 4.1, block p 0.0004), ...;
    slice p 0.03 (healthy slices this extreme); 41.2 s``."""
    score = summary["score"]
    volume = len(summary.get("slices", [])) > 1
    parts = []
    for b in summary["top_blocks"]:
        where = f"z{b['slice']} " if volume else ""
        z = f" (z {b['null_z']:.2f}, block p {b['block_p']:.2g})" if "null_z" in b else ""
        parts.append(f"{where}(r{b['row']},c{b['col']}) {b['nats_per_pixel']:.3g}{z}")
    size = summary["top_blocks"][0]["size"] if summary["top_blocks"] else "?"
    seconds = summary.get("timings", {}).get("total_s")
    tail = f"; {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
    in_slice = f" (slice {score['slice']})" if volume else ""
    verdict = ""
    null = summary.get("null", {})
    if volume and null.get("volume_p") is not None:
        verdict = f"; volume p {null['volume_p']:.2g} (healthy volumes this extreme)"
    elif not volume and (null.get("slice_p") or [None])[0] is not None:  # one slice: its own slice_p
        verdict = f"; slice p {null['slice_p'][0]:.2g} (healthy slices this extreme)"
    return (f"image score {score['max_nats_per_pixel']:.3g} nats/pixel{in_slice}; top {size}x{size} blocks "
            f"(row, col on the working grid) {', '.join(parts)}{verdict}{tail}")
