"""Line re-attribution: give the aliasing floor of a Cartesian-undersampled KL map back to its sources.

With 1-D Cartesian undersampling (whole phase-encode lines sampled), the data-consistency correction
of a sampler step is the residual spread by the sampling mask's point-spread function along the
phase-encode axis. With a random mask that spread is incoherent: a lesion's surprise lands on its
own pixels *and*, as a nearly flat floor, on every pixel of the same line (row for column masks),
inside the head and out. The per-pixel KL ``d(i)^2 / (2 s^2)`` then shows a band along the lesion's
lines (``docs/research-log.md``, issue 18).

This module re-attributes each line's KL under that model, keeping every line's total exactly
(an attribution, not a new divergence; summed over lines the map's total is unchanged):

1. the line's floor ``f`` is the median KL of its pixels outside the body (where nothing but
   aliasing and noise lands), when it has at least ``min_outside`` of them; otherwise the line is
   left as it is;
2. each pixel keeps its excess over the floor, ``e(i) = max(kl(i) - f, 0)``;
3. the line's total is shared in proportion to the excess: ``kl'(i) = e(i) * sum(kl) / sum(e)``.

Within a line the order of pixels is unchanged; across lines, a pixel on a lesion's line no longer
inherits the lesion's floor. Pure tensor math: any (..., H, W) map, the axis of the phase-encode
direction, a (H, W) body mask.
"""

from __future__ import annotations

import torch

from klip_med.errors import expect

MIN_OUTSIDE = 8
"""A line needs at least this many pixels outside the body for its floor to be estimated."""


def reattribute_lines(pixel_nats: torch.Tensor, body_mask: torch.Tensor, axis: int = -1,
                      min_outside: int = MIN_OUTSIDE) -> torch.Tensor:
    """Each line's KL shared in proportion to its excess over the line's outside-body floor.

    Args:
        pixel_nats: (..., H, W) non-negative KL per pixel (nats), e.g. a window's map.
        body_mask: (H, W) bool, True inside the body.
        axis: the phase-encode axis, along which the aliasing spreads: -1 (along W: each row is a
            line; klip_med's MRI masks sample whole columns) or -2 (along H).
        min_outside: pixels outside the body a line needs for its floor.

    Returns:
        A new tensor of the same shape and dtype; every line's sum equals the input's.
    """
    expect(axis in (-1, -2), "axis", "-1 (lines along W) or -2 (lines along H)", axis)
    x = torch.as_tensor(pixel_nats)
    body = torch.as_tensor(body_mask, dtype=torch.bool, device=x.device)
    expect(x.dim() >= 2 and tuple(body.shape) == tuple(x.shape[-2:]), "body_mask",
           f"a (H, W) = {tuple(x.shape[-2:])} mask", tuple(body.shape))
    expect(bool(torch.isfinite(x).all()) and bool((x >= 0).all()), "pixel_nats", "finite KL >= 0 per pixel",
           "NaN / Inf or negative values")
    if axis == -2:
        return reattribute_lines(x.transpose(-1, -2), body.T, -1, min_outside).transpose(-1, -2)
    work = x.to(torch.float64)
    outside = ~body  # (H, W)
    enough = outside.sum(dim=-1) >= min_outside  # (H,)
    masked = torch.where(outside, work, torch.full_like(work, float("nan")))
    floor = torch.nanmedian(masked, dim=-1, keepdim=True).values  # (..., H, 1); NaN on lines without outside
    floor = torch.where(enough[:, None], torch.nan_to_num(floor, nan=0.0), torch.zeros_like(floor))
    excess = (work - floor).clamp_min(0.0)
    total, kept = work.sum(dim=-1, keepdim=True), excess.sum(dim=-1, keepdim=True)
    shared = torch.where(kept > 0, excess * total / kept.clamp_min(1e-300), work)
    return shared.to(x.dtype)
