"""Everything about one phantom study except its pixels: anatomy, grades, series, quirks.

Quirks (names in `QUIRKS`) are drawn at random per study; `forced` turns one on, so that
any small generated set can be made to show every quirk (see `competition`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernel_src import schema
from kernel_src.synthetic.anatomy import Spine, landmarks_world, sample_spine
from kernel_src.synthetic.pathology import sample_grades
from kernel_src.synthetic.series import (
    AXIAL_LAYOUTS,
    SeriesPlan,
    number_instances,
    plan_axial_block,
    plan_sagittal,
)

QUIRKS: tuple[str, ...] = (
    "axial_multi_stack",     # several orientations inside one axial series
    "two_axial_series",      # the axial stacks split over two Axial T2 series
    "missing_series",        # one of the three series absent
    "reverse_instances",     # instance numbers against the spatial order
    "monochrome1",           # PhotometricInterpretation MONOCHROME1
    "rescale",               # RescaleSlope / RescaleIntercept not identity
    "non_square",            # Rows != Columns
    "stir",                  # the Sagittal T2/STIR series is a STIR
    "missing_labels",        # empty cells in train.csv (train split only)
    "missing_coordinates",   # labelled points without a coordinate row (train only)
)
TRAIN_ONLY = ("missing_labels", "missing_coordinates")
PROBABILITY = {
    "axial_multi_stack": 0.4, "two_axial_series": 0.12, "missing_series": 0.05,
    "reverse_instances": 0.3, "monochrome1": 0.12, "rescale": 0.25, "non_square": 0.3,
    "stir": 0.25, "missing_labels": 0.12, "missing_coordinates": 0.12,
}
RESCALES = ((2.0, 0.0), (0.5, -100.0), (1.5, -1024.0), (0.25, 0.0))


@dataclass
class StudyPlan:
    """study_id; grades (25,) int; label_mask / coordinate_mask (25,) bool (False =
    missing); landmarks (25, 3) world mm; series in writing order; quirks that occurred."""

    study_id: int
    spine: Spine
    grades: np.ndarray
    label_mask: np.ndarray
    coordinate_mask: np.ndarray
    landmarks: np.ndarray
    series: list[SeriesPlan]
    quirks: frozenset[str]


def _draw_quirks(rng: np.random.Generator, train: bool, forced: str | None,
                 clean: bool) -> set[str]:
    if clean:
        return set()
    drawn = {q for q in QUIRKS if rng.random() < PROBABILITY[q]}
    if forced is not None:
        drawn.add(forced)
    return drawn - set(TRAIN_ONLY) if not train else drawn


def _axial_series(rng, spine, landmarks, size, quirks, new_id) -> list[SeriesPlan]:
    """One or two Axial T2 series; several stacks when `axial_multi_stack`."""
    layout = "single"
    if "axial_multi_stack" in quirks or "two_axial_series" in quirks:
        layout = "per_level" if rng.random() < 0.5 else "two_stacks"
    square = "non_square" not in quirks or rng.random() < 0.5
    blocks = [plan_axial_block(rng, spine, landmarks, lv, size, square)
              for lv in AXIAL_LAYOUTS[layout]]
    if "two_axial_series" in quirks:
        cut = 1 if len(blocks) == 2 else 3
        groups = [blocks[:cut], blocks[cut:]]
        if "axial_multi_stack" in quirks and layout == "two_stacks":
            groups = [blocks, [plan_axial_block(rng, spine, landmarks, (3, 4), size, square)]]
    else:
        groups = [blocks]
    return [SeriesPlan(new_id(), schema.AXIAL_T2, "T2", g) for g in groups]


def _series_plans(rng, spine, landmarks, size, quirks, new_id) -> list[SeriesPlan]:
    square = "non_square" not in quirks
    t1 = SeriesPlan(new_id(), schema.SAG_T1, "T1",
                    [plan_sagittal(rng, spine, landmarks, size, square)])
    t2 = SeriesPlan(new_id(), schema.SAG_T2, "STIR" if "stir" in quirks else "T2",
                    [plan_sagittal(rng, spine, landmarks, size, square or rng.random() < 0.5)])
    plans = [t1, t2, *_axial_series(rng, spine, landmarks, size, quirks, new_id)]
    if "missing_series" in quirks:
        drop = schema.SERIES_DESCRIPTIONS[int(rng.integers(3))]
        plans = [p for p in plans if p.description != drop]
    return plans


def _storage_quirks(rng, plans: list[SeriesPlan], quirks: set[str]) -> None:
    """Gain, MONOCHROME1, rescale and instance order per series (at least one when drawn)."""
    for name, attr in (("monochrome1", "monochrome1"), ("rescale", "rescale"),
                       ("reverse_instances", "reversed_instances")):
        if name in quirks:
            chosen = {int(rng.integers(len(plans)))} | {
                i for i in range(len(plans)) if rng.random() < 0.3}
            for i in chosen:
                value = RESCALES[int(rng.integers(len(RESCALES)))] if name == "rescale" else True
                setattr(plans[i], attr, value)
    for p in plans:
        p.gain = float(rng.uniform(400.0, 2500.0))
        number_instances(p, cranial_first=p.description == schema.AXIAL_T2)


def _masks(rng, quirks: set[str]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.ones(schema.N_LABELS, dtype=bool)
    coords = np.ones(schema.N_LABELS, dtype=bool)
    if "missing_labels" in quirks:
        labels[rng.choice(schema.N_LABELS, int(rng.integers(1, 5)), replace=False)] = False
    if "missing_coordinates" in quirks:
        coords[rng.choice(schema.N_LABELS, int(rng.integers(1, 4)), replace=False)] = False
    return labels, coords & labels


def plan_study(rng: np.random.Generator, study_id: int, size: int, *, train: bool,
               forced: str | None = None, clean: bool = False) -> StudyPlan:
    """Draw one study: grades, spine, series geometry and quirks (no pixels yet).

    clean: no quirk at all (used for the first study of each split, so that no series
    type is ever absent from a whole split).
    """
    grades, severity = sample_grades(rng)
    spine = sample_spine(rng, severity)
    landmarks = landmarks_world(spine)
    quirks = _draw_quirks(rng, train, forced, clean)
    used: set[int] = {study_id}

    def new_id() -> int:
        while (sid := int(rng.integers(1_000_000, 4_294_967_295))) in used:
            pass
        used.add(sid)
        return sid

    plans = _series_plans(rng, spine, landmarks, size, quirks, new_id)
    _storage_quirks(rng, plans, quirks)
    axial = [p for p in plans if p.description == schema.AXIAL_T2]
    occurred = set(quirks) - {"axial_multi_stack", "two_axial_series"}
    occurred |= {"axial_multi_stack"} if any(len(p.stacks) > 1 for p in axial) else set()
    occurred |= {"two_axial_series"} if len(axial) > 1 else set()
    labels, coords = _masks(rng, quirks)
    return StudyPlan(study_id, spine, grades, labels, coords, landmarks, plans,
                     frozenset(occurred))
