"""The phantom competition: Kaggle layout, determinism, quirks, exact label coordinates,
anatomy orientation, class priors and grade visibility. Small: size 48-64, few studies."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from kernel_src import schema
from kernel_src.synthetic.__main__ import main
from kernel_src.synthetic.competition import coordinate_rows, generate_competition
from kernel_src.synthetic.pathology import sample_grades
from kernel_src.synthetic.render import render_stack
from kernel_src.synthetic.study_plan import QUIRKS, plan_study

N_TRAIN, N_TEST = 11, 3  # 11 train studies: index 1..10 force each quirk once

# Kaggle's headers, written out here independently of kernel_src.schema.
KAGGLE_CONDITIONS = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing",
                     "right_neural_foraminal_narrowing", "left_subarticular_stenosis",
                     "right_subarticular_stenosis"]
KAGGLE_LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
HEADERS = {
    "train.csv": "study_id," + ",".join(f"{c}_{lv}" for c in KAGGLE_CONDITIONS
                                        for lv in KAGGLE_LEVELS),
    "train_label_coordinates.csv": "study_id,series_id,instance_number,condition,level,x,y",
    "train_series_descriptions.csv": "study_id,series_id,series_description",
    "test_series_descriptions.csv": "study_id,series_id,series_description",
    "sample_submission.csv": "row_id,normal_mild,moderate,severe",
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_competition(tmp_path_factory.mktemp("phantom"), N_TRAIN, N_TEST,
                                seed=11, size=64)


def _headers(path: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(path.glob("*.dcm"))]


def _normal(ds) -> np.ndarray:
    o = np.array(ds.ImageOrientationPatient, dtype=float)
    n = np.cross(o[:3], o[3:])
    return n if n[np.argmax(np.abs(n))] > 0 else -n


def _pixel_world(ds, x: float, y: float) -> np.ndarray:
    o = np.array(ds.ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    return np.array(ds.ImagePositionPatient, dtype=float) + x * col_mm * o[:3] + y * row_mm * o[3:]


def test_layout_and_csv_columns_match_kaggle(phantom):
    for name, header in HEADERS.items():
        assert (phantom / name).read_text().splitlines()[0] == header, name
    assert (phantom / "truth/test_labels.csv").read_text().splitlines()[0] == HEADERS["train.csv"]
    assert (phantom / "truth/test_label_coordinates.csv").read_text().splitlines()[0] == \
        HEADERS["train_label_coordinates.csv"]
    assert (phantom / "truth/landmarks.csv").read_text().splitlines()[0] == \
        "study_id,condition,level,x,y,z"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        desc = pd.read_csv(phantom / f"{split}_series_descriptions.csv")
        assert desc.study_id.nunique() == n
        assert set(desc.series_description) <= {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
        on_disk = {(int(p.parent.name), int(p.name))
                   for p in (phantom / f"{split}_images").glob("*/*")}
        assert on_disk == set(zip(desc.study_id, desc.series_id, strict=True))
        for study_id, series_id in on_disk:
            files = list((phantom / f"{split}_images/{study_id}/{series_id}").glob("*.dcm"))
            numbers = sorted(int(f.stem) for f in files)
            assert numbers == list(range(1, len(files) + 1))
    assert len({*pd.read_csv(phantom / "train.csv").study_id,
                *pd.read_csv(phantom / "truth/test_labels.csv").study_id}) == N_TRAIN + N_TEST
    train = pd.read_csv(phantom / "train.csv")
    values = set(train.drop(columns="study_id").stack())
    assert values <= {"Normal/Mild", "Moderate", "Severe"}
    assert train.study_id.between(10**6, 2**32).all()
    truth = pd.read_csv(phantom / "truth/test_labels.csv")
    assert truth.notna().all().all()
    sub = pd.read_csv(phantom / "sample_submission.csv")
    assert len(sub) == 25 * N_TEST
    assert set(sub.row_id) == {f"{s}_{c}_{lv}" for s in truth.study_id
                               for c in KAGGLE_CONDITIONS for lv in KAGGLE_LEVELS}
    np.testing.assert_allclose(sub[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0)


def test_label_coordinates_are_exact_projections(phantom):
    """Each coordinate row, read back with pydicom, lies on its landmark's nearest slice,
    < 1 mm in-plane (it is the projection), off-plane at most half the slice gap."""
    landmarks = pd.read_csv(phantom / "truth/landmarks.csv").set_index(
        ["study_id", "condition", "level"])
    checked = 0
    for split, name in (("train", "train_label_coordinates.csv"),
                        ("test", "truth/test_label_coordinates.csv")):
        coords = pd.read_csv(phantom / name)
        for row in coords.itertuples():
            series_dir = phantom / f"{split}_images/{row.study_id}/{row.series_id}"
            headers = _headers(series_dir)
            ds = next(h for h in headers if int(h.InstanceNumber) == row.instance_number)
            assert 0 <= row.x <= ds.Columns - 1 and 0 <= row.y <= ds.Rows - 1
            target = landmarks.loc[(row.study_id, row.condition, row.level)].to_numpy(float)
            normal = _normal(ds)
            error = _pixel_world(ds, row.x, row.y) - target
            assert np.linalg.norm(error - (error @ normal) * normal) < 1.0, row
            same = [h for h in headers if np.allclose(_normal(h), normal, atol=1e-6)]
            offs = sorted(abs((np.array(h.ImagePositionPatient, float) - target) @ normal)
                          for h in same)
            assert abs(error @ normal) == pytest.approx(offs[0], abs=1e-3), row
            checked += 1
    assert checked >= 20 * (N_TRAIN + N_TEST) - 30  # missing series / coordinates aside


def test_landmarks_follow_patient_orientation(phantom):
    lm = pd.read_csv(phantom / "truth/landmarks.csv")
    assert len(lm) == 25 * (N_TRAIN + N_TEST)
    wide = lm.pivot_table(index=["study_id", "level"], columns="condition", values="x")
    for side in ("Neural Foraminal Narrowing", "Subarticular Stenosis"):
        assert (wide[f"Left {side}"] > wide[f"Right {side}"] + 5).all()
    spinal = lm[lm.condition == "Spinal Canal Stenosis"].pivot(
        index="study_id", columns="level", values="z")
    gaps = -np.diff(spinal[["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]].to_numpy(), axis=1)
    assert (gaps > 25).all() and (gaps < 50).all()  # L1/L2 on top, ~35-40 mm apart


def test_coordinates_use_the_labelled_series(phantom):
    coords = pd.read_csv(phantom / "train_label_coordinates.csv")
    desc = pd.read_csv(phantom / "train_series_descriptions.csv")
    merged = coords.merge(desc, on=["study_id", "series_id"], how="left")
    expected = {"Spinal Canal Stenosis": "Sagittal T2/STIR",
                "Left Neural Foraminal Narrowing": "Sagittal T1",
                "Right Neural Foraminal Narrowing": "Sagittal T1",
                "Left Subarticular Stenosis": "Axial T2",
                "Right Subarticular Stenosis": "Axial T2"}
    assert (merged.series_description == merged.condition.map(expected)).all()


def _series_facts(phantom: Path) -> list[dict]:
    facts = []
    desc = pd.read_csv(phantom / "train_series_descriptions.csv")
    for row in desc.itertuples():
        headers = _headers(phantom / f"train_images/{row.study_id}/{row.series_id}")
        normals = np.unique(np.round([_normal(h) for h in headers], 6), axis=0)
        n = normals[0]
        order = np.argsort([np.array(h.ImagePositionPatient, float) @ n for h in headers])
        instances = np.array([int(h.InstanceNumber) for h in headers])[order]
        first = headers[0]
        facts.append({
            "study_id": row.study_id, "description": row.series_description,
            "stacks": len(normals), "slices": len(headers),
            "increasing": bool(np.all(np.diff(instances) > 0)) if len(normals) == 1 else None,
            "decreasing": bool(np.all(np.diff(instances) < 0)) if len(normals) == 1 else None,
            "monochrome1": first.PhotometricInterpretation == "MONOCHROME1",
            "rescale": float(getattr(first, "RescaleSlope", 1)) != 1.0
            or float(getattr(first, "RescaleIntercept", 0)) != 0.0,
            "shape": (int(first.Rows), int(first.Columns)),
            "spacing": float(first.PixelSpacing[0]),
        })
    return facts


def test_every_quirk_appears_in_the_written_files(phantom):
    facts = pd.DataFrame(_series_facts(phantom))
    axial = facts[facts.description == "Axial T2"]
    assert (axial.stacks > 1).any(), "several orientations in one axial series"
    assert (axial.groupby("study_id").size() == 2).any(), "two axial series"
    per_study = facts.groupby("study_id").description.nunique()
    assert (per_study < 3).any() and (per_study == 3).sum() > N_TRAIN // 2, "missing series"
    single = facts[facts.stacks == 1]
    sag = single[single.description != "Axial T2"]
    assert sag.increasing.any() and sag.decreasing.any(), "instance order both ways"
    assert facts.monochrome1.any() and not facts.monochrome1.all()
    assert facts.rescale.any() and not facts.rescale.all()
    assert any(h != w for h, w in facts["shape"]), "non-square images"
    assert facts["shape"].nunique() > 3 and facts.spacing.nunique() > 3
    sagittal = facts[facts.description.str.startswith("Sagittal")]
    assert sagittal.slices.between(12, 20).all()
    assert facts[facts.description == "Axial T2"].slices.between(3, 40).all()
    train = pd.read_csv(phantom / "train.csv")
    assert train.isna().any().any(), "missing labels"
    coords = pd.read_csv(phantom / "train_label_coordinates.csv")
    present = pd.read_csv(phantom / "train_series_descriptions.csv").groupby(
        "study_id").series_description.agg(set)
    long = train.melt(id_vars="study_id", var_name="label").dropna()
    series_of = {f"{c}_{lv}": s for c, s in schema.CONDITION_SERIES.items()
                 for lv in KAGGLE_LEVELS}
    long = long[[series_of[r.label] in present[r.study_id] for r in long.itertuples()]]
    expected = long.groupby("study_id").size()
    have = coords.groupby("study_id").size().reindex(expected.index, fill_value=0)
    assert (have <= expected).all() and (have < expected).any(), "missing coordinates"


def test_every_quirk_is_drawn_for_some_seed():
    seen: dict[str, int] = defaultdict(int)
    for k in range(150):
        plan = plan_study(np.random.default_rng([5, k]), 1000 + k, 64, train=True)
        for q in plan.quirks:
            seen[q] += 1
        present = {s.description for s in plan.series}
        assert present == {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"} or \
            "missing_series" in plan.quirks
        for s in plan.series:
            n = sum(len(st.positions) for st in s.stacks)
            assert 12 <= n <= 20 if s.description != "Axial T2" else 3 <= n <= 40, (k, n)
        # every labelled landmark lies inside the field of view of its series
        wanted = [i for i in range(25) if plan.coordinate_mask[i] and
                  schema.CONDITION_SERIES[schema.CONDITIONS[i // 5]] in present]
        assert len(coordinate_rows(plan)) == len(wanted), k
    assert set(seen) == set(QUIRKS)
    assert seen["missing_series"] < 20  # rare


def test_deterministic_for_a_seed(tmp_path, capsys):
    main(["--out", str(tmp_path / "a"), "--train-studies", "2", "--test-studies", "1",
          "--seed", "4", "--size", "48"])
    assert "wrote 3 phantom studies" in capsys.readouterr().out
    generate_competition(tmp_path / "b", 2, 1, seed=4, size=48)
    generate_competition(tmp_path / "c", 2, 1, seed=5, size=48)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    for rel in files:
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        if rel.suffix == ".csv":
            assert a.read_bytes() == b.read_bytes(), rel
        else:
            assert pydicom.dcmread(a).PixelData == pydicom.dcmread(b).PixelData, rel
    assert (tmp_path / "a/train.csv").read_bytes() != (tmp_path / "c/train.csv").read_bytes()


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "train.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="train.csv"):
        generate_competition(tmp_path, 1, 0, seed=0, size=48)
    assert (tmp_path / "train.csv").read_text() == "mine"


def test_class_priors_and_within_study_correlation():
    grades = np.array([sample_grades(np.random.default_rng([9, k]))[0] for k in range(3000)])
    for group, (lo_normal, hi_normal) in {"spinal": (0.74, 0.86), "foraminal": (0.65, 0.78),
                                          "subarticular": (0.6, 0.75)}.items():
        cols = [i for i, c in enumerate(schema.LABEL_COLUMNS) if group in c]
        g = grades[:, cols]
        assert lo_normal < (g == 0).mean() < hi_normal, group
        assert 0.03 < (g == 2).mean() < 0.12, group
        assert 0.08 < (g == 1).mean() < 0.26, group
    sev = (grades > 0).astype(float)
    spinal_l1, foraminal_l5 = sev[:, 0], sev[:, 9]
    assert np.corrcoef(spinal_l1, foraminal_l5)[0, 1] > 0.05  # older spines worse overall
    lower = sev[:, [3, 4]].mean(), sev[:, [0, 1]].mean()
    assert lower[0] > lower[1]  # lower levels degenerate more


def test_grades_are_visible_around_the_landmarks():
    """Mean normalised intensity in a ~6 mm box at the landmark, in the series where the
    condition is labelled, falls from Normal/Mild to Moderate to Severe for every group."""
    boxes: dict[tuple[str, int], list[float]] = defaultdict(list)
    for k in range(24):
        rng = np.random.default_rng([21, k])
        plan = plan_study(rng, k, 64, train=False, clean=True)
        for series in plan.series:
            for stack in series.stacks:
                img = render_stack(plan.spine, stack, series.contrast, rng)
                lo, hi = np.percentile(img, [1, 99.5])
                img = (img - lo) / (hi - lo)
                for i in range(schema.N_LABELS):
                    condition = schema.CONDITIONS[i // 5]
                    if schema.CONDITION_SERIES[condition] != series.description:
                        continue
                    s, x, y, off = stack.project(plan.landmarks[i][None])
                    if off[0] > 2.5 or not stack.contains(x, y)[0]:
                        continue
                    r = max(1, round(3.0 / stack.pixel_spacing[0]))
                    xi, yi = round(x[0]), round(y[0])
                    box = img[s[0], max(0, yi - r):yi + r + 1, max(0, xi - r):xi + r + 1]
                    boxes[(schema.CONDITION_GROUP[condition], int(plan.grades[i]))].append(
                        float(box.mean()))
    for group in schema.GROUPS:
        means = [np.mean(boxes[(group, g)]) for g in range(3)]
        assert all(len(boxes[(group, g)]) >= 3 for g in range(3)), group
        assert means[0] > means[1] + 0.05 > means[2] + 0.1, (group, means)
