"""Keypoints record: merging stage-1 outputs by confidence x manifest weight."""

import numpy as np

from kernel_src.keypoints import Keypoints, merge_weighted
from kernel_src.schema import N_LABELS, label_index


def _points(index: int, xyz, confidence: float, source: str) -> Keypoints:
    kp = Keypoints()
    kp.set(index, xyz, confidence, source)
    return kp


def test_merge_weighted_prefers_confidence_times_weight():
    i = label_index("left_subarticular_stenosis", "l3_l4")
    precise = _points(i, (1.0, 2.0, 3.0), 0.5, "axial_level")
    sloppy = _points(i, (9.0, 9.0, 9.0), 0.9, "axial3d")
    # equal weights: the more confident point wins (as Keypoints.merged does)
    assert merge_weighted([(precise, 1.0), (sloppy, 1.0)]).source[i] == "axial3d"
    assert precise.merged(sloppy).source[i] == "axial3d"
    # a weight of 1/error: the accurate family wins although its confidence is lower
    out = merge_weighted([(sloppy, 1 / 6.0), (precise, 1 / 3.0)])
    assert out.source[i] == "axial_level"
    np.testing.assert_allclose(out.world[i], (1.0, 2.0, 3.0))
    assert out.confidence[i] == 0.5  # confidences are kept, not scaled


def test_merge_weighted_keeps_known_points_and_ties_keep_the_first():
    a = _points(0, (1, 1, 1), 0.4, "a")
    b = _points(0, (2, 2, 2), 0.4, "b")
    b.set(7, (5, 5, 5), 0.1, "b")
    out = merge_weighted([(a, 1.0), (b, 1.0), (Keypoints(), 5.0)])
    assert out.source[0] == "a" and out.source[7] == "b"
    assert out.known.sum() == 2 and not out.known[[i for i in range(N_LABELS) if i not in
                                                    (0, 7)]].any()


def test_planar_winner_takes_its_depth_from_the_best_3d_point():
    """A 2D sagittal point (depth = its slice, not an estimate) that wins keeps its
    in-plane position and moves along the slice normal to the 3D estimate's depth."""
    i = label_index("left_neural_foraminal_narrowing", "l4_l5")
    flat = Keypoints()
    flat.set(i, (0.0, 10.0, 20.0), 0.9, "sag2d", normal=(1.0, 0.0, 0.0))
    deep = Keypoints()
    deep.set(i, (25.0, 13.0, 17.0), 0.9, "sag3d")
    out = merge_weighted([(flat, 1.0), (deep, 0.5)])
    np.testing.assert_allclose(out.world[i], (25.0, 10.0, 20.0))
    assert out.source[i] == "sag2d+sag3d" and not out.planar[i]
    # the 3D point wins outright when it scores higher
    out = merge_weighted([(flat, 0.5), (deep, 1.0)])
    np.testing.assert_allclose(out.world[i], (25.0, 13.0, 17.0))
    # without any 3D estimate the planar point stays planar
    alone = merge_weighted([(flat, 1.0)])
    assert alone.planar[i] and alone.source[i] == "sag2d"
    rows = alone.to_rows(5)
    assert rows[i]["nx"] == 1.0 and np.isnan(rows[0]["nx"])
