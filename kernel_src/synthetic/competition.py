"""Write a whole phantom competition in the exact Kaggle layout, plus its truth.

DIR/train_images/{study_id}/{series_id}/{instance_number}.dcm, DIR/test_images/...,
train.csv, train_label_coordinates.csv, train_series_descriptions.csv,
test_series_descriptions.csv, sample_submission.csv;
DIR/truth/test_labels.csv (train.csv format), DIR/truth/test_label_coordinates.csv,
DIR/truth/landmarks.csv (study_id, condition, level, x, y, z: world LPS mm, every study;
condition and level in the Title Case of train_label_coordinates.csv).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kernel_src import schema
from kernel_src.synthetic.dicom_writer import write_stack
from kernel_src.synthetic.render import render_stack
from kernel_src.synthetic.study_plan import QUIRKS, TRAIN_ONLY, StudyPlan, plan_study

OUTPUTS = ("train_images", "test_images", "truth", "train.csv", "train_label_coordinates.csv",
           "train_series_descriptions.csv", "test_series_descriptions.csv",
           "sample_submission.csv")
MARKER = Path("truth") / "landmarks.csv"


def study_ids(seed: int, n: int) -> list[int]:
    """n distinct realistic study ids (7-10 digits), deterministic for the seed."""
    rng = np.random.default_rng([seed, 7919])
    ids: list[int] = []
    while len(ids) < n:
        sid = int(rng.integers(4_000_000, 4_294_967_295))
        if sid not in ids:
            ids.append(sid)
    return ids


def forced_quirk(index: int, train: bool) -> str | None:
    """The quirk forced on the index-th study of a split (index 0 is kept clean)."""
    names = QUIRKS if train else tuple(q for q in QUIRKS if q not in TRAIN_ONLY)
    return None if index == 0 else names[(index - 1) % len(names)]


def coordinate_rows(plan: StudyPlan) -> list[dict]:
    """train_label_coordinates rows: each landmark projected into its labelled series.

    The series (and, for axial series, the stack) whose nearest slice lies closest to the
    landmark; the landmark is projected onto that slice: instance_number, x (col), y (row).
    """
    rows = []
    for i in range(schema.N_LABELS):
        condition, level = schema.CONDITIONS[i // 5], schema.LEVELS[i % 5]
        best = None
        for series in plan.series:
            if series.description != schema.CONDITION_SERIES[condition]:
                continue
            for stack, numbers in zip(series.stacks, series.instance_numbers, strict=True):
                k, x, y, off = stack.project(plan.landmarks[i][None])
                if stack.contains(x, y)[0] and (best is None or off[0] < best[0]):
                    best = (off[0], series.series_id, int(numbers[k[0]]), x[0], y[0])
        if best is None or not plan.coordinate_mask[i]:
            continue
        rows.append({"study_id": plan.study_id, "series_id": best[1],
                     "instance_number": best[2],
                     "condition": schema.CONDITION_TITLES[condition],
                     "level": schema.LEVEL_TITLES[level], "x": best[3], "y": best[4]})
    return rows


def label_row(plan: StudyPlan, mask: bool = True) -> dict:
    """train.csv row: grade names, None where the label is missing (when `mask`)."""
    row: dict = {"study_id": plan.study_id}
    for i, column in enumerate(schema.LABEL_COLUMNS):
        missing = mask and not plan.label_mask[i]
        row[column] = None if missing else schema.GRADES[int(plan.grades[i])]
    return row


def landmark_rows(plan: StudyPlan) -> list[dict]:
    return [{"study_id": plan.study_id,
             "condition": schema.CONDITION_TITLES[schema.CONDITIONS[i // 5]],
             "level": schema.LEVEL_TITLES[schema.LEVELS[i % 5]],
             "x": p[0], "y": p[1], "z": p[2]} for i, p in enumerate(plan.landmarks)]


def write_study(plan: StudyPlan, images_dir: Path, rng: np.random.Generator) -> None:
    """Render and write every stack of every series of one study."""
    for series in plan.series:
        series_dir = images_dir / str(plan.study_id) / str(series.series_id)
        for stack, numbers in zip(series.stacks, series.instance_numbers, strict=True):
            pixels = render_stack(plan.spine, stack, series.contrast, rng) * series.gain
            write_stack(series_dir, pixels, stack.positions, stack.orientation,
                        stack.pixel_spacing, study_id=plan.study_id,
                        series_id=series.series_id, description=series.description,
                        instance_numbers=numbers, slice_thickness=stack.slice_thickness,
                        monochrome1=series.monochrome1, rescale=series.rescale)


def _prepare_output(out: Path) -> None:
    """Create `out`; clear a previous phantom there; refuse to mix with other content."""
    out.mkdir(parents=True, exist_ok=True)
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not (out / MARKER).exists():
        raise FileExistsError(f"{out}: holds {present} but no {MARKER}; not a phantom "
                              "competition, refusing to overwrite")
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write_csvs(out: Path, tables: dict[str, list[dict]]) -> None:
    (out / "truth").mkdir(exist_ok=True)
    columns = {
        "train.csv": ["study_id", *schema.LABEL_COLUMNS],
        "truth/test_labels.csv": ["study_id", *schema.LABEL_COLUMNS],
        "train_label_coordinates.csv": ["study_id", "series_id", "instance_number",
                                        "condition", "level", "x", "y"],
        "truth/test_label_coordinates.csv": ["study_id", "series_id", "instance_number",
                                             "condition", "level", "x", "y"],
        "train_series_descriptions.csv": ["study_id", "series_id", "series_description"],
        "test_series_descriptions.csv": ["study_id", "series_id", "series_description"],
        "sample_submission.csv": ["row_id", *schema.SUBMISSION_COLUMNS],
        "truth/landmarks.csv": ["study_id", "condition", "level", "x", "y", "z"],
    }
    for name, cols in columns.items():
        pd.DataFrame(tables.get(name, []), columns=cols).to_csv(out / name, index=False)


def generate_competition(out, n_train: int, n_test: int, seed: int = 0,
                         size: int = 128) -> Path:
    """Write a phantom competition of n_train + n_test studies to `out`; returns `out`.

    Deterministic for (n_train, n_test, seed, size). Images are around `size` pixels
    (0.75x..1.25x). Study k of a split uses rng([seed, split, k]).
    """
    out = Path(out)
    _prepare_output(out)
    ids = study_ids(seed, n_train + n_test)
    tables: dict[str, list[dict]] = {}
    progress = tqdm(total=n_train + n_test, desc="phantom studies", unit="study")
    for split_index, (split, split_ids) in enumerate(
            (("train", ids[:n_train]), ("test", ids[n_train:]))):
        train = split == "train"
        for k, sid in enumerate(split_ids):
            rng = np.random.default_rng([seed, split_index, k])
            plan = plan_study(rng, sid, size, train=train, forced=forced_quirk(k, train),
                              clean=k == 0)
            write_study(plan, out / f"{split}_images", rng)
            _add_rows(tables, plan, split)
            progress.update(1)
    progress.close()
    _write_csvs(out, tables)
    return out


def _add_rows(tables: dict[str, list[dict]], plan: StudyPlan, split: str) -> None:
    """Append one study's rows to the CSV tables of its split."""
    def add(name: str, rows: list[dict]) -> None:
        tables.setdefault(name, []).extend(rows)

    add(f"{split}_series_descriptions.csv", [
        {"study_id": plan.study_id, "series_id": s.series_id,
         "series_description": s.description} for s in plan.series])
    add("truth/landmarks.csv", landmark_rows(plan))
    if split == "train":
        add("train.csv", [label_row(plan)])
        add("train_label_coordinates.csv", coordinate_rows(plan))
    else:
        add("truth/test_labels.csv", [label_row(plan, mask=False)])
        add("truth/test_label_coordinates.csv", coordinate_rows(plan))
        add("sample_submission.csv", [
            {"row_id": rid, **{c: 1.0 / 3.0 for c in schema.SUBMISSION_COLUMNS}}
            for rid in schema.row_ids(plan.study_id)])
