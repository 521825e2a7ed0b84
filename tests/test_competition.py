"""Loaders of the competition CSVs: clean output and one clear error per fault."""

import re

import numpy as np
import pytest

from kernel_src import competition
from kernel_src.competition import DataError
from kernel_src.schema import LABEL_COLUMNS

HEADER_TRAIN = "study_id," + ",".join(LABEL_COLUMNS)


def train_row(study, grades):
    return f"{study}," + ",".join(grades)


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_error(exc_info, path, line, column):
    msg = str(exc_info.value)
    assert str(path) in msg
    assert re.search(rf"\bline {line}\b", msg), msg
    assert repr(column) in msg, msg


@pytest.fixture
def train_csv(tmp_path):
    grades = ["Normal/Mild"] * 25
    grades[0], grades[7], grades[24] = "Moderate", "Severe", ""
    return write(tmp_path, "train.csv", [
        HEADER_TRAIN, train_row(4003253, grades), train_row(4646740, ["Severe"] * 25)])


def test_load_train_codes(train_csv):
    df = competition.load_train(train_csv)
    assert list(df.columns) == ["study_id", *LABEL_COLUMNS]
    assert df["study_id"].tolist() == [4003253, 4646740]
    first = df.iloc[0, 1:].to_numpy()
    assert first[0] == 1 and first[7] == 2 and first[24] == -1
    assert (first[[1, 2, 3, 4, 5, 6, 8]] == 0).all()
    assert (df.iloc[1, 1:] == 2).all()
    assert df[list(LABEL_COLUMNS)].dtypes.map(lambda t: t.kind == "i").all()


def test_train_unknown_grade(tmp_path):
    grades = ["Normal/Mild"] * 25
    grades[6] = "Mild"
    path = write(tmp_path, "train.csv", [HEADER_TRAIN, train_row(1, ["Moderate"] * 25),
                                         train_row(2, grades)])
    with pytest.raises(DataError, match="unknown grade 'Mild'") as exc:
        competition.load_train(path)
    assert_error(exc, path, 3, LABEL_COLUMNS[6])


def test_train_non_integer_id(tmp_path):
    path = write(tmp_path, "train.csv", [HEADER_TRAIN, train_row("12a", [""] * 25)])
    with pytest.raises(DataError, match="non-integer id") as exc:
        competition.load_train(path)
    assert_error(exc, path, 2, "study_id")


def test_train_missing_column(tmp_path):
    header = HEADER_TRAIN.replace(",left_subarticular_stenosis_l2_l3", "")
    path = write(tmp_path, "train.csv", [header, "1," + ",".join([""] * 24)])
    with pytest.raises(DataError, match="missing column") as exc:
        competition.load_train(path)
    assert_error(exc, path, 1, "left_subarticular_stenosis_l2_l3")


def test_train_duplicate_study_and_blank_lines_keep_line_numbers(tmp_path):
    path = write(tmp_path, "train.csv", [HEADER_TRAIN, train_row(7, [""] * 25), "",
                                         train_row(8, [""] * 25), train_row(7, [""] * 25)])
    with pytest.raises(DataError, match=r"duplicate study .*first seen on line 2") as exc:
        competition.load_train(path)
    assert_error(exc, path, 5, "study_id")


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "train.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty file"):
        competition.load_train(empty)
    header_only = write(tmp_path, "t.csv", [HEADER_TRAIN])
    assert len(competition.load_train(header_only)) == 0


COORD_HEADER = "study_id,series_id,instance_number,condition,level,x,y"


def test_load_label_coordinates(tmp_path):
    path = write(tmp_path, "c.csv", [
        COORD_HEADER,
        "4003253,702807833,8,Spinal Canal Stenosis,L1/L2,322.83,227.96",
        "4003253,1054713880,4,Right Neural Foraminal Narrowing,L5/S1,187.96,251.04",
        "4003253,2448190387,28,Left Subarticular Stenosis,L3/L4,179.37,161.71",
    ])
    df = competition.load_label_coordinates(path)
    assert df["condition"].tolist() == ["spinal_canal_stenosis", "right_neural_foraminal_narrowing",
                                        "left_subarticular_stenosis"]
    assert df["level"].tolist() == ["l1_l2", "l5_s1", "l3_l4"]
    assert df["label"].tolist() == ["spinal_canal_stenosis_l1_l2",
                                    "right_neural_foraminal_narrowing_l5_s1",
                                    "left_subarticular_stenosis_l3_l4"]
    assert df["instance_number"].tolist() == [8, 4, 28]
    np.testing.assert_allclose(df[["x", "y"]].to_numpy()[0], [322.83, 227.96])
    assert df["series_id"].dtype == np.int64


@pytest.mark.parametrize("row, column, message", [
    ("1,2,3,Spinal Stenosis,L1/L2,1,2", "condition", "unknown condition 'Spinal Stenosis'"),
    ("1,2,3,Spinal Canal Stenosis,L1-L2,1,2", "level", "unknown level 'L1-L2'"),
    ("1,2,3.5,Spinal Canal Stenosis,L1/L2,1,2", "instance_number", "non-integer id '3.5'"),
    ("1,x2,3,Spinal Canal Stenosis,L1/L2,1,2", "series_id", "non-integer id 'x2'"),
    ("1,2,3,Spinal Canal Stenosis,L1/L2,nan,2", "x", "not a finite number"),
    ("1,2,3,Spinal Canal Stenosis,L1/L2,1,", "y", "not a finite number"),
])
def test_label_coordinates_errors(tmp_path, row, column, message):
    path = write(tmp_path, "coords.csv", [COORD_HEADER, "1,2,4,Spinal Canal Stenosis,L2/L3,5,6", row])
    with pytest.raises(DataError, match=re.escape(message)) as exc:
        competition.load_label_coordinates(path)
    assert_error(exc, path, 3, column)


def test_label_coordinates_duplicate_and_missing_column(tmp_path):
    row = "1,2,3,Spinal Canal Stenosis,L1/L2,1,2"
    path = write(tmp_path, "coords.csv", [COORD_HEADER, row, "1,2,3,Spinal Canal Stenosis,L1/L2,9,9"])
    with pytest.raises(DataError, match="duplicate coordinate") as exc:
        competition.load_label_coordinates(path)
    assert "line 3" in str(exc.value) and "first seen on line 2" in str(exc.value)
    # The same point on another instance is a different annotation, not a duplicate.
    ok = write(tmp_path, "ok.csv", [COORD_HEADER, row, "1,2,4,Spinal Canal Stenosis,L1/L2,9,9"])
    assert len(competition.load_label_coordinates(ok)) == 2
    bad = write(tmp_path, "nolevel.csv", [COORD_HEADER.replace(",level", ""), "1,2,3,Spinal Canal Stenosis,1,2"])
    with pytest.raises(DataError) as exc:
        competition.load_label_coordinates(bad)
    assert_error(exc, bad, 1, "level")


SERIES_HEADER = "study_id,series_id,series_description"


def test_series_descriptions(tmp_path):
    path = write(tmp_path, "s.csv", [SERIES_HEADER, "1,10,Sagittal T1", "1,11,Sagittal T2/STIR",
                                     "1,12,Axial T2", "1,13,Axial T2"])
    df = competition.load_series_descriptions(path)
    assert df["series_id"].tolist() == [10, 11, 12, 13]
    assert competition.series_by_study(df) == {
        1: {10: "Sagittal T1", 11: "Sagittal T2/STIR", 12: "Axial T2", 13: "Axial T2"}}
    empty = write(tmp_path, "test_series_descriptions.csv", [SERIES_HEADER])
    df = competition.load_series_descriptions(empty)
    assert len(df) == 0 and list(df.columns) == SERIES_HEADER.split(",")


@pytest.mark.parametrize("row, column, message", [
    ("1,11,Sagittal T3", "series_description", "unknown series description 'Sagittal T3'"),
    ("-1,11,Axial T2", "study_id", "non-integer id '-1'"),
    ("1,10,Axial T2", "study_id+series_id", "duplicate series"),
])
def test_series_description_errors(tmp_path, row, column, message):
    path = write(tmp_path, "s.csv", [SERIES_HEADER, "1,10,Sagittal T1", row])
    with pytest.raises(DataError, match=re.escape(message)) as exc:
        competition.load_series_descriptions(path)
    assert_error(exc, path, 3, column)


SAMPLE_HEADER = "row_id,normal_mild,moderate,severe"


def test_sample_submission(tmp_path):
    path = write(tmp_path, "sample_submission.csv", [
        SAMPLE_HEADER,
        "44036939_spinal_canal_stenosis_l1_l2,0.333333,0.333333,0.333333",
        "44036939_spinal_canal_stenosis_l2_l3,0.333333,0.333333,0.333333",
        "12_left_subarticular_stenosis_l5_s1,0.333333,0.333333,0.333333",
    ])
    df = competition.load_sample_submission(path)
    assert df["study_id"].tolist() == [44036939, 44036939, 12]
    assert competition.sample_study_ids(df) == [44036939, 12]
    empty = competition.load_sample_submission(write(tmp_path, "e.csv", [SAMPLE_HEADER]))
    assert len(empty) == 0 and competition.sample_study_ids(empty) == []


@pytest.mark.parametrize("row, column, message", [
    ("12_spinal_canal_stenosis_l1_l2,0.3,0.3,0.4", "row_id", "duplicate row_id"),
    ("12_spinal_canal_stenosis_l9_l9,0.3,0.3,0.4", "row_id", "unknown condition or level"),
    ("x12_spinal_canal_stenosis_l1_l2,0.3,0.3,0.4", "row_id", "expected"),
    ("13_spinal_canal_stenosis_l1_l2,0.3,abc,0.4", "moderate", "not a finite number 'abc'"),
])
def test_sample_submission_errors(tmp_path, row, column, message):
    path = write(tmp_path, "sample.csv", [SAMPLE_HEADER, "12_spinal_canal_stenosis_l1_l2,0.3,0.3,0.4", row])
    with pytest.raises(DataError, match=re.escape(message)) as exc:
        competition.load_sample_submission(path)
    assert_error(exc, path, 3, column)
    assert isinstance(exc.value, ValueError)
