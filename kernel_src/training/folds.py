"""Study-level cross-validation folds, made once, saved as CSV, reused by every model.

Every model of both stages reads the same `runs/<name>/folds.csv` (columns study_id, fold),
so out-of-fold predictions of stage 1 are truly out of fold for stage 2 as well.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd


def make_folds(study_ids: Iterable[int], n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each unique study to one of `n_folds` folds (sizes differ by at most one).

    Deterministic in (set of study ids, n_folds, seed); order of `study_ids` is irrelevant.
    Returns DataFrame (study_id int64, fold int64) sorted by study_id.
    """
    ids = np.unique(np.asarray(list(study_ids), dtype=np.int64))
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} studies cannot fill {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    fold = np.empty(len(ids), dtype=np.int64)
    fold[order] = np.arange(len(ids)) % n_folds
    return pd.DataFrame({"study_id": ids, "fold": fold})


def load_or_make_folds(path: str | Path, study_ids: Iterable[int], n_folds: int = 5,
                       seed: int = 42) -> pd.DataFrame:
    """Read folds from `path` if it exists, else make them and save them there.

    An existing file must cover every study in `study_ids` and use `n_folds` folds;
    otherwise ValueError names the file and the problem (delete it to start over).
    """
    path = Path(path)
    ids = set(int(s) for s in study_ids)
    if path.is_file():
        folds = pd.read_csv(path)
        missing_cols = {"study_id", "fold"} - set(folds.columns)
        if missing_cols:
            raise ValueError(f"{path}: missing column(s) {sorted(missing_cols)}")
        missing = sorted(ids - set(folds["study_id"].astype(int)))
        if missing:
            raise ValueError(f"{path}: {len(missing)} studies have no fold "
                             f"(first: {missing[:5]}); delete the file to remake folds")
        found = int(folds["fold"].max()) + 1
        if found != n_folds:
            raise ValueError(f"{path}: has {found} folds, {n_folds} asked")
        return folds.astype({"study_id": np.int64, "fold": np.int64})
    folds = make_folds(ids, n_folds, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    folds.to_csv(tmp, index=False)
    tmp.replace(path)
    return folds


def split(folds: pd.DataFrame, fold: int, study_ids: Iterable[int] | None = None
          ) -> tuple[list[int], list[int]]:
    """(train study ids, valid study ids) for `fold`, optionally restricted to `study_ids`."""
    if fold not in set(folds["fold"]):
        raise ValueError(f"fold {fold} not in folds (have {sorted(set(folds['fold']))})")
    table = folds
    if study_ids is not None:
        table = folds[folds["study_id"].isin(set(int(s) for s in study_ids))]
    train = sorted(int(s) for s in table.loc[table["fold"] != fold, "study_id"])
    valid = sorted(int(s) for s in table.loc[table["fold"] == fold, "study_id"])
    return train, valid
