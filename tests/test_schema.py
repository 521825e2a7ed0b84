"""The competition names: columns, Title Case forms, groups, row ids."""

import pytest

from kernel_src import schema

# Spelled out by hand from the competition's files (not derived from the code under test).
COORDINATE_CONDITIONS = {
    "Spinal Canal Stenosis": "spinal_canal_stenosis",
    "Left Neural Foraminal Narrowing": "left_neural_foraminal_narrowing",
    "Right Neural Foraminal Narrowing": "right_neural_foraminal_narrowing",
    "Left Subarticular Stenosis": "left_subarticular_stenosis",
    "Right Subarticular Stenosis": "right_subarticular_stenosis",
}
COORDINATE_LEVELS = {"L1/L2": "l1_l2", "L2/L3": "l2_l3", "L3/L4": "l3_l4",
                     "L4/L5": "l4_l5", "L5/S1": "l5_s1"}


def test_title_case_maps_match_the_competition_files():
    assert schema.TITLE_TO_CONDITION == COORDINATE_CONDITIONS
    assert schema.TITLE_TO_LEVEL == COORDINATE_LEVELS


def test_label_columns_are_condition_major():
    cols = schema.LABEL_COLUMNS
    assert len(cols) == 25 == len(set(cols))
    assert cols[0] == "spinal_canal_stenosis_l1_l2"
    assert cols[4] == "spinal_canal_stenosis_l5_s1"
    assert cols[5] == "left_neural_foraminal_narrowing_l1_l2"
    assert cols[24] == "right_subarticular_stenosis_l5_s1"
    assert schema.label_index("left_subarticular_stenosis", "l3_l4") == 17
    assert cols[schema.label_index("left_subarticular_stenosis", "l3_l4")] == \
        "left_subarticular_stenosis_l3_l4"


def test_groups_and_grades():
    assert [schema.CONDITION_GROUP[c] for c in schema.CONDITIONS] == [
        "spinal", "foraminal", "foraminal", "subarticular", "subarticular"]
    assert schema.GRADE_INDEX == {"Normal/Mild": 0, "Moderate": 1, "Severe": 2}
    assert schema.CLASS_WEIGHTS == (1.0, 2.0, 4.0)
    assert schema.SERIES_DESCRIPTIONS == ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")


def test_row_ids_round_trip():
    ids = schema.row_ids(4003253)
    assert ids[0] == "4003253_spinal_canal_stenosis_l1_l2"
    assert len(ids) == 25
    for rid, col in zip(ids, schema.LABEL_COLUMNS, strict=True):
        study, condition, level = schema.parse_row_id(rid)
        assert (study, f"{condition}_{level}") == (4003253, col)
        assert schema.row_id(study, condition, level) == rid


@pytest.mark.parametrize("bad", [
    "abc_spinal_canal_stenosis_l1_l2", "12_spinal_canal_stenosis_l6_l7",
    "12_spinal_stenosis_l1_l2", "12", "", "12_spinal_canal_stenosisxl1_l2",
])
def test_parse_row_id_rejects(bad):
    with pytest.raises(ValueError, match="row_id"):
        schema.parse_row_id(bad)
