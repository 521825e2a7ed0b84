"""Crop primitives: centring, masking, slice pickers, axial level slices.

cv2.warpAffine samples bilinearly at 1/32-pixel resolution, hence tolerances of 0.05 px.
"""
import numpy as np
import pytest
from stage2_phantom import phantom  # noqa: F401  (fixture)

from kernel_src import crops
from kernel_src.study import Series, Stack, Study


def ramp_pixels(n_slices, height, width, axis):
    """(S, H, W) float32 whose value is the column (axis 'x') or row (axis 'y') index."""
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32),
                             np.arange(height, dtype=np.float32))
    plane = cols if axis == "x" else rows
    return np.repeat(plane[None], n_slices, axis=0)


def sagittal_stack(pixels, spacing=(0.8, 0.6), slice_gap=3.5, origin=(-20.0, -40.0, 60.0)):
    """Analytic sagittal stack: columns run +y (posterior), rows run -z (feet), slices +x."""
    n = pixels.shape[0]
    positions = np.array(origin)[None] + np.arange(n)[:, None] * np.array([slice_gap, 0, 0])
    return Stack(pixels, positions, np.array([0, 1, 0, 0, 0, -1], dtype=float),
                 np.array(spacing, dtype=float), np.arange(1, n + 1))


def axial_stack(n=30, size=16, gap=1.0):
    """Analytic axial stack: slice k at world z = k * gap; rows +y, columns +x."""
    positions = np.stack([np.zeros(n), np.zeros(n), np.arange(n) * gap], axis=1)
    return Stack(np.zeros((n, size, size), np.uint8), positions,
                 np.array([1, 0, 0, 0, 1, 0], dtype=float), np.array([1.0, 1.0]),
                 np.arange(1, n + 1))


@pytest.mark.parametrize("centre", [(10.0, 12.0), (17.3, 5.6), (3.5, 20.25)])
def test_crop_centre_is_the_requested_point(centre):
    pixels_x = ramp_pixels(1, 32, 40, "x")
    pixels_y = ramp_pixels(1, 32, 40, "y")
    got_x = crops.crop_slices(pixels_x, [0], centre, (8, 12), (9, 7))[0]
    got_y = crops.crop_slices(pixels_y, [0], centre, (8, 12), (9, 7))[0]
    assert got_x[4, 3] == pytest.approx(centre[0], abs=0.05)
    assert got_y[4, 3] == pytest.approx(centre[1], abs=0.05)
    # the window spans 12 input columns over 7 output columns
    assert got_x[4, 4] - got_x[4, 3] == pytest.approx(12 / 7, abs=0.05)
    assert got_y[5, 3] - got_y[4, 3] == pytest.approx(8 / 9, abs=0.05)


def test_flip_and_zoom_and_uint8_scaling():
    pixels = ramp_pixels(1, 32, 32, "x")
    plain = crops.crop_slices(pixels, [0], (16, 16), (10, 10), (11, 11))[0]
    flipped = crops.crop_slices(pixels, [0], (16, 16), (10, 10), (11, 11), flip_x=True)[0]
    zoomed = crops.crop_slices(pixels, [0], (16, 16), (10, 10), (11, 11), scale=2.0)[0]
    np.testing.assert_allclose(flipped, plain[:, ::-1], atol=0.05)
    assert zoomed[5, 10] - zoomed[5, 0] == pytest.approx((plain[5, 10] - plain[5, 0]) / 2, abs=0.05)
    as_uint8 = crops.crop_slices(np.full((1, 8, 8), 255, np.uint8), [0], (4, 4), (4, 4), (3, 3))
    assert as_uint8.dtype == np.float32 and as_uint8.max() == pytest.approx(1.0)


def test_world_point_crop_is_centred_on_its_projection():
    n, height, width = 7, 40, 50
    spacing, gap, origin = (0.8, 0.6), 3.5, np.array([-20.0, -40.0, 60.0])
    col, row, sl = 21.4, 13.7, 3.0  # the pixel we aim at
    world = origin + np.array([sl * gap, col * spacing[1], -row * spacing[0]])
    stack_x = sagittal_stack(ramp_pixels(n, height, width, "x"), spacing, gap, tuple(origin))
    stack_y = sagittal_stack(ramp_pixels(n, height, width, "y"), spacing, gap, tuple(origin))
    for stack, expected in ((stack_x, col), (stack_y, row)):
        point = crops.locate_point([stack], world)
        assert point.inside and point.nearest_slice == 3
        crop = crops.crop_at(point, 3, (10.0, 10.0), (11, 11), unit="mm")
        assert crop.valid and crop.pixels.shape == (3, 11, 11)
        assert abs(crop.pixels[1, 5, 5] - expected) < 1.0
    # a 10 mm window is 10 / 0.6 columns wide
    crop = crops.crop_at(crops.locate_point([stack_x], world), 1, (10.0, 10.0), (11, 11), unit="mm")
    assert crop.pixels[0, 5, 10] - crop.pixels[0, 5, 0] == pytest.approx(10 / 0.6 * 10 / 11, abs=1e-2)


def test_locate_point_prefers_the_stack_that_contains_it():
    far = sagittal_stack(np.zeros((5, 20, 20), np.uint8), origin=(100.0, -40.0, 60.0))
    near = sagittal_stack(np.zeros((5, 20, 20), np.uint8), origin=(-20.0, -40.0, 60.0))
    world = np.array([-20.0 + 2 * 3.5, -40.0 + 5 * 0.6, 60.0 - 6 * 0.8])
    point = crops.locate_point([far, near], world)
    assert point.stack is near and point.inside
    assert point.z == pytest.approx(2.0) and point.x == pytest.approx(5.0)
    assert point.y == pytest.approx(6.0)


def test_missing_nan_and_outside_points_give_masked_input():
    stack = sagittal_stack(np.full((5, 20, 20), 200, np.uint8))
    inside = np.array([-20.0 + 7.0, -40.0 + 3.0, 60.0 - 4.0])
    assert crops.crop_at(crops.locate_point([stack], inside), 3, (8, 8), (5, 5)).valid
    nan_point = crops.locate_point([stack], [np.nan, 0.0, 0.0])
    outside_plane = crops.locate_point([stack], inside + np.array([0.0, 500.0, 0.0]))
    outside_range = crops.locate_point([stack], inside + np.array([400.0, 0.0, 0.0]))
    study = Study(1, {7: Series(1, 7, "Sagittal T1", [stack])})
    no_series = crops.locate_point(crops.series_stacks(study, "Axial T2"), inside)
    assert nan_point is None and no_series is None
    assert not outside_plane.in_plane and outside_range.in_plane and not outside_range.in_range
    for point, need_range in ((nan_point, False), (outside_plane, False), (no_series, False),
                              (outside_range, True)):
        crop = crops.crop_at(point, 3, (8, 8), (5, 5), require_in_range=need_range)
        assert not crop.valid
        assert crop.pixels.shape == (3, 5, 5) and not crop.pixels.any()


def test_slice_pickers():
    np.testing.assert_array_equal(crops.slices_around(4.4, 5, 10), [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(crops.slices_around(0.2, 3, 10), [0, 0, 1])
    np.testing.assert_array_equal(crops.slices_around(9.0, 3, 10, step=2), [7, 9, 9])
    np.testing.assert_array_equal(crops.evenly_spaced_slices(19, 10), np.rint(np.arange(10) * 2))
    assert crops.evenly_spaced_slices(3, 5).tolist() == [0, 0, 1, 2, 2]
    assert crops.choose_evenly([4, 5, 6, 7, 8, 9, 10], 3).tolist() == [4, 7, 10]
    assert crops.choose_evenly([], 6).size == 0
    np.testing.assert_array_equal(crops.neighbour_slices([0, 5, 9], 10),
                                  [[0, 0, 1], [4, 5, 6], [8, 9, 9]])
    pixels = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 10, 20)])
    assert crops.slice_image(pixels, 0.75, "linear")[0, 0] == pytest.approx(7.5)
    assert crops.slice_image(pixels, 1.6, "nearest")[0, 0] == 20


def test_fill_level_points_interpolates_and_extrapolates():
    points = np.array([[0, 0, 40.0], [np.nan] * 3, [0, 0, 20.0], [0, 0, 10.0], [np.nan] * 3])
    filled = crops.fill_level_points(points)
    np.testing.assert_allclose(filled[:, 2], [40, 30, 20, 10, 0])
    lonely = np.full((5, 3), np.nan)
    lonely[2] = 1.0
    assert np.isnan(crops.fill_level_points(lonely)[0]).all()


def test_axial_level_slices_lie_between_neighbour_midpoints():
    stack = axial_stack(n=30, gap=1.0)
    # levels from head to feet: L1/L2 highest z
    level_points = np.array([[0, 0, z] for z in (25.0, 20.0, 15.0, 10.0, 5.0)])
    got = crops.axial_level_slices(stack, level_points, 2)
    z = stack.positions[got, 2]
    assert got.size >= 4 and (z > 12.5).all() and (z < 17.5).all()
    level_points[2] = np.nan  # filled from its neighbours
    np.testing.assert_array_equal(crops.axial_level_slices(stack, level_points, 2), got)
    assert crops.axial_level_slices(stack, np.full((5, 3), np.nan), 2).size == 0


def test_phantom_crops_centre_on_projected_truth_landmarks(phantom):  # noqa: F811
    """On the phantom's real geometry (oblique stacks, several stacks per series), a crop
    around each truth landmark is centred within one pixel of the landmark's projection
    (coordinate-ramp images make the crop's centre pixel report where it sampled)."""
    import dataclasses

    import pandas as pd

    from kernel_src import competition, dicom, geometry, schema

    names = competition.series_by_study(competition.load_series_descriptions(
        phantom / "train_series_descriptions.csv"))
    landmarks = pd.read_csv(phantom / "truth" / "landmarks.csv")
    checked = 0
    for sid in sorted(names)[:3]:
        study = dicom.read_study(phantom / "train_images", sid, names[sid])
        for row in landmarks[landmarks["study_id"] == sid].itertuples(index=False):
            condition = schema.TITLE_TO_CONDITION[row.condition]
            stacks = crops.series_stacks(study, schema.CONDITION_SERIES[condition])
            world = np.array([row.x, row.y, row.z])
            point = crops.locate_point(stacks, world)
            if point is None or not point.inside:
                continue
            _, px, py, _ = geometry.project_to_stack(point.stack, world)
            for axis, expected in (("x", px), ("y", py)):
                ramp = dataclasses.replace(point.stack, pixels=ramp_pixels(*point.stack.shape, axis))
                moved = dataclasses.replace(point, stack=ramp)
                crop = crops.crop_at(moved, 1, (20.0, 20.0), (21, 21), unit="mm")
                assert crop.valid and abs(crop.pixels[0, 10, 10] - expected) < 1.0, (sid, row)
            checked += 1
    assert checked >= 40
