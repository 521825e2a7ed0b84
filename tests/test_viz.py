"""viz: panel sizes, markers at the pixels their world points project to, the slice shown,
the montage's verdict frames, the input readers and the CLI on a phantom study."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from kernel_src import geometry, viz
from kernel_src.keypoints import Keypoints
from kernel_src.schema import AXIAL_T2, LABEL_COLUMNS, N_LABELS, SAG_T1, SAG_T2, label_index
from kernel_src.study import Series, Stack, Study

SAG = np.array([0, 1, 0, 0, 0, -1], dtype=float)   # rows: +y (posterior), cols: -z (foot)
AX = np.array([1, 0, 0, 0, 1, 0], dtype=float)


def make_stack(orientation, n=5, h=64, w=48, spacing=(0.5, 0.75), gap=4.0,
               origin=(-10.0, -20.0, 60.0)) -> Stack:
    """Slice k is filled with the constant 20 * k + 10 (so the slice shown is readable)."""
    normal = np.cross(orientation[:3], orientation[3:])
    normal = normal if normal[np.argmax(np.abs(normal))] > 0 else -normal
    positions = np.asarray(origin) + np.arange(n)[:, None] * gap * normal
    pixels = np.repeat((20 * np.arange(n) + 10).astype(np.uint8)[:, None, None], h, 1)
    pixels = np.repeat(pixels, w, 2)
    return Stack(pixels, positions, np.asarray(orientation, float), np.asarray(spacing, float),
                 np.arange(1, n + 1))


def colour_pixels(image: np.ndarray, colour) -> np.ndarray:
    """(n, 2) (x, y) of the pixels exactly of this colour."""
    ys, xs = np.nonzero((image == np.asarray(colour, np.uint8)).all(axis=2))
    return np.stack([xs, ys], axis=1)


def test_prediction_marker_is_centred_on_the_projected_pixel():
    stack = make_stack(SAG)
    world = geometry.pixel_to_world(stack, 3, 20.0, 30.0)
    panel = viz.slice_panel(stack, 3, [viz.PanelPoint(world, 2, "pred")], "t", height=192)
    assert panel.shape == (viz.TITLE_H + 192, 144, 3)
    ex, ey = geometry.resized_pixel(20.0, 30.0, (64, 48), (192, 144))
    found = colour_pixels(panel, viz.LEVEL_COLOURS[2])
    assert len(found) > 20
    assert np.allclose(found.mean(axis=0), [ex, ey + viz.TITLE_H], atol=1.0)
    # the panel shows slice 3 (constant 70) around the marker
    assert (panel[viz.TITLE_H + 5, 5] == 70).all()


def test_truth_ring_is_hollow_and_has_the_truth_radius():
    stack = make_stack(SAG)
    world = geometry.pixel_to_world(stack, 1, 24.0, 32.0)
    panel = viz.slice_panel(stack, 1, [viz.PanelPoint(world, 4, "truth")], "t", height=128)
    ex, ey = (int(round(v)) for v in geometry.resized_pixel(24.0, 32.0, (64, 48), (128, 96)))
    ey += viz.TITLE_H
    colour = np.asarray(viz.LEVEL_COLOURS[4])
    assert not (panel[ey, ex] == colour).all()
    r = viz.TRUTH_RADIUS
    for dx, dy in ((r, 0), (-r, 0), (0, r), (0, -r)):
        assert (panel[ey + dy, ex + dx] == colour).all(), (dx, dy)


def test_zoom_window_crops_around_the_points():
    """64 x 64 px at 1 mm, a point at (40, 30), a 20 mm window: box x 30..50, y 20..40, so
    the canvas is 5x and the marker is at ((40 - 30) + 0.5) * 5 - 0.5 = 52 (same for y)."""
    stack = make_stack(AX, h=64, w=64, spacing=(1.0, 1.0))
    world = geometry.pixel_to_world(stack, 2, 40.0, 30.0)
    panel = viz.slice_panel(stack, 2, [viz.PanelPoint(world, 0, "pred")], "t", height=100,
                            window_mm=20.0)
    assert panel.shape == (viz.TITLE_H + 100, 100, 3)
    found = colour_pixels(panel, viz.LEVEL_COLOURS[0])
    assert np.allclose(found.mean(axis=0), [52.0, 52.0 + viz.TITLE_H], atol=0.6)


def make_study(study_id=7) -> Study:
    sag_t2 = make_stack(SAG, n=5, origin=(-8.0, -20.0, 60.0))
    sag_t1 = make_stack(SAG, n=7, origin=(-12.0, -20.0, 60.0))
    axial = make_stack(AX, n=9, h=40, w=40, spacing=(1.0, 1.0), gap=3.0,
                       origin=(-20.0, -30.0, 20.0))
    series = {1: Series(study_id, 1, SAG_T1, [sag_t1]), 2: Series(study_id, 2, SAG_T2, [sag_t2]),
              3: Series(study_id, 3, AXIAL_T2, [axial])}
    return Study(study_id, series)


def truth_points(study: Study) -> Keypoints:
    """Spinal points on slice 3 of the T2 stack, one level per 10 rows."""
    stack = study.series[2].stacks[0]
    kp = Keypoints()
    for lv in range(5):
        kp.set(lv, geometry.pixel_to_world(stack, 3, 24.0, 8.0 + 10 * lv), 1.0, "truth")
    return kp


def test_keypoint_figure_size_and_spinal_truth_on_its_slice():
    study = make_study()
    truth = truth_points(study)
    view = viz.StudyView(study, predicted=None, truth=truth)
    fig = viz.keypoint_figure(view, height=128, axial_height=80, axial_window_mm=None)
    sag_w, ax_w = round(48 * 128 / 64), round(40 * 80 / 40)
    width = max(820, 3 * sag_w + 2 * 4, 5 * ax_w + 4 * 4)
    assert fig.shape == (26 + 4 + viz.TITLE_H + 128 + 4 + viz.TITLE_H + 80, width, 3)
    top = 26 + 4 + viz.TITLE_H
    panel = fig[top:top + 128, :sag_w]
    assert (panel[2, 2] == 70).all()  # slice 3 of the T2 stack: where the points lie
    for lv in range(5):
        ex, ey = (int(round(v)) for v in geometry.resized_pixel(24.0, 8.0 + 10 * lv,
                                                                  (64, 48), (128, sag_w)))
        for dx, dy in ((0, -viz.TRUTH_RADIUS), (0, viz.TRUTH_RADIUS)):  # text is beside
            assert (panel[ey + dy, ex + dx] == viz.LEVEL_COLOURS[lv]).all(), (lv, dx, dy)


def test_crop_montage_frames_say_right_or_wrong():
    study = make_study()
    truth = truth_points(study)
    probs = np.full((N_LABELS, 3), np.nan)
    probs[0] = [0.7, 0.2, 0.1]   # argmax 0, label 0: right
    probs[1] = [0.1, 0.2, 0.7]   # argmax 2, label 1: wrong
    labels = np.full(N_LABELS, -1)
    labels[0], labels[1] = 0, 1
    view = viz.StudyView(study, predicted=truth, truth=truth, probs=probs, labels=labels)
    tile = 64
    montage = viz.crop_montage(view, tile=tile, window_mm=20.0)
    cell_w, cell_h = tile + 4, tile + viz.TEXT_H + 4
    assert montage.shape == (20 + 4 + 5 * (cell_h + 4) - 4, 86 + 5 * (cell_w + 4), 3)
    x0, y0 = 86 + 4, 20 + 4
    assert (montage[y0, x0] == viz.GOOD).all()
    assert (montage[y0, x0 + cell_w + 4] == viz.BAD).all()
    assert (montage[y0, x0 + 2 * (cell_w + 4)] == viz.UNKNOWN).all()
    # the spinal L1/L2 crop is centred on its point: the prediction disc at the tile centre
    centre = (tile - 1) // 2
    assert (montage[y0 + 2 + centre, x0 + 2 + centre] == viz.LEVEL_COLOURS[0]).all()


def test_readers_round_trip():
    study = make_study(5)
    kp = truth_points(study)
    rows = pd.DataFrame(kp.to_rows(5) + Keypoints().to_rows(6))
    back = viz.keypoints_from_rows(rows, 5)
    assert np.allclose(back.world[:5], kp.world[:5]) and not back.known[5:].any()
    assert viz.keypoints_from_rows(rows, 99) is None
    lm = pd.DataFrame([{"study_id": 5, "condition": "Right Subarticular Stenosis",
                        "level": "L4/L5", "x": 1.0, "y": 2.0, "z": 3.0}])
    truth = viz.keypoints_from_landmarks(lm, 5)
    i = label_index("right_subarticular_stenosis", "l4_l5")
    assert np.allclose(truth.world[i], [1, 2, 3]) and truth.known.sum() == 1
    sub = pd.DataFrame({"row_id": [f"5_{c}" for c in LABEL_COLUMNS],
                        "normal_mild": np.linspace(0, 1, 25), "moderate": 0.0, "severe": 0.0})
    assert np.allclose(viz.probs_from_submission(sub, 5)[:, 0], np.linspace(0, 1, 25))
    assert viz.probs_from_submission(sub, 6) is None
    coords = pd.DataFrame([{"study_id": 5, "series_id": 2, "instance_number": 4, "x": 24.0,
                            "y": 18.0, "label": LABEL_COLUMNS[1]}])
    from_coords = viz.keypoints_from_coordinates(study, coords)
    assert np.allclose(from_coords.world[1], kp.world[1])


def test_cli_writes_readable_pngs_for_a_phantom_study(tmp_path):
    synthetic = pytest.importorskip("kernel_src.synthetic")
    data = synthetic.generate_competition(tmp_path / "ph", 0, 1, seed=3, size=64)
    landmarks = pd.read_csv(data / "truth/landmarks.csv")
    sid = int(landmarks["study_id"].iloc[0])
    truth = viz.keypoints_from_landmarks(landmarks, sid)
    pd.DataFrame(truth.to_rows(sid)).to_csv(tmp_path / "kp.csv", index=False)
    written = viz.main(["--data", str(data), "--keypoints", str(tmp_path / "kp.csv"),
                        "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in written) == [f"{sid}_crops.png", f"{sid}_keypoints.png"]
    image = cv2.imread(str(written[0]))
    assert image is not None and image.shape[0] > 300 and image.shape[1] >= 820
    # every level's colour is drawn on the keypoint figure
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    for colour in viz.LEVEL_COLOURS:
        assert len(colour_pixels(rgb, colour)) > 0


def test_crop_without_prediction_is_centred_on_the_truth_without_a_disc():
    study = make_study()
    truth = truth_points(study)
    tile = 64
    with_pred = viz.crop_tile(viz.StudyView(study, truth, truth), 0, tile, 20.0)
    no_pred = viz.crop_tile(viz.StudyView(study, None, truth), 0, tile, 20.0)
    c = 2 + (tile - 1) // 2
    colour = np.asarray(viz.LEVEL_COLOURS[0])
    assert (with_pred[c, c] == colour).all()
    assert not (no_pred[c, c] == colour).all()  # the hollow ring's centre
    r = viz.TRUTH_RADIUS
    assert (no_pred[c + r, c] == colour).all() and (no_pred[c - r, c] == colour).all()
