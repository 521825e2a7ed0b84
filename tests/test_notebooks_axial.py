"""The axial keypoint notebooks run under papermill with tiny parameters on a phantom and
write their checkpoint, out-of-fold keypoints and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kernel_src.models import registry, zoo  # noqa: F401  (zoo registers the families)

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "axial3d": {"backbone": "resnet10t", "image_size": 32, "depth": 32,
                "config_overrides": {"head": "soft_argmax", "feature_stride": 8}},
    "axial_level": {"backbone": "resnet10t", "image_size": 32,
                    "config_overrides": {"regressor_backbone": "resnet10t",
                                         "regressor_size": 32, "hidden": 32}},
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from kernel_src.synthetic import generate_competition

    root = tmp_path_factory.mktemp("axial_nb")
    return generate_competition(root / "phantom", 6, 0, seed=7, size=48), root / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_notebook_trains_one_fold(tmp_path, phantom, family):
    import papermill

    out, (data_dir, cache_dir) = tmp_path / "runs", phantom
    params = {"data_dir": str(data_dir), "cache_dir": str(cache_dir),
              "out_dir": str(out), "fold": 0, "n_folds": 3, "epochs": 1, "batch_size": 2,
              "device": "cpu", "seed": 0, **TINY[family]}
    papermill.execute_notebook(str(ROOT / "notebooks" / f"train_keypoint_{family}.ipynb"),
                               str(tmp_path / "executed.ipynb"), parameters=params,
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    run_dir = out / family / "resnet10t"
    model, config, payload = registry.load_checkpoint(run_dir / "fold0.pt")
    assert payload["family"] == family and config.image_size == 32
    assert "baseline_median_mm" in payload["metrics"]
    oof = pd.read_csv(run_dir / "oof_fold0.csv")
    assert set(oof["label"].str.contains("subarticular")) == {True}
    assert len(oof) == 10 * oof["study_id"].nunique() and oof["study_id"].nunique() >= 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fold0"]["model"]["all"]["n"] > 0
    folds = pd.read_csv(out / "folds.csv")
    assert set(folds["fold"]) == {0, 1, 2}
