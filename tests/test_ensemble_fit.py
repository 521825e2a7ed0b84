"""Ensemble fitting on synthetic out-of-fold logits: good models get the weight, blends
follow the family that is good on each group, the manifest is written for the kernel."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stage2_phantom import TINY_V2

from kernel_src import ensemble, metric
from kernel_src.manifest import load_manifest, validate_manifest
from kernel_src.models.grade_v2 import V2Config
from kernel_src.models.registry import build_model, save_checkpoint
from kernel_src.schema import GRADES, GROUPS, LABEL_COLUMNS
from kernel_src.training.fit_ensemble import ROW_GROUP, OOFModel, fit_and_write, fit_ensemble


def synthetic_labels(n=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=(n, 25), p=[0.6, 0.25, 0.15])
    labels[rng.random((n, 25)) < 0.05] = -1
    return labels


def informative_logits(labels, seed, strength=2.0):
    """Logits that favour the true class (noise on top)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 0.7, labels.shape + (3,))
    true = np.clip(labels, 0, 2)
    np.put_along_axis(logits, true[..., None], np.take_along_axis(
        logits, true[..., None], -1) + strength, -1)
    return logits


def noise_logits(labels, seed):
    return np.random.default_rng(seed).normal(0, 2.0, labels.shape + (3,))


def priors_of(labels):
    counts = np.stack([(labels == k).sum(0) for k in range(3)], -1) + 1.0
    return counts / counts.sum(-1, keepdims=True)


def test_good_model_outweighs_noise_model():
    labels = synthetic_labels()
    models = [OOFModel("v2_good", "v2", Path("."), informative_logits(labels, 1)),
              OOFModel("v2_noise", "v2", Path("."), noise_logits(labels, 2))]
    weights, blends, table = fit_ensemble(models, labels, priors_of(labels))
    assert weights["v2_good"] > 0.8 > weights["v2_noise"]
    assert sum(weights.values()) == pytest.approx(1.0)
    rows = table.set_index("model")
    assert rows.loc["ensemble", "total"] <= rows.loc["v2_good", "total"] + 1e-9
    assert rows.loc["v2_noise", "total"] > rows.loc["class priors", "total"]
    assert rows.loc["ensemble", "total"] < 0.8 * rows.loc["class priors", "total"]
    assert set(table["kind"]) == {"baseline", "model", "family", "blend"}


def test_blends_follow_the_family_that_is_good_on_each_group():
    labels = synthetic_labels(seed=3)
    good, bad = informative_logits(labels, 4), noise_logits(labels, 5)
    spinal_rows = ROW_GROUP == "spinal"
    fam_a = np.where(spinal_rows[None, :, None], good, bad)     # good on spinal only
    fam_b = np.where(spinal_rows[None, :, None], bad, good)     # good elsewhere
    fam_b[:, ROW_GROUP == "subarticular"] = np.nan              # b does not grade these
    models = [OOFModel("v2_a", "v2", Path("."), fam_a), OOFModel("v20_b", "v20", Path("."), fam_b)]
    weights, blends, table = fit_ensemble(models, labels, priors_of(labels))
    assert weights == {"v2_a": 1.0, "v20_b": 1.0}
    assert blends["spinal"]["v2"] > 0.8 and blends["foraminal"]["v20"] > 0.8
    assert blends["subarticular"] == {"v2": 1.0}
    # what the kernel computes with these weights is what the table reports
    probs = ensemble.combine({"v2_a": fam_a, "v20_b": fam_b}, {"v2_a": "v2", "v20_b": "v20"},
                             weights, blends)
    assert metric.score_arrays(labels, probs)["total"] == pytest.approx(
        table.set_index("model").loc["ensemble", "total"])


def write_run(runs: Path, name: str, family_config: V2Config, study_ids, logits, folds):
    folder = runs / "v2" / name
    folder.mkdir(parents=True)
    model = build_model("v2", family_config)
    for k in range(2):
        save_checkpoint(folder / f"fold{k}.pt", "v2", family_config, model)
        rows = [{"study_id": s, "label": col, "logit_0": x[0], "logit_1": x[1], "logit_2": x[2]}
                for s, study, f in zip(study_ids, logits, folds, strict=True) if f == k
                for col, x in zip(LABEL_COLUMNS, study, strict=True)]
        pd.DataFrame(rows).to_csv(folder / f"oof_fold{k}.csv", index=False)


def test_fit_and_write_produces_a_valid_manifest(tmp_path):
    torch.manual_seed(0)
    labels = synthetic_labels(n=30, seed=7)
    study_ids = list(range(1000, 1030))
    table = pd.DataFrame(np.where(labels >= 0, np.array(GRADES, dtype=object)[labels], ""),
                         columns=list(LABEL_COLUMNS))
    table.insert(0, "study_id", study_ids)
    data = tmp_path / "data"
    data.mkdir()
    table.to_csv(data / "train.csv", index=False)
    runs = tmp_path / "runs"
    folds = np.arange(30) % 2
    config = V2Config(**TINY_V2)
    write_run(runs, "good", config, study_ids, informative_logits(labels, 8), folds)
    write_run(runs, "noise", config, study_ids, noise_logits(labels, 9), folds)
    # a stage-1 run (variant folder as train_keypoint writes it): listed with weight 1
    from kernel_src.models.keypoint_sag2d import Sag2D
    from kernel_src.models.registry import save_checkpoint

    kp_config = Sag2D.Config(backbone="test_resnet", image_size=32)
    save_checkpoint(runs / "sag2d_t2/test_resnet/fold0.pt", "sag2d", kp_config,
                    Sag2D.build(kp_config))
    result = fit_and_write({"data_dir": str(data), "runs_dir": str(runs)})
    manifest = load_manifest(runs / "weights_manifest.json")
    stage1 = [m for m in manifest.models if m.stage == 1]
    assert [(m.name, m.family, m.folds[0].file) for m in stage1] == [
        ("sag2d_t2_test_resnet", "sag2d", "sag2d_t2/test_resnet/fold0.pt")]
    validate_manifest(manifest, runs)
    by_name = {m.name: m for m in manifest.models}
    assert by_name["v2_good"].weight > by_name["v2_noise"].weight
    assert by_name["v2_good"].weight == pytest.approx(result["weights"]["v2_good"])
    assert [f.file for f in by_name["v2_good"].folds] == ["v2/good/fold0.pt", "v2/good/fold1.pt"]
    assert set(manifest.blends) == set(GROUPS)
    assert (runs / "class_priors.json").is_file()
