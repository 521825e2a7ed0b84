"""Class priors, the submission writer and its validator."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from kernel_src import metric, submission
from kernel_src.schema import LABEL_COLUMNS, SUBMISSION_COLUMNS


def train_frame(codes):
    df = pd.DataFrame(np.asarray(codes, dtype=np.int64), columns=list(LABEL_COLUMNS))
    df.insert(0, "study_id", np.arange(100, 100 + len(df), dtype=np.int64))
    return df


@pytest.fixture
def train_df():
    codes = np.zeros((6, 25), dtype=np.int64)
    codes[:, 0] = [0, 0, 1, 2, 2, -1]   # 2 Normal, 1 Moderate, 2 Severe, 1 missing
    codes[:, 1] = [-1] * 6              # nothing labelled
    return train_frame(codes)


def test_priors_hand_computed(train_df):
    priors = submission.compute_priors(train_df, alpha=1.0)
    assert priors.shape == (25, 3) and priors.dtype == np.float64
    np.testing.assert_allclose(priors[0], [3 / 8, 2 / 8, 3 / 8])
    np.testing.assert_allclose(priors[1], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(priors[2], [7 / 9, 1 / 9, 1 / 9])  # 6 Normal, no class at 0
    half = submission.compute_priors(train_df, alpha=0.5)
    np.testing.assert_allclose(half[0], [2.5 / 6.5, 1.5 / 6.5, 2.5 / 6.5])
    assert (priors > 0).all()


def test_priors_reject_bad_labels(train_df):
    bad = train_df.copy()
    bad.loc[0, LABEL_COLUMNS[4]] = 3
    with pytest.raises(ValueError, match=LABEL_COLUMNS[4]):
        submission.compute_priors(bad)
    with pytest.raises(ValueError, match=LABEL_COLUMNS[24]):
        submission.compute_priors(train_df.drop(columns=LABEL_COLUMNS[24]))


def test_priors_json_round_trip_and_errors(tmp_path, train_df):
    priors = submission.compute_priors(train_df)
    path = submission.save_priors(tmp_path / "priors.json", priors)
    data = json.loads(path.read_text())
    assert list(data) == list(LABEL_COLUMNS)
    assert data[LABEL_COLUMNS[0]] == {"normal_mild": 3 / 8, "moderate": 2 / 8, "severe": 3 / 8}
    np.testing.assert_array_equal(submission.load_priors(path), priors)

    del data[LABEL_COLUMNS[3]]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=LABEL_COLUMNS[3]):
        submission.load_priors(path)
    data[LABEL_COLUMNS[3]] = {"normal_mild": 0.5, "moderate": 0.2, "severe": 0.2}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{LABEL_COLUMNS[3]}.*not a probability row"):
        submission.load_priors(path)


def test_write_read_validate_score_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    study_ids = [4003253, 4646740, 7143189]
    labels = rng.choice(3, size=(3, 25))
    labels[0, 5] = -1
    priors = submission.compute_priors(train_frame(rng.choice(3, size=(20, 25))))
    probs = rng.dirichlet([1, 1, 1], size=(3, 25)) * 3.0   # unnormalised on purpose
    probs[1, 7] = np.nan                                    # one row without prediction
    probs[2] = np.nan                                       # a whole study failed
    path = tmp_path / "out" / "submission.csv"
    written = submission.write_submission(path, study_ids, probs, priors)
    assert not list(path.parent.glob("*.tmp"))

    read = pd.read_csv(path)
    submission.validate_submission(read, study_ids)
    assert list(read.columns) == ["row_id", *SUBMISSION_COLUMNS]
    assert read["row_id"].tolist() == [f"{s}_{c}" for s in study_ids for c in LABEL_COLUMNS]
    values = read[list(SUBMISSION_COLUMNS)].to_numpy().reshape(3, 25, 3)
    assert values.dtype == np.float64
    # pandas' default CSV float parser may be off by one ulp.
    np.testing.assert_allclose(values, written[list(SUBMISSION_COLUMNS)].to_numpy().reshape(3, 25, 3),
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(values.sum(axis=2), 1.0, atol=1e-12)
    np.testing.assert_allclose(values[0], probs[0] / probs[0].sum(axis=1, keepdims=True), atol=1e-15)
    np.testing.assert_allclose(values[1, 7], priors[7], atol=1e-15)
    np.testing.assert_allclose(values[2], priors, atol=1e-15)

    wide = pd.DataFrame(labels, columns=list(LABEL_COLUMNS))
    wide.insert(0, "study_id", study_ids)
    scored = metric.score(wide, read)
    assert scored == pytest.approx(metric.score_arrays(labels, values), abs=1e-12)
    # Study 3 predicted by its priors: its spinal rows score -log prior[true class].
    assert math.isfinite(scored["total"]) and scored["total"] > 0


def test_mapping_input_and_missing_studies(tmp_path):
    priors = np.tile([0.7, 0.2, 0.1], (25, 1))
    one = np.tile([0.1, 0.1, 0.8], (25, 1))
    df = submission.write_submission(tmp_path / "s.csv", [5, 6], {6: one, 999: one}, priors)
    np.testing.assert_allclose(df.iloc[:25, 1:].to_numpy(), priors)
    np.testing.assert_allclose(df.iloc[25:, 1:].to_numpy(), one)
    empty = submission.write_submission(tmp_path / "e.csv", [], None, priors)
    assert len(empty) == 0
    submission.validate_submission(pd.read_csv(tmp_path / "e.csv"), [])


def test_writer_rejects_bad_input(tmp_path):
    priors = np.full((25, 3), 1 / 3)
    probs = np.full((2, 25, 3), 1 / 3)
    probs[1, 4, 2] = -0.5
    with pytest.raises(ValueError, match="negative value at study index 1, spinal_canal_stenosis_l5_s1"):
        submission.write_submission(tmp_path / "s.csv", [1, 2], probs, priors)
    with pytest.raises(ValueError, match="2 studies for 3 study ids"):
        submission.write_submission(tmp_path / "s.csv", [1, 2, 3], np.full((2, 25, 3), 0.3), priors)
    with pytest.raises(ValueError, match="duplicate study id"):
        submission.write_submission(tmp_path / "s.csv", [1, 1], np.full((2, 25, 3), 0.3), priors)
    with pytest.raises(ValueError, match="not a probability row"):
        submission.write_submission(tmp_path / "s.csv", [1], None, np.full((25, 3), 0.5))
    assert not (tmp_path / "s.csv").exists()


def good_frame(study_ids):
    df = submission.build_submission(study_ids, None, np.full((25, 3), 1 / 3))
    submission.validate_submission(df, study_ids)
    return df


@pytest.mark.parametrize("fault, message", [
    ("missing row", "1 row_ids missing"),
    ("extra study", "25 unexpected"),
    ("duplicate", "duplicate row_ids"),
    ("nan", "is not finite"),
    ("negative", "is not finite"),
    ("sum", "summing to 1"),
    ("column", "columns"),
    ("text", "non-numeric"),
])
def test_validate_rejects(fault, message):
    df = good_frame([1, 2])
    ids = [1, 2]
    if fault == "missing row":
        df = df.drop(index=13)
    elif fault == "extra study":
        ids = [1]
    elif fault == "duplicate":
        df = pd.concat([df, df.iloc[[0]]])
    elif fault == "nan":
        df.loc[3, "moderate"] = np.nan
    elif fault == "negative":
        df.loc[3, ["normal_mild", "moderate"]] = [1.5, -0.5]
        df.loc[3, "severe"] = 0.0
    elif fault == "sum":
        df.loc[3, "severe"] += 2e-6
    elif fault == "column":
        df = df.rename(columns={"severe": "Severe"})
    elif fault == "text":
        df["severe"] = df["severe"].astype(str)
    with pytest.raises(ValueError, match=message):
        submission.validate_submission(df, ids)


def test_validate_accepts_small_rounding():
    df = good_frame([1])
    df.loc[0, "severe"] += 5e-7
    submission.validate_submission(df, [1])
