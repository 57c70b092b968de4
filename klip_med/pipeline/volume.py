"""Reconstruct and score every slice of a volume, resumably (what ``klip-med run`` does).

    from klip_med import priors
    from klip_med.io.inputs import read_input
    from klip_med.pipeline import KLIPSettings, RunOptions, run_volume

    summary = run_volume(read_input("scan/"), priors.load("ct-abdomen-128"),
                         RunOptions("ct-sparse:views=60", KLIPSettings(samples=4, steps=50)), "out/")

Inputs: :func:`klip_med.io.inputs.read_input`.

What happens to each slice: it is resampled to the prior's working grid (same field of view; a
non-square matrix is stretched), mapped to prior units by the prior's intensity rule (CT: HU window;
MR: the percentile scale of the whole volume), measured by ``--physics`` (a simulated acquisition
with its noise), reconstructed by the posterior sampler and scored with KLIP. Slices run in batches
of ``slice_batch`` (B x S samples in one sampler call).

Randomness: one operator per volume (the MRI mask is drawn from ``seed``). Batch 0 is measured and
sampled exactly as :func:`klip_med.pipeline.reconstruct_image` would (generators seeded ``seed``
and ``seed + 1``), so a one-slice run reproduces it; batch ``b > 0`` draws from generators seeded
by ``SeedSequence([seed, first slice, stream])``. A slice's result depends on the seed and the batch
it belongs to, never on what ran before: an interrupted run resumes to the same numbers.

Resuming: each finished slice is saved atomically in ``OUT/slices/slice_NNNNN.npz``; a rerun with
the same input, prior, physics, settings and ``slice_batch`` (checked against ``OUT/slices/run.json``)
skips finished batches. A rerun with different ones is refused rather than mixing results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klip_med.calibration.covariates import block_covariates
from klip_med.calibration.thresholds import parse_threshold
from klip_med.errors import expect
from klip_med.io.inputs import RunInput
from klip_med.io.json_files import write_json
from klip_med.io.outputs import VolumeResult, write_output_set
from klip_med.io.resample import working_grid
from klip_med.pipeline.reconstruct import reconstruct_batch
from klip_med.pipeline.settings import KLIPSettings
from klip_med.pipeline.slice_store import (
    SLICES_DIR,
    check_resume,
    load_slice,
    prepare_out,
    run_fingerprint,
    save_slice,
    slice_path,
    stack_slices,
)
from klip_med.priors.identity import prior_provenance


@dataclass(frozen=True)
class RunOptions:
    """How a volume is measured, reconstructed and scored.

    Attributes:
        physics: operator spec (:func:`klip_med.physics.parse_physics`), e.g. ``ct-sparse:views=60``.
        settings: sampler and KLIP settings (samples, steps, sampler, windows, block size, seed).
        slice_batch: slices per sampler call (B x S samples at once).
        threshold: OOD mask threshold (:func:`klip_med.calibration.thresholds.parse_threshold`): ``"auto"``
            (``fwer:0.05`` with a null model, else no SEG), ``"fwer:A"``, ``"fdr:Q"``, ``"fpr:A"`` (and
            their ``-slice`` forms), ``"pNN"`` or nats per pixel.
        device: ``"cpu"`` or ``"cuda"``.
        allow_calibration_overlap: score an input whose slices the null model was fitted on
            (refused otherwise).
        null: null model of the first window (:func:`klip_med.calibration.store.resolve_null`): ``"auto"``
            (one shipped with the prior for exactly these physics and settings, if any), ``"none"``,
            or a JSON file from ``klip-med calibrate``.
    """

    physics: str
    settings: KLIPSettings = field(default_factory=KLIPSettings)
    slice_batch: int = 1
    threshold: str = "auto"
    device: str = "cpu"
    null: str | None = "auto"
    allow_calibration_overlap: bool = False

    def __post_init__(self) -> None:
        from klip_med.physics import parse_spec

        parse_spec(self.physics)
        expect(isinstance(self.slice_batch, int) and self.slice_batch >= 1, "slice_batch",
               "an integer >= 1", self.slice_batch)
        parse_threshold(self.threshold)


def _seeds(seed: int, start: int) -> tuple[int | None, int]:
    """(measurement-noise seed or None = straight after building the operator, sampler seed)."""
    if start == 0:
        return None, seed + 1
    noise, sampler = np.random.SeedSequence([seed, start]).generate_state(2)
    return int(noise), int(sampler)


def _model_units(run_input: RunInput, prior) -> tuple[np.ndarray, float | None]:
    """The volume on the working grid in prior units ``(Z, h, w)``, and the MR scale used."""
    rule = prior.config.intensity
    size = tuple(prior.image_shape[1:])
    physical = working_grid(run_input.volume, size).pixels
    scale = None
    if rule.kind == "mr-percentile":
        scale = run_input.mr_scale if run_input.mr_scale is not None else rule.mr_scale(run_input.volume.pixels)
    return rule.to_model(physical, scale), scale



def _measure(x: torch.Tensor, options: RunOptions, size: int, start: int):
    """Operator (same for every batch) and the batch's measurement ``y``."""
    from klip_med.physics import parse_physics

    gen = torch.Generator(device=options.device).manual_seed(options.settings.seed)
    physics = parse_physics(options.physics, size, generator=gen, device=options.device)
    noise_seed, _ = _seeds(options.settings.seed, start)
    if noise_seed is not None:
        gen.manual_seed(noise_seed)
    with torch.no_grad():
        y = physics(x.to(options.device, torch.float32))
    return physics, y



def _find_null(run_input: RunInput, prior, prior_reference: str | None, options: RunOptions):
    """The run's null model (:attr:`RunOptions.null`), settled before any sampling: ``(model or None,
    indices of its windows among the run's, description)``. A model whose calibration images include a
    slice of this input is refused (unless ``allow_calibration_overlap``): its p-values would be too
    small there."""
    from klip_med.calibration.store import resolve_null
    from klip_med.data.identity import slice_sha256

    null, windows, description = resolve_null(options.null, prior_reference or prior.config.name, prior,
                                              options.physics, options.settings)
    if null is not None and null.fingerprints:
        pixels = run_input.volume.pixels
        hits = null.overlap([{"key": None, "sha256": slice_sha256(pixels[k])} for k in range(pixels.shape[0])])
        expect(not hits or options.allow_calibration_overlap, f"--null {options.null}",
               "a null model fitted on other images than the input", f"{len(hits)} of the input's {pixels.shape[0]} "
               "slices among its calibration images (use another model, or --allow-calibration-overlap to score "
               "them anyway)")
        if hits:
            description += f" (note: {len(hits)} input slices are among its calibration images)"
    return null, windows, description


def _z_scores(result: VolumeResult, null, windows: list[int], block_size: int) -> None:
    """Set ``result.zscores``: each slice's combined block z-scores under ``null``."""
    from klip_med.score.blocks import pool_blocks

    dens = pool_blocks(torch.from_numpy(result.klip[windows]), block_size).densities.numpy()  # (W, Z, gh, gw)
    result.zscores = np.stack([null.z_scores(dens[:, k], block_covariates(result.recon[k], result.body[k], block_size),
                                             result.inside[k])
                               for k in range(result.recon.shape[0])])


def baseline_name(physics_spec: str) -> str:
    """``"zero-filled"`` for MRI operators, ``"FBP"`` for CT."""
    return "zero-filled" if physics_spec.strip().startswith("mri") else "FBP"


def run_volume(
    run_input: RunInput,
    prior,
    options: RunOptions,
    out: str | Path,
    *,
    prior_reference: str | None = None,
    progress: bool = True,
    after_slice: Callable[[int], None] | None = None,
    summary_extra: dict[str, Any] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Reconstruct and score every slice of ``run_input`` (resumably), then write the output set.

    Args:
        run_input: from :func:`klip_med.io.inputs.read_input` (or built by the demo).
        prior: a loaded :class:`klip_med.priors.DiffusionPrior`.
        options: physics, settings, slice batch, threshold, device.
        out: output folder (created); see :mod:`klip_med.io.outputs` for what it holds.
        prior_reference: the name or path the prior was loaded from (for the summary).
        progress: show a tqdm progress bar (stderr).
        after_slice: called with each slice index once its result is saved (tests use it to
            interrupt a run).
        summary_extra: merged into ``summary.json`` (e.g. the demo case).

    Returns:
        The summary (as written to ``summary.json``).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = prepare_out(out)
    folder = out / SLICES_DIR
    modality = prior.config.modality
    expect(run_input.modality in (None, modality), "--input",
           f"a {modality} image for prior {prior.config.name!r}", f"modality {run_input.modality}")
    model, scale = _model_units(run_input, prior)
    null, null_windows, null_description = _find_null(run_input, prior, prior_reference, options)
    fingerprint = run_fingerprint(model, prior, options)
    network = prior.execution() if hasattr(prior, "execution") else {}
    if network:  # opt-in network execution (DiffusionPrior.set_execution): never mixed with default slices
        fingerprint["network"] = network
    check_resume(folder, fingerprint)
    size = int(prior.image_shape[-1])
    n_slices, batch = model.shape[0], options.slice_batch
    paths = [slice_path(folder, k) for k in range(n_slices)]
    done = [load_slice(p) is not None for p in paths]
    sampling_s, computed, physics_description = 0.0, 0, None
    steps = options.settings.steps
    skipped = sum(stop - start for start in range(0, n_slices, batch)
                  if all(done[start:(stop := min(start + batch, n_slices))]))
    label = f"klip-med {(summary_extra or {}).get('command', 'run')}"
    bar = tqdm(total=n_slices * steps, initial=skipped * steps, unit="step", desc=label,
               disable=not progress, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} slice-steps "
               "[{elapsed}<{remaining}{postfix}]")
    try:
        for start in range(0, n_slices, batch):
            stop = min(start + batch, n_slices)
            if all(done[start:stop]):
                continue
            x = torch.from_numpy(model[start:stop])[:, None]
            physics, y = _measure(x, options, size, start)
            physics_description = physics.describe()
            gen = torch.Generator(device=options.device).manual_seed(_seeds(options.settings.seed, start)[1])
            bar.set_postfix_str(f"slices {start + 1}-{stop} of {n_slices}" if stop > start + 1
                                else f"slice {start + 1} of {n_slices}")
            t0 = time.perf_counter()
            results = reconstruct_batch(prior, physics, y, options.settings, gen,
                                        observers=[lambda event, n=stop - start: bar.update(n)])
            sampling_s += time.perf_counter() - t0
            for k, result in zip(range(start, stop), results, strict=True):
                save_slice(paths[k], k, result)
                done[k] = True
                computed += 1
                if after_slice is not None:
                    after_slice(k)
    finally:
        bar.close()
    records = [load_slice(p) for p in paths]
    missing = [k for k, r in enumerate(records) if r is None]
    expect(not missing, str(folder), "every slice's saved result", f"slices {missing} unreadable")
    klip_metadata = records[0]["record"].get("klip")  # type: ignore[index]
    for r in records:
        r["record"].pop("klip", None)  # type: ignore[index]
    result = stack_slices(records, options.settings.block_size)  # type: ignore[arg-type]
    if null is not None:
        _z_scores(result, null, null_windows, options.settings.block_size)
    if physics_description is None:
        physics_description = _measure(torch.zeros(1, 1, size, size), options, size, 0)[0].describe()
    summary: dict[str, Any] = {
        "command": "run",
        "input": {"path": run_input.description, "format": run_input.format,
                  "modality": modality, "shape_zhw": list(run_input.volume.shape),
                  "spacing_mm_zrc": [round(v, 6) for v in run_input.volume.spacing],
                  "mr_scale": scale, **run_input.extra},
        "prior": prior_provenance(prior, prior_reference or prior.config.name),
        "physics": {"spec": options.physics, "operator": physics_description},
        "settings": options.settings.describe(),
        "seed": options.settings.seed,
        "slice_batch": batch,
        "device": options.device,
        "windows": options.settings.describe()["windows"],
        "klip": klip_metadata,
        "null_model": null_description,
        **({"network": network} if network else {}),
        **(summary_extra or {}),
    }
    write_start = time.perf_counter()
    timings = dict(summary.get("timings", {}))
    timings.update({
        "sampling_s_this_invocation": round(sampling_s, 2),
        "sampling_s_all_slices": round(sum(r["record"]["seconds"] for r in records), 2),  # type: ignore[index]
        "slices_computed_this_invocation": computed,
    })
    summary["timings"] = timings
    written = write_output_set(
        out, run_input.volume, result, rule=prior.config.intensity, mr_scale=scale,
        threshold=options.threshold, summary=summary, truth_mask=run_input.truth_mask,
        baseline_name=baseline_name(options.physics),
        window_labels=[w.label for w in options.settings.windows], title=title, null=null,
    )
    written["timings"]["write_s"] = round(time.perf_counter() - write_start, 2)
    written["timings"]["total_s"] = round(time.perf_counter() - started + timings.get("prepare_s", 0.0), 2)
    write_json(out / "summary.json", written)
    return written
