"""A PNG figure of one slice: source, reconstruction, and the KLIP heat map over the source.

Uses matplotlib's object API (``Figure`` + Agg canvas), never pyplot's global state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from klip_med.errors import expect
from klip_med.atomic import atomic_path


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
    p = Path(path)
    expect(p.suffix.lower() == ".png", "path", "a .png file name", p.name)
    src = np.asarray(source_slice, dtype=np.float64)
    expect(src.ndim == 2, "source_slice", "an (H, W) slice", f"shape {src.shape}")
    heat = np.asarray(klip_slice, dtype=np.float64)
    expect(heat.shape == src.shape, "klip_slice", f"shape {src.shape}", f"shape {heat.shape}")
    if recon_slice is not None:
        expect(np.shape(recon_slice) == src.shape, "recon_slice", f"shape {src.shape}", np.shape(recon_slice))
    if mask is not None:
        expect(np.shape(mask) == src.shape, "mask", f"shape {src.shape}", np.shape(mask))
    lo, hi = window if window is not None else tuple(float(v) for v in np.percentile(src, [1, 99]))
    aspect = float(spacing[0]) / float(spacing[1])
    panels = [("source", src)] + ([("reconstruction", np.asarray(recon_slice))] if recon_slice is not None else [])
    fig = Figure(figsize=(4 * (len(panels) + 1), 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (name, img) in zip(axes, panels, strict=False):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.set_title(name)
    ax = axes[-1]
    ax.imshow(src, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    top = float(np.percentile(heat, 99.5)) or float(heat.max()) or 1.0
    shown = np.ma.masked_less_equal(heat, 0.0)
    im = ax.imshow(shown, cmap="inferno", vmin=0.0, vmax=top, alpha=0.6, aspect=aspect,
                   interpolation="nearest")
    if mask is not None and np.any(mask):
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title("KLIP")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=units)
    for a in axes:
        a.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png")
    return p
