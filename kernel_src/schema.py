"""The competition's names: conditions, levels, label columns, grades, series, row ids.

One name for each thing everywhere: condition and level names as in `train.csv`'s
columns (`spinal_canal_stenosis`, `l1_l2`), Title Case forms as in
`train_label_coordinates.csv` (`Spinal Canal Stenosis`, `L1/L2`), series descriptions as
in the `*_series_descriptions.csv` files.

Array order used across the kit: a (25, ...) array is indexed by `LABEL_COLUMNS`, which
is condition-major: index = condition_index * 5 + level_index.
"""

from __future__ import annotations

CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")

CONDITION_TITLES: dict[str, str] = {
    c: " ".join(w.capitalize() for w in c.split("_")) for c in CONDITIONS
}
TITLE_TO_CONDITION: dict[str, str] = {t: c for c, t in CONDITION_TITLES.items()}
LEVEL_TITLES: dict[str, str] = {lv: lv.upper().replace("_", "/") for lv in LEVELS}
TITLE_TO_LEVEL: dict[str, str] = {t: lv for lv, t in LEVEL_TITLES.items()}

LABEL_COLUMNS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)
N_CONDITIONS, N_LEVELS, N_LABELS = len(CONDITIONS), len(LEVELS), len(LABEL_COLUMNS)

GRADES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
GRADE_INDEX: dict[str, int] = {g: i for i, g in enumerate(GRADES)}
SUBMISSION_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

# Condition groups of the metric: the group is the word found in the row_id.
GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
CONDITION_GROUP: dict[str, str] = {
    c: next(g for g in GROUPS if g in c) for c in CONDITIONS
}

SAG_T1, SAG_T2, AXIAL_T2 = "Sagittal T1", "Sagittal T2/STIR", "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAG_T1, SAG_T2, AXIAL_T2)
# The series on which each condition is annotated (and mostly visible).
CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": SAG_T2,
    "left_neural_foraminal_narrowing": SAG_T1,
    "right_neural_foraminal_narrowing": SAG_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}

COMPETITION_SLUG = "rsna-2024-lumbar-spine-degenerative-classification"


def label_index(condition: str, level: str) -> int:
    """Index of (condition, level) in `LABEL_COLUMNS`."""
    return CONDITIONS.index(condition) * N_LEVELS + LEVELS.index(level)


def row_id(study_id: int, condition: str, level: str) -> str:
    """`{study_id}_{condition}_{level}` as in `sample_submission.csv`."""
    return f"{int(study_id)}_{condition}_{level}"


def row_ids(study_id: int) -> list[str]:
    """The 25 row ids of one study, in `LABEL_COLUMNS` order."""
    return [f"{int(study_id)}_{col}" for col in LABEL_COLUMNS]


def parse_row_id(rid: str) -> tuple[int, str, str]:
    """Inverse of `row_id`: `'123_spinal_canal_stenosis_l1_l2'` -> (123, condition, level).

    Raises ValueError naming the row id when it is not of that form.
    """
    head, sep, rest = str(rid).partition("_")
    if not sep or not head.isdigit() or len(rest) < 7:
        raise ValueError(f"row_id {rid!r}: expected '{{study_id}}_{{condition}}_{{level}}'")
    condition, level = rest[:-6], rest[-5:]
    if rest[-6] != "_" or condition not in CONDITIONS or level not in LEVELS:
        raise ValueError(f"row_id {rid!r}: unknown condition or level")
    return int(head), condition, level
