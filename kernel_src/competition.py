"""Loaders for the competition CSV files, with validation.

Every loader reads the file as text, checks it against the contract in `schema` and
returns a clean DataFrame with integer ids and the kit's snake_case names. Any fault
raises `DataError` whose message names the file, the CSV line (1-based, the header is
line 1) and the column. Header-only files load as empty frames (the visible Kaggle test
set has a single study; the scored one is swapped in at run time).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import (
    GRADE_INDEX,
    LABEL_COLUMNS,
    SERIES_DESCRIPTIONS,
    SUBMISSION_COLUMNS,
    TITLE_TO_CONDITION,
    TITLE_TO_LEVEL,
    parse_row_id,
)

MISSING_GRADE = -1  # code of an empty cell in train.csv
_INT_RE = re.compile(r"\d+")

TRAIN_COLUMNS: tuple[str, ...] = ("study_id", *LABEL_COLUMNS)
COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "condition", "level", "x", "y",
)
SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
SAMPLE_COLUMNS: tuple[str, ...] = ("row_id", *SUBMISSION_COLUMNS)


class DataError(ValueError):
    """A competition file breaks the contract; the message names file, line and column."""


def _error(path: str | Path, line: int, column: str, message: str) -> DataError:
    return DataError(f"{path}: line {line}, column {column!r}: {message}")


def _lines(df: pd.DataFrame) -> np.ndarray:
    """1-based CSV line of each row (header = line 1; rows keep their read-time index)."""
    return df.index.to_numpy() + 2


def read_text_csv(path: str | Path, required: Iterable[str]) -> pd.DataFrame:
    """Read a CSV as strings (empty cell = ''), drop blank lines, check required columns."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: line 1: empty file, no header") from exc
    for column in required:
        if column not in df.columns:
            raise _error(path, 1, column, f"missing column (header has {list(df.columns)})")
    blank = (df == "").all(axis=1)
    return df.loc[~blank]


def parse_ids(df: pd.DataFrame, path: str | Path, column: str) -> np.ndarray:
    """Non-negative integer ids of `column` as int64; else DataError at the first bad row."""
    values = df[column].str.strip()
    ok = values.str.fullmatch(_INT_RE).to_numpy(dtype=bool)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise _error(path, _lines(df)[i], column, f"non-integer id {df[column].iloc[i]!r} (expected digits only)")
    return values.astype(np.int64).to_numpy()


def parse_choice(
    df: pd.DataFrame, path: str | Path, column: str, mapping: Mapping[str, object], what: str
) -> pd.Series:
    """Map each stripped cell of `column` through `mapping` (object Series, same index);
    unknown values raise DataError."""
    out = []
    for line, raw in zip(_lines(df), df[column], strict=True):
        key = raw.strip()
        if key not in mapping:
            raise _error(path, line, column, f"unknown {what} {raw!r} (expected one of {list(mapping)})")
        out.append(mapping[key])
    return pd.Series(out, index=df.index, dtype=object)


def parse_floats(df: pd.DataFrame, path: str | Path, column: str) -> np.ndarray:
    """Finite float64 values of `column`; else DataError at the first bad row."""
    values = pd.to_numeric(df[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _error(path, _lines(df)[i], column, f"not a finite number {df[column].iloc[i]!r}")
    return values


def check_unique(df: pd.DataFrame, path: str | Path, key: list[str], what: str) -> None:
    """Raise DataError at the first row whose `key` columns repeat an earlier row."""
    dup = df.duplicated(subset=key, keep=False).to_numpy()
    if not dup.any():
        return
    lines = _lines(df)[dup]
    rows = df.loc[dup, key]
    first_key = tuple(rows.iloc[0])
    same = (rows == pd.Series(first_key, index=key)).all(axis=1).to_numpy()
    earlier, later = lines[same][:2]
    raise _error(
        path, int(later), key[-1] if len(key) == 1 else "+".join(key),
        f"duplicate {what} {first_key} (first seen on line {earlier})",
    )


def load_train(path: str | Path) -> pd.DataFrame:
    """`train.csv` (wide) -> study_id (int64) + the 25 `LABEL_COLUMNS` as int64 grade codes.

    Codes: 0 Normal/Mild, 1 Moderate, 2 Severe, -1 empty (unlabelled). Extra columns are
    dropped. Also reads truth files in the same format (phantom `truth/test_labels.csv`).
    """
    df = read_text_csv(path, TRAIN_COLUMNS)
    out = pd.DataFrame({"study_id": parse_ids(df, path, "study_id")})
    check_unique(out.set_axis(df.index), path, ["study_id"], "study")
    grades = {**GRADE_INDEX, "": MISSING_GRADE}
    for column in LABEL_COLUMNS:
        out[column] = parse_choice(df, path, column, grades, "grade").to_numpy(dtype=np.int64)
    return out


def load_label_coordinates(path: str | Path) -> pd.DataFrame:
    """`train_label_coordinates.csv` -> study_id, series_id, instance_number (int64),
    condition, level (snake_case, e.g. `spinal_canal_stenosis`, `l1_l2`), x, y (float64
    pixel (col, row) on that instance) and `label` = `{condition}_{level}` (a LABEL_COLUMN).
    """
    df = read_text_csv(path, COORDINATE_COLUMNS)
    out = pd.DataFrame(index=df.index)
    for column in ("study_id", "series_id", "instance_number"):
        out[column] = parse_ids(df, path, column)
    out["condition"] = parse_choice(df, path, "condition", TITLE_TO_CONDITION, "condition")
    out["level"] = parse_choice(df, path, "level", TITLE_TO_LEVEL, "level")
    out["x"] = parse_floats(df, path, "x")
    out["y"] = parse_floats(df, path, "y")
    out["label"] = out["condition"] + "_" + out["level"]
    key = ["study_id", "series_id", "instance_number", "condition", "level"]
    check_unique(out, path, key, "coordinate")
    return out.reset_index(drop=True)


def load_series_descriptions(path: str | Path) -> pd.DataFrame:
    """`{train,test}_series_descriptions.csv` -> study_id, series_id (int64),
    series_description (one of `schema.SERIES_DESCRIPTIONS`)."""
    df = read_text_csv(path, SERIES_COLUMNS)
    out = pd.DataFrame(index=df.index)
    out["study_id"] = parse_ids(df, path, "study_id")
    out["series_id"] = parse_ids(df, path, "series_id")
    choices = {d: d for d in SERIES_DESCRIPTIONS}
    out["series_description"] = parse_choice(
        df, path, "series_description", choices, "series description"
    )
    check_unique(out, path, ["study_id", "series_id"], "series")
    return out.reset_index(drop=True)


def load_sample_submission(path: str | Path) -> pd.DataFrame:
    """`sample_submission.csv` -> row_id, normal_mild, moderate, severe (float64) and
    study_id (int64, parsed from row_id). Row ids must parse and be unique."""
    df = read_text_csv(path, SAMPLE_COLUMNS)
    study_ids = []
    for line, rid in zip(_lines(df), df["row_id"], strict=True):
        try:
            study_ids.append(parse_row_id(rid.strip())[0])
        except ValueError as exc:
            raise _error(path, line, "row_id", str(exc)) from exc
    out = pd.DataFrame({"row_id": df["row_id"].str.strip()}, index=df.index)
    check_unique(out, path, ["row_id"], "row_id")
    for column in SUBMISSION_COLUMNS:
        out[column] = parse_floats(df, path, column)
    out["study_id"] = np.asarray(study_ids, dtype=np.int64)
    return out.reset_index(drop=True)


def sample_study_ids(sample: pd.DataFrame) -> list[int]:
    """Study ids of a loaded sample submission, in order of first appearance."""
    return [int(s) for s in pd.unique(sample["study_id"])]


def series_by_study(descriptions: pd.DataFrame) -> dict[int, dict[int, str]]:
    """study_id -> {series_id: description}, the form `dicom.read_study` takes."""
    out: dict[int, dict[int, str]] = {}
    for study, series, desc in descriptions[list(SERIES_COLUMNS)].itertuples(index=False):
        out.setdefault(int(study), {})[int(series)] = desc
    return out
