"""Stage-2 training data: studies, labels, keypoints, and the augmenting dataset.

A `StudyRecord` holds one cached study (uint8 stacks, `preprocess` cache), its (25,) grade
codes from train.csv (-1 = unlabelled), its ground-truth keypoints (train_label_coordinates
mapped to world mm) and, when given, stage-1 out-of-fold predicted keypoints.

`Stage2Dataset` serves one study per item for any stage-2 family (protocol in
`models/grade_common.py`): it feeds the ground-truth points or the predicted ones (half and
half by default; predicted points fall back to the truth point by point), lets the family
crop with geometric augmentation (keypoint jitter, rotation, zoom), mirrors the study
left <-> right with its labels swapped, and applies intensity augmentation (contrast,
brightness, blur) to the image arrays. Items are dicts of tensors plus "target" (*grid)
int64 for the family's outputs.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .. import geometry, preprocess
from ..competition import load_label_coordinates, load_train
from ..keypoints import Keypoints
from ..models.grade_common import grid_targets, mirror_labels
from ..schema import LABEL_COLUMNS
from ..study import Study


@dataclass
class StudyRecord:
    study_id: int
    study: Study
    labels: np.ndarray             # (25,) int64 grade codes, -1 unlabelled
    truth: Keypoints               # ground-truth points (world mm)
    predicted: Keypoints | None = None  # stage-1 out-of-fold points, if any


def truth_keypoints(study: Study, coords: pd.DataFrame,
                    shapes: dict[tuple[int, int], tuple[int, int]] | None = None) -> Keypoints:
    """Keypoints from one study's rows of `competition.load_label_coordinates` (column
    `label` = label column). Several rows for one label (rare) are averaged."""
    kp = Keypoints()
    if coords.empty:
        return kp
    world = geometry.label_points_world(study, coords, shapes)
    for label, rows in coords.groupby("label").indices.items():
        points = world[rows][np.isfinite(world[rows]).all(axis=1)]
        if len(points):
            kp.set(LABEL_COLUMNS.index(label), points.mean(axis=0), 1.0, "truth")
    return kp


def read_keypoints_csv(path: str | Path) -> dict[int, Keypoints]:
    """Stage-1 keypoints CSV (`Keypoints.to_rows`: study_id, label, x, y, z, confidence,
    source, optional nx, ny, nz of planar points) -> study_id -> Keypoints. Unknown label names are an error naming the row."""
    table = pd.read_csv(path)
    missing = {"study_id", "label", "x", "y", "z", "confidence"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    out: dict[int, Keypoints] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        if row.label not in LABEL_COLUMNS:
            raise ValueError(f"{path}: row {i + 2}: unknown label {row.label!r}")
        kp = out.setdefault(int(row.study_id), Keypoints())
        source = getattr(row, "source", "stage1")
        normal = tuple(getattr(row, k, np.nan) for k in ("nx", "ny", "nz"))
        kp.set(LABEL_COLUMNS.index(row.label), (row.x, row.y, row.z),
               0.0 if pd.isna(row.confidence) else row.confidence,
               "" if pd.isna(source) else str(source),
               normal if np.isfinite(normal).all() else None)
    return out


def read_keypoints(sources: str | Path | Sequence[str | Path]) -> dict[int, Keypoints]:
    """Stage-1 keypoints from one or several CSV paths or glob patterns (e.g.
    "runs/phantom/sag2d_t2/*/oof_fold*.csv"), merged per point (most confident wins)."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    paths = []
    for source in map(str, sources):
        found = [Path(f) for f in sorted(glob.glob(source))] if glob.has_magic(source) \
            else [Path(source)]
        if not found:
            raise FileNotFoundError(f"no stage-1 keypoints file matches {source!r}")
        paths += found
    merged: dict[int, Keypoints] = {}
    for path in paths:
        for sid, kp in read_keypoints_csv(path).items():
            merged[sid] = merged[sid].merged(kp) if sid in merged else kp
    return merged


def ensure_cache(data_dir: str | Path, cache_dir: str | Path, size: int | None) -> pd.DataFrame:
    """The train cache index, building the cache first when it is missing."""
    try:
        return preprocess.read_index(cache_dir, "train")
    except FileNotFoundError:
        preprocess.build_cache(data_dir, cache_dir, "train", size)
        return preprocess.read_index(cache_dir, "train")


def load_records(data_dir: str | Path, cache_dir: str | Path, study_ids: Sequence[int],
                 keypoints_csv=None, size: int | None = None) -> list[StudyRecord]:
    """StudyRecords of `study_ids` (in that order) from DATA/train.csv,
    DATA/train_label_coordinates.csv, the cache (built when missing) and the stage-1
    keypoints (`read_keypoints` sources, or None)."""
    data_dir = Path(data_dir)
    train = load_train(data_dir / "train.csv").set_index("study_id")
    coords = load_label_coordinates(data_dir / "train_label_coordinates.csv")
    index = ensure_cache(data_dir, cache_dir, size)
    predicted = read_keypoints(keypoints_csv) if keypoints_csv else {}
    by_study = dict(tuple(coords.groupby("study_id")))
    records = []
    for sid in study_ids:
        sid = int(sid)
        if sid not in train.index:
            raise KeyError(f"{data_dir / 'train.csv'}: no row for study {sid}")
        study = preprocess.load_cached_study(cache_dir, "train", sid, index)
        rows = by_study.get(sid, coords.iloc[:0])
        truth = truth_keypoints(study, rows, preprocess.source_shapes(index, sid))
        labels = train.loc[sid, list(LABEL_COLUMNS)].to_numpy(dtype=np.int64)
        records.append(StudyRecord(sid, study, labels, truth, predicted.get(sid)))
    return records


def mixed_keypoints(record: StudyRecord, use_predicted: bool) -> Keypoints:
    """The predicted points where known (truth elsewhere) when `use_predicted`, else truth."""
    if not use_predicted or record.predicted is None:
        return record.truth
    return record.truth.merged(Keypoints(record.predicted.world,
                                         np.full(len(LABEL_COLUMNS), 2.0),
                                         list(record.predicted.source)))


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation of the stage-2 dataset (geometric jitter is the family's)."""

    p_predicted: float = 0.5    # share of items fed stage-1 points (when available)
    p_mirror: float = 0.5       # left <-> right mirror (labels swapped), if the family can
    contrast: float = 0.2       # multiply by 1 +- contrast around the mean
    brightness: float = 0.1     # add +- brightness (pixel values are in [0, 1])
    p_blur: float = 0.2         # Gaussian blur, sigma 0.5..1 px


def intensity_augment(image: np.ndarray, rng: np.random.Generator, aug: AugConfig) -> np.ndarray:
    """(..., H, W) float32 in [0, 1] -> augmented copy, clipped to [0, 1]."""
    mean = float(image.mean())
    out = (image - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
    out = out + rng.uniform(-aug.brightness, aug.brightness)
    if rng.random() < aug.p_blur:
        flat = out.reshape(-1, *out.shape[-2:])
        sigma = rng.uniform(0.5, 1.0)
        flat = np.stack([cv2.GaussianBlur(p, (0, 0), sigma) for p in flat])
        out = flat.reshape(out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def is_image(name: str, value: np.ndarray) -> bool:
    """Image arrays of a family's inputs: float, >= 3 dims, not a validity flag."""
    return value.dtype.kind == "f" and value.ndim >= 3 and "valid" not in name


class Stage2Dataset(Dataset):
    """One study per item: family inputs (tensors) + "target" (*grid) int64.

    aug None = validation style (truth points, no augmentation, deterministic).
    """

    def __init__(self, family, config, records: Sequence[StudyRecord],
                 aug: AugConfig | None = None, seed: int = 0) -> None:
        self.family, self.config, self.records = family, config, list(records)
        self.aug, self.seed, self.calls = aug, int(seed), 0
        self.label_indices = np.asarray(family.label_indices(config))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        record = self.records[i]
        self.calls += 1
        rng = None if self.aug is None else np.random.default_rng([self.seed, i, self.calls])
        use_predicted = rng is not None and rng.random() < self.aug.p_predicted
        keypoints = mixed_keypoints(record, use_predicted)
        inputs = self.family.prepare_inputs(self.config, record.study, keypoints, rng=rng)
        labels = record.labels
        if rng is not None and hasattr(self.family, "mirror_inputs") \
                and rng.random() < self.aug.p_mirror:
            inputs, labels = self.family.mirror_inputs(self.config, inputs), mirror_labels(labels)
        if rng is not None:
            inputs = {k: intensity_augment(v, rng, self.aug) if is_image(k, v) else v
                      for k, v in inputs.items()}
        item = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in inputs.items()}
        item["target"] = torch.as_tensor(grid_targets(labels, self.label_indices))
        return item
