"""PNG figures of one slice on the source grid, with the KLIP heat map drawn one way everywhere.

- :func:`write_report`: ``report.png`` of ``klip-med run`` / ``demo``: input (the truth of the
  simulation) | measurement-domain baseline (zero-filled MRI / FBP CT) | posterior mean | posterior
  std | KLIP over the posterior mean [| KLIP z]. Contours: the known lesion mask (cyan, solid) on the
  input and the last panel, the OOD mask written to the SEG (lime, dashed) on the last panel.
- :func:`write_figure`: a short figure for scripts: source | reconstruction (optional) | KLIP over
  the source, with an optional mask contour.

Both draw the heat map with :func:`draw_heat` (inferno, zero transparent, 99.5th percentile top).
Uses matplotlib's object API (``Figure`` + Agg), never pyplot's global state; files are written
atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from klip_med._atomic import atomic_path
from klip_med.errors import expect


def draw_heat(fig: Figure, ax, background: np.ndarray, heat: np.ndarray, grey: dict, label: str) -> None:
    """Draw ``heat`` (H, W) over ``background`` (H, W) on ``ax``, with a colour bar labelled ``label``.

    Values <= 0 are transparent; the colour range is [0, 99.5th percentile of ``heat``].

    Args:
        grey: ``imshow`` keywords of the grey background (cmap, vmin, vmax, aspect, interpolation).
    """
    ax.imshow(background, **grey)
    values = np.asarray(heat, dtype=np.float64)
    top = float(np.percentile(values, 99.5)) or float(values.max()) or 1.0
    im = ax.imshow(np.ma.masked_less_equal(values, 0.0), cmap="inferno", vmin=0.0, vmax=top, alpha=0.6,
                   aspect=grey["aspect"], interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)


def _contour(ax, mask: np.ndarray | None, colour: str, style: str = "solid", width: float = 0.9) -> None:
    if mask is not None and np.any(mask):
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=colour, linewidths=width, linestyles=style)


def _save(fig: Figure, path: Path, title: str, axes) -> Path:
    for a in axes:
        a.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _png_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    expect(p.suffix.lower() == ".png", "path", "a .png file name", p.name)
    return p


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
    """Write the five-panel ``report.png`` (six with ``zmap``; atomic).

    Args:
        path: ``.png`` file.
        truth, baseline, recon, std: ``(H, W)`` in physical units (HU / MR signal).
        klip: ``(H, W)`` nats per pixel.
        truth_mask, ood_mask: optional bool ``(H, W)`` contours.
        spacing: (row, column) mm, for the aspect ratio.
        modality, rule: for the panel units and the grey window (the prior's intensity rule: the HU
            window for CT, else the input's 1st-99.5th percentile).
        zmap: optional ``(H, W)`` null z-score of each pixel's block (NaN / 0 outside the body):
            a sixth panel, where the OOD mask is drawn.
    """
    p = _png_path(path)
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
    draw_heat(fig, ax, recon, klip, grey, "KLIP (nats / pixel)")
    ax.set_title("KLIP over posterior mean")
    if zmap is not None:
        ax = axes[5]
        ax.imshow(recon, **grey)
        z = np.asarray(zmap, dtype=np.float64)
        im_z = ax.imshow(np.ma.masked_where(~np.isfinite(z) | (z == 0.0), z), cmap="coolwarm", vmin=-4.0, vmax=4.0,
                         alpha=0.7, aspect=aspect, interpolation="nearest")
        fig.colorbar(im_z, ax=ax, fraction=0.046, pad=0.04, label="null z-score")
        ax.set_title("KLIP z (vs healthy)")
    for a in (axes[0], ax):
        _contour(a, truth_mask, "cyan")
    _contour(ax, ood_mask, "lime", "dashed")
    return _save(fig, p, title, axes)


def write_figure(
    path: str | os.PathLike[str],
    source_slice: np.ndarray,
    klip_slice: np.ndarray,
    *,
    recon_slice: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    spacing: tuple[float, float] = (1.0, 1.0),
    window: tuple[float, float] | None = None,
    title: str = "",
    units: str = "nats / pixel",
    dpi: int = 100,
) -> Path:
    """Write a PNG (atomic) with panels: source | reconstruction (if given) | KLIP over source.

    Args:
        path: ``.png`` file.
        source_slice, klip_slice, recon_slice: ``(H, W)`` arrays on one grid.
        mask: optional bool ``(H, W)`` OOD mask, drawn as a contour on the heat-map panel.
        spacing: (row, column) pixel size in mm, for the aspect ratio.
        window: (low, high) grey range; default 1st-99th percentile of the source.
        title: figure title; ``units``: colour-bar label.
    """
    p = _png_path(path)
    src = np.asarray(source_slice, dtype=np.float64)
    expect(src.ndim == 2, "source_slice", "an (H, W) slice", f"shape {src.shape}")
    heat = np.asarray(klip_slice, dtype=np.float64)
    expect(heat.shape == src.shape, "klip_slice", f"shape {src.shape}", f"shape {heat.shape}")
    if recon_slice is not None:
        expect(np.shape(recon_slice) == src.shape, "recon_slice", f"shape {src.shape}", np.shape(recon_slice))
    if mask is not None:
        expect(np.shape(mask) == src.shape, "mask", f"shape {src.shape}", np.shape(mask))
    lo, hi = window if window is not None else tuple(float(v) for v in np.percentile(src, [1, 99]))
    grey = dict(cmap="gray", vmin=lo, vmax=hi, aspect=float(spacing[0]) / float(spacing[1]), interpolation="nearest")
    panels = [("source", src)] + ([("reconstruction", np.asarray(recon_slice))] if recon_slice is not None else [])
    fig = Figure(figsize=(4 * (len(panels) + 1), 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (name, img) in zip(axes, panels, strict=False):
        ax.imshow(img, **grey)
        ax.set_title(name)
    draw_heat(fig, axes[-1], src, heat, grey, units)
    _contour(axes[-1], mask, "cyan", width=0.8)
    axes[-1].set_title("KLIP")
    return _save(fig, p, title, axes)
