"""When has a prior's training loss stopped falling? The rule the GPU sessions use to stop resuming.

The rule (issue 17): over the last ``tail`` (30%) of all steps trained, compare the mean loss of
the first ``window`` (1,000) steps of that stretch with the mean of the last ``window`` steps. If it
fell by less than ``threshold`` (2%) of the first mean, the loss has plateaued. With fewer steps
than that needs (``tail * steps < 2 * window``: the two windows would overlap) there is no
verdict. Each ``loss.csv`` row is the mean loss over the steps since the row before it, so a
window's mean weights each row by the steps it covers (runs logged every 50 and every 100 steps
mix correctly).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from klip_med.errors import KLIPMedError, expect


@dataclass(frozen=True)
class PlateauVerdict:
    """The rule's answer for one loss curve.

    Attributes:
        plateaued: True (fell less than ``threshold``), False (still falling), None (too few steps).
        steps: the last step of the curve.
        first_mean, last_mean: the window means at the start and the end of the tail.
        drop: ``(first_mean - last_mean) / first_mean`` (negative if the loss rose).
        window, tail, threshold: the rule's parameters.
        reason: one sentence saying why.
    """

    plateaued: bool | None
    steps: int
    first_mean: float | None
    last_mean: float | None
    drop: float | None
    window: int
    tail: float
    threshold: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_loss_csv(path: str | Path) -> list[tuple[int, float]]:
    """``(step, loss)`` rows of a ``loss.csv`` (header ``step,loss``) as ``klip-med train`` writes it."""
    path = Path(path)
    if not path.is_file():
        raise KLIPMedError(f"{path}: expected a loss.csv file, found none")
    lines = path.read_text(encoding="utf-8").split()
    if not lines or lines[0].strip() != "step,loss":
        raise KLIPMedError(f"{path}: expected the header 'step,loss', found {lines[:1]}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            step, loss = line.split(",")
            rows.append((int(step), float(loss)))
        except ValueError:
            raise KLIPMedError(f"{path}: line {number}: expected 'step,loss', found {line!r}") from None
    return rows


def _window_mean(rows: list[tuple[int, float]], lo: float, hi: float) -> float:
    """Mean loss over steps in (lo, hi]: rows weighted by the steps each covers."""
    total = weight = 0.0
    previous = 0
    for step, loss in rows:
        covered = max(0.0, min(step, hi) - max(previous, lo))
        total += covered * loss
        weight += covered
        previous = step
    return total / weight


def plateau(rows, *, window: int = 1000, tail: float = 0.3, threshold: float = 0.02) -> PlateauVerdict:
    """Apply the rule to ``(step, loss)`` rows (one curve, steps increasing). See the module docstring.

    Raises:
        KLIPMedError: no rows, steps not strictly increasing from >= 1, a loss not finite and > 0,
            or parameters out of range.
    """
    expect(isinstance(window, int) and window >= 1, "window", "an integer >= 1", repr(window))
    expect(0 < tail <= 1, "tail", "a fraction in (0, 1]", repr(tail))
    expect(threshold >= 0, "threshold", "a fraction >= 0", repr(threshold))
    rows = [(int(s), float(v)) for s, v in rows]
    expect(bool(rows), "loss curve", "at least one (step, loss) row", "none")
    steps = [s for s, _ in rows]
    expect(steps[0] >= 1 and all(b > a for a, b in pairwise(steps)), "loss curve",
           "steps >= 1, strictly increasing", str(steps[:8]))
    bad = [v for _, v in rows if not (math.isfinite(v) and v > 0)]
    expect(not bad, "loss curve", "finite losses > 0", str(bad[:3]))
    last = steps[-1]
    start = last - tail * last
    params = {"steps": last, "window": window, "tail": tail, "threshold": threshold}
    if last - start < 2 * window:
        return PlateauVerdict(None, first_mean=None, last_mean=None, drop=None, **params,
                              reason=f"too few steps to judge: the last {tail:.0%} of {last} steps is "
                                     f"shorter than two {window}-step windows")
    first = _window_mean(rows, start, start + window)
    final = _window_mean(rows, last - window, last)
    drop = (first - final) / first
    flat = drop < threshold
    return PlateauVerdict(flat, first_mean=first, last_mean=final, drop=drop, **params,
                          reason=(f"the {window}-step mean loss fell {drop:.2%} over the last {tail:.0%} of "
                                  f"{last} steps ({first:.5f} -> {final:.5f}): "
                                  + ("under" if flat else "at least") + f" {threshold:.0%}, so "
                                  + ("plateaued" if flat else "still falling")))
