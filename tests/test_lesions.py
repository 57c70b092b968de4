"""Tests for klip_med.data.lesions and klip_med.data.phantom: masks, contrast, determinism, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, map_coordinates

from klip_med.data.lesions import (
    MASK_LEVEL,
    SUPPORT,
    insert_ct_lesion,
    insert_flair_cavity,
    insert_flair_lesion,
    insert_metal,
    insert_star,
    insert_texture,
    largest_inscribed_radius_mm,
    soft_tissue_mask_ct,
)
from klip_med.data.phantom import KINDS, ct_phantom, mr_phantom, phantom_with_lesion
from klip_med.errors import KLIPMedError


def gen(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def liver_slice(size: int = 80, hu: float = 60.0) -> np.ndarray:
    """A flat 'liver' with a little smooth texture, in HU."""
    return (hu + 3 * np.sin(np.arange(size)[:, None] / 5.0) * np.cos(np.arange(size) / 7.0)).astype(np.float32)


def inner_disc(shape, centre, spacing, radius_mm) -> np.ndarray:
    rows = (np.arange(shape[0]) - centre[0]) * spacing[0]
    cols = (np.arange(shape[1]) - centre[1]) * spacing[1]
    return np.hypot(*np.meshgrid(rows, cols, indexing="ij")) <= radius_mm


def far_from(mask: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """Pixels farther than margin_mm from every mask pixel."""
    return distance_transform_edt(~mask, sampling=spacing) > margin_mm


@pytest.mark.parametrize("spacing", [(0.5, 0.5), (0.5, 0.7)])
@pytest.mark.parametrize("diameter", [8.0, 20.0])
def test_ct_mask_area_matches_diameter(spacing, diameter):
    image = liver_slice()
    _, mask, lesion = insert_ct_lesion(image, spacing, gen(1), diameter_mm=diameter, contrast_hu=-30.0,
                                       centre=(40.0, 40.0))
    area = mask.sum() * spacing[0] * spacing[1]
    assert area == pytest.approx(math.pi * diameter**2 / 4, rel=0.08)
    assert lesion.mask_pixels == mask.sum() and lesion.diameter_mm == diameter
    assert mask.dtype == bool and mask.shape == image.shape


@pytest.mark.parametrize("contrast", [-45.0, -10.0, 12.0, 60.0])
def test_ct_contrast_over_the_core(contrast):
    image, spacing, centre = liver_slice(), (0.5, 0.5), (40.0, 41.0)
    out, mask, lesion = insert_ct_lesion(image, spacing, gen(2), diameter_mm=16.0, contrast_hu=contrast,
                                         centre=centre, texture=0.0)
    change = out.astype(np.float64) - image
    assert lesion.contrast == contrast
    # without texture the inner half-radius disc carries the full contrast (the rim is soft)
    assert change[inner_disc(image.shape, centre, spacing, 4.0)].mean() == pytest.approx(contrast, rel=0.03)
    assert np.sign(change[mask]).tolist() == [np.sign(contrast)] * int(mask.sum())
    assert lesion.kind == ("ct_hypo" if contrast < 0 else "ct_hyper")
    # with texture the mean stays near the contrast and the texture shows
    out, mask, _ = insert_ct_lesion(image, spacing, gen(2), diameter_mm=16.0, contrast_hu=contrast,
                                    centre=centre, texture=0.3)
    change = out.astype(np.float64) - image
    assert change[inner_disc(image.shape, centre, spacing, 4.0)].mean() == pytest.approx(contrast, rel=0.15)
    assert change[inner_disc(image.shape, centre, spacing, 4.0)].std() > 0.03 * abs(contrast)


@pytest.mark.parametrize("texture", [0.0, 0.3])
def test_ct_unchanged_outside_mask_beyond_soft_edge(texture):
    image, spacing = liver_slice(), (0.5, 0.5)
    out, mask, lesion = insert_ct_lesion(image, spacing, gen(3), diameter_mm=12.0, contrast_hu=50.0,
                                         centre=(40.0, 40.0), texture=texture)
    change = np.abs(out.astype(np.float64) - image)
    amplitude, edge = lesion.params["amplitude"], lesion.params["edge_mm"]
    # just outside: below half the peak (times the texture's maximum factor)
    assert change[~mask].max() <= MASK_LEVEL * (1 + 3 * texture) * abs(amplitude) + 1e-3
    # beyond the support (profile < 1e-3, i.e. > edge * ln(1/SUPPORT - 1) past the boundary): bit-identical
    margin = edge * math.log(1 / SUPPORT - 1) + 2 * max(spacing)
    far = far_from(mask, spacing, margin)
    assert far.sum() > 0.5 * far.size
    assert np.array_equal(out[far], image[far])


def test_input_never_modified_and_output_is_new_float32():
    image = liver_slice().astype(np.float64)
    before = image.copy()
    for insert, kwargs in ((insert_ct_lesion, {}), (insert_star, {"contrast": 100.0}),
                           (insert_metal, {})):
        out, _, _ = insert(image, 0.5, gen(4), **kwargs)
        assert out.dtype == np.float32 and out.shape == image.shape
        assert not np.shares_memory(out, image)
    mr = np.full((40, 40), 0.4)
    mr_before = mr.copy()
    insert_flair_lesion(mr, 1.0, gen(4), diameter_mm=8.0)
    assert np.array_equal(image, before) and np.array_equal(mr, mr_before)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_lesion_other_seed_differs(kind):
    _, (a, mask_a, les_a) = phantom_with_lesion(kind, gen(5), size=96)
    _, (b, mask_b, les_b) = phantom_with_lesion(kind, gen(5), size=96)
    _, (c, _, les_c) = phantom_with_lesion(kind, gen(6), size=96)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b) and les_a == les_b
    assert not np.array_equal(a, c) and les_a != les_c
    assert json.loads(json.dumps(les_a.as_dict()))["kind"] == les_a.kind


def test_sampled_ct_lesion_within_stated_ranges_and_inside_placement_mask():
    image = liver_slice(100)
    region = np.zeros(image.shape, bool)
    region[20:90, 10:70] = True
    for seed in range(8):
        _, mask, lesion = insert_ct_lesion(image, 0.7, gen(seed), placement_mask=region)
        assert 5.0 <= lesion.diameter_mm <= 30.0
        assert 10.0 <= abs(lesion.contrast) <= 60.0
        assert not (mask & ~region).any()
        assert region[int(lesion.centre[0]), int(lesion.centre[1])]


def test_soft_tissue_mask_keeps_parenchyma_and_drops_fat_vessels_bone_and_air():
    size, spacing = 96, 2.0
    rows, cols = np.mgrid[:size, :size]
    r = np.hypot(rows - 48, cols - 48)
    image = np.full((size, size), -1000.0, np.float32)  # air
    image[r < 44] = -100.0  # subcutaneous fat
    image[r < 36] = 60.0  # liver-like parenchyma
    image[np.hypot(rows - 48, cols - 30) < 4] = 300.0  # a contrast-filled vessel
    image[np.abs(rows - 70) < 3] = 700.0  # a band of bone across the body
    mask = soft_tissue_mask_ct(image, spacing)
    assert mask.dtype == bool and mask.shape == image.shape
    assert mask[48, 60] and mask[30, 48]  # parenchyma away from edges
    assert not mask[48, 30] and not mask[70, 48] and not mask[48, 2] and not mask[48, 90]
    # nothing in fat or air (but for the partial-volume rim where bone meets fat: too thin to hold a lesion)
    assert not (mask & (r >= 40) & (np.abs(rows - 70) > 6)).any()
    image_before = image.copy()
    soft_tissue_mask_ct(image, spacing)
    assert np.array_equal(image, image_before)
    with pytest.raises(KLIPMedError, match="hu_range"):
        soft_tissue_mask_ct(image, spacing, hu_range=(100.0, 20.0))


def test_largest_inscribed_radius_of_a_disc_and_the_border():
    spacing = (0.5, 0.5)
    disc = inner_disc((101, 101), (50, 50), spacing, 15.0)
    assert largest_inscribed_radius_mm(disc, spacing) == pytest.approx(15.5, abs=0.5)  # edge is the first outside pixel
    assert largest_inscribed_radius_mm(np.ones((11, 21), bool), 2.0) == pytest.approx(12.0)  # 6 px to the border
    assert largest_inscribed_radius_mm(np.zeros((5, 5), bool), 1.0) == 0.0


def test_flair_lesion_is_hyperintense_with_oedema_and_stays_in_range():
    image, spacing, centre = np.full((64, 64), 0.4, np.float32), (1.0, 1.0), (32.0, 32.0)
    out, mask, lesion = insert_flair_lesion(image, spacing, gen(7), diameter_mm=14.0, contrast=0.3,
                                            centre=centre, oedema=0.3, oedema_extent=0.6)
    change = out - image
    assert lesion.kind == "flair" and (change[mask] > 0).all()
    assert change[inner_disc(image.shape, centre, spacing, 3.5)].mean() == pytest.approx(0.3, rel=0.15)
    # the mask holds the oedema ring: its area matches the oedema diameter, not the core's
    oedema_d = lesion.params["oedema_diameter_mm"]
    assert oedema_d == pytest.approx(14.0 * 1.6)
    assert mask.sum() == pytest.approx(math.pi * oedema_d**2 / 4, rel=0.1)
    ring = inner_disc(image.shape, centre, spacing, 10.0) & ~inner_disc(image.shape, centre, spacing, 9.0)
    assert 0.03 < change[ring].mean() < 0.2  # mildly hyperintense oedema
    assert out.min() >= 0.0 and out.max() <= 1.0
    bright = np.full((64, 64), 0.9, np.float32)
    assert insert_flair_lesion(bright, spacing, gen(7), diameter_mm=14.0, contrast=0.5).image.max() <= 1.0
    _, mask0, _ = insert_flair_lesion(image, spacing, gen(7), diameter_mm=14.0, oedema=0.0, centre=centre)
    assert mask0.sum() == pytest.approx(math.pi * 14.0**2 / 4, rel=0.1)
    scaled, _, les255 = insert_flair_lesion(image * 255, spacing, gen(7), diameter_mm=14.0,
                                            intensity_range=(0, 255), centre=centre)
    assert 0.15 * 255 <= les255.contrast <= 0.4 * 255 and scaled.max() <= 255


@pytest.mark.parametrize("arms", [3, 5, 8])
@pytest.mark.parametrize("contrast", [150.0, -0.4])
def test_star_has_k_arms(arms, contrast):
    image, centre = np.zeros((72, 72), np.float32), (36.0, 35.0)
    out, mask, lesion = insert_star(image, 1.0, gen(8), contrast=contrast, arms=arms, diameter_mm=56.0,
                                    centre=centre)
    assert lesion.params["arms"] == arms and lesion.kind == "star"
    change = (out - image) * np.sign(contrast)
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    radius = 0.5 * 28.0
    profile = map_coordinates(change, [centre[0] + radius * np.sin(theta), centre[1] + radius * np.cos(theta)],
                              order=1)
    above = profile > 0.5 * profile.max()
    runs = int(np.count_nonzero(above & ~np.roll(above, 1)))  # rising edges around the circle
    assert runs == arms
    assert (change[mask] > 0).all() and change.min() >= 0
    assert change[mask].max() == pytest.approx(abs(contrast), rel=0.1)


def test_metal_object_is_dense_and_mask_covers_it():
    image, spacing = liver_slice(64, hu=40.0), (0.8, 0.8)
    out, mask, lesion = insert_metal(image, spacing, gen(9), density_hu=2500.0, diameter_mm=8.0, aspect=2.0,
                                     centre=(30.0, 30.0))
    assert lesion.kind == "metal" and lesion.params["density_hu"] == 2500.0
    assert mask.sum() * 0.64 == pytest.approx(math.pi * 4.0 * 2.0, rel=0.2)
    assert out[mask].max() == pytest.approx(2500.0, rel=0.01) and np.median(out[mask]) > 2000.0
    assert 0.9 * 2460.0 <= lesion.contrast <= 2460.0  # measured: mean change over the core
    far = far_from(mask, spacing, 3.0)
    assert np.array_equal(out[far], image[far])
    assert (out[~mask] < 0.5 * (2500.0 + 40.0) + 1.0).all()


def test_phantoms_any_size_and_nominal_values():
    ct = ct_phantom(64)
    assert ct.image.dtype == np.float32 and ct.image.shape == (64, 64) and ct.modality == "ct"
    assert ct.image[0, 0] == -1000.0
    assert np.median(ct.image[ct.masks["liver"]]) == pytest.approx(60.0, abs=5)
    assert np.median(ct.image[binary_erosion(ct.masks["spine"])]) == pytest.approx(700.0, abs=30)
    assert ct.pixel_spacing_mm == (400.0 / 64, 400.0 / 64)
    assert (ct.masks["liver"] <= ct.masks["body"]).all()
    odd = ct_phantom((33, 47), gen(10))
    assert odd.image.shape == (33, 47) and not np.array_equal(odd.image, ct_phantom((33, 47), gen(11)).image)
    mr = mr_phantom(48, gen(12))
    assert mr.image.min() >= 0 and mr.image.max() <= 1 and mr.image[0, 0] == 0
    assert 0.3 < np.median(mr.image[mr.masks["white_matter"]]) < 0.55


@pytest.mark.parametrize("kind", KINDS)
def test_phantom_with_lesion_places_it_in_its_organ(kind):
    phantom, (image, mask, lesion) = phantom_with_lesion(kind, gen(13), size=128)
    organ = {"ct_hypo": "liver", "ct_hyper": "liver", "flair": "brain", "mr_star": "brain"}.get(kind, "body")
    assert mask.any() and not (mask & ~phantom.masks[organ]).any()
    assert lesion.pixel_spacing_mm == phantom.pixel_spacing_mm
    if kind in ("ct_hypo", "ct_hyper"):
        assert (lesion.contrast < 0) == (kind == "ct_hypo")
    assert not np.array_equal(image, phantom.image)


def test_torch_input_is_refused_with_a_hint():
    with pytest.raises(KLIPMedError, match=r"image: expected a numpy.ndarray .*tensor.numpy\(\).*Tensor"):
        insert_ct_lesion(torch.zeros(16, 16), 1.0, gen())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), diameter_mm=-3.0),
         r"diameter_mm: expected a finite number > 0, found -3\.0"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), diameter_mm=80.0),
         r"diameter_mm: expected a lesion that fits the 80 x 80 image \(<= 34\.8 mm\), found 80\.0"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), diameter_mm=0.6),
         r"diameter_mm: expected at least 2 pixels \(>= 1 mm\), found 0\.6"),
        (lambda: insert_ct_lesion(np.zeros((2, 16, 16)), 0.5, gen()),
         r"image: expected a 2D array of shape \(H, W\), found shape \(2, 16, 16\)"),
        (lambda: insert_ct_lesion(np.full((16, 16), np.nan), 0.5, gen()),
         r"image: expected finite values only, found 256 NaN/inf pixels"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), placement_mask=np.zeros((80, 80), bool)),
         r"placement_mask: expected at least one True pixel, found none"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), placement_mask=np.ones((8, 8), bool)),
         r"placement_mask: expected shape \(80, 80\) \(the image's\), found shape \(8, 8\)"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), diameter_mm=20.0,
                                  placement_mask=np.pad(np.ones((10, 10), bool), 35)),
         r"placement_mask: expected a point > 11\.5 mm inside its edge .*found at most 2\.5 mm"),
        (lambda: insert_ct_lesion(np.full((32, 32), -1000.0), 0.5, gen()),
         r"placement_mask \(default: body, HU > -500\): expected at least one True pixel"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), diameter_mm=10.0, centre=(2.0, 40.0)),
         r"centre: expected a point >= 5\.75 mm from the image border"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), centre=(40, 40), placement_mask=np.ones((80, 80))),
         r"centre, placement_mask: expected at most one of them, found both"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, gen(), contrast_hu=0.0),
         r"contrast_hu: expected a non-zero number"),
        (lambda: insert_ct_lesion(liver_slice(), -1.0, gen()),
         r"pixel_spacing_mm: expected a finite number > 0, found -1\.0"),
        (lambda: insert_ct_lesion(liver_slice(), 0.5, 42),
         r"rng: expected a numpy.random.Generator, found int"),
        (lambda: insert_flair_lesion(np.full((32, 32), 2.0), 1.0, gen()),
         r"image: expected values inside intensity_range \[0, 1\], found \[2, 2\]"),
        (lambda: insert_flair_lesion(np.full((32, 32), 0.5), 1.0, gen(), contrast=-0.2),
         r"contrast: expected a finite number > 0, found -0\.2"),
        (lambda: insert_star(np.zeros((32, 32)), 1.0, gen(), contrast=1.0, arms=1),
         r"arms: expected an integer in \[2, 64\], found 1"),
        (lambda: insert_metal(liver_slice(), 0.5, gen(), diameter_mm=4.0, aspect=20.0),
         r"aspect: expected a ratio in \[1, 8\] \(short axis >= 1 pixel\), found 20\.0"),
        (lambda: phantom_with_lesion("tumour", gen()),
         r"kind: expected one of ct_hypo, ct_hyper, ct_star, metal, flair, mr_star, found tumour"),
        (lambda: phantom_with_lesion("ct_hypo", gen(), contrast_hu=20.0),
         r"contrast_hu: expected a negative number for kind 'ct_hypo', found 20\.0"),
        (lambda: ct_phantom(4), r"size: expected an integer >= 8 or an \(H, W\) pair of them, found 4"),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(KLIPMedError, match=message):
        call()


# ---------------------------------------------------------------- shifts where brightness cannot help


def _brain(size: int = 64, value: float = 0.45) -> np.ndarray:
    """Flat 'parenchyma' with a little smooth texture, in [0, 1]."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return (value + 0.02 * np.sin(rows / 4.0) * np.cos(cols / 6.0)).astype(np.float32)


def test_flair_cavity_is_csf_dark_with_an_exact_disc_mask():
    image, spacing, centre = _brain(), (1.0, 1.0), (32.0, 31.0)
    out, mask, lesion = insert_flair_cavity(image, spacing, gen(11), diameter_mm=16.0, level=0.05, centre=centre,
                                            irregularity=0.0, texture=0.3)
    assert lesion.kind == "flair_hypo" and lesion.params["target"] == pytest.approx(0.05)
    # exact mask: with no irregularity the half-maximum contour is the circle of radius d / 2
    assert np.array_equal(mask, inner_disc(image.shape, centre, spacing, 8.0))
    core = inner_disc(image.shape, centre, spacing, 3.0)  # the soft rim (0.15 r) has decayed below 1.5 % here
    assert out[core].mean() == pytest.approx(0.05, abs=0.01)  # fluid level, +-30 % texture of that level
    assert (out[mask] < image[mask]).all() and lesion.contrast == pytest.approx(0.05 - 0.45, abs=0.04)
    assert out[core].std() < 0.3 * 0.05 + 0.01  # nearly flat, like fluid
    far = far_from(mask, spacing, 9.0)  # support: profile >= 1e-3, i.e. within 0.15 r ln(999) = 8.3 mm of the edge
    assert np.array_equal(out[far], image[far])  # untouched beyond the soft edge
    assert out.min() >= 0.0 and out.max() <= 1.0
    scaled, _, les255 = insert_flair_cavity(image * 255, spacing, gen(11), diameter_mm=16.0, intensity_range=(0, 255),
                                            centre=centre)
    assert 0.02 * 255 <= les255.params["target"] <= 0.08 * 255 and scaled.min() >= 0


@pytest.mark.parametrize("amplitude,clip", [(0.06, (0.0, 1.0)), (40.0, None)])
def test_texture_change_keeps_the_mean_and_changes_only_the_texture(amplitude, clip):
    image = _brain() if clip else liver_slice(64)
    spacing, centre = (1.0, 1.0), (30.0, 33.0)
    out, mask, lesion = insert_texture(image, spacing, gen(12), amplitude=amplitude, diameter_mm=20.0, centre=centre,
                                       irregularity=0.0, texture_mm=1.5, clip=clip)
    assert lesion.kind == "texture" and np.array_equal(mask, inner_disc(image.shape, centre, spacing, 10.0))
    change = out.astype(np.float64) - image
    assert abs(change[mask].mean()) < 1e-5 * amplitude + 1e-6  # the same mean inside the lesion (float32 output)
    assert change[mask].std() == pytest.approx(amplitude, rel=1e-3)  # and a texture of the stated strength
    assert lesion.params["mean_change_in_mask"] == pytest.approx(change[mask].mean(), abs=1e-6)
    assert out[mask].std() > 3 * image[mask].std()  # the texture differs from the tissue's
    far = far_from(mask, spacing, 11.0)  # 0.15 r ln(999) = 10.4 mm
    assert np.array_equal(out[far], image[far])
    with pytest.raises(KLIPMedError, match="amplitude: expected a finite number > 0"):
        insert_texture(image, spacing, gen(12), amplitude=0.0)


@pytest.mark.parametrize("kind", ["bright", "hypo", "texture", "star"])
@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_every_shift_kind_has_an_exact_mask_and_its_promised_sign(kind, modality):
    from klip_med.data.shifts import insert_shift

    if modality == "MR":
        ph = mr_phantom(96, gen(1))
        image, spacing, rng_range = ph.image * 255.0, ph.pixel_spacing_mm, (0.0, 255.0)
    else:
        ph = ct_phantom(96, gen(1))
        image, spacing, rng_range = ph.image, ph.pixel_spacing_mm, (0.0, 255.0)
    out, mask, lesion = insert_shift(image, spacing, gen(2), modality, kind, min_px=30, intensity_range=rng_range)
    expected = {"bright": "flair" if modality == "MR" else "ct_hyper", "hypo": "flair_hypo" if modality == "MR"
                else "ct_hypo", "texture": "texture", "star": "star"}[kind]
    assert lesion.kind == expected and mask.sum() == lesion.mask_pixels
    change = out.astype(np.float64) - image
    assert np.array_equal(out[change != 0] != image[change != 0], np.ones((change != 0).sum(), bool))
    assert (np.abs(change) > 0)[mask].mean() > 0.9  # the mask is where the image changed
    if kind in ("bright", "hypo", "texture"):
        assert mask.sum() >= 30
    if kind == "bright":
        assert change[mask].mean() > 0
    elif kind == "hypo":
        assert change[mask].mean() < 0
    elif kind == "texture":
        assert abs(change[mask].mean()) < 0.05 * change[mask].std()
    else:
        assert np.sign(change[mask].mean()) == np.sign(lesion.contrast)


def test_metal_shift_is_ct_only_and_at_least_two_pixels():
    from klip_med.data.shifts import insert_shift

    ph = ct_phantom(96, gen(3))
    out, mask, lesion = insert_shift(ph.image, ph.pixel_spacing_mm, gen(4), "CT", "metal")
    assert lesion.kind == "metal" and lesion.diameter_mm >= 2.02 * max(ph.pixel_spacing_mm) and mask.any()
    assert out[mask].max() > 1500
    with pytest.raises(KLIPMedError, match="metal is CT only"):
        insert_shift(mr_phantom(96, gen(3)).image, 1.0, gen(4), "MR", "metal")
