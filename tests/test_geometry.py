"""Geometry: pixel <-> world, projection between stacks, axial slice levels, labels."""

import numpy as np
import pandas as pd
import pytest

from kernel_src.geometry import (
    axial_slice_levels,
    instance_to_slice,
    label_points_world,
    pixel_to_world,
    project_to_stack,
    resized_pixel,
    world_to_pixel,
)
from kernel_src.study import Series, Stack, Study

AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _stack(orientation, positions, spacing=(1.0, 1.0), shape=(32, 32), instances=None):
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    return Stack(pixels=np.zeros((n, *shape), np.float32), positions=positions,
                 orientation=np.asarray(orientation, dtype=np.float64),
                 pixel_spacing=np.asarray(spacing, dtype=np.float64),
                 instance_numbers=np.asarray(instances if instances is not None
                                             else np.arange(1, n + 1), dtype=np.int64))


def _oblique_stack(seed=0, n=6):
    """Random rotation, anisotropic spacing, uneven slice gaps, in-plane drift per slice."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    r, c = q[:, 0], q[:, 1]
    normal = np.cross(r, c)
    sign = 1 if normal[np.argmax(np.abs(normal))] > 0 else -1
    offsets = np.cumsum(rng.uniform(2.0, 5.0, n))
    drift = rng.normal(scale=0.5, size=(n, 2))
    positions = (np.array([10.0, -40.0, 25.0]) + offsets[:, None] * sign * normal
                 + drift[:, :1] * r + drift[:, 1:] * c)
    return _stack(np.concatenate([r, c]), positions, spacing=(0.6, 0.85))


def test_pixel_to_world_by_hand():
    stack = _stack(AXIAL, [[10.0, 20.0, 30.0], [10.0, 20.0, 34.0]], spacing=(0.5, 0.8))
    np.testing.assert_allclose(pixel_to_world(stack, 0, 2, 3), [11.6, 21.5, 30.0])
    np.testing.assert_allclose(pixel_to_world(stack, 1, 2, 3), [11.6, 21.5, 34.0])
    np.testing.assert_allclose(pixel_to_world(stack, 0.25, 0, 0), [10.0, 20.0, 31.0])
    np.testing.assert_allclose(pixel_to_world(stack, -1, 0, 0), [10.0, 20.0, 26.0])
    sagittal = _stack([0, 1, 0, 0, 0, -1], [[5.0, -50.0, 60.0]], spacing=(0.5, 0.8))
    np.testing.assert_allclose(pixel_to_world(sagittal, 0, 10, 4), [5.0, -42.0, 58.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_world_round_trip_oblique(seed):
    stack = _oblique_stack(seed)
    rng = np.random.default_rng(seed + 10)
    s = rng.uniform(-1.5, 6.5, 200)  # inside and beyond the stack
    x, y = rng.uniform(-5, 40, 200), rng.uniform(-5, 40, 200)
    world = pixel_to_world(stack, s, x, y)
    assert world.shape == (200, 3)
    s2, x2, y2 = world_to_pixel(stack, world)
    np.testing.assert_allclose(np.stack([s2, x2, y2]), np.stack([s, x, y]), atol=1e-9)
    # integer slices: exactly the DICOM formula
    row_spacing, col_spacing = stack.pixel_spacing
    expected = (stack.positions[3] + 7 * col_spacing * stack.row_cosine
                + 11 * row_spacing * stack.col_cosine)
    np.testing.assert_allclose(pixel_to_world(stack, 3, 7, 11), expected)


def test_world_to_pixel_broadcasts():
    stack = _oblique_stack(3)
    world = pixel_to_world(stack, np.arange(4)[:, None], np.arange(5)[None, :], 2.0)
    assert world.shape == (4, 5, 3)
    s, x, y = world_to_pixel(stack, world)
    np.testing.assert_allclose(s, np.broadcast_to(np.arange(4)[:, None], (4, 5)), atol=1e-9)
    np.testing.assert_allclose(x, np.broadcast_to(np.arange(5), (4, 5)), atol=1e-9)


def test_project_to_stack_known_geometry():
    stack = _stack(AXIAL, [[-50.0, -50.0, z] for z in (0.0, 4.0, 8.0)], spacing=(2.0, 1.0))
    nearest, x, y, off = project_to_stack(stack, [[-40.0, -30.0, 5.0], [-50.0, -50.0, -3.0]])
    np.testing.assert_array_equal(nearest, [1, 0])
    np.testing.assert_allclose(x, [10.0, 0.0])
    np.testing.assert_allclose(y, [10.0, 0.0])
    np.testing.assert_allclose(off, [1.0, 3.0])


def test_project_sagittal_point_into_tilted_axial():
    tilt = 0.2
    orientation = [1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt)]
    stack = _stack(orientation, [[0.0, 0.0, z] for z in (0.0, 3.0, 6.0)])
    normal = stack.normal
    point = pixel_to_world(stack, 2, 12.0, 8.0) + 0.7 * normal
    nearest, x, y, off = project_to_stack(stack, point)
    assert int(nearest) == 2
    np.testing.assert_allclose([x, y, off], [12.0, 8.0, 0.7], atol=1e-9)


def test_instance_to_slice():
    a = _stack(AXIAL, [[0, 0, 0], [0, 0, 4]], instances=[7, 3])
    b = _stack(AXIAL, [[0, 0, 40], [0, 0, 44]], instances=[9, 1])
    series = Series(1, 2, "Axial T2", [a, b])
    assert instance_to_slice(series, 3) == (0, 1)
    assert instance_to_slice(series, 9) == (1, 0)
    with pytest.raises(KeyError, match="series 2: no instance number 5"):
        instance_to_slice(series, 5)


def test_axial_slice_levels():
    z = np.arange(0.0, 101.0, 2.0)
    stack = _stack(AXIAL, [[0.0, 0.0, v] for v in z])
    levels = np.array([[0, 0, 80.0], [0, 0, 60.0], [0, 0, 40.0], [0, 0, 20.0], [3, 7, 5.0]])
    got = axial_slice_levels(stack, levels)
    # bounds: 5 - 7.5 | 12.5 | 30 | 50 | 70 | 80 + 10
    expected = np.select([z < -2.5, z < 12.5, z < 30, z < 50, z < 70, z < 90],
                         [-1, 4, 3, 2, 1, 0], -1)
    np.testing.assert_array_equal(got, expected)
    levels[2] = np.nan  # unknown L3/L4: its neighbours share the gap
    got = axial_slice_levels(stack, levels)
    expected = np.select([z < -2.5, z < 12.5, z < 40, z < 70, z < 90], [-1, 4, 3, 1, 0], -1)
    np.testing.assert_array_equal(got, expected)
    only = np.full((5, 3), np.nan)
    only[1] = [0, 0, 61.0]
    got = axial_slice_levels(stack, only)
    assert list(np.flatnonzero(got >= 0)) == [30] and got[30] == 1
    assert np.all(axial_slice_levels(stack, np.full((5, 3), np.nan)) == -1)


def test_axial_slice_levels_on_tilted_stack():
    tilt = 0.3
    orientation = [1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt)]
    stack = _stack(orientation, [[0.0, 0.0, 0.0]])
    n = stack.normal
    stack.positions = np.array([k * 3.0 * n for k in range(10)])
    along = np.array([28.5, 22.5, 16.5, 10.5, 4.5])  # L1/L2 .. L5/S1, mm along n
    levels = along[:, None] * n + 40.0 * stack.row_cosine  # shifted in-plane: no effect
    got = axial_slice_levels(stack, levels)  # slices at 0, 3, .., 27 mm; bounds 1.5 + 6k
    np.testing.assert_array_equal(got, [-1, 4, 4, 3, 3, 2, 2, 1, 1, 0])


def test_resized_pixel():
    x, y = resized_pixel([0.0, 3.5], [1.0, 7.5], (8, 4), (16, 2))
    np.testing.assert_allclose(x, [-0.25, 1.5])
    np.testing.assert_allclose(y, [2.5, 15.5])


def test_label_points_world():
    sag = _stack([0, 1, 0, 0, 0, -1], [[x, -50.0, 60.0] for x in (-5.0, 0.0, 5.0)],
                 instances=[3, 2, 1], spacing=(0.5, 0.5))
    study = Study(1, {10: Series(1, 10, "Sagittal T1", [sag])})
    coords = pd.DataFrame({"study_id": [1, 1, 1], "series_id": [10, 10, 99],
                           "instance_number": [1, 3, 1], "x": [4.0, 0.0, 0.0],
                           "y": [2.0, 0.0, 0.0]})
    got = label_points_world(study, coords)
    np.testing.assert_allclose(got[0], [5.0, -48.0, 59.0])
    np.testing.assert_allclose(got[1], [-5.0, -50.0, 60.0])
    assert np.isnan(got[2]).all()
    # the same points through a 2x upsampled copy and its source shapes
    # 2x upsampling: new pixel (0, 0) = old (-0.25, -0.25), i.e. 0.125 mm back along r, c
    shift = -0.125 * (sag.row_cosine + sag.col_cosine)
    big = _stack(sag.orientation, sag.positions + shift, spacing=(0.25, 0.25),
                 shape=(64, 64), instances=[3, 2, 1])
    resized = Study(1, {10: Series(1, 10, "Sagittal T1", [big])})
    again = label_points_world(resized, coords, source_shapes={(10, 0): (32, 32)})
    np.testing.assert_allclose(again, got, atol=1e-9)


# ---- end to end on the phantom: every label coordinate back to its truth landmark ----

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from kernel_src.synthetic.competition import generate_competition

    out = tmp_path_factory.mktemp("phantom")
    generate_competition(out, n_train=8, n_test=2, seed=3, size=64)
    return out


def _labelled(phantom, split):
    from kernel_src import competition, schema

    coords_csv = ("train_label_coordinates.csv" if split == "train"
                  else "truth/test_label_coordinates.csv")
    coords = competition.load_label_coordinates(phantom / coords_csv)
    names = competition.series_by_study(competition.load_series_descriptions(
        phantom / f"{split}_series_descriptions.csv"))
    landmarks = pd.read_csv(phantom / "truth" / "landmarks.csv")
    landmarks["label"] = (landmarks["condition"].map(schema.TITLE_TO_CONDITION) + "_"
                          + landmarks["level"].map(schema.TITLE_TO_LEVEL))
    return coords, names, landmarks.set_index(["study_id", "label"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_phantom_labels_map_to_truth_landmarks(phantom, split):
    """Through read_study and the geometry, each label lands on its landmark's nearest
    slice, within 1 mm of the landmark in that slice's plane (the label is the landmark's
    projection onto the slice, so the off-plane offset is at most half a slice gap)."""
    from kernel_src.dicom import read_study

    coords, names, landmarks = _labelled(phantom, split)
    assert len(coords) > 20 * coords["study_id"].nunique()
    for study_id, rows in coords.groupby("study_id"):
        study = read_study(phantom / f"{split}_images", study_id, names[study_id])
        world = label_points_world(study, rows)
        truth = landmarks.loc[[(study_id, lab) for lab in rows["label"]], ["x", "y", "z"]]
        for point, target, row in zip(world, truth.to_numpy(), rows.itertuples(), strict=True):
            series = study.series[row.series_id]
            stack_index, slice_index = instance_to_slice(series, row.instance_number)
            stack = series.stacks[stack_index]
            nearest, _, _, off_plane = project_to_stack(stack, target)
            where = f"{split} study {study_id} {row.label}"
            assert nearest == slice_index, where
            error = point - target
            in_plane = error - (error @ stack.normal) * stack.normal
            assert np.linalg.norm(in_plane) < 1.0, where
            assert abs(error @ stack.normal) == pytest.approx(off_plane, abs=1e-3), where


def test_phantom_labels_through_the_cache(phantom, tmp_path):
    """The cached, resized stacks give the same world points for the labels."""
    from kernel_src.dicom import read_study
    from kernel_src.preprocess import build_cache, load_cached_study, read_index, source_shapes

    coords, names, _ = _labelled(phantom, "train")
    assert build_cache(phantom, tmp_path, "train", size=48)["failed"] == 0
    index = read_index(tmp_path, "train")
    for study_id, rows in coords.groupby("study_id"):
        raw = label_points_world(read_study(phantom / "train_images", study_id,
                                            names[study_id]), rows)
        cached = label_points_world(load_cached_study(tmp_path, "train", study_id, index),
                                    rows, source_shapes(index, study_id))
        np.testing.assert_allclose(cached, raw, atol=1e-6)
        assert np.isfinite(raw).all()
