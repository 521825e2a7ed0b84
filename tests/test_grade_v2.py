"""The v2 family: build, forward, checkpoints, masked inputs, mirror, phantom inputs and a
short training that must beat the class priors; plus the shared stage-2 label mirror."""

import time

import numpy as np
import pandas as pd
import pytest
import torch
from stage2_phantom import TINY_V2, phantom  # noqa: F401  (fixture)

from kernel_src import competition, dicom, preprocess, schema
from kernel_src.keypoints import Keypoints
from kernel_src.models import zoo  # noqa: F401
from kernel_src.models.grade_common import LR_SWAP, class_weighted_ce, mirror_labels
from kernel_src.models.grade_v2 import V2, V2Config
from kernel_src.models.registry import build_model, load_checkpoint, save_checkpoint
from kernel_src.training.stage2_data import AugConfig, Stage2Dataset, StudyRecord, truth_keypoints

CONFIG = V2Config(**TINY_V2)


def random_inputs(batch=2, seed=0, config=CONFIG):
    g = torch.Generator().manual_seed(seed)
    s, a = config.sag_size, config.axial_size
    return {"sag": torch.rand(batch, 5, 5, config.sag_slices, s, s, generator=g),
            "sag_valid": (torch.rand(batch, 5, 5, generator=g) > 0.3).float(),
            "axial": torch.rand(batch, 5, config.axial_slices, config.axial_channels, a, a,
                                generator=g),
            "axial_valid": torch.tensor([[1, 1, 0, 1, 1]] * batch, dtype=torch.float32)}


def test_v2_forward_shapes_and_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_model("v2", CONFIG).eval()
    inputs = random_inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == (2, 5, 5, 3) and torch.isfinite(out).all()
    path = save_checkpoint(tmp_path / "fold0.pt", "v2", CONFIG, model, {"score": 0.5})
    loaded, config, payload = load_checkpoint(path)
    assert config == CONFIG and payload["metrics"]["score"] == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), out)


def test_invalid_crops_do_not_leak_their_pixels():
    """A masked crop's pixels cannot change the output (the learned missing vector is used)."""
    torch.manual_seed(0)
    model = build_model("v2", CONFIG).eval()
    inputs = random_inputs()
    changed = {k: v.clone() for k, v in inputs.items()}
    invalid = inputs["sag_valid"] == 0
    changed["sag"][invalid] = torch.rand_like(changed["sag"][invalid])
    changed["axial"][:, 2] = 1.0  # level 2 axial is flagged invalid
    with torch.no_grad():
        torch.testing.assert_close(model(**changed), model(**inputs))
        inputs["sag_valid"][0, 0, 0] = 1 - inputs["sag_valid"][0, 0, 0]
        assert not torch.allclose(model(**inputs)[0, 0, 0], model(**changed)[0, 0, 0])


def test_lr_swap_and_weighted_ce():
    labels = np.arange(25)
    mirrored = mirror_labels(labels)
    left_l3 = schema.label_index("left_neural_foraminal_narrowing", "l3_l4")
    right_l3 = schema.label_index("right_neural_foraminal_narrowing", "l3_l4")
    left_sub = schema.label_index("left_subarticular_stenosis", "l5_s1")
    right_sub = schema.label_index("right_subarticular_stenosis", "l5_s1")
    assert mirrored[left_l3] == right_l3 and mirrored[right_sub] == left_sub
    assert (mirrored[:5] == labels[:5]).all() and (mirror_labels(mirrored) == labels).all()
    assert sorted(LR_SWAP.tolist()) == list(range(25))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([2, 0, -1])
    nll = -torch.log_softmax(logits, -1)
    expected = (4 * nll[0, 2] + 1 * nll[1, 0]) / 5
    torch.testing.assert_close(class_weighted_ce(logits, targets), expected)


def load_phantom_study(phantom, index=0):  # noqa: F811
    names = competition.series_by_study(competition.load_series_descriptions(
        phantom / "train_series_descriptions.csv"))
    sid = sorted(names)[index]
    raw = dicom.read_study(phantom / "train_images", sid, names[sid])
    coords = competition.load_label_coordinates(phantom / "train_label_coordinates.csv")
    truth = truth_keypoints(raw, coords[coords["study_id"] == sid])
    train = competition.load_train(phantom / "train.csv").set_index("study_id")
    labels = train.loc[sid, list(schema.LABEL_COLUMNS)].to_numpy(np.int64)
    return StudyRecord(sid, preprocess.normalize_study(raw), labels, truth)


def test_prepare_inputs_on_phantom_and_masking(phantom):  # noqa: F811
    record = load_phantom_study(phantom)
    inputs = V2.prepare_inputs(CONFIG, record.study, record.truth)
    assert inputs["sag"].shape == (5, 5, 5, 32, 32)
    assert inputs["axial"].shape == (5, 3, 3, 32, 32)
    known = record.truth.known.reshape(5, 5).T  # (level, condition)
    np.testing.assert_array_equal(inputs["sag_valid"] == 1, known)
    assert inputs["sag"][known].reshape(known.sum(), -1).std(axis=1).min() > 0.01
    assert not inputs["sag"][~known].any()
    assert inputs["axial_valid"].sum() >= 4
    logits = V2.infer([build_model("v2", CONFIG)], CONFIG, record.study, record.truth)
    assert logits.shape == (25, 3) and np.isfinite(logits).all()
    # no points at all: every input masked, every row NaN
    empty = V2.prepare_inputs(CONFIG, record.study, Keypoints())
    assert not empty["sag_valid"].any() and not empty["axial_valid"].any()
    assert not empty["sag"].any() and not empty["axial"].any()
    assert np.isnan(V2.infer([build_model("v2", CONFIG)], CONFIG, record.study,
                             Keypoints())).all()
    # a missing axial series: axial masked, sagittal unaffected
    record.study.series = {k: s for k, s in record.study.series.items()
                           if s.description != schema.AXIAL_T2}
    no_axial = V2.prepare_inputs(CONFIG, record.study, record.truth)
    assert not no_axial["axial_valid"].any()
    np.testing.assert_array_equal(no_axial["sag_valid"], inputs["sag_valid"])


def test_mirror_swaps_sides_and_labels(phantom):  # noqa: F811
    record = load_phantom_study(phantom, 1)
    inputs = V2.prepare_inputs(CONFIG, record.study, record.truth)
    mirrored = V2.mirror_inputs(CONFIG, inputs)
    np.testing.assert_array_equal(mirrored["sag"][:, 1], inputs["sag"][:, 2, ::-1])
    np.testing.assert_array_equal(mirrored["sag"][:, 0], inputs["sag"][:, 0, ::-1])
    np.testing.assert_array_equal(mirrored["sag_valid"][:, 3], inputs["sag_valid"][:, 4])
    np.testing.assert_array_equal(mirrored["axial"], inputs["axial"][..., ::-1])
    twice = V2.mirror_inputs(CONFIG, mirrored)
    for key in inputs:
        np.testing.assert_array_equal(twice[key], inputs[key])
    quiet = dict(p_predicted=0.0, contrast=0.0, brightness=0.0, p_blur=0.0)
    plain = Stage2Dataset(V2, CONFIG, [record], AugConfig(p_mirror=0.0, **quiet))[0]
    flipped = Stage2Dataset(V2, CONFIG, [record], AugConfig(p_mirror=1.0, **quiet))[0]
    grid = V2.label_indices(CONFIG)
    np.testing.assert_array_equal(plain["target"].numpy(), record.labels[grid])
    np.testing.assert_array_equal(flipped["target"].numpy(), record.labels[LR_SWAP][grid])
    assert (flipped["target"][:, 1] == plain["target"][:, 2]).all()


@pytest.mark.slow
def test_short_training_beats_class_priors(phantom, tmp_path):  # noqa: F811
    from kernel_src.training.train_stage2 import train_fold

    start = time.time()
    metrics = train_fold(dict(
        data_dir=str(phantom), cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"),
        family="v2", config=TINY_V2, fold=0, n_folds=4, epochs=10, lr=1e-3, batch_size=3,
        device="cpu", num_threads=1))
    elapsed = time.time() - start
    out = tmp_path / "runs" / "v2" / "test_resnet"
    assert (out / "fold0.pt").is_file() and (out / "metrics_fold0.json").is_file()
    oof = pd.read_csv(out / "oof_fold0.csv")
    assert list(oof.columns) == ["study_id", "label", "logit_0", "logit_1", "logit_2"]
    assert oof["study_id"].nunique() == metrics["n_valid"] == 6
    assert metrics["oof_metric"]["total"] < metrics["prior_metric"]["total"], metrics
    assert elapsed < 150, f"training took {elapsed:.0f} s"


def test_stage1_points_replace_truth_where_known_and_merge_across_files(tmp_path):
    from kernel_src.training.stage2_data import mixed_keypoints, read_keypoints

    truth = Keypoints()
    truth.set(0, (1.0, 2.0, 3.0), 1.0, "truth")
    truth.set(5, (4.0, 5.0, 6.0), 1.0, "truth")
    spinal = Keypoints()
    spinal.set(0, (1.5, 2.5, 3.5), 0.3, "sag2d_t2")
    foraminal = Keypoints()
    foraminal.set(7, (7.0, 8.0, 9.0), 0.9, "sag2d_t1")
    foraminal.set(0, (9.0, 9.0, 9.0), 0.1, "sag2d_t1")  # less confident than the spinal file
    for name, kp in (("a", spinal), ("b", foraminal)):
        (tmp_path / name).mkdir()
        pd.DataFrame(kp.to_rows(42)).to_csv(tmp_path / name / "oof_fold0.csv", index=False)
    predicted = read_keypoints(str(tmp_path / "*" / "oof_fold*.csv"))[42]
    np.testing.assert_allclose(predicted.world[0], (1.5, 2.5, 3.5))
    np.testing.assert_allclose(predicted.world[7], (7.0, 8.0, 9.0))
    record = StudyRecord(42, None, np.zeros(25, np.int64), truth, predicted)
    mixed = mixed_keypoints(record, True)
    np.testing.assert_allclose(mixed.world[0], (1.5, 2.5, 3.5))   # predicted wins
    np.testing.assert_allclose(mixed.world[5], (4.0, 5.0, 6.0))   # truth where none predicted
    assert mixed.known.sum() == 3
    assert mixed_keypoints(record, False) is truth
    with pytest.raises(FileNotFoundError, match="no stage-1 keypoints"):
        read_keypoints(str(tmp_path / "nothing*.csv"))


def test_unknown_recipe_and_parameter_are_errors():
    from kernel_src.training.train_stage2 import train_fold, train_recipe

    with pytest.raises(KeyError, match="unknown recipe"):
        train_recipe("nope", {})
    with pytest.raises(ValueError, match="unknown parameter"):
        train_fold({"epochs": 1, "learning_rate": 0.1})
