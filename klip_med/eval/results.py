"""Benchmark outputs: ``results.json``, a markdown table, ROC figures (all written atomically)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from klip_med._atomic import atomic_path
from klip_med.eval.metrics import auroc, has_both_classes, roc_points


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _per_patient(values, sign: str = "") -> str:
    """`` (per patient 0.812 / n/a / 0.640)``: the values that replace an interval when there are
    too few patients for one (:data:`klip_med.eval.metrics.MIN_INTERVAL_UNITS`)."""
    shown = ["n/a" if v is None else f"{v:{sign}.3f}" for v in values]
    return f" (per patient {' / '.join(shown)})" if shown else ""


def with_ci(entry: Mapping, key: str) -> str:
    """``0.812 [0.747, 0.872]``: ``entry[key]`` with ``entry[key + '_ci']``, or each patient's value when
    there are too few patients for an interval; ``n/a`` when missing."""
    value, ci = entry.get(key), entry.get(f"{key}_ci", [None, None])
    if value is None:
        return "n/a"
    if ci[0] is None:
        per = entry.get("per_patient")
        return _fmt(value) + (_per_patient([p.get(key) for p in per.values()]) if per else "")
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def delta(entry: Mapping | None) -> str:
    """``+0.012 [-0.030, +0.051]``: a paired difference (``{"mean", "ci"}``) with its interval, or each
    patient's difference when there are too few patients; ``n/a`` when missing."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    ci = entry["ci"]
    if ci[0] is None:
        per = entry.get("per_patient")
        return f"{entry['mean']:+.3f}" + (_per_patient(list(per.values()), "+") if per else "")
    return f"{entry['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def localisation_delta(method: Mapping, ref: str) -> str:
    """:func:`delta` of a method's paired localisation-AUROC difference to the method ``ref``
    (``method["vs"][ref]["localisation_auroc"]``); ``n/a`` when it has none."""
    return delta(method.get("vs", {}).get(ref, {}).get("localisation_auroc"))


def markdown_table(results: Mapping) -> str:
    """The methods side by side: dataset-level and localisation AUROC / AUPRC with 95% intervals,
    paired differences of localisation AUROC against the reference methods, cost per image."""
    refs = results.get("references", [])
    head = ["method", "dataset AUROC [95% CI]", "dataset AUPRC", "loc. AUROC [95% CI]", "loc. AUPRC"]
    head += [f"loc. AUROC - {r}" for r in refs] + ["NFE / image", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        loc = m.get("localisation") or {}
        row = [f"**{name}** (default)" if m.get("default") else name, with_ci(m["dataset"], "auroc"), _fmt(m["dataset"].get("auprc")),
               with_ci(loc, "auroc") if loc else "n/a", _fmt(loc.get("auprc")) if loc else "n/a"]
        row += [localisation_delta(m, r) if r != name else "-" for r in refs]
        row += [str(m["cost"]["nfe_per_image"]), _fmt(m["cost"]["seconds_per_image"], 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def dataset_difference_table(results: Mapping) -> str:
    """Paired differences of dataset-level AUROC against the reference methods (per-patient
    bootstrap intervals), one row per method; empty when no method has them."""
    refs = results.get("references", [])
    rows = []
    for name, m in results["methods"].items():
        cells = [delta(m.get("vs", {}).get(r, {}).get("dataset_auroc")) if r != name else "-" for r in refs]
        if any(c not in ("-", "n/a") for c in cells):
            rows.append("| " + " | ".join([name, *cells]) + " |")
    if not rows:
        return ""
    head = ["method", *(f"dataset AUROC - {r}" for r in refs)]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])


def _rate(entry: Mapping) -> str:
    ci, per = entry.get("ci", [None, None]), entry.get("per_patient")
    interval = "" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if ci[0] is None and per:  # too few patients for an interval
        interval = _per_patient(list(per.values()))
    nominal = "no nominal rate" if entry.get("nominal") is None else f"nominal {entry['nominal']:g}"
    return f"{entry['observed']:.3f}{interval} ({nominal})"


def calibration_lines(cal: Mapping | None) -> list[str]:
    """The null model's observed rates on the run's lesion-free images, per block, slice and volume."""
    if not cal or not cal.get("n_images"):
        return []
    lines = [f"- null model: {cal['null']}; on this run's {cal['n_images']} lesion-free images of "
             f"{cal['n_patients']} patients ({cal['n_blocks']} in-body blocks), observed rates with per-patient "
             "intervals:",
             "  - false-positive rate per block: " + "; ".join(f"fpr:{a}: {_rate(r)}" for a, r in cal["rates"].items()),
             "  - healthy slices flagged: " + "; ".join(f"{k}: {_rate(r)}" for k, r in cal["slice"].items()),
             "  - healthy patients flagged (their lesion-free slices as one volume): "
             + "; ".join(f"{k}: {_rate(r)}" for k, r in cal["volume"].items())]
    if "overlapping" in cal:
        o = cal["overlapping"]
        lines.append(f"  - {o['n_images']} further images are calibration images of the model (reported apart, not "
                     "a measure of calibration): per block "
                     + "; ".join(f"fpr:{a}: {_rate(r)}" for a, r in o["rates"].items()))
    return lines


def markdown_report(results: Mapping) -> str:
    """A short markdown page: what was run, on what, and the table."""
    b, c = results["benchmark"], results["counts"]
    s = b["settings"]
    text = [
        f"# KLIP benchmark: {b['manifest']} ({b['split']}), {b['physics']}",
        "",
        f"- prior `{b['prior']}`, sampler `{s['sampler']}`, {s['steps']} steps, {s['samples']} samples, "
        f"blocks {b['block_size']}x{b['block_size']}, image score = top-{s['top_k']} block mean inside the body",
        f"- images: {c['images']} ({c['ood']} OOD, {c['id']} ID) from {c['patients']} patients; "
        f"lesions: {b['lesions']}; device {b['device']}",
        f"- sampling run: {results['sampling']['nfe_per_image']} network forwards and "
        f"{results['sampling']['seconds_per_image']:.2f} s per image (shared by every KLIP row, "
        "posterior_std, residual; anoddpm / eigenscore / cfs add their own; brightness rows need none)",
        _interval_line(results),
    ]
    if b.get("command"):
        text.append(f"- command: `{b['command']}`")
    if results.get("default_method"):
        text.append(f"- default map (what `klip-med run` writes): `{results['default_method']}`")
    text += calibration_lines(results.get("null_calibration"))
    skipped = {n: m["localisation"]["n_skipped"] for n, m in results["methods"].items()
               if (m.get("localisation") or {}).get("n_skipped")}
    if skipped:
        counts = sorted(set(skipped.values()))
        text.append(f"- localisation skipped {', '.join(map(str, counts))} of {c['ood']} OOD images (no block inside "
                    "the body overlaps the lesion, or every inside block does): "
                    + ", ".join(f"`{n}`" for n in list(skipped)[:4]) + (" ..." if len(skipped) > 4 else ""))
    text += ["", markdown_table(results), ""]
    differences = dataset_difference_table(results)
    if differences:
        text += ["Dataset level, paired differences (same images, per-patient bootstrap):", "", differences, ""]
    return "\n".join(text)


def _interval_line(results: Mapping) -> str:
    """How the table's intervals were made, or why there are none (too few patients)."""
    from klip_med.eval.metrics import MIN_INTERVAL_UNITS

    b, n = results["benchmark"], results["counts"]["patients"]
    if n < MIN_INTERVAL_UNITS:
        return (f"- intervals: **none** ({n} patients, fewer than {MIN_INTERVAL_UNITS}: a bootstrap over so few "
                "patients describes the resampling, not the method); each patient's value is given in parentheses "
                "instead (patients in sorted order)")
    return f"- intervals: per-patient bootstrap, {b['n_boot']} resamples, seed {b['seed']}"


def write_results(results: Mapping, out_dir: Path, stem: str = "results") -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_report(results), encoding="utf-8")
    return json_path, md_path


def _shown_in_figure(name: str) -> bool:
    """ROC figures draw the calibrated map, the full-run KLIP (ours and the paper's) and every
    baseline; per-window KLIP rows stay in the tables (a figure of 30 curves cannot be read)."""
    return not name.startswith(("klip[", "klip_paper[")) or name in ("klip[full]", "klip_paper[full]")


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path | None:
    """One ROC panel: ``curves`` maps a method name to (scores, labels), drawn when
    :func:`_shown_in_figure` keeps it and its labels hold both classes; the legend gives each
    curve's pooled AUROC. Returns None when no curve is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = {n: sl for n, sl in curves.items() if _shown_in_figure(n) and has_both_classes(sl[1])}
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(9.0, 5.5))
    colours = plt.get_cmap("tab20")
    for k, (name, (scores, labels)) in enumerate(usable.items()):
        fpr, tpr = roc_points(scores, labels)
        klip = name.startswith("klip")
        ax.plot(fpr, tpr, color=colours(k % 20), lw=2.2 if name.startswith("klip_z") else 1.6 if klip else 1.2,
                ls="-" if klip else "--", label=f"{name} ({auroc(scores, labels):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.set_title("\n".join(textwrap.wrap(title.replace("\n", " "), 70)), fontsize=8.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="method (pooled AUROC)",
              title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
