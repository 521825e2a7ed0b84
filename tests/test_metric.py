"""The official metric against scikit-learn's log_loss and hand-computed cases."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from kernel_src import metric
from kernel_src.schema import GRADES, LABEL_COLUMNS, SUBMISSION_COLUMNS

REPO = Path(__file__).resolve().parents[1]
PARTS = ("spinal", "foraminal", "subarticular", "any_severe_spinal")


def frames(study_ids, labels, probs):
    """(N, 25) codes and (N, 25, 3) probs -> (wide labels df, submission df)."""
    wide = pd.DataFrame(np.asarray(labels), columns=list(LABEL_COLUMNS))
    wide.insert(0, "study_id", np.asarray(study_ids, dtype=np.int64))
    sub = pd.DataFrame(np.asarray(probs, dtype=float).reshape(-1, 3), columns=list(SUBMISSION_COLUMNS))
    sub.insert(0, "row_id", [f"{s}_{c}" for s in study_ids for c in LABEL_COLUMNS])
    return wide, sub


def sklearn_reference(study_ids, labels, probs):
    """The host's recipe in long format: group from the row_id word, sklearn log_loss."""
    rows = pd.DataFrame({
        "row_id": [f"{s}_{c}" for s in study_ids for c in LABEL_COLUMNS],
        "study_id": np.repeat(study_ids, 25),
        "y": np.asarray(labels).reshape(-1),
    })
    rows[["p0", "p1", "p2"]] = np.asarray(probs).reshape(-1, 3)
    rows = rows[rows["y"] >= 0].copy()
    rows["group"] = rows["row_id"].map(
        lambda r: next(g for g in ("spinal", "foraminal", "subarticular") if g in r))
    rows["w"] = rows["y"].map({0: 1.0, 1: 2.0, 2: 4.0})
    out = {}
    for group in ("spinal", "foraminal", "subarticular"):
        g = rows[rows["group"] == group]
        out[group] = log_loss(g["y"], g[["p0", "p1", "p2"]].to_numpy(), sample_weight=g["w"],
                              labels=[0, 1, 2])
    spinal = rows[rows["group"] == "spinal"].groupby("study_id")
    y = spinal["y"].apply(lambda v: int((v == 2).any()))
    out["any_severe_spinal"] = log_loss(y, spinal["p2"].max(), sample_weight=spinal["w"].max(),
                                        labels=[0, 1])
    out["total"] = float(np.mean([out[p] for p in PARTS]))
    return out


def random_case(seed, n_studies, missing=0.2):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=(n_studies, 25), p=[0.6, 0.25, 0.15])
    labels[rng.random(labels.shape) < missing] = -1
    probs = np.maximum(rng.dirichlet([0.7, 0.7, 0.7], size=(n_studies, 25)), 1e-6)
    probs /= probs.sum(axis=2, keepdims=True)
    study_ids = rng.choice(10**9, size=n_studies, replace=False)
    return study_ids, labels, probs


@pytest.mark.parametrize("seed, n_studies", [(0, 2), (1, 5), (2, 17), (3, 40), (4, 3)])
def test_matches_sklearn_log_loss(seed, n_studies):
    study_ids, labels, probs = random_case(seed, n_studies)
    assert (labels == -1).any() and (labels[:, :5] == 2).any()
    ours = metric.score(*frames(study_ids, labels, probs))
    ref = sklearn_reference(study_ids, labels, probs)
    for key in ("total", *PARTS):
        assert abs(ours[key] - ref[key]) < 1e-9, (key, ours[key], ref[key])
    # The array entry point gives the same numbers.
    assert metric.score_arrays(labels, probs) == pytest.approx(ours, abs=1e-12)


def test_submission_row_order_does_not_matter():
    study_ids, labels, probs = random_case(7, 6)
    wide, sub = frames(study_ids, labels, probs)
    shuffled = sub.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert metric.score(wide, shuffled) == pytest.approx(metric.score(wide, sub), abs=1e-12)


def test_perfect_and_confidently_wrong():
    study_ids, labels, _ = random_case(5, 8, missing=0.0)
    onehot = np.eye(3)[labels]
    perfect = metric.score(*frames(study_ids, labels, onehot))
    assert all(0 <= v < 1e-12 for v in perfect.values()), perfect
    # All Normal/Mild truth, all-Severe one-hot prediction: clip to [1e-15, 1-1e-15],
    # renormalise -> p_true = 1e-15 / (1 + 1e-15) for every row.
    wrong = np.zeros((1, 25, 3))
    wrong[..., 2] = 1.0
    res = metric.score(*frames([1], np.zeros((1, 25), dtype=int), wrong))
    row_loss = -math.log(1e-15 / (1 + 1e-15))
    assert res["spinal"] == pytest.approx(row_loss, rel=1e-12)
    assert res["foraminal"] == pytest.approx(row_loss, rel=1e-12)
    # Binary term: q = 1 clipped to 1 - 1e-15, then [1 - q, q] (no second clip).
    assert res["any_severe_spinal"] == pytest.approx(-math.log(1 - (1 - 1e-15)), rel=1e-12)
    assert math.isfinite(res["total"]) and res["total"] > 30


# Two hand-made studies: A has a Severe spinal level, B's worst spinal level is Moderate
# and its l2_l3 is unlabelled.
SPINAL_A = [0, 0, 2, 1, 0]
SPINAL_B = [1, -1, 0, 0, 0]


def two_studies(rest=0):
    labels = np.full((2, 25), rest)
    labels[0, :5], labels[1, :5] = SPINAL_A, SPINAL_B
    return [101, 202], labels


def test_uniform_prediction():
    study_ids, labels = two_studies()
    labels[1, 10:13] = [2, 1, -1]
    res = metric.score(*frames(study_ids, labels, np.full((2, 25, 3), 1 / 3)))
    for group in ("spinal", "foraminal", "subarticular"):
        assert res[group] == pytest.approx(math.log(3), abs=1e-12)
    # Study A: y=1, w=4, q=1/3; study B: y=0, w=2, q=1/3.
    expected_any = (4 * math.log(3) + 2 * math.log(3 / 2)) / 6
    assert res["any_severe_spinal"] == pytest.approx(expected_any, abs=1e-12)
    assert res["total"] == pytest.approx((3 * math.log(3) + expected_any) / 4, abs=1e-12)


def test_prior_prediction():
    study_ids, labels = two_studies()
    prior = np.array([0.6, 0.3, 0.1])
    res = metric.score(*frames(study_ids, labels, np.broadcast_to(prior, (2, 25, 3))))
    # Labelled spinal rows: 6 Normal/Mild (w 1), 2 Moderate (w 2), 1 Severe (w 4).
    expected = (6 * -math.log(0.6) + 2 * 2 * -math.log(0.3) + 4 * -math.log(0.1)) / (6 + 4 + 4)
    assert res["spinal"] == pytest.approx(expected, abs=1e-12)
    assert res["foraminal"] == pytest.approx(-math.log(0.6), abs=1e-12)
    expected_any = (4 * -math.log(0.1) + 2 * -math.log(0.9)) / 6
    assert res["any_severe_spinal"] == pytest.approx(expected_any, abs=1e-12)


def test_any_severe_two_study_example():
    study_ids, labels = two_studies()
    probs = np.full((2, 25, 3), 1 / 3)
    probs[0, :5, 2] = [0.1, 0.2, 0.3, 0.05, 0.6]   # max 0.6
    probs[1, :5, 2] = [0.1, 0.9, 0.4, 0.2, 0.05]   # 0.9 sits on the unlabelled level
    probs[..., 1] = 0.05
    probs[..., 0] = 1.0 - probs[..., 2] - probs[..., 1]
    res = metric.score(*frames(study_ids, labels, probs))
    # A: severe -> y=1, weight max(1,1,4,2,1)=4, q=0.6. B: y=0, weight max(2,1,1,1)=2, q=0.4.
    expected = (4 * -math.log(0.6) + 2 * -math.log(1 - 0.4)) / (4 + 2)
    assert res["any_severe_spinal"] == pytest.approx(expected, abs=1e-12)


def test_rows_are_renormalised_and_unlabelled_rows_ignored():
    study_ids, labels, probs = random_case(11, 6)
    base = metric.score(*frames(study_ids, labels, probs))
    # Entries stay <= 1: the host clipped to [1e-15, 1 - 1e-15] before renormalising.
    scale = np.random.default_rng(0).uniform(0.05, 1.0, size=(6, 25, 1))
    scaled = metric.score(*frames(study_ids, labels, probs * scale))
    for group in ("spinal", "foraminal", "subarticular"):
        assert scaled[group] == pytest.approx(base[group], abs=1e-12)
    changed = probs.copy()
    changed[labels == -1] = [0.0, 0.0, 1.0]
    assert metric.score(*frames(study_ids, labels, changed)) == pytest.approx(base, abs=1e-12)


def test_group_without_labels_is_nan_and_left_out_of_total():
    study_ids, labels, probs = random_case(12, 4, missing=0.0)
    labels[:, 15:] = -1
    with pytest.warns(UserWarning, match="subarticular"):
        res = metric.score(*frames(study_ids, labels, probs))
    assert math.isnan(res["subarticular"])
    assert res["total"] == pytest.approx(
        (res["spinal"] + res["foraminal"] + res["any_severe_spinal"]) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="no labelled row"):
        metric.score(*frames(study_ids, np.full_like(labels, -1), probs))


def test_grade_strings_accepted_as_labels():
    study_ids, labels, probs = random_case(13, 3)
    wide, sub = frames(study_ids, labels, probs)
    as_text = wide.copy()
    for column in LABEL_COLUMNS:
        as_text[column] = [GRADES[v] if v >= 0 else np.nan for v in wide[column]]
    assert metric.score(as_text, sub) == pytest.approx(metric.score(wide, sub), abs=1e-15)
    as_text.loc[1, LABEL_COLUMNS[3]] = "Mild"
    with pytest.raises(ValueError, match=f"{LABEL_COLUMNS[3]}: unknown grade 'Mild'"):
        metric.score(as_text, sub)


def bad_submissions():
    study_ids, labels, probs = random_case(21, 2)
    wide, sub = frames(study_ids, labels, probs)
    cases = {}
    for name, value, message in [("nan", np.nan, "not finite"), ("inf", np.inf, "not finite"),
                                 ("negative", -0.1, "negative")]:
        bad = sub.copy()
        bad.loc[7, "moderate"] = value
        cases[name] = (bad, f"row_id {sub.loc[7, 'row_id']}, moderate: {message}")
    text = sub.copy()
    text["severe"] = text["severe"].astype(str)
    text.loc[3, "severe"] = "high"
    cases["non-numeric"] = (text, "'severe' must be numeric")
    cases["missing row"] = (sub.drop(index=30), f"missing, e.g. \\['{sub.loc[30, 'row_id']}'")
    extra = pd.concat([sub, pd.DataFrame({"row_id": ["5_spinal_canal_stenosis_l1_l2"],
                                          "normal_mild": [1.0], "moderate": [0.0], "severe": [0.0]})])
    cases["extra row"] = (extra, "not in the labels, e.g. \\['5_spinal_canal_stenosis_l1_l2'")
    cases["duplicate"] = (pd.concat([sub, sub.iloc[[4]]]), "duplicate row_ids")
    cases["missing column"] = (sub.drop(columns="moderate"), "missing columns \\['moderate'\\]")
    return wide, cases


@pytest.mark.parametrize("case", ["nan", "inf", "negative", "non-numeric", "missing row",
                                  "extra row", "duplicate", "missing column"])
def test_bad_submission_rejected(case):
    wide, cases = bad_submissions()
    bad, message = cases[case]
    with pytest.raises(ValueError, match=message):
        metric.score(wide, bad)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kernel_src.metric", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    study_ids, labels, probs = random_case(31, 4)
    wide, sub = frames(study_ids, labels, probs)
    text = wide.copy()
    for column in LABEL_COLUMNS:  # train.csv's format: grade strings, empty = unlabelled
        text[column] = [GRADES[v] if v >= 0 else "" for v in wide[column]]
    text.to_csv(tmp_path / "labels.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    done = run_cli("--labels", str(tmp_path / "labels.csv"), "--submission", str(tmp_path / "sub.csv"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    expected = sklearn_reference(study_ids, labels, probs)
    assert [line.split(":")[0] for line in lines] == [*PARTS, "score"]
    for line, key in zip(lines, [*PARTS, "total"], strict=True):
        assert float(line.split(":")[1]) == pytest.approx(expected[key], abs=1e-6)

    _, cases = bad_submissions()
    sub.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    done = run_cli("--labels", str(tmp_path / "labels.csv"), "--submission", str(tmp_path / "short.csv"))
    assert done.returncode != 0 and "row_ids of the labels are missing" in done.stderr
    assert "score:" not in done.stdout
    done = run_cli("--labels", str(tmp_path / "nope.csv"), "--submission", str(tmp_path / "sub.csv"))
    assert done.returncode != 0 and "nope.csv" in done.stderr
    bad_labels = tmp_path / "bad_labels.csv"
    text.assign(study_id="x").to_csv(bad_labels, index=False)
    done = run_cli("--labels", str(bad_labels), "--submission", str(tmp_path / "sub.csv"))
    assert done.returncode != 0 and "line 2" in done.stderr and "'study_id'" in done.stderr
