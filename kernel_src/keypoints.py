"""The keypoint record that stage 1 produces and stage 2 consumes.

One point per condition-level (25, in `schema.LABEL_COLUMNS` order), in world millimetres
(DICOM patient coordinates), each with a confidence in [0, 1]. A point a model does not
estimate is NaN with confidence 0.

Planar points: a 2D sagittal model places a point on its input slice, so the point's
coordinate along that slice's normal is only the slice's position, not an estimate. Such
a point carries the unit normal in `normal` (NaN for full 3D estimates). When points are
merged (`merge_weighted`), a planar point that wins keeps its in-plane position and takes
its depth along the normal from the best 3D estimate of the same label, if there is one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .schema import LABEL_COLUMNS, N_LABELS


def _nan3() -> np.ndarray:
    return np.full((N_LABELS, 3), np.nan)


@dataclass
class Keypoints:
    world: np.ndarray = field(default_factory=_nan3)
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(N_LABELS))
    source: list[str] = field(default_factory=lambda: [""] * N_LABELS)
    normal: np.ndarray = field(default_factory=_nan3)

    def __post_init__(self) -> None:
        self.world = np.asarray(self.world, dtype=np.float64).reshape(N_LABELS, 3)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(N_LABELS)
        self.normal = np.asarray(self.normal, dtype=np.float64).reshape(N_LABELS, 3)
        if len(self.source) != N_LABELS:
            raise ValueError(f"Keypoints.source must have {N_LABELS} entries")

    @property
    def known(self) -> np.ndarray:
        """(25,) bool: the points that have a finite position."""
        return np.isfinite(self.world).all(axis=1)

    @property
    def planar(self) -> np.ndarray:
        """(25,) bool: points whose depth along `normal` is not estimated."""
        return np.isfinite(self.normal).all(axis=1)

    def set(self, index: int, world_xyz, confidence: float, source: str,
            normal=None) -> None:
        """One point; `normal` (3,) marks it planar (depth along it not estimated)."""
        self.world[index] = np.asarray(world_xyz, dtype=np.float64)
        self.confidence[index] = float(confidence)
        self.source[index] = source
        self.normal[index] = np.nan if normal is None else np.asarray(normal, np.float64)

    def copy(self) -> Keypoints:
        return Keypoints(self.world.copy(), self.confidence.copy(), list(self.source),
                         self.normal.copy())

    def take(self, other: Keypoints, mask: np.ndarray) -> None:
        """Copy other's points where mask (25,) is True."""
        self.world[mask] = other.world[mask]
        self.confidence[mask] = other.confidence[mask]
        self.normal[mask] = other.normal[mask]
        for i in np.flatnonzero(mask):
            self.source[i] = other.source[i]

    def merged(self, other: Keypoints) -> Keypoints:
        """`merge_weighted` of self and other with equal weights (ties keep self)."""
        return merge_weighted([(self, 1.0), (other, 1.0)])

    def to_rows(self, study_id: int) -> list[dict]:
        """Long-format rows: study_id, label column, x, y, z (mm), confidence, source, and
        nx, ny, nz (the normal of a planar point, else NaN)."""
        return [
            {"study_id": int(study_id), "label": col, "x": w[0], "y": w[1], "z": w[2],
             "confidence": c, "source": s, "nx": n[0], "ny": n[1], "nz": n[2]}
            for col, w, c, s, n in zip(LABEL_COLUMNS, self.world, self.confidence,
                                       self.source, self.normal, strict=True)
        ]


def _best(parts: list[tuple[Keypoints, float]], planar: bool) -> tuple[Keypoints, np.ndarray]:
    """Per point, the known (planar or 3D) point of highest confidence x weight."""
    out, best = Keypoints(), np.full(N_LABELS, -np.inf)
    for part, weight in parts:
        score = part.confidence * float(weight)
        take = part.known & (part.planar == planar) & (score > best)
        out.take(part, take)
        best[take] = score[take]
    return out, best


def merge_weighted(parts: Iterable[tuple[Keypoints, float]]) -> Keypoints:
    """Per point, the known point with the highest confidence x weight among `parts`
    ((Keypoints, weight) pairs; the weight is the stage-1 entry's manifest weight, e.g.
    its inverse held-out error, so confidences of different families need not be
    calibrated against each other). Ties keep the earlier part; confidences are kept.
    A winning planar point takes its depth along its normal from the best 3D point of
    the same label (source "planar+3d"), and stays planar when there is none."""
    parts = list(parts)
    out, score3d = _best(parts, planar=False)
    flat, score2d = _best(parts, planar=True)
    win = flat.known & (score2d > score3d)
    depth = win & out.known
    n = flat.normal[depth]
    shift = ((out.world[depth] - flat.world[depth]) * n).sum(-1, keepdims=True) * n
    sources = {i: f"{flat.source[i]}+{out.source[i]}" for i in np.flatnonzero(depth)}
    out.take(flat, win)
    out.world[depth] += shift
    out.normal[depth] = np.nan
    for i, s in sources.items():
        out.source[i] = s
    return out
