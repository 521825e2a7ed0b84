"""The sagittal keypoint notebooks are the writer's output and run under papermill with
tiny parameters on a phantom, writing checkpoint, out-of-fold keypoints and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from kernel_src.models import registry
from kernel_src.schema import LABEL_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"sag2d": {"image_size": 32},
            "sag3d": {"image_size": 32, "depth": 16}}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from kernel_src.synthetic import generate_competition

    root = tmp_path_factory.mktemp("sag_nb")
    return generate_competition(root / "phantom", 6, 0, seed=5, size=48), root / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_notebook_trains_one_fold(tmp_path, phantom, family):
    import papermill

    out, (data_dir, cache_dir) = tmp_path / "runs", phantom
    params = {"data_dir": str(data_dir), "cache_dir": str(cache_dir), "out_dir": str(out),
              "fold": 0, "n_folds": 3, "epochs": 1, "batch_size": 2, "device": "cpu",
              "seed": 0, "backbone": "resnet18", "variants": ["t1"], **FAMILIES[family]}
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / f"train_keypoint_{family}.ipynb"),
                               str(executed), parameters=params, cwd=str(ROOT),
                               progress_bar=False, kernel_name="python3")
    run_dir = out / f"{family}_t1" / "resnet18"
    _, config, payload = registry.load_checkpoint(run_dir / "fold0.pt")
    assert payload["family"] == family and config.image_size == 32
    assert "baseline_median_mm" in payload["metrics"]
    oof = pd.read_csv(run_dir / "oof_fold0.csv")
    assert set(oof["label"]) == {c for c in LABEL_COLUMNS if "foraminal" in c}
    assert oof["study_id"].nunique() >= 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fold0"]["model"]["all"]["n"] > 0
    printed = "".join(o.get("text", "") for c in nbformat.read(executed, 4).cells
                      if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"{family}_t1/resnet18/fold0: median" in printed and "baseline" in printed
