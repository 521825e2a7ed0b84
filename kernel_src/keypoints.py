"""The keypoint record that stage 1 produces and stage 2 consumes.

One point per condition-level (25, in `schema.LABEL_COLUMNS` order), in world millimetres
(DICOM patient coordinates), each with a confidence in [0, 1]. A point a model does not
estimate is NaN with confidence 0. `estimated_axes` says which world coordinates are real
estimates: a 2D sagittal model places a point on its input slice, so its lateral (slice)
coordinate is only that slice's position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .schema import LABEL_COLUMNS, N_LABELS


@dataclass
class Keypoints:
    world: np.ndarray = field(default_factory=lambda: np.full((N_LABELS, 3), np.nan))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(N_LABELS))
    source: list[str] = field(default_factory=lambda: [""] * N_LABELS)

    def __post_init__(self) -> None:
        self.world = np.asarray(self.world, dtype=np.float64).reshape(N_LABELS, 3)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(N_LABELS)
        if len(self.source) != N_LABELS:
            raise ValueError(f"Keypoints.source must have {N_LABELS} entries")

    @property
    def known(self) -> np.ndarray:
        """(25,) bool: the points that have a finite position."""
        return np.isfinite(self.world).all(axis=1)

    def set(self, index: int, world_xyz, confidence: float, source: str) -> None:
        self.world[index] = np.asarray(world_xyz, dtype=np.float64)
        self.confidence[index] = float(confidence)
        self.source[index] = source

    def merged(self, other: Keypoints) -> Keypoints:
        """Per point, the more confident of self and other (known beats unknown)."""
        out = Keypoints(self.world.copy(), self.confidence.copy(), list(self.source))
        take = other.known & (~self.known | (other.confidence > self.confidence))
        out.world[take] = other.world[take]
        out.confidence[take] = other.confidence[take]
        for i in np.flatnonzero(take):
            out.source[i] = other.source[i]
        return out

    def to_rows(self, study_id: int) -> list[dict]:
        """Long-format rows: study_id, label column, x, y, z (mm), confidence, source."""
        return [
            {"study_id": int(study_id), "label": col, "x": w[0], "y": w[1], "z": w[2],
             "confidence": c, "source": s}
            for col, w, c, s in zip(LABEL_COLUMNS, self.world, self.confidence, self.source,
                                    strict=True)
        ]


def merge_weighted(parts: Iterable[tuple[Keypoints, float]]) -> Keypoints:
    """Per point, the known point with the highest confidence x weight among `parts`
    ((Keypoints, weight) pairs; the weight is the stage-1 entry's manifest weight, e.g.
    its inverse held-out error, so confidences of different families need not be
    calibrated against each other). Ties keep the earlier part; confidences are kept."""
    out = Keypoints()
    best = np.full(N_LABELS, -np.inf)
    for part, weight in parts:
        score = part.confidence * float(weight)
        take = part.known & (score > best)
        out.world[take] = part.world[take]
        out.confidence[take] = part.confidence[take]
        best[take] = score[take]
        for i in np.flatnonzero(take):
            out.source[i] = part.source[i]
    return out
