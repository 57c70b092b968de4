"""The MONAI transforms: in a Compose with LoadImaged / Orientationd / SaveImaged the outputs keep the
source affine and metadata; array and dictionary versions; errors; determinism; the shipped prior.

A tiny random-weight prior (16x16) keeps these fast: the tests check geometry, units and plumbing,
not reconstruction quality.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    SaveImaged,
    ScaleIntensityRanged,
)

from klip_med.errors import KLIPMedError
from klip_med.monai import KLIPReconstruct, KLIPReconstructd
from klip_med.physics import parse_physics
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior
from klip_med.priors.intensity import IntensityRule

SPEC = "mri:accel=4,center=0.08,noise=0.01"
FAST = {"samples": 2, "steps": 3}


@pytest.fixture(scope="module")
def tiny_prior() -> DiffusionPrior:
    """A 16x16 prior with random weights (seeded without touching the global generator's state)."""
    config = PriorConfig(
        name="tiny", modality="MR", image_size=16, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), weights_dtype="float32",
        intensity=IntensityRule("mr-percentile", percentile=99.0, reference=0.8),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = DiffusionPrior(config)
    return prior.eval().requires_grad_(False)


def _oblique_affine() -> np.ndarray:
    """Voxel to RAS: rotated 20 degrees about z, first axis flipped, anisotropic spacing."""
    a = math.radians(20.0)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.9, 1.1, 2.5])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    return affine


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
    return path


def _mr_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A bright disc on a dark background, MR-like signal 0..~300."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    disc = (yy**2 + xx**2 < 0.6).astype(np.float32) * 200.0
    vol = disc[..., None] + 40.0 * rng.random((*shape[:2], shape[2] if len(shape) > 2 else 1))
    return vol if len(shape) > 2 else vol[..., 0]


# ---------------------------------------------------------------- Compose / affine


def test_compose_keeps_affine_through_orientation_and_save(tmp_path, tiny_prior):
    source = _write_nifti(tmp_path / "case.nii.gz", _mr_volume((20, 18, 2)), _oblique_affine())
    out_dir = tmp_path / "out"
    pipeline = Compose([
        LoadImaged(keys="img", reader="NibabelReader"),
        EnsureChannelFirstd(keys="img"),
        Orientationd(keys="img", axcodes="RAS", labels=None),
        KLIPReconstructd(keys="img", prior=tiny_prior, physics=SPEC, **FAST),
        *(SaveImaged(keys=f"img_{name}", output_dir=out_dir, output_postfix=name, separate_folder=False,
                     print_log=False) for name in ("recon", "klip", "std")),
    ])
    data = pipeline({"img": str(source)})

    canonical = nib.as_closest_canonical(nib.load(source))  # nibabel's own RAS reorientation
    oriented = data["img"]
    np.testing.assert_allclose(oriented.affine.numpy(), canonical.affine, atol=1e-5)
    assert not np.allclose(canonical.affine, _oblique_affine())  # Orientationd really flipped an axis
    for name in ("recon", "klip", "std"):
        item = data[f"img_{name}"]
        assert isinstance(item, MetaTensor) and item.shape == (1, 20, 18, 2)
        np.testing.assert_allclose(item.affine.numpy(), oriented.affine.numpy())
        assert item.meta["filename_or_obj"] == oriented.meta["filename_or_obj"]
        saved = nib.load(out_dir / f"case_{name}.nii.gz")
        np.testing.assert_allclose(saved.affine, canonical.affine, atol=1e-4)
        assert saved.shape == (20, 18, 2)
        np.testing.assert_allclose(np.asarray(saved.dataobj), item[0].numpy(), rtol=1e-6)
    klip = data["img_klip"]
    assert klip.meta["klip"]["units"] == "nats per pixel" and float(klip.min()) >= 0
    assert data["img_recon"].meta["klip"]["units"] == "MR signal (arbitrary units)"
    assert len(klip.meta["klip"]["slices"]) == 2 and klip.meta["klip"]["prior"] == "tiny"
    # the input key is left as Orientationd made it
    np.testing.assert_array_equal(oriented[0].numpy(), np.asarray(canonical.dataobj, dtype=np.float32))


def test_compose_with_scale_intensity_range_on_a_2d_image(tmp_path, tiny_prior):
    """ScaleIntensityRanged to [-1, 1] + intensity='prior': outputs stay in the prior's range."""
    affine = _oblique_affine()
    source = _write_nifti(tmp_path / "slice.nii.gz", _mr_volume((24, 12)), affine)
    pipeline = Compose([
        LoadImaged(keys="img", reader="NibabelReader"),
        EnsureChannelFirstd(keys="img"),
        Orientationd(keys="img", axcodes="RA", labels=None),
        ScaleIntensityRanged(keys="img", a_min=0.0, a_max=250.0, b_min=-1.0, b_max=1.0, clip=True),
        KLIPReconstructd(keys="img", prior=tiny_prior, physics=SPEC, intensity="prior",
                         recon_keys="r", klip_keys="k", std_keys="s", **FAST),
    ])
    data = pipeline({"img": str(source)})
    assert data["r"].shape == data["k"].shape == data["s"].shape == (1, 24, 12)
    np.testing.assert_allclose(data["k"].affine.numpy(), data["img"].affine.numpy())
    assert data["r"].meta["klip"]["units"] == "prior range [-1, 1]"


# ---------------------------------------------------------------- array version


def test_array_transform_on_a_plain_tensor(tiny_prior):
    image = torch.rand(1, 12, 20, generator=torch.Generator().manual_seed(1)) * 300
    before = image.clone()
    transform = KLIPReconstruct(tiny_prior, SPEC, windows=("full", "t:0.5,1"), all_windows=True, **FAST)
    out = transform.outputs(image)
    assert set(out) == {"recon", "klip", "std"}
    assert out["recon"].shape == out["std"].shape == (1, 12, 20)
    assert out["klip"].shape == (2, 12, 20)  # one channel per window
    assert out["klip"].meta["klip"]["channels"] == ["full", "t:0.5,1"]
    for item in out.values():
        assert isinstance(item, MetaTensor) and item.dtype == torch.float32
        assert torch.isfinite(item).all()
    torch.testing.assert_close(out["recon"].affine, torch.eye(4, dtype=torch.float64))
    assert float(out["std"].min()) >= 0
    torch.testing.assert_close(image, before, rtol=0, atol=0)  # input never modified

    stacked = transform(image)  # MONAI array style: one tensor, the outputs as named channels
    assert isinstance(stacked, MetaTensor) and stacked.shape == (4, 12, 20) and stacked.dtype == torch.float32
    meta = stacked.meta["klip"]
    assert meta["channels"] == ["recon", "std", "klip[full]", "klip[t:0.5,1]"]
    assert meta["units"]["recon"] == out["recon"].meta["klip"]["units"]
    assert meta["units"]["klip[full]"] == out["klip"].meta["klip"]["units"]
    torch.testing.assert_close(stacked[0], out["recon"][0].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(stacked[1], out["std"][0].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(stacked[2:], out["klip"].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(stacked.affine, out["recon"].affine)


def test_slices_are_shown_to_the_prior_in_its_orientation(tiny_prior):
    """A slice stored transposed, with an affine saying so, gives exactly the transposed outputs."""
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(2)) * 300
    transform = KLIPReconstruct(tiny_prior, SPEC, **FAST)
    plain = transform.outputs(image)  # no affine: rows = first axis, as the prior sees it
    lps_like = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))  # axes point L, P
    stored = MetaTensor(image.transpose(1, 2).clone(), affine=lps_like)
    oriented = transform.outputs(stored)
    assert oriented["klip"].meta["klip"]["orientation"]["transpose"] is True
    for name in ("recon", "klip", "std"):
        torch.testing.assert_close(oriented[name].as_tensor(), plain[name].as_tensor().transpose(1, 2))


def test_measurement_input_matches_the_simulated_case(tiny_prior):
    """measure=False on the y that measure=True simulates gives the same reconstruction."""
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    simulated = KLIPReconstruct(tiny_prior, SPEC, intensity="prior", **FAST).outputs(x)
    physics = parse_physics(SPEC, 16, generator=torch.Generator().manual_seed(0))  # as reconstruct_image
    y = physics(x[None])
    from_y = KLIPReconstruct(tiny_prior, SPEC, measure=False, intensity="prior", **FAST).outputs(y[0])
    torch.testing.assert_close(from_y["recon"].as_tensor(), simulated["recon"].as_tensor())
    torch.testing.assert_close(from_y["klip"].as_tensor(), simulated["klip"].as_tensor())
    with_operator = KLIPReconstruct(tiny_prior, physics, measure=False, intensity="prior", **FAST).outputs(y)
    torch.testing.assert_close(with_operator["recon"].as_tensor(), simulated["recon"].as_tensor())


def test_same_seed_same_outputs_and_another_seed_differs(tiny_prior):
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4)) * 300
    first = KLIPReconstruct(tiny_prior, SPEC, seed=7, **FAST).outputs(image)
    again = KLIPReconstruct(tiny_prior, SPEC, seed=7, **FAST).outputs(image)
    other = KLIPReconstruct(tiny_prior, SPEC, seed=8, **FAST).outputs(image)
    for name in ("recon", "klip", "std"):
        torch.testing.assert_close(first[name].as_tensor(), again[name].as_tensor(), rtol=0, atol=0)
    assert not torch.equal(first["klip"].as_tensor(), other["klip"].as_tensor())


def test_physical_units_are_the_prior_rule_applied_to_prior_units(tiny_prior):
    """A CT prior: HU in, HU out; the same as running in prior units and mapping with the rule."""
    rule = IntensityRule("ct-hu-window", hu_min=-160.0, hu_max=240.0)
    ct_prior = DiffusionPrior(replace(tiny_prior.config, name="tiny-ct", modality="CT", intensity=rule),
                              unet=tiny_prior.unet)
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    hu = torch.from_numpy(rule.to_physical(x.numpy()))
    in_hu = KLIPReconstruct(ct_prior, "ct-sparse:views=8,noise=0.5", **FAST).outputs(hu)
    in_prior = KLIPReconstruct(ct_prior, "ct-sparse:views=8,noise=0.5", intensity="prior", **FAST).outputs(x)
    assert in_hu["recon"].meta["klip"]["units"] == "HU"
    expected = torch.from_numpy(rule.to_physical(in_prior["recon"].numpy()))
    torch.testing.assert_close(in_hu["recon"].as_tensor(), expected, rtol=1e-4, atol=1e-2)
    hu_per_unit = (rule.hu_max - rule.hu_min) / 2.0
    torch.testing.assert_close(in_hu["std"].as_tensor(), in_prior["std"].as_tensor() * hu_per_unit,
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(in_hu["klip"].as_tensor(), in_prior["klip"].as_tensor(), rtol=1e-3, atol=1e-4)  # HU round trip: float32 rounding


# ---------------------------------------------------------------- errors


def test_missing_key_raises_monai_key_error_naming_key_and_transform(tiny_prior):
    transform = KLIPReconstructd(keys="img", prior=tiny_prior, physics=SPEC, **FAST)
    with pytest.raises(KeyError, match=r"img.*KLIPReconstructd"):
        transform({"label": torch.zeros(1, 16, 16)})
    skipping = KLIPReconstructd(keys="img", prior=tiny_prior, physics=SPEC, allow_missing_keys=True, **FAST)
    data = {"label": torch.zeros(1, 16, 16)}
    assert set(skipping(data)) == {"label"}


@pytest.mark.parametrize("spec, match", [
    ("mri:accel=x", "accel"),
    ("pet:dose=1", "ct-sparse"),  # an unknown kind lists the valid ones
    ("mri:accel=4,bogus=1", "bogus"),
])
def test_bad_physics_spec_raises_at_construction(tiny_prior, spec, match):
    with pytest.raises(KLIPMedError, match=match):
        KLIPReconstruct(tiny_prior, spec)
    with pytest.raises(KLIPMedError, match=match):
        KLIPReconstructd(keys="img", prior=tiny_prior, physics=spec)


@pytest.mark.parametrize("kwargs, match", [
    ({"intensity": "hu"}, r"intensity: expected one of \('physical', 'prior'\), found hu"),
    ({"windows": ("t:oops",)}, "--windows: expected"),
    ({"samples": 0}, "samples: expected a positive integer"),
    ({"slice_axcodes": "PA"}, "slice_axcodes: expected two axis codes on different axes"),
    ({"mr_scale": -1.0}, "mr_scale: expected a finite number > 0"),
])
def test_bad_options_raise_naming_the_argument(tiny_prior, kwargs, match):
    with pytest.raises(KLIPMedError, match=match):
        KLIPReconstruct(tiny_prior, SPEC, **kwargs)


def test_bad_inputs_raise_naming_the_argument(tiny_prior):
    transform = KLIPReconstruct(tiny_prior, SPEC, **FAST)
    shape_error = r"img: expected a channel-first image \(1, H, W\).*found shape \(2, 16, 16\)"
    with pytest.raises(KLIPMedError, match=shape_error):
        transform(torch.zeros(2, 16, 16))
    with pytest.raises(KLIPMedError, match="img: expected finite values"):
        transform(torch.full((1, 16, 16), float("nan")))
    as_prior = KLIPReconstruct(tiny_prior, SPEC, intensity="prior", **FAST)
    with pytest.raises(KLIPMedError, match=r"img: expected values in the prior's range \[-1, 1\]"):
        as_prior(torch.full((1, 16, 16), 120.0))
    with pytest.raises(KLIPMedError, match="physics: expected a spec string"):
        KLIPReconstruct(tiny_prior, parse_physics(SPEC, 16))  # an operator needs measure=False
    measuring = KLIPReconstruct(tiny_prior, SPEC, measure=False, **FAST)
    with pytest.raises(KLIPMedError, match=r"img: expected a measurement of shape \(2, 16, 16\)"):
        measuring(torch.zeros(1, 16, 16))
    with pytest.raises(KLIPMedError, match="prior: expected a shipped prior name"):
        KLIPReconstruct("no-such-prior", SPEC)


def test_klip_med_monai_does_not_shadow_monai():
    import monai

    import klip_med.monai.array as ours

    assert "klip_med" not in Path(monai.__file__).parts
    assert ours.monai is monai and hasattr(monai.transforms, "MapTransform")


# ---------------------------------------------------------------- a shipped prior


def test_shipped_mri_prior_on_the_bundled_case():
    """The shipped 128 prior, a few steps, on the bundled FLAIR slice stored RAS at half resolution."""
    case = np.load(Path(__file__).parents[1] / "klip_med" / "cases" / "lgg_flair_demo.npz")
    flair = case["flair"].astype(np.float32)  # radiological display: rows to P, columns to L
    half = flair.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    stored = np.flip(half.T, (0, 1)).copy()  # RAS storage: first axis to R, second to A
    affine = torch.diag(torch.tensor([3.75, 3.75, 5.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(stored)[None], affine=affine)
    transform = KLIPReconstruct("mri-brain-flair-128", SPEC, samples=1, steps=3,
                                mr_scale=float(case["volume_mr_scale"]))
    out = transform.outputs(image)
    meta = out["klip"].meta["klip"]
    assert meta["prior"] == "mri-brain-flair-128"
    assert meta["orientation"] == {"transpose": True, "flip_rows": True, "flip_cols": True,
                                   "note": "slice axes RA (RAS) shown to the prior as PL"}
    for item in out.values():
        assert item.shape == (1, 64, 64) and torch.isfinite(item).all()
        torch.testing.assert_close(item.affine, affine)
    assert float(out["klip"].sum()) > 0 and meta["score_max"] > 0


def test_example_script_runs_and_writes_on_the_source_geometry(tmp_path, capsys):
    """examples/monai_pipeline.py with tiny settings: the NIfTIs it writes lie on its source."""
    path = Path(__file__).parents[1] / "examples" / "monai_pipeline.py"
    spec = importlib.util.spec_from_file_location("monai_pipeline_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--out", str(tmp_path), "--steps", "3", "--samples", "1"])
    printed = capsys.readouterr().out
    source = nib.as_closest_canonical(nib.load(tmp_path / "flair_demo.nii.gz"))
    for name in ("recon", "klip", "std"):
        written = nib.load(tmp_path / f"flair_demo_{name}.nii.gz")
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
        assert written.shape == (128, 128) and str(tmp_path / f"flair_demo_{name}.nii.gz") in printed
    assert "null model      none applies" in printed  # no null model is shipped for 1 sample x 3 steps
    assert not (tmp_path / "flair_demo_klip_z.nii.gz").exists()


# ---------------------------------------------------------------- null-calibrated z map


def test_null_model_adds_the_klip_z_map_of_klip_med_run(tiny_prior, tmp_path):
    """With a null model the transform returns klip_z: the null's block z-scores on their pixels,
    0 outside the body, exactly those of calibrate.apply_null on the same reconstruction."""
    from klip_med.calibration.scoring import apply_null
    from klip_med.pipeline import KLIPSettings, default_windows, reconstruct_image
    from klip_med.pipeline.calibrate import calibrate_images
    from klip_med.score.blocks import blocks_inside_mask

    spec = "mri:accel=2,center=0.25,noise=0.01"
    settings = KLIPSettings(samples=2, steps=3, block_size=4)
    settings = replace(settings, windows=default_windows(tiny_prior, settings))
    from klip_med.data.phantom import mr_phantom

    rng = np.random.default_rng(3)
    heads = [(2 * mr_phantom(16, rng).image - 1).astype(np.float32) for _ in range(7)]
    null = calibrate_images(tiny_prior, spec, settings, heads[:6], "phantoms", conditioning="none", log=None)
    path = null.save(tmp_path / "null.json")
    image = torch.from_numpy(heads[6][None])

    out = KLIPReconstruct(tiny_prior, spec, samples=2, steps=3, block_size=4, intensity="prior", null=path).outputs(image)
    assert set(out) == {"recon", "klip", "std", "klip_z"} and out["klip_z"].shape == (1, 16, 16)
    meta = out["klip_z"].meta["klip"]
    assert meta["null_model"] == str(path) and meta["units"] == "standard deviations"
    n_inside = int(blocks_inside_mask(reconstruct_image(tiny_prior, image[0], spec, settings)[0].body_mask, 4).sum())
    assert meta["z_threshold"] == {"rule": "fwer:0.05", "in_body_blocks": n_inside,
                                   "z": round(null.family_threshold(0.05, n_inside, volume=True), 4)}
    assert 0 < meta["volume_p"] <= 1 and 0 < meta["slices"][0]["slice_p"] <= 1
    result, _ = reconstruct_image(tiny_prior, image[0], spec, settings)
    z, _ = apply_null(null, result)
    inside = blocks_inside_mask(result.body_mask, 4).numpy()
    expected = np.repeat(np.repeat(np.where(inside, z, 0.0), 4, axis=0), 4, axis=1)
    np.testing.assert_allclose(out["klip_z"][0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert meta["z_max"] == pytest.approx(float(z[inside].max()), abs=1e-4)

    d = KLIPReconstructd("img", tiny_prior, spec, samples=2, steps=3, block_size=4, intensity="prior",
                         null=path)({"img": image})
    torch.testing.assert_close(d["img_klip_z"].as_tensor(), out["klip_z"].as_tensor())
    plain = KLIPReconstruct(tiny_prior, spec, samples=2, steps=3, block_size=4, intensity="prior", null="none").outputs(image)
    assert "klip_z" not in plain and plain["klip"].meta["klip"]["null_model"] == "none"
    auto = KLIPReconstruct(tiny_prior, spec, samples=2, steps=3, block_size=4, intensity="prior").outputs(image)
    assert "klip_z" not in auto and auto["klip"].meta["klip"]["null_model"].startswith("none applies")
    with pytest.raises(KLIPMedError, match="block_size"):  # fitted with 4x4 blocks
        KLIPReconstruct(tiny_prior, spec, samples=2, steps=3, block_size=8, intensity="prior", null=path)
    with pytest.raises(KLIPMedError, match="null: expected 'auto' or 'none' with a built operator"):
        KLIPReconstruct(tiny_prior, parse_physics(spec, 16), measure=False, null=path)
