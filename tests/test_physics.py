"""Tests for klip_med.physics: CT / MRI operators over deepinv, noise, spec parsing, validation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from deepinv.physics import LinearPhysics

from klip_med.errors import KLIPMedError
from klip_med.physics import (
    baseline_reconstruction,
    cartesian_mask,
    cartesian_mri,
    check_measurement,
    limited_angle_ct,
    low_dose_ct,
    multicoil_mri,
    parse_physics,
    sparse_view_ct,
)

N = 32


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def coil_maps(n_coils: int = 3, size: int = N, seed: int = 7, dtype=torch.complex64) -> torch.Tensor:
    return torch.randn(n_coils, size, size, generator=gen(seed), dtype=dtype)


def smooth_phantom(size: int = N, dtype=torch.float32) -> torch.Tensor:
    """Two Gaussian blobs inside the inscribed disc, values in [0, ~1.1], shape (1, 1, size, size)."""
    r = torch.linspace(-1, 1, size, dtype=dtype)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    img = torch.exp(-((xx - 0.1) ** 2 + (yy + 0.05) ** 2) / 0.15)
    img = img + 0.5 * torch.exp(-((xx + 0.3) ** 2 + (yy - 0.3) ** 2) / 0.03)
    return img[None, None]


def relative_adjoint_error(op, dtype: torch.dtype, batch: int = 2) -> float:
    """|<A x, y> - <x, A^T y>| / |<A x, y>| for Gaussian x (real image) and y (measurement)."""
    x = torch.randn((batch, *op.image_shape), generator=gen(11), dtype=dtype)
    y = torch.randn((batch, *op.measurement_shape), generator=gen(12), dtype=dtype)
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.A_adjoint(y)).sum()
    return (abs(lhs - rhs) / abs(lhs)).item()


# --------------------------------------------------------------------------- adjointness

ALL_BUILDERS = {
    "ct-sparse": lambda dt: sparse_view_ct(N, 12, dtype=dt),
    "ct-sparse-circle": lambda dt: sparse_view_ct(N, 12, circle=True, dtype=dt),
    "ct-limited": lambda dt: limited_angle_ct(N, 90.0, views=20, dtype=dt),
    "ct-lowdose": lambda dt: low_dose_ct(N, 1e4, views=30, dtype=dt),
    "mri": lambda dt: cartesian_mri(N, 4.0, generator=gen(0)),
    "mri-equispaced": lambda dt: cartesian_mri(N, 3.0, center_fraction=0.0, mask_kind="equispaced", generator=gen(0)),
    "mri-multicoil": lambda dt: multicoil_mri(coil_maps(dtype=torch.complex128), 4.0, generator=gen(0)),
}


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_adjointness_float64(name):
    # CT is built with float64 Radon grids; MRI FFTs promote float64 images to complex128.
    # deepinv's autograd adjoint is the exact transpose, so only round-off remains (measured 0 to 1e-16).
    op = ALL_BUILDERS[name](torch.float64)
    assert relative_adjoint_error(op, torch.float64) < 1e-10


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_adjointness_float32_default(name):
    # Default float32 operators: measured 1e-7 .. 1e-6 relative error (float32 summation round-off).
    # For contrast, deepinv's unfiltered IRadon adjoint (adjoint_via_backprop=False, not used here)
    # is off by ~1.5% at 32 px / 30 views.
    op = ALL_BUILDERS[name](torch.float32)
    assert relative_adjoint_error(op, torch.float32) < 1e-4


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_operator_is_deepinv_linear_physics_with_shape_and_metadata(name):
    op = ALL_BUILDERS[name](torch.float32)
    assert isinstance(op, LinearPhysics)
    assert op.image_shape == (1, N, N)
    x = smooth_phantom()
    y = op(x)  # A + noise through deepinv's forward
    assert tuple(y.shape) == (1, *op.measurement_shape)
    assert op.A_adjoint(y).shape == x.shape
    desc = json.loads(json.dumps(op.describe()))
    assert desc["kind"] == op.kind
    assert desc["image_shape"] == [1, N, N]
    assert desc["measurement_shape"] == list(op.measurement_shape)
    assert "model" in desc["noise"]


def test_prox_l2_and_a_dagger_run_on_real_operators():
    x = smooth_phantom()
    mri = cartesian_mri(N, 1.0)
    # Fully sampled real-image MRI: the least-squares pseudo-inverse recovers the image.
    assert torch.allclose(mri.A_dagger(mri.A(x)), x, atol=1e-4)
    ct = sparse_view_ct(N, 40)
    z = torch.zeros_like(x)
    p = ct.prox_l2(z, ct.A(x), gamma=1.0, max_iter=100)
    assert p.shape == x.shape
    # The prox moves from z=0 towards data consistency.
    assert (ct.A(p) - ct.A(x)).norm() < 0.5 * ct.A(x).norm()


# --------------------------------------------------------------------------- MRI


def test_fully_sampled_single_coil_zero_filled_is_exact():
    op = cartesian_mri(N, 1.0, center_fraction=0.08)
    assert bool((op.mask == 1).all())
    x = torch.rand(3, 1, N, N, generator=gen(1))
    rec = baseline_reconstruction(op, op.A(x))
    assert torch.allclose(rec, x, atol=1e-5)


def test_fully_sampled_multicoil_zero_filled_is_exact():
    op = multicoil_mri(coil_maps(4), 1.0)
    x = torch.rand(2, 1, N, N, generator=gen(2))
    rec = baseline_reconstruction(op, op.A(x))
    assert torch.allclose(rec, x, atol=1e-4)


def test_undersampled_zero_filled_is_not_exact():
    op = cartesian_mri(N, 4.0, generator=gen(0))
    x = smooth_phantom()
    err = ((baseline_reconstruction(op, op.A(x)) - x).norm() / x.norm()).item()
    assert 1e-3 < err < 1.0


@pytest.mark.parametrize("kind", ["random", "gaussian", "equispaced"])
@pytest.mark.parametrize("accel", [2.0, 4.0, 8.0])
def test_mask_line_count_centre_band_and_orientation(kind, accel):
    width, cf = 64, 0.08
    mask = cartesian_mask(width, accel, center_fraction=cf, mask_kind=kind, generator=gen(3))
    assert mask.shape == (width, width)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # Whole columns (phase-encode lines) are sampled: every row identical.
    assert bool((mask == mask[:1]).all())
    lines = int(mask[0].sum())
    target = int(width // accel)
    if kind == "equispaced":
        # Regular lines may land inside the centre band, so the count can fall short by ~1.
        assert target - 2 <= lines <= target
    else:
        assert lines == target
    n_center = int(cf * width)
    start = width // 2 - n_center // 2
    assert bool((mask[0, start : start + n_center] == 1).all())


def test_center_fraction_zero_allowed_and_reported():
    op = cartesian_mri(N, 4.0, center_fraction=0.0, generator=gen(4))
    params = op.describe()["parameters"]
    assert params["center_lines"] == 0
    assert params["sampled_lines"] == N // 4
    assert params["effective_acceleration"] == pytest.approx(4.0)


@pytest.mark.parametrize("kind", ["random", "gaussian"])
def test_mask_reproducible_by_seed_and_varies_across_seeds(kind):
    a = cartesian_mri(64, 4.0, mask_kind=kind, generator=gen(5)).mask
    b = cartesian_mri(64, 4.0, mask_kind=kind, generator=gen(5)).mask
    c = cartesian_mri(64, 4.0, mask_kind=kind, generator=gen(6)).mask
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_without_generator_is_deterministic_and_ignores_global_seed():
    a = cartesian_mask(N, 4.0)
    torch.randn(10)  # advance torch's global generator; the mask must not depend on it
    b = cartesian_mask(N, 4.0)
    assert torch.equal(a, b)


def test_mri_noise_only_on_sampled_kspace_and_has_sigma():
    sigma = 0.1
    op = cartesian_mri(64, 4.0, noise_sigma=sigma, generator=gen(8))
    x = torch.zeros(4, 1, 64, 64)
    noise = op(x) - op.A(x)
    unsampled = (op.mask == 0).expand_as(noise)
    assert bool((noise[unsampled] == 0).all())
    measured = noise[~unsampled].std().item()
    assert measured == pytest.approx(sigma, rel=0.05)


# --------------------------------------------------------------------------- CT


def test_fbp_of_many_views_recovers_smooth_phantom():
    # Measured relative L2 error of deepinv FBP at 32 px: 0.0234 (90, 180 and 360 views alike);
    # 0.035 at 24 px. Bound with ~2x margin.
    op = sparse_view_ct(N, 180)
    x = smooth_phantom()
    rec = baseline_reconstruction(op, op.A(x))
    assert ((rec - x).norm() / x.norm()).item() < 0.05


def test_fbp_degrades_with_sparse_views():
    x = smooth_phantom()
    errs = []
    for views in (180, 6):
        op = sparse_view_ct(N, views)
        errs.append(((baseline_reconstruction(op, op.A(x)) - x).norm() / x.norm()).item())
    assert errs[1] > 2 * errs[0]


@pytest.mark.parametrize("views", [1, 7, 60])
def test_sparse_view_angles(views):
    op = sparse_view_ct(N, views)
    assert op.angles.numel() == views
    assert op.measurement_shape[-1] == views
    expected = torch.arange(views, dtype=torch.float64) * (180.0 / views)
    assert torch.allclose(op.angles.double(), expected, atol=1e-4)
    assert op.describe()["parameters"]["views"] == views


def test_sinogram_is_unnormalised_line_integrals():
    op = sparse_view_ct(N, 4)
    y = op.A(torch.ones(1, 1, N, N))
    # A ray through the full width of a unit image integrates to N pixels (unit spacing).
    assert y.max().item() >= N - 1e-3
    assert op.measurement_shape[1] == 46  # ceil(sqrt(2) * 32) detector cells when circle=False


@pytest.mark.parametrize("rng_deg", [30.0, 120.0, 180.0])
def test_limited_angle_spans_range(rng_deg):
    op = limited_angle_ct(N, rng_deg)
    angles = op.angles.double()
    views = angles.numel()
    assert views == round(rng_deg)  # default: one view per degree
    step = rng_deg / views
    assert angles[0].item() == 0.0
    assert angles[-1].item() == pytest.approx(rng_deg - step, abs=1e-4)
    assert bool((angles < rng_deg).all())
    explicit = limited_angle_ct(N, rng_deg, views=10).angles.double()
    assert explicit.numel() == 10
    assert explicit[-1].item() == pytest.approx(rng_deg * 0.9, abs=1e-4)


def test_limited_angle_is_worse_than_full_scan():
    x = smooth_phantom()
    full = sparse_view_ct(N, 60)
    lim = limited_angle_ct(N, 60.0, views=60)
    err_full = ((baseline_reconstruction(full, full.A(x)) - x).norm() / x.norm()).item()
    err_lim = ((baseline_reconstruction(lim, lim.A(x)) - x).norm() / x.norm()).item()
    assert err_lim > 2 * err_full


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize(
    "build",
    [
        lambda g: sparse_view_ct(N, 10, noise_sigma=0.5, generator=g),
        lambda g: cartesian_mri(N, 4.0, noise_sigma=0.05, generator=g),
        lambda g: low_dose_ct(N, 1e3, views=10, generator=g),
    ],
    ids=["ct-gaussian", "mri-gaussian", "ct-lowdose"],
)
def test_same_generator_seed_same_noisy_measurement(build):
    x = smooth_phantom()
    y1 = build(gen(21))(x)
    y2 = build(gen(21))(x)
    y3 = build(gen(22))(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_gaussian_noise_std_matches_sigma_in_measurement_units():
    sigma = 0.5
    op = sparse_view_ct(N, 30, noise_sigma=sigma, generator=gen(23))
    x = smooth_phantom().repeat(4, 1, 1, 1)
    assert (op(x) - op.A(x)).std().item() == pytest.approx(sigma, rel=0.05)
    assert op.describe()["noise"] == {"model": "gaussian", "sigma": sigma, "seeded": True}


def test_low_dose_mean_matches_noiseless_line_integrals_at_high_dose():
    # Measured: 20-draw mean within 4e-4 (relative L2) of A x at i0 = 1e6.
    op = low_dose_ct(N, 1e6, views=30, generator=gen(24))
    x = smooth_phantom()
    clean = op.A(x)
    mean = torch.stack([op(x) for _ in range(20)]).mean(0)
    assert ((mean - clean).norm() / clean.norm()).item() < 5e-3


def test_low_dose_noise_grows_as_dose_drops_and_stays_finite():
    x = smooth_phantom()
    spreads = []
    for i0 in (1e5, 1e3):
        op = low_dose_ct(N, i0, views=30, generator=gen(25))
        spreads.append((op(x) - op.A(x)).std().item())
    # Photon noise std scales like 1/sqrt(i0): 100x fewer photons -> ~10x the spread.
    assert 5.0 < spreads[1] / spreads[0] < 20.0
    starved = low_dose_ct(N, 5.0, views=30, mu=1.0, generator=gen(26))
    y = starved(x)
    assert bool(torch.isfinite(y).all())  # zero photon counts are clamped, not -log(0) = inf
    check_measurement(starved, y)


def test_low_dose_extra_gaussian_noise_is_applied():
    x = smooth_phantom()
    plain = low_dose_ct(N, 1e6, views=30, generator=gen(27))
    extra = low_dose_ct(N, 1e6, views=30, noise_sigma=1.0, generator=gen(27))
    assert (extra(x) - extra.A(x)).std() > 5 * (plain(x) - plain.A(x)).std()
    stages = extra.describe()["noise"]["stages"]
    assert [s["model"] for s in stages] == ["log-poisson", "gaussian"]


# --------------------------------------------------------------------------- parse_physics


@pytest.mark.parametrize(
    "spec, kind, expected",
    [
        ("ct-sparse:views=60", "ct-sparse", {"views": 60, "noise_sigma": 0.0}),
        ("ct-sparse:views=60,noise=0.01", "ct-sparse", {"views": 60, "noise_sigma": 0.01}),
        ("ct-limited:range=120", "ct-limited", {"angular_range_deg": 120.0, "views": 120}),
        ("ct-limited: range=90 , views=30", "ct-limited", {"angular_range_deg": 90.0, "views": 30}),
        ("ct-lowdose:i0=1e4", "ct-lowdose", {"i0": 1e4, "views": 180, "mu": 2.0 / N}),
        ("ct-lowdose:i0=500,mu=0.05,views=1e2", "ct-lowdose", {"i0": 500.0, "mu": 0.05, "views": 100}),
        ("mri:accel=4,center=0.08", "mri", {"acceleration": 4.0, "center_fraction": 0.08, "mask_kind": "random"}),
        (
            "mri:accel=8,center=0,mask=equispaced",
            "mri",
            {"acceleration": 8.0, "center_fraction": 0.0, "mask_kind": "equispaced", "center_lines": 0},
        ),
        ("mri:accel=2,noise=0.01,mask=gaussian", "mri", {"noise_sigma": 0.01, "mask_kind": "gaussian"}),
    ],
)
def test_parse_physics_valid(spec, kind, expected):
    op = parse_physics(spec, N, generator=gen(0))
    assert op.kind == kind
    params = op.describe()["parameters"]
    for key, value in expected.items():
        assert params[key] == pytest.approx(value), key
    assert op.image_shape == (1, N, N)


def test_parse_physics_noise_key_sets_noise_model():
    op = parse_physics("ct-limited:range=60,noise=0.2", N)
    assert op.describe()["noise"]["model"] == "gaussian"
    assert op.describe()["noise"]["sigma"] == pytest.approx(0.2)


def test_parse_physics_multicoil_needs_and_checks_coil_maps():
    op = parse_physics("mri-multicoil:accel=4", N, coil_maps=coil_maps(2))
    assert op.kind == "mri-multicoil"
    assert op.measurement_shape == (2, 2, N, N)
    with pytest.raises(KLIPMedError, match=r"coil_maps: expected complex coil maps"):
        parse_physics("mri-multicoil:accel=4", N)
    with pytest.raises(KLIPMedError, match=re.escape(f"shape (N_coils, {N}, {N}) matching image_size, found (2, 16, 16)")):
        parse_physics("mri-multicoil:accel=4", N, coil_maps=coil_maps(2, size=16))


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("foo:x=1", r"expected a kind among ct-limited, ct-lowdose, ct-sparse, mri, mri-multicoil, found 'foo'"),
        ("ct-sparse:vews=3", r"expected keys among circle, noise, views for kind ct-sparse, found 'vews'"),
        ("mri:accel=4,range=3", r"expected keys among accel, center, mask, noise for kind mri, found 'range'"),
        ("ct-sparse:views=abc", r"key 'views': expected an integer >= 1, found 'abc'"),
        ("ct-sparse:views=2.5", r"key 'views': expected an integer >= 1, found '2.5'"),
        ("mri:accel=four", r"key 'accel': expected a number >= 1, found 'four'"),
        ("mri:accel=4,center=nan", r"key 'center': expected a number in \[0, 1\), found 'nan'"),
        ("mri:accel=4,mask=radial", r"key 'mask': expected one of equispaced, gaussian, random, found 'radial'"),
        ("ct-sparse:views", r"expected items of the form key=value, found 'views'"),
        ("ct-sparse", r"expected required key\(s\) views for kind ct-sparse"),
        ("mri:center=0.1", r"expected required key\(s\) accel for kind mri"),
        ("mri:accel=4,accel=2", r"'accel' repeated"),
        ("ct-limited:range=200", r"angular_range_deg: expected a finite number in \(0.0, 180.0\], found 200.0"),
        ("ct-sparse:views=0", r"views: expected an integer >= 1, found 0"),
        ("mri:accel=0.5", r"acceleration: expected a finite number in \[1.0, 32.0\], found 0.5"),
        ("ct-lowdose:i0=-5", r"i0: expected a finite number in \(0.0, inf\], found -5.0"),
        ("ct-sparse:views=4,noise=-1", r"noise_sigma: expected a finite number in \[0.0, inf\], found -1.0"),
    ],
)
def test_parse_physics_errors(spec, pattern):
    with pytest.raises(KLIPMedError, match=pattern):
        parse_physics(spec, N)


def test_parse_physics_rejects_unknown_keyword():
    with pytest.raises(KLIPMedError, match=r"keywords among device, dtype, generator for kind ct-sparse, found coil_maps"):
        parse_physics("ct-sparse:views=4", N, coil_maps=coil_maps())


# --------------------------------------------------------------------------- shape / value checks


@pytest.mark.parametrize("name", ["ct-sparse", "ct-lowdose", "mri", "mri-multicoil"])
def test_wrong_image_size_raises_with_expected_and_found(name):
    op = ALL_BUILDERS[name](torch.float32)
    message = re.escape(f"physics {op.kind}: expected image of shape (B, 1, {N}, {N}), found (2, 1, 16, 16)")
    with pytest.raises(KLIPMedError, match=message):
        op.A(torch.zeros(2, 1, 16, 16))
    with pytest.raises(KLIPMedError, match=message):
        op(torch.zeros(2, 1, 16, 16))
    with pytest.raises(KLIPMedError, match=re.escape("found (2, 2, 32, 32)")):
        op.A(torch.zeros(2, 2, N, N))  # complex-as-2-channel input is not accepted


def test_wrong_measurement_shape_raises():
    op = sparse_view_ct(N, 10)
    with pytest.raises(KLIPMedError, match=re.escape("expected measurement of shape (B, 1, 46, 10), found (1, 1, 46, 11)")):
        op.A_adjoint(torch.zeros(1, 1, 46, 11))
    mri = cartesian_mri(N, 4.0)
    with pytest.raises(KLIPMedError, match=re.escape("expected measurement of shape (B, 2, 32, 32), found (1, 1, 32, 32)")):
        mri.A_adjoint(torch.zeros(1, 1, N, N))


def test_ct_image_dtype_must_match_operator():
    op = sparse_view_ct(N, 4)
    with pytest.raises(KLIPMedError, match=r"with dtype torch.float32, found torch.float64"):
        op.A(torch.zeros(1, 1, N, N, dtype=torch.float64))


@pytest.mark.parametrize("bad, count", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")])
def test_non_finite_measurement_rejected(bad, count):
    for op in (sparse_view_ct(N, 8), cartesian_mri(N, 2.0)):
        y = op.A(smooth_phantom()).contiguous()  # MRI k-space comes back as a strided view
        y.view(-1)[3] = bad
        with pytest.raises(KLIPMedError, match=rf"^y: expected finite measurement values, found {count} values"):
            baseline_reconstruction(op, y)
        with pytest.raises(KLIPMedError, match=r"^y: "):
            check_measurement(op, y)


def test_check_measurement_shape_and_physics_type():
    op = sparse_view_ct(N, 8)
    with pytest.raises(KLIPMedError, match=re.escape("y: expected a ct-sparse measurement of shape (B, 1, 46, 8), found (1, 46, 8)")):
        check_measurement(op, torch.zeros(1, 46, 8))
    with pytest.raises(KLIPMedError, match=r"^physics: expected an operator built by klip_med.physics"):
        baseline_reconstruction(torch.nn.Identity(), torch.zeros(1, 1, 46, 8))
    y = op.A(smooth_phantom())
    assert check_measurement(op, y) is y


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: sparse_view_ct(4, 10), r"image_size: expected an integer >= 8, found 4"),
        (lambda: sparse_view_ct(32.0, 10), r"image_size: expected an integer >= 8, found 32.0"),
        (lambda: sparse_view_ct(N, 0), r"views: expected an integer >= 1, found 0"),
        (lambda: sparse_view_ct(N, 4, noise_sigma=-0.1), r"noise_sigma: expected a finite number in \[0.0, inf\], found -0.1"),
        (lambda: limited_angle_ct(N, 0.0), r"angular_range_deg: expected a finite number in \(0.0, 180.0\], found 0.0"),
        (lambda: limited_angle_ct(N, 181.0), r"angular_range_deg: .*found 181.0"),
        (lambda: low_dose_ct(N, 0.0), r"i0: expected a finite number in \(0.0, inf\], found 0.0"),
        (lambda: low_dose_ct(N, 1e4, mu=-1.0), r"mu: expected a finite number in \(0.0, inf\], found -1.0"),
        (lambda: cartesian_mri(N, 0.9), r"acceleration: expected a finite number in \[1.0, 32.0\], found 0.9"),
        (lambda: cartesian_mri(N, 64.0), r"acceleration: .*found 64.0"),
        (lambda: cartesian_mri(N, 4.0, center_fraction=1.0), r"center_fraction: expected a finite number in \[0.0, 1.0\), found 1.0"),
        (lambda: cartesian_mri(N, 4.0, center_fraction=0.3), r"center_fraction: expected fewer centre lines .* than the 8 lines sampled at acceleration 4, found 0.3 -> 9 centre lines"),
        (lambda: cartesian_mri(N, 4.0, mask_kind="radial"), r"mask_kind: expected one of equispaced, gaussian, random, found 'radial'"),
        (lambda: cartesian_mri(N, 4.0, generator=123), r"generator: expected a torch.Generator or None, found int"),
        (lambda: multicoil_mri(coil_maps().real, 4.0), r"coil_maps: expected a complex tensor \(N_coils, H, W\), found dtype torch.float32"),
        (lambda: multicoil_mri(coil_maps()[0], 4.0), r"coil_maps: expected shape \(N_coils, H, W\), found \(32, 32\)"),
        (lambda: multicoil_mri(coil_maps(), 4.0, image_size=16), r"coil_maps: expected shape \(N_coils, 16, 16\) matching image_size, found \(3, 32, 32\)"),
        (lambda: sparse_view_ct(N, 4, dtype=torch.float16), r"dtype: expected torch.float32 or torch.float64, found torch.float16"),
    ],
)
def test_construction_validation(call, pattern):
    with pytest.raises(KLIPMedError, match=pattern):
        call()
