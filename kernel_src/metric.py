"""The competition's official metric, as the host defined it (numpy only).

- Per condition group g in (spinal, foraminal, subarticular): weighted log loss
  `sum_i w_i * -log p_i[y_i] / sum_i w_i`, w = 1 / 2 / 4 for a true Normal/Mild /
  Moderate / Severe row.
- any_severe_spinal: per study, y = 1 if any spinal level is Severe, q = max over the
  spinal levels of the submitted `severe` value, w = max spinal row weight of the study
  (4 if any Severe, else 2 if any Moderate, else 1); binary weighted log loss.
- total = mean of the four parts (the last one scaled by `ANY_SEVERE_SCALAR` = 1.0).

As the host's scikit-learn `log_loss` did, probabilities are clipped to [1e-15, 1 - 1e-15]
and each row is then renormalised to sum to 1 (so an entry above 1 counts as 1 - 1e-15;
the any_severe term uses the submitted `severe` values as they are, clipped). Unlabelled rows (grade code -1) are dropped before anything
else, so the any_severe max runs over a study's labelled spinal levels only and a study
with no labelled spinal level is left out of that term.

Edge case (never met by the host, whose test set had rows in every group): a part with
no labelled rows is NaN and the total is the mean of the remaining parts (a warning says
so); no labelled row at all is an error.

CLI: `python -m kernel_src.metric --labels LABELS.csv --submission SUBMISSION.csv`
(labels in train.csv's wide format) prints the four parts, then `score: <value>`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .schema import (
    CLASS_WEIGHTS,
    CONDITION_GROUP,
    CONDITIONS,
    GRADE_INDEX,
    GROUPS,
    LABEL_COLUMNS,
    LEVELS,
    N_LABELS,
    SUBMISSION_COLUMNS,
    row_ids,
)

EPS = 1e-15
ANY_SEVERE_SCALAR = 1.0
PARTS: tuple[str, ...] = (*GROUPS, "any_severe_spinal")
SEVERE = 2
# Group index (into GROUPS) of each of the 25 label columns, and the spinal columns.
LABEL_GROUP = np.array([GROUPS.index(CONDITION_GROUP[c]) for c in CONDITIONS for _ in LEVELS])
SPINAL_COLUMNS = np.array([i for i, c in enumerate(LABEL_COLUMNS) if c.startswith("spinal")])


def weighted_log_loss(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """`sum_i w_i * -log p_i[y_i] / sum_i w_i`; y (n,) int class, weights (n,) > 0, probs
    (n, K) >= 0, or (n,) P(class 1) of a binary loss. In the host's scikit-learn order:
    clip to [EPS, 1 - EPS], then (binary) p -> [1 - p, p], then renormalise each row."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    p = p / p.sum(axis=1, keepdims=True)
    nll = -np.log(p[np.arange(len(y)), y])
    return float(np.average(nll, weights=weights))


def check_labels(labels: np.ndarray) -> np.ndarray:
    """(N, 25) integer grade codes in {-1, 0, 1, 2} as int64; else ValueError."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.shape[1] != N_LABELS:
        raise ValueError(f"labels: expected shape (N, {N_LABELS}), got {arr.shape}")
    if arr.dtype.kind not in "iu" or not np.isin(arr, (-1, 0, 1, 2)).all():
        raise ValueError("labels: grade codes must be integers in {-1, 0, 1, 2}")
    return arr.astype(np.int64)


def check_predictions(probs: np.ndarray, n_studies: int) -> np.ndarray:
    """(N, 25, 3) numeric, finite, >= 0 predictions as float64; else ValueError naming
    the first bad (study index, label column, class column)."""
    arr = np.asarray(probs)
    if arr.shape != (n_studies, N_LABELS, len(SUBMISSION_COLUMNS)):
        raise ValueError(f"predictions: expected shape ({n_studies}, {N_LABELS}, 3), got {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"predictions: must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    for bad, what in ((~np.isfinite(arr), "not finite"), (arr < 0, "negative")):
        if bad.any():
            s, j, k = np.argwhere(bad)[0]
            raise ValueError(
                f"predictions: {what} value {arr[s, j, k]} at study index {s}, "
                f"{LABEL_COLUMNS[j]}, {SUBMISSION_COLUMNS[k]}"
            )
    return arr


def any_severe_spinal_inputs(
    labels: np.ndarray, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per study with >= 1 labelled spinal level: (y (M,) 0/1, q (M,) max submitted P(severe)
    over the labelled spinal levels, w (M,) max spinal row weight)."""
    spinal = labels[:, SPINAL_COLUMNS]
    labelled = spinal >= 0
    keep = labelled.any(axis=1)
    y = ((spinal == SEVERE) & labelled).any(axis=1).astype(np.int64)
    row_w = np.asarray(CLASS_WEIGHTS)[np.clip(spinal, 0, None)]
    w = np.where(labelled, row_w, 0.0).max(axis=1)
    q = np.where(labelled, probs[:, SPINAL_COLUMNS, SEVERE], -np.inf).max(axis=1)
    return y[keep], q[keep], w[keep]


def score_arrays(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metric from (N, 25) grade codes (-1 = unlabelled) and (N, 25, 3) predictions.

    Returns {total, spinal, foraminal, subarticular, any_severe_spinal}."""
    labels = check_labels(labels)
    probs = check_predictions(probs, labels.shape[0])
    if not (labels >= 0).any():
        raise ValueError("labels: no labelled row to score")
    weights = np.asarray(CLASS_WEIGHTS)
    out: dict[str, float] = {}
    for g, group in enumerate(GROUPS):
        mask = (labels >= 0) & (LABEL_GROUP == g)[None, :]
        y = labels[mask]
        out[group] = weighted_log_loss(y, probs[mask], weights[y]) if y.size else np.nan
    y, q, w = any_severe_spinal_inputs(labels, probs)
    out["any_severe_spinal"] = weighted_log_loss(y, q, w) if y.size else np.nan
    terms = [out[p] * (ANY_SEVERE_SCALAR if p == "any_severe_spinal" else 1.0) for p in PARTS]
    defined = [t for t in terms if not np.isnan(t)]
    if len(defined) < len(terms):
        empty = [p for p in PARTS if np.isnan(out[p])]
        warnings.warn(f"metric: no labelled rows for {empty}; total = mean of the other parts",
                      stacklevel=2)
    out["total"] = float(np.mean(defined))
    return {k: out[k] for k in ("total", *PARTS)}


def labels_to_codes(labels_wide: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Wide labels (study_id + 25 columns; int codes as `competition.load_train` gives, or
    grade strings / NaN) -> (study_ids (N,) int64, codes (N, 25) int64)."""
    missing = [c for c in ("study_id", *LABEL_COLUMNS) if c not in labels_wide.columns]
    if missing:
        raise ValueError(f"labels: missing columns {missing}")
    study_ids = labels_wide["study_id"].to_numpy()
    if study_ids.dtype.kind not in "iu":
        raise ValueError("labels: study_id must be integers")
    if len(set(study_ids.tolist())) != len(study_ids):
        raise ValueError("labels: duplicate study_id")
    codes = np.empty((len(labels_wide), N_LABELS), dtype=np.int64)
    for j, column in enumerate(LABEL_COLUMNS):
        codes[:, j] = _grade_codes(labels_wide[column], column, study_ids)
    return study_ids.astype(np.int64), codes


def _grade_codes(values: pd.Series, column: str, study_ids: np.ndarray) -> np.ndarray:
    """One label column (int codes, grade strings, NaN / '' = unlabelled) -> (N,) codes."""
    lookup = {**GRADE_INDEX, "": -1}
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        codes = values.fillna(-1).to_numpy(dtype=np.float64)
    else:
        codes = np.array([-1 if pd.isna(v) else lookup.get(str(v).strip(), np.nan)
                          for v in values], dtype=np.float64)
    bad = ~np.isin(codes, (-1, 0, 1, 2))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"labels: study {study_ids[i]}, {column}: unknown grade {values.iloc[i]!r}")
    return codes.astype(np.int64)


def submission_to_array(submission: pd.DataFrame, study_ids: Sequence[int]) -> np.ndarray:
    """Submission rows -> (N, 25, 3) float64 in `study_ids` x `LABEL_COLUMNS` order.

    Rejects missing columns, non-numeric / non-finite / negative values (naming the
    row_id), duplicate row_ids, and row_ids missing from or extra to the studies."""
    missing = [c for c in ("row_id", *SUBMISSION_COLUMNS) if c not in submission.columns]
    if missing:
        raise ValueError(f"submission: missing columns {missing}")
    rids = submission["row_id"].astype(str).str.strip()
    for column in SUBMISSION_COLUMNS:
        values = submission[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise ValueError(f"submission: column {column!r} must be numeric, got {values.dtype}")
        arr = values.to_numpy(dtype=np.float64)
        for bad, what in ((~np.isfinite(arr), "not finite"), (arr < 0, "negative")):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"submission: row_id {rids.iloc[i]}, {column}: {what} value {arr[i]}")
    dup = rids[rids.duplicated()]
    if len(dup):
        raise ValueError(f"submission: {len(dup)} duplicate row_ids, e.g. {dup.iloc[0]}")
    expected = [r for s in study_ids for r in row_ids(s)]
    have = set(rids)
    absent = [r for r in expected if r not in have]
    extra = sorted(have.difference(expected))
    if absent:
        raise ValueError(f"submission: {len(absent)} row_ids of the labels are missing, e.g. {absent[:3]}")
    if extra:
        raise ValueError(f"submission: {len(extra)} row_ids not in the labels, e.g. {extra[:3]}")
    table = submission.set_index(rids)[list(SUBMISSION_COLUMNS)].astype(np.float64)
    return table.loc[expected].to_numpy().reshape(len(study_ids), N_LABELS, len(SUBMISSION_COLUMNS))


def score(labels_wide_df: pd.DataFrame, submission_df: pd.DataFrame) -> dict[str, float]:
    """The metric of a submission (row_id, normal_mild, moderate, severe) against wide
    labels (train.csv format). Returns {total, spinal, foraminal, subarticular,
    any_severe_spinal}; raises ValueError on bad input."""
    study_ids, codes = labels_to_codes(labels_wide_df)
    probs = submission_to_array(submission_df, study_ids.tolist())
    return score_arrays(codes, probs)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (1 with the reason on stderr for bad input)."""
    from .competition import load_train

    parser = argparse.ArgumentParser(
        prog="python -m kernel_src.metric",
        description="Score a submission.csv against labels in train.csv's wide format.",
    )
    parser.add_argument("--labels", required=True, help="labels CSV (train.csv format)")
    parser.add_argument("--submission", required=True, help="submission CSV")
    args = parser.parse_args(argv)
    try:
        labels = load_train(args.labels)
        submission = pd.read_csv(args.submission)
        result = score(labels, submission)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for part in PARTS:
        print(f"{part}: {result[part]:.6f}")
    print(f"score: {result['total']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
