"""Class priors, the submission writer and its validator.

The priors (25, 3) are per condition-level class frequencies of the training labels with
Laplace smoothing; they are saved as JSON keyed by label column and carried by the kernel
with its weights. Any study (or label row) without a usable prediction gets its prior, so
a submission always has every row, rows sum to 1 in float64, and nothing is NaN or inf.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import LABEL_COLUMNS, N_LABELS, SUBMISSION_COLUMNS, row_ids

N_CLASSES = len(SUBMISSION_COLUMNS)
SUM_TOLERANCE = 1e-6


def compute_priors(train_df: pd.DataFrame, alpha: float = 1.0) -> np.ndarray:
    """(25, 3) float64 class frequencies per label column of `train_df` (study_id + 25
    columns of grade codes 0/1/2, -1 = missing, as `competition.load_train` returns);
    missing labels are ignored and `alpha` is added to every count (no class is 0)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    counts = np.full((N_LABELS, N_CLASSES), float(alpha))
    for j, column in enumerate(LABEL_COLUMNS):
        if column not in train_df.columns:
            raise ValueError(f"priors: training labels lack column {column!r}")
        codes = train_df[column].to_numpy()
        if codes.dtype.kind not in "iu" or not np.isin(codes, (-1, 0, 1, 2)).all():
            raise ValueError(f"priors: column {column!r} must hold grade codes -1/0/1/2")
        counts[j] += np.bincount(codes[codes >= 0], minlength=N_CLASSES)
    return counts / counts.sum(axis=1, keepdims=True)


def check_priors(priors: np.ndarray, source: str = "priors") -> np.ndarray:
    """(25, 3) finite, >= 0, rows summing to 1 (within 1e-6) as float64; else ValueError."""
    arr = np.asarray(priors, dtype=np.float64)
    if arr.shape != (N_LABELS, N_CLASSES):
        raise ValueError(f"{source}: expected shape ({N_LABELS}, {N_CLASSES}), got {arr.shape}")
    ok = np.isfinite(arr).all(axis=1) & (arr >= 0).all(axis=1)
    ok &= np.abs(arr.sum(axis=1) - 1.0) <= SUM_TOLERANCE
    if not ok.all():
        j = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{source}: {LABEL_COLUMNS[j]}: {arr[j].tolist()} is not a probability row")
    return arr


def save_priors(path: str | Path, priors: np.ndarray) -> Path:
    """Write priors as JSON {label_column: {normal_mild, moderate, severe}}."""
    arr = check_priors(priors)
    data = {c: dict(zip(SUBMISSION_COLUMNS, map(float, row), strict=True))
            for c, row in zip(LABEL_COLUMNS, arr, strict=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_priors(path: str | Path) -> np.ndarray:
    """Read `save_priors` JSON -> (25, 3) float64; ValueError naming the file and key."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or set(data) != set(LABEL_COLUMNS):
        keys = set(data) if isinstance(data, dict) else set()
        raise ValueError(f"{path}: keys must be the 25 label columns; missing "
                         f"{sorted(set(LABEL_COLUMNS) - keys)[:3]}, extra {sorted(keys - set(LABEL_COLUMNS))[:3]}")
    rows = []
    for column in LABEL_COLUMNS:
        entry = data[column]
        if not isinstance(entry, dict) or set(entry) != set(SUBMISSION_COLUMNS):
            raise ValueError(f"{path}: {column}: expected keys {list(SUBMISSION_COLUMNS)}")
        rows.append([entry[k] for k in SUBMISSION_COLUMNS])
    return check_priors(np.array(rows, dtype=np.float64), source=str(path))


def fill_predictions(probs: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """(N, 25, 3) -> float64 rows summing to 1: rows with a NaN/inf entry or summing to 0
    take the prior of their label column; others are renormalised. Negative entries raise."""
    arr = np.array(probs, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (N_LABELS, N_CLASSES):
        raise ValueError(f"probabilities: expected shape (N, {N_LABELS}, {N_CLASSES}), got {arr.shape}")
    negative = np.isfinite(arr) & (arr < 0)
    if negative.any():
        s, j, k = np.argwhere(negative)[0]
        raise ValueError(f"probabilities: negative value at study index {s}, {LABEL_COLUMNS[j]}, "
                         f"{SUBMISSION_COLUMNS[k]}")
    total = arr.sum(axis=2, keepdims=True)
    missing = ~np.isfinite(arr).all(axis=2, keepdims=True) | ~(total > 0)
    filled = np.where(missing, check_priors(priors)[None], arr / np.where(missing, 1.0, total))
    return filled / filled.sum(axis=2, keepdims=True)


def build_submission(
    study_ids: Sequence[int],
    probs: np.ndarray | Mapping[int, np.ndarray] | None,
    priors: np.ndarray,
) -> pd.DataFrame:
    """Submission rows (row_id + 3 columns), study by study in `study_ids` order, the 25
    rows of a study in `LABEL_COLUMNS` order. `probs` is (N, 25, 3) aligned with
    `study_ids`, or a mapping study_id -> (25, 3) (absent studies get the priors), or None."""
    ids = [int(s) for s in study_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("study_ids: duplicate study id")
    if probs is None or isinstance(probs, Mapping):
        given = probs or {}
        nan = np.full((N_LABELS, N_CLASSES), np.nan)
        probs = np.stack([np.asarray(given.get(s, nan), dtype=np.float64) for s in ids]) \
            if ids else np.empty((0, N_LABELS, N_CLASSES))
    probs = np.asarray(probs)
    if probs.shape[:1] != (len(ids),):
        raise ValueError(f"probabilities: {probs.shape[0]} studies for {len(ids)} study ids")
    filled = fill_predictions(probs, priors).reshape(-1, N_CLASSES)
    df = pd.DataFrame(filled, columns=list(SUBMISSION_COLUMNS))
    df.insert(0, "row_id", [r for s in ids for r in row_ids(s)])
    return df


def validate_submission(df: pd.DataFrame, study_ids: Sequence[int]) -> None:
    """Raise ValueError unless `df` has exactly the columns row_id, normal_mild, moderate,
    severe; every row_id of every study exactly once and no other; numeric finite values
    >= 0; rows summing to 1 within 1e-6."""
    expected_columns = ["row_id", *SUBMISSION_COLUMNS]
    if sorted(map(str, df.columns)) != sorted(expected_columns) or df.columns.duplicated().any():
        raise ValueError(f"submission: columns {list(df.columns)}, expected {expected_columns}")
    rids = df["row_id"].astype(str)
    dup = rids[rids.duplicated()]
    if len(dup):
        raise ValueError(f"submission: {len(dup)} duplicate row_ids, e.g. {dup.iloc[0]}")
    expected = {r for s in study_ids for r in row_ids(s)}
    absent, extra = expected.difference(rids), set(rids).difference(expected)
    if absent or extra:
        raise ValueError(f"submission: {len(absent)} row_ids missing (e.g. {sorted(absent)[:3]}), "
                         f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})")
    values = df[list(SUBMISSION_COLUMNS)]
    if not all(pd.api.types.is_float_dtype(t) or pd.api.types.is_integer_dtype(t) for t in values.dtypes):
        if len(values):  # a header-only CSV reads back as text columns
            raise ValueError(f"submission: non-numeric columns {values.dtypes.to_dict()}")
    arr = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(arr).all(axis=1) | (arr < 0).any(axis=1)
    bad |= ~(np.abs(arr.sum(axis=1) - 1.0) <= SUM_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"submission: row_id {rids.iloc[i]}: {arr[i].tolist()} is not finite, "
                         f">= 0 and summing to 1 (+-{SUM_TOLERANCE})")


def write_submission(
    path: str | Path,
    study_ids: Sequence[int],
    probs: np.ndarray | Mapping[int, np.ndarray] | None,
    priors: np.ndarray,
) -> pd.DataFrame:
    """Build, validate and write `submission.csv` (atomically: temp file then rename).
    See `build_submission` for `probs`. Returns the written DataFrame."""
    df = build_submission(study_ids, probs, priors)
    validate_submission(df, study_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return df
