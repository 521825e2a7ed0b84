"""Kernel-side ensemble: NaN-aware weighted means, per-group blends, softmax last."""

import numpy as np
import pytest

from kernel_src import ensemble
from kernel_src.schema import CONDITION_GROUP, CONDITIONS, N_LABELS


def _rows(group: str) -> np.ndarray:
    return np.array([CONDITION_GROUP[c] == group for c in CONDITIONS for _ in range(5)])


def test_row_groups_follow_label_order():
    assert len(ensemble.ROW_GROUPS) == N_LABELS
    assert ensemble.ROW_GROUPS[:5] == ("spinal",) * 5
    assert set(ensemble.ROW_GROUPS[5:15]) == {"foraminal"}
    assert set(ensemble.ROW_GROUPS[15:]) == {"subarticular"}


def test_weighted_nanmean_renormalises_over_present_rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(N_LABELS, 3)), rng.normal(size=(N_LABELS, 3))
    b[3] = np.nan
    out = ensemble.weighted_nanmean([a, b], [1.0, 3.0])
    np.testing.assert_allclose(out[0], (a[0] + 3 * b[0]) / 4)
    np.testing.assert_allclose(out[3], a[3])  # b's NaN row ignored, weight renormalised
    both = np.full((N_LABELS, 3), np.nan)
    assert np.isnan(ensemble.weighted_nanmean([both, both], [1, 1])).all()


def test_weighted_nanmean_zero_weight_is_nothing():
    a = np.ones((N_LABELS, 3))
    assert np.isnan(ensemble.weighted_nanmean([a], [0.0])).all()


def test_weighted_nanmean_rejects_bad_shapes():
    with pytest.raises(ValueError, match="25, 3"):
        ensemble.weighted_nanmean([np.zeros((24, 3))], [1.0])
    with pytest.raises(ValueError, match="weights"):
        ensemble.weighted_nanmean([np.zeros((25, 3))], [1.0, 2.0])


def test_blend_uses_each_groups_weights_and_renormalises_per_row():
    v2, v20 = np.zeros((N_LABELS, 3)), np.zeros((N_LABELS, 3))
    v2[:, 0], v20[:, 0] = 1.0, 2.0
    v20[_rows("subarticular")] = np.nan  # v20 does not grade subarticular rows
    blends = {"spinal": {"v2": 0.6, "v20": 0.4}, "foraminal": {"v2": 0.1, "v20": 0.9},
              "subarticular": {"v2": 0.3, "v20": 0.7}}
    out = ensemble.blend_families({"v2": v2, "v20": v20}, blends)
    np.testing.assert_allclose(out[_rows("spinal"), 0], 0.6 * 1 + 0.4 * 2)
    np.testing.assert_allclose(out[_rows("foraminal"), 0], 0.1 * 1 + 0.9 * 2)
    np.testing.assert_allclose(out[_rows("subarticular"), 0], 1.0)  # only v2 present


def test_blend_family_absent_from_group_gets_no_weight_and_missing_group_is_equal():
    v2, v24 = np.full((N_LABELS, 3), 1.0), np.full((N_LABELS, 3), 3.0)
    out = ensemble.blend_families({"v2": v2, "v24": v24}, {"spinal": {"v2": 1.0}})
    np.testing.assert_allclose(out[_rows("spinal")], 1.0)
    np.testing.assert_allclose(out[_rows("foraminal")], 2.0)  # no blends: equal weights


def test_softmax_last_and_nan_rows_kept():
    logits = np.zeros((N_LABELS, 3))
    logits[0] = [0.0, np.log(2.0), np.log(5.0)]
    logits[1] = np.nan
    p = ensemble.softmax(logits)
    np.testing.assert_allclose(p[0], [1 / 8, 2 / 8, 5 / 8])
    assert np.isnan(p[1]).all()
    np.testing.assert_allclose(p[2:].sum(axis=-1), 1.0)


def test_combine_is_mean_of_logits_then_softmax_not_mean_of_probs():
    a = np.zeros((N_LABELS, 3))
    b = np.zeros((N_LABELS, 3))
    a[:, 2], b[:, 2] = 4.0, -4.0
    p = ensemble.combine({"m1": a, "m2": b}, {"m1": "v2", "m2": "v2"},
                         {"m1": 1.0, "m2": 1.0}, {})
    np.testing.assert_allclose(p, 1 / 3)  # mean logits are 0: uniform
    weighted = ensemble.combine({"m1": a, "m2": b}, {"m1": "v2", "m2": "v2"},
                                {"m1": 3.0, "m2": 1.0}, {})
    expected = np.exp([0.0, 0.0, 2.0]) / np.exp([0.0, 0.0, 2.0]).sum()
    np.testing.assert_allclose(weighted[7], expected)


def test_combine_with_nothing_is_all_nan():
    assert np.isnan(ensemble.combine({}, {}, {}, {})).all()
