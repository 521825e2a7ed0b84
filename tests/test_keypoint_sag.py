"""Sagittal keypoint families (sag2d, sag3d), their data pieces and the keypoint evaluation.

Unit tests on hand-built stacks with known geometry; the phantom training test (trained
error below the mean-shape baseline) is at the end.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernel_src import geometry
from kernel_src.models import registry, zoo  # noqa: F401
from kernel_src.models.keypoint_common import FORAMINAL, SPINAL, pick_series, swap_sides
from kernel_src.models.keypoint_sag2d import Sag2D
from kernel_src.models.keypoint_sag3d import Sag3D
from kernel_src.schema import AXIAL_T2, LABEL_COLUMNS, SAG_T1, SAG_T2
from kernel_src.study import Series, Stack, Study
from kernel_src.training import keypoint_data as kd
from kernel_src.training import keypoint_eval as ke

TINY = {"sag2d": dict(backbone="resnet18", image_size=32),
        "sag3d": dict(backbone="resnet18", image_size=32, depth=16)}


def sagittal_stack(n=12, h=40, w=50, spacing=(1.5, 1.2), x0=-20.0, dx=3.5, tilt=0.0,
                   rng=None):
    """A sagittal stack: rows along -z (head at top), columns along +y, slices along +x."""
    c, s = np.cos(tilt), np.sin(tilt)
    row_cos = np.array([0.0, c, s])        # increasing column: posterior (tilted)
    col_cos = np.array([0.0, s, -c])       # increasing row: towards the feet
    positions = np.stack([x0 + dx * np.arange(n), np.full(n, -30.0), np.full(n, 40.0)], 1)
    rng = rng or np.random.default_rng(0)
    pixels = rng.integers(0, 255, (n, h, w), dtype=np.uint8)
    return Stack(pixels, positions, np.r_[row_cos, col_cos], np.array(spacing),
                 np.arange(1, n + 1))


def study_with(*series: tuple[int, str, list[Stack]]) -> Study:
    st = Study(1)
    for sid, desc, stacks in series:
        st.series[sid] = Series(1, sid, desc, stacks)
    return st


@pytest.mark.parametrize("family", [Sag2D, Sag3D])
def test_family_builds_runs_and_roundtrips_checkpoint(tmp_path, family):
    for tag, base in family.variants().items():
        config = dataclasses.replace(base, **TINY[family.name])
        model = registry.build_model(family.name, registry.config_to_dict(config)).eval()
        stack = sagittal_stack()
        image, _ = family.prepare(stack, config)
        assert image.dtype == np.uint8
        x = kd.to_model_range(image)[None]
        with torch.no_grad():
            out = model(x)
        assert out.shape == (1, len(config.points), family.n_dims + 1)
        assert (out[..., -1] >= 0).all()  # predicted error is non-negative
        path = registry.save_checkpoint(tmp_path / f"{tag}.pt", family.name, config, model)
        again, cfg2, _ = registry.load_checkpoint(path)
        assert cfg2 == config
        with torch.no_grad():
            assert torch.allclose(again(x), out)


def test_prepare_shapes_and_centre_slice():
    stack = sagittal_stack(n=15, h=40, w=50)
    c2 = Sag2D.Config(image_size=24, n_slices=10)
    image, s = Sag2D.prepare(stack, c2)
    assert image.shape == (1, 24, 24) and s == int(np.round(np.linspace(0, 14, 10))[5])
    c3 = Sag3D.Config(image_size=24, depth=8)
    vol, _ = Sag3D.prepare(stack, c3)
    assert vol.shape == (1, 24, 24, 8)  # depth last
    # the first resampled plane comes from the first slices, the last from the last ones
    assert abs(float(vol[0, :, :, 0].mean()) - float(stack.pixels[:2].mean())) < 12


@pytest.mark.parametrize("tilt", [0.0, 0.2])
def test_encode_decode_roundtrip_in_world_mm(tilt):
    stack = sagittal_stack(tilt=tilt)
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 11, 5)
    world = geometry.pixel_to_world(stack, s, rng.uniform(0, 49, 5), rng.uniform(0, 39, 5))
    c3 = Sag3D.Config(image_size=24, depth=8, points=SPINAL)
    back = Sag3D.decode(stack, None, Sag3D.encode(stack, None, world), c3)
    np.testing.assert_allclose(back, world, atol=1e-6)
    c2 = Sag2D.Config(image_size=24, points=SPINAL)
    _, k = Sag2D.prepare(stack, c2)
    flat = Sag2D.decode(stack, k, Sag2D.encode(stack, k, world), c2)
    # on the input slice: same in-plane position, lateral position = that slice
    d = flat - world
    n = stack.normal
    np.testing.assert_allclose(d - (d @ n)[:, None] * n, 0, atol=1e-6)
    np.testing.assert_allclose(flat @ n, geometry.slice_positions(stack, k) @ n, atol=1e-6)


def test_series_choice_is_deterministic():
    small, big = sagittal_stack(n=8), sagittal_stack(n=14)
    study = study_with((30, SAG_T2, [small]), (20, SAG_T2, [small, big]), (10, SAG_T1, [big]),
                       (5, AXIAL_T2, [big]))
    sid, stack = pick_series(study, SAG_T2)
    assert sid == 20 and stack is big  # the series with the largest stack, its largest stack
    assert pick_series(study, SAG_T2, prefer=[30])[0] == 30  # training: labelled series
    assert pick_series(study_with((5, AXIAL_T2, [big])), SAG_T2) is None
    tie = study_with((30, SAG_T2, [small]), (20, SAG_T2, [small]))
    assert pick_series(tie, SAG_T2)[0] == 20


def test_infer_empty_without_series_and_mean_shape_decodes_the_mean():
    config = Sag3D.Config(**TINY["sag3d"], points=FORAMINAL, series=SAG_T1)
    no_t1 = study_with((1, SAG_T2, [sagittal_stack()]))
    assert not Sag3D.infer([Sag3D.build(config)], config, no_t1, "cpu").known.any()
    stack = sagittal_stack()
    study = study_with((7, SAG_T1, [stack]))
    mean = np.random.default_rng(0).uniform(0.2, 0.8, (10, 3))
    kp = Sag3D.infer([ke.MeanShapeModel(mean)], config, study, "cpu")
    assert kp.known.sum() == 10 and set(np.flatnonzero(kp.known)) == set(FORAMINAL)
    np.testing.assert_allclose(kp.world[list(FORAMINAL)],
                               Sag3D.decode(stack, None, mean, config), atol=1e-5)
    assert np.all(kp.confidence[list(FORAMINAL)] == 1.0)  # zero predicted error, one model
    assert kp.source[FORAMINAL[0]] == "sag3d:7"


def test_fold_disagreement_lowers_confidence():
    config = Sag2D.Config(**TINY["sag2d"])
    study = study_with((7, SAG_T2, [sagittal_stack()]))
    a = np.full((5, 2), 0.5)
    one = Sag2D.infer([ke.MeanShapeModel(a), ke.MeanShapeModel(a)], config, study, "cpu")
    two = Sag2D.infer([ke.MeanShapeModel(a), ke.MeanShapeModel(a + 0.1)], config, study, "cpu")
    assert np.all(two.confidence[list(SPINAL)] < one.confidence[list(SPINAL)])


def test_swap_sides_pairs_left_and_right_levels():
    perm = swap_sides(FORAMINAL)
    for i, j in enumerate(perm):
        a, b = LABEL_COLUMNS[FORAMINAL[i]], LABEL_COLUMNS[FORAMINAL[j]]
        assert a.split("_")[0] != b.split("_")[0] and a[-5:] == b[-5:]
    assert list(swap_sides(SPINAL)) == list(range(5))


def test_affine_moves_points_with_the_image():
    rng = np.random.default_rng(3)
    h, w = 60, 80
    planes = np.zeros((h, w, 3), np.uint8)
    px, py = 50.0, 20.0
    planes[int(py), int(px)] = 255
    for _ in range(5):
        m = kd.random_affine(rng, h, w, scale=0.1, rotate_deg=15, shift=0.1)
        warped = kd.warp_planes(planes, m)
        assert warped.shape == planes.shape
        peak = np.unravel_index(np.argmax(warped[..., 1]), (h, w))
        unit = np.array([[(px + 0.5) / w, (py + 0.5) / h]])
        moved = kd.warp_unit_points(unit, m, h, w)[0] * (w, h) - 0.5
        assert abs(peak[1] - moved[0]) <= 1.0 and abs(peak[0] - moved[1]) <= 1.0


def test_mirror_depth_swaps_left_right_and_flips_w():
    vol = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(1, 2, 3, 4)
    coords = np.random.default_rng(0).uniform(size=(10, 3)).astype(np.float32)
    mask = np.r_[np.ones(5), np.zeros(5)].astype(np.float32)
    perm = swap_sides(FORAMINAL)
    v2, c2, m2 = kd.mirror_depth(vol, coords, mask, perm)
    assert np.array_equal(v2[..., 0], vol[..., -1])
    np.testing.assert_allclose(c2[:5, 2], 1 - coords[5:, 2])
    np.testing.assert_allclose(c2[:5, :2], coords[5:, :2])
    assert m2[:5].sum() == 0 and m2[5:].sum() == 5


def test_distances_drop_the_normal_component_and_level_accuracy():
    truth = np.full((1, 25, 3), np.nan)
    truth[0, :5] = np.stack([np.zeros(5), np.zeros(5), -10.0 * np.arange(5)], 1)
    pred = truth.copy()
    pred[0, :5, 0] += 7.0            # lateral error only
    pred[0, 2, 2] -= 6.0             # L3/L4 point 6 mm towards L4/L5 (10 mm away)
    normals = np.array([[1.0, 0, 0]])
    d2 = ke.distances(pred, truth, normals)
    np.testing.assert_allclose(d2[0, :5], [0, 0, 6, 0, 0], atol=1e-9)
    d3 = ke.distances(pred, truth, np.full((1, 3), np.nan))
    np.testing.assert_allclose(d3[0, 0], 7.0)
    hits = ke.level_hits(pred, truth, normals)
    assert list(hits[0, :5]) == [1, 1, 0, 1, 1] and np.isnan(hits[0, 5:]).all()
    s = ke.summarize(pred, truth, normals, SPINAL)
    assert s["all"]["n"] == 5 and s["all"]["median_mm"] == 0.0
    assert s["all"]["level_acc"] == pytest.approx(0.8)
    assert s["spinal_canal_stenosis"]["p90_mm"] == pytest.approx(np.percentile(d2[0, :5], 90))


# --------------------------------------------------------------- phantom training
@pytest.mark.slow
def test_short_training_on_phantom_beats_mean_shape_baseline(tmp_path):
    """sag2d (T2 spinal points) trained briefly on a small phantom: its held-out median
    error is below the mean-shape baseline's, and the run writes its files."""
    import json

    import pandas as pd

    from kernel_src.synthetic import generate_competition
    from kernel_src.training import train_keypoint

    data = generate_competition(tmp_path / "phantom", 20, 0, seed=3, size=64)
    out = tmp_path / "runs"
    result = train_keypoint.train({
        "family": "sag2d", "variants": ["t2"], "data_dir": str(data),
        "cache_dir": str(tmp_path / "cache"), "out_dir": str(out), "fold": 0, "n_folds": 5,
        "backbone": "resnet18", "image_size": 64, "epochs": 20, "batch_size": 4, "lr": 3e-3,
        "device": "cpu", "seed": 0, "precise_bn_batches": 4,
        "config_overrides": {"head": "soft_argmax", "feature_stage": 2,
                             "heatmap_weight": 1.0}})
    metrics = result["sag2d_t2"]
    model, base = metrics["model"]["all"], metrics["baseline"]["all"]
    assert model["n"] == base["n"] > 0
    assert model["median_mm"] < base["median_mm"]
    run_dir = out / "sag2d_t2" / "resnet18"
    saved = json.loads((run_dir / "metrics.json").read_text())["fold0"]
    assert saved["model"]["all"]["median_mm"] == pytest.approx(model["median_mm"])
    oof = pd.read_csv(run_dir / "oof_fold0.csv")
    assert set(oof["label"]) == {LABEL_COLUMNS[i] for i in SPINAL}
    _, config, payload = registry.load_checkpoint(run_dir / "fold0.pt")
    assert config.head == "soft_argmax" and "baseline_median_mm" in payload["metrics"]
