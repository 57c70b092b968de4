"""``KLIPReconstruct``: the MONAI array transform (posterior reconstruction with a KLIP map).

Each slice of a channel-first image is mapped to the prior's range and grid, measured with the
physics (or taken as a measurement), reconstructed by the posterior sampler with KLIP
(:func:`klip_med.pipeline.reconstruct_image` / :func:`~klip_med.pipeline.reconstruct_measurement`),
and brought back to the input's grid, orientation (:mod:`klip_med.monai.orientation`) and units as
``MetaTensor`` s that carry the input's affine and metadata, so ``SaveImage`` writes them exactly on
the source.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

import klip_med
from klip_med.calibration.scoring import z_pixel_map
from klip_med.errors import expect
from klip_med.io.resample import resample_inplane
from klip_med.monai.options import as_tensor, load_prior, null_summary, parse_windows, prior_name
from klip_med.monai.orientation import PRIOR_SLICE_AXCODES, SliceLayout, check_axcodes, slice_layout
from klip_med.pipeline.reconstruct import SliceResult, reconstruct_image, reconstruct_measurement
from klip_med.pipeline.settings import KLIPSettings, default_windows
from klip_med.score import Window

INTENSITY_MODES = ("physical", "prior")
OUTPUT_NAMES = ("recon", "std", "klip", "klip_z")
"""Outputs in channel order; ``klip_z`` only when a null model applies."""
Z_THRESHOLD_RULE = ("fwer", 0.05)
"""The rule of the z threshold recorded in ``meta["klip"]``: ``klip-med run``'s default SEG rule, a 5%
family-wise rate over the input's in-body blocks."""


class KLIPReconstruct(Transform):
    """Posterior reconstruction of a slice or volume with a KLIP out-of-distribution map.

    Args:
        prior: a shipped prior name (``"mri-brain-flair-128"``, ``"ct-abdomen-128"``), a prior
            folder / ``.safetensors`` path, or a loaded ``DiffusionPrior`` (never modified; copied
            if it sits on another device).
        physics: the operator as a spec string, e.g. ``"mri:accel=4,center=0.08,noise=0.01"``,
            ``"ct-sparse:views=60,noise=0.5"`` (see :func:`klip_med.physics.parse_physics`). With
            ``measure=False`` a built operator is accepted too (your scan's own mask).
        samples, steps, sampler, block_size, normalization, seed: the fields of
            :class:`klip_med.pipeline.KLIPSettings`.
        windows: KLIP windows: spec strings (``"full"``, ``"t:a,b"``, ``"sigma:a,b"``) or
            :class:`klip_med.score.Window`; the first one is the headline map. None (default): those
            of ``klip-med run`` (:func:`klip_med.pipeline.default_windows`: ``t:0.1,1``, or ``full``
            for DPS, and the nine calibrated tenths), so a shipped null model applies.
        null: the null model behind ``klip_z`` (:mod:`klip_med.calibration`): ``"auto"`` (default:
            the one shipped with the prior for this physics spec, sampler settings, windows and
            block size, if any), ``"none"``, or a JSON file from ``klip-med calibrate`` (checked
            against this transform's prior, physics and settings).
        device: where sampling runs (``"cpu"``, ``"cuda"``).
        measure: True: the input is the ground-truth image; a measurement is simulated from it with
            ``physics`` (demos, benchmarks). False: the input is a measurement ``y`` of one slice,
            shape ``physics.measurement_shape`` (optionally with a leading batch axis of 1).
        intensity: ``"physical"``: the input is in HU (CT) / MR signal and is mapped with the
            prior's intensity rule, outputs come back in those units. ``"prior"``: the input is
            already in the prior's [-1, 1] range (e.g. after ``ScaleIntensityRanged(..., b_min=-1,
            b_max=1, clip=True)``) and outputs stay in it.
        mr_scale: MR priors only: the multiplier from MR signal to the rule's scale, computed once
            over the whole patient volume (``prior.config.intensity.mr_scale(volume)``). None
            computes it from the input itself (best when the input is the whole volume).
        slice_axcodes: where the prior's image rows and columns point (shipped priors: ``"PL"``).
            Inputs with an affine are flipped / transposed slice by slice to match and back; None
            uses slices as stored (rows = first spatial axis), as for inputs without an affine.
        all_windows: True returns every window's map as channels of ``klip``; False the first only.

    Call with ``img``: a channel-first ``(1, H, W)`` image or ``(1, H, W, D)`` volume (slices along
    the last axis, MONAI's convention), ``MetaTensor`` / tensor / array, any real dtype.

    Returns:
        One ``MetaTensor`` (float32), channel-first like its input, with the input's affine and a copy
        of its metadata, holding these channels in order (``meta["klip"]["channels"]`` names them;
        :meth:`outputs` returns them as a dict instead):

        - ``recon``: posterior mean, in the input's units (HU / MR signal, or the prior's range with
          ``intensity="prior"``).
        - ``std``: posterior standard deviation over the samples, input units.
        - ``klip`` (one channel, or one per window with ``all_windows=True``, named ``klip[<window>]``):
          KLIP map in nats per input pixel (the prior-grid map resampled so that block sums are kept).
        - ``klip_z`` (only when a null model applies): each block's combined z-score against healthy
          reconstructions, on its pixels (nearest-neighbour onto the input grid; 0 for blocks
          outside the body). ``meta["klip"]["z_threshold"]`` is the z that a healthy input with as many
          in-body blocks reaches with probability 5% (``fwer:0.05``, ``klip-med run``'s default SEG rule);
          ``meta["klip"]["volume_p"]`` and each slice's ``slice_p`` say how often a healthy input / slice
          reaches the largest z found.

        With ``measure=False`` the outputs lie on the prior's grid, (1, h, w), in the prior's slice
        orientation, and carry the input's affine if it is a ``MetaTensor``.

    Deterministic: the same input, seed and device give the same outputs (each slice's measurement
    and sampler are seeded from ``seed`` exactly as in :func:`klip_med.pipeline.reconstruct_image`).

    Raises:
        KLIPMedError: unknown prior, malformed physics spec, bad settings (at construction); a
            wrong shape, non-finite values, or values outside [-1, 1] with ``intensity="prior"``.
    """

    def __init__(
        self,
        prior: Any,
        physics: Any,
        *,
        samples: int = 4,
        steps: int = 50,
        sampler: str = "fast",
        windows: Sequence[str | Window] | str | Window | None = None,
        block_size: int = 8,
        normalization: str = "transition",
        seed: int = 0,
        device: str | torch.device = "cpu",
        measure: bool = True,
        intensity: str = "physical",
        mr_scale: float | None = None,
        slice_axcodes: str | None = PRIOR_SLICE_AXCODES,
        all_windows: bool = False,
        null: str | Any | None = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.prior = load_prior(prior, self.device)
        shape = tuple(self.prior.image_shape)
        expect(len(shape) == 3 and shape[0] == 1, "prior", "a single-channel 2D prior (1, h, w)", shape)
        self.grid = (int(shape[1]), int(shape[2]))
        self.settings = KLIPSettings(samples=samples, steps=steps, sampler=sampler, block_size=block_size,
                                     normalization=normalization, seed=seed)
        chosen = default_windows(self.prior, self.settings) if windows is None else parse_windows(windows, self.prior)
        self.settings = dataclasses.replace(self.settings, windows=chosen)
        expect(isinstance(measure, bool), "measure", "True or False", measure)
        self.measure = measure
        if isinstance(physics, str):
            from klip_med.physics import parse_physics

            # validate now, not at the first call
            parse_physics(physics, self.grid[-1], generator=torch.Generator().manual_seed(seed))
        else:
            expect(not measure and callable(physics), "physics",
                   "a spec string such as 'mri:accel=4,center=0.08' (an operator only with measure=False)",
                   type(physics).__name__)
        self.physics = physics
        expect(intensity in INTENSITY_MODES, "intensity", f"one of {INTENSITY_MODES}", intensity)
        self.intensity = intensity
        config = getattr(self.prior, "config", None)
        self.rule = getattr(config, "intensity", None)
        expect(intensity == "prior" or self.rule is not None, "intensity",
               "'prior' for a prior without an intensity rule in its config", intensity)
        if mr_scale is not None:
            expect(self.rule is not None and self.rule.kind == "mr-percentile", "mr_scale",
                   "None for a prior without an mr-percentile intensity rule", mr_scale)
            expect(isinstance(mr_scale, (int, float)) and math.isfinite(mr_scale) and mr_scale > 0,
                   "mr_scale", "a finite number > 0", mr_scale)
        self.mr_scale = None if mr_scale is None else float(mr_scale)
        slice_axcodes = check_axcodes(slice_axcodes)
        self.slice_axcodes = slice_axcodes
        self.all_windows = bool(all_windows)
        self.null, self.null_windows, self.null_description = self._resolve_null(null, prior)

    def _resolve_null(self, null: Any, prior_argument: Any) -> tuple[Any, list[int], str]:
        """``(model or None, indices of its windows among the settings', description)``."""
        if null is None or str(null) == "none":
            return None, [], "none"
        spec_only = "'auto' or 'none'"
        if not isinstance(self.physics, str):
            expect(str(null) == "auto", "null", f"{spec_only} with a built operator (a null model is matched "
                   "against a physics spec string)", null)
            return None, [], "none applies (auto: a built operator has no spec string to match)"
        if getattr(self.prior, "config", None) is None:
            expect(str(null) == "auto", "null", f"{spec_only} for a prior without a config (e.g. analytic)", null)
            return None, [], "none applies (auto: the prior has no config)"
        from klip_med.calibration.store import resolve_null

        named = isinstance(prior_argument, str) or hasattr(prior_argument, "__fspath__")
        reference = prior_argument if named else self.prior.config.name
        return resolve_null(null, reference, self.prior, self.physics, self.settings)

    def _zscores(self, results: list[SliceResult]) -> tuple[np.ndarray, list[tuple[float | None, int]]]:
        """(D, h, w) z maps on the prior's grid and each slice's (largest in-body z, in-body blocks)
        (:func:`z_pixel_map`)."""
        maps, maxima, counts = zip(*(z_pixel_map(self.null, r, self.null_windows) for r in results), strict=True)
        return np.stack(maps).astype(np.float32), list(zip(maxima, counts, strict=True))

    # -------------------------------------------------------------- call

    def __call__(self, img: Any) -> MetaTensor:
        """Reconstruct ``img``: the outputs stacked as channels (see the class docstring)."""
        parts = self.outputs(img)
        names: list[str] = []
        for name, tensor in parts.items():
            channels = parts[name].meta["klip"].get("channels") if name == "klip" else None
            names += [f"klip[{c}]" for c in channels] if channels else [name] * int(tensor.shape[0])
        first = parts["recon"]
        meta = copy.deepcopy(dict(first.meta))
        meta["klip"] = {**{k: v for k, v in first.meta["klip"].items() if k not in ("quantity", "units")},
                        "channels": names,
                        "units": {n: parts[n.split("[")[0]].meta["klip"]["units"] for n in names}}
        stacked = torch.cat([t.as_tensor() for t in parts.values()], dim=0)
        return MetaTensor(stacked, affine=first.affine, meta=meta,
                          applied_operations=copy.deepcopy(list(first.applied_operations)))

    def outputs(self, img: Any) -> dict[str, MetaTensor]:
        """Reconstruct ``img``: ``{"recon", "std", "klip"[, "klip_z"]}``, each a ``MetaTensor`` with the
        input's affine and metadata plus ``meta["klip"]`` (quantity, units, prior, physics, settings,
        per-slice scores); the dictionary transform stores these under its keys."""
        start = time.perf_counter()
        values = as_tensor(img, "img")
        is_meta = isinstance(img, MetaTensor)
        meta = copy.deepcopy(dict(img.meta)) if is_meta else {}
        affine = img.affine.detach().clone() if is_meta else None
        ops = copy.deepcopy(list(img.applied_operations)) if is_meta else []
        if self.measure:
            arrays, summary = self._from_image(values, affine, meta)
        else:
            arrays, summary = self._from_measurement(values)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        units = summary.pop("_units")
        klip_units = summary["klip"].get("units", "nats") + " per pixel"
        names = [w.name or f"sigma:{w.sigma_min},{w.sigma_max}" for w in self.settings.windows]
        described = {
            "recon": {"quantity": "posterior mean reconstruction", "units": units},
            "klip": {"quantity": "KLIP map", "units": klip_units,
                     "channels": names if self.all_windows else names[:1]},
            "std": {"quantity": "posterior standard deviation", "units": units},
            "klip_z": {"quantity": "KLIP z-score against healthy reconstructions (null model)",
                       "units": "standard deviations"},
        }
        out = {}
        for name in (n for n in OUTPUT_NAMES if n in arrays):
            item_meta = copy.deepcopy(meta)
            item_meta.pop("affine", None)
            item_meta["klip"] = {**described[name], **copy.deepcopy(summary)}
            tensor = torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float32))
            out[name] = MetaTensor(tensor, affine=affine, meta=item_meta,
                                   applied_operations=copy.deepcopy(ops))
        return out

    def _summary(self, results: list[SliceResult], physics_text: Any,
                 z_max: Sequence[tuple[float | None, int]] | None = None) -> dict[str, Any]:
        """Per-slice and overall scores; ``z_max``: each slice's (largest in-body z, in-body blocks)
        with a null model: then per-slice ``slice_p``, the input's ``volume_p`` and the z threshold
        of :data:`Z_THRESHOLD_RULE` (what ``klip-med run`` flags by default)."""
        slices = []
        for index, r in enumerate(results):
            slices.append({
                "slice": index, "score_max": r.score.max, "score_topk_mean": r.score.topk_mean,
                "score_statistic": r.score.statistic, "top_blocks_prior_grid": r.top_blocks(3),
                "network_calls": r.metadata["network_calls"], "seconds": r.metadata["seconds"],
            })
        null = null_summary(self.null, self.null_description, slices, z_max, Z_THRESHOLD_RULE)
        return {
            "score_max": max(s["score_max"] for s in slices), **null,
            "prior": prior_name(self.prior), "physics": physics_text, "measure": self.measure,
            "settings": self.settings.describe(), "klip": results[0].metadata["klip"],
            "slices": slices, "klip_med_version": klip_med.__version__, "monai_version": monai.__version__,
            "device": str(self.device),
        }

    def _to_physical(self, mean: np.ndarray, std: np.ndarray,
                     scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean / std from the prior's range to the input's units (no-op for ``"prior"``)."""
        if self.intensity != "physical":
            return mean, std
        ends = self.rule.to_physical(np.array([-1.0, 1.0], dtype=np.float32), scale)
        return self.rule.to_physical(mean, scale), std * float(ends[1] - ends[0]) / 2.0

    def _intensity_summary(self, scale: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.intensity}
        if self.rule is not None:
            out["rule"] = self.rule.to_dict()
        if scale is not None:
            out["mr_scale"] = scale
        return out

    def _from_image(self, values: torch.Tensor, affine: torch.Tensor | None,
                    meta: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        shape = tuple(values.shape)
        expect(values.ndim in (3, 4) and shape[0] == 1, "img",
               "a channel-first image (1, H, W) or volume (1, H, W, D)", f"shape {shape}")
        expect(not values.is_complex() and values.dtype != torch.bool, "img", "real-valued voxels",
               str(values.dtype))
        volume = values[0].to(torch.float64).numpy()
        expect(bool(np.isfinite(volume).all()), "img", "finite values", "NaN or inf")
        is_2d = volume.ndim == 2
        slices = np.moveaxis(volume[..., None] if is_2d else volume, -1, 0)  # (D, H, W)

        scale = None
        if self.intensity == "physical":
            if self.rule.kind == "mr-percentile":
                scale = self.mr_scale if self.mr_scale is not None else self.rule.mr_scale(slices)
            model = self.rule.to_model(slices, scale)
            units = self.rule.unit
        else:
            lo, hi = float(slices.min()), float(slices.max())
            expect(lo >= -1.001 and hi <= 1.001, "img",
                   "values in the prior's range [-1, 1] with intensity='prior' (use intensity='physical' "
                   "for HU / MR signal)", f"[{lo:.4g}, {hi:.4g}]")
            model = np.clip(slices, -1.0, 1.0).astype(np.float32)
            units = "prior range [-1, 1]"

        layout = SliceLayout()
        if affine is not None and self.slice_axcodes is not None:
            layout = slice_layout(affine.numpy(), meta.get("space", "RAS"), self.slice_axcodes)
            if not layout.matched:
                warnings.warn(f"KLIPReconstruct: {layout.note}; the prior expects {self.slice_axcodes}",
                              stacklevel=3)
        oriented = layout.to_prior(model)  # (D, h0, w0)
        native = tuple(oriented.shape[-2:])
        on_grid = resample_inplane(oriented, self.grid, kind="intensity")

        results = []
        for k in range(on_grid.shape[0]):
            image = torch.from_numpy(np.ascontiguousarray(on_grid[k]))
            result, _ = reconstruct_image(self.prior, image, self.physics, self.settings, self.device)
            results.append(result)
        mean = np.stack([r.recon_mean.numpy() for r in results])
        std = np.stack([r.recon_std.numpy() for r in results])
        klip = np.stack([r.klip.numpy() for r in results])  # (D, n_windows, h, w)
        if not self.all_windows:
            klip = klip[:, :1]

        mean = layout.from_prior(resample_inplane(mean, native, kind="intensity"))
        std = layout.from_prior(resample_inplane(std, native, kind="intensity"))
        klip = layout.from_prior(resample_inplane(klip, native, kind="density"))
        mean, std = self._to_physical(mean, std, scale)

        def channel_first(x: np.ndarray) -> np.ndarray:  # (D, ..., H, W) -> (..., H, W[, D])
            x = np.moveaxis(x, 0, -1)
            return x[..., 0] if is_2d else x

        arrays = {"recon": channel_first(mean)[None], "klip": channel_first(klip),
                  "std": channel_first(std)[None]}
        z_max = None
        if self.null is not None:
            z, z_max = self._zscores(results)
            arrays["klip_z"] = channel_first(layout.from_prior(resample_inplane(z, native, kind="label")))[None]
        summary = self._summary(results, self.physics, z_max)
        summary["orientation"] = layout.describe()
        summary["intensity"] = self._intensity_summary(scale)
        summary["_units"] = units
        return arrays, summary

    def _from_measurement(self, values: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if isinstance(self.physics, str):
            from klip_med.physics import parse_physics

            gen = torch.Generator(device=self.device).manual_seed(self.settings.seed)
            physics = parse_physics(self.physics, self.grid[-1], generator=gen, device=self.device)
            physics_text: Any = self.physics
        else:
            physics = self.physics
            physics_text = physics.describe() if hasattr(physics, "describe") else type(physics).__name__
        expected = tuple(getattr(physics, "measurement_shape", ()) or ())
        shape = tuple(values.shape)
        if expected:
            expect(shape in (expected, (1, *expected)), "img",
                   f"a measurement of shape {expected} or {(1, *expected)} for physics {physics_text!r}",
                   f"shape {shape}")
            y = values.reshape(1, *expected)
        else:
            y = values[None]
        if not y.is_complex():
            y = y.to(torch.float32)
        expect(bool(torch.isfinite(y).all()), "img", "a finite measurement", "NaN or inf")
        result = reconstruct_measurement(self.prior, physics, y.to(self.device), self.settings)
        mean, std = result.recon_mean.numpy(), result.recon_std.numpy()
        klip = result.klip.numpy() if self.all_windows else result.klip.numpy()[:1]
        units = "prior range [-1, 1]"
        scale = self.mr_scale if self.intensity == "physical" else None
        mean, std = self._to_physical(mean, std, scale)
        if self.intensity == "physical":
            units = self.rule.unit
            if self.rule.kind == "mr-percentile" and scale is None:
                units = "MR signal scaled to [0, 1] (no mr_scale given)"
        arrays = {"recon": mean[None], "klip": klip, "std": std[None]}
        z_max = None
        if self.null is not None:
            z, z_max = self._zscores([result])
            arrays["klip_z"] = z
        summary = self._summary([result], physics_text, z_max)
        summary["orientation"] = {"note": f"on the prior's {self.grid[0]}x{self.grid[1]} grid, slice axes "
                                          f"{self.slice_axcodes or 'as the prior was trained'}"}
        summary["intensity"] = self._intensity_summary(scale)
        summary["_units"] = units
        return arrays, summary
