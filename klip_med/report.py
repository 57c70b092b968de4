"""``report.png``: one slice of a run, from the input to the KLIP map, on the source grid.

Panels: input (the truth of the simulation) | measurement-domain baseline (zero-filled MRI / FBP
CT) | posterior mean | posterior std | KLIP heat map over the posterior mean. Contours: the known
lesion mask (cyan, solid) on the input and KLIP panels, the OOD mask written to the SEG (lime,
dashed) on the KLIP panel. Grey levels: the prior's HU window for CT, the input's 1st-99.5th
percentile for MR. Uses matplotlib's object API (``Figure`` + Agg), never pyplot's global state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from klip_med.atomic import atomic_path
from klip_med.errors import expect


def _grey_window(rule, truth: np.ndarray) -> tuple[float, float]:
    if rule is not None and rule.kind == "ct-hu-window":
        return float(rule.hu_min), float(rule.hu_max)
    lo, hi = (float(v) for v in np.percentile(truth, [1.0, 99.5]))
    return lo, hi if hi > lo else lo + 1.0


def write_report(
    path: str | os.PathLike[str],
    *,
    truth: np.ndarray,
    baseline: np.ndarray,
    recon: np.ndarray,
    std: np.ndarray,
    klip: np.ndarray,
    truth_mask: np.ndarray | None = None,
    ood_mask: np.ndarray | None = None,
    spacing: tuple[float, float] = (1.0, 1.0),
    modality: str | None = None,
    rule=None,
    baseline_name: str = "baseline",
    title: str = "",
    dpi: int = 100,
    zmap: np.ndarray | None = None,
) -> Path:
    """Write the five-panel PNG (six with ``zmap``; atomic).

    Args:
        path: ``.png`` file.
        truth, baseline, recon, std: ``(H, W)`` in physical units (HU / MR signal).
        klip: ``(H, W)`` nats per pixel.
        truth_mask, ood_mask: optional bool ``(H, W)`` contours.
        spacing: (row, column) mm, for the aspect ratio.
        modality, rule: for the panel units and the grey window (the prior's intensity rule).
        zmap: optional ``(H, W)`` null z-score of each pixel's block (NaN / 0 outside the body):
            a sixth panel, where the OOD mask is drawn.
    """
    p = Path(path)
    expect(p.suffix.lower() == ".png", "path", "a .png file name", p.name)
    shape = np.shape(truth)
    for name, arr in (("baseline", baseline), ("recon", recon), ("std", std), ("klip", klip),
                      ("truth_mask", truth_mask), ("ood_mask", ood_mask), ("zmap", zmap)):
        if arr is not None:
            expect(np.shape(arr) == shape, name, f"shape {shape} (the slice)", f"shape {np.shape(arr)}")
    lo, hi = _grey_window(rule, np.asarray(truth))
    unit = "HU" if modality == "CT" else "a.u."
    aspect = float(spacing[0]) / float(spacing[1])
    n_panels = 5 if zmap is None else 6
    fig = Figure(figsize=(3.5 * n_panels, 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels)
    grey = dict(cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    panels = [("input (truth)", truth), (baseline_name, baseline), ("posterior mean", recon)]
    for ax, (name, img) in zip(axes[:3], panels, strict=True):
        ax.imshow(img, **grey)
        ax.set_title(name)
    top_std = float(np.percentile(std, 99.5)) or float(np.max(std)) or 1.0
    im_std = axes[3].imshow(std, cmap="magma", vmin=0.0, vmax=top_std, aspect=aspect, interpolation="nearest")
    axes[3].set_title("posterior std")
    fig.colorbar(im_std, ax=axes[3], fraction=0.046, pad=0.04, label=unit)
    ax = axes[4]
    ax.imshow(recon, **grey)
    heat = np.asarray(klip, dtype=np.float64)
    top = float(np.percentile(heat, 99.5)) or float(heat.max()) or 1.0
    im = ax.imshow(np.ma.masked_less_equal(heat, 0.0), cmap="inferno", vmin=0.0, vmax=top, alpha=0.6,
                   aspect=aspect, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="KLIP (nats / pixel)")
    ax.set_title("KLIP over posterior mean")
    if zmap is not None:
        ax = axes[5]
        ax.imshow(recon, **grey)
        z = np.asarray(zmap, dtype=np.float64)
        im_z = ax.imshow(np.ma.masked_where(~np.isfinite(z) | (z == 0.0), z), cmap="coolwarm", vmin=-4.0, vmax=4.0,
                         alpha=0.7, aspect=aspect, interpolation="nearest")
        fig.colorbar(im_z, ax=ax, fraction=0.046, pad=0.04, label="null z-score")
        ax.set_title("KLIP z (vs healthy)")
    if truth_mask is not None and np.any(truth_mask):
        for a in (axes[0], ax):
            a.contour(np.asarray(truth_mask, dtype=float), levels=[0.5], colors="cyan", linewidths=0.9)
    if ood_mask is not None and np.any(ood_mask):
        ax.contour(np.asarray(ood_mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.9,
                   linestyles="dashed")
    for a in axes:
        a.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png")
    return p
