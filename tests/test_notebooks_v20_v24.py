"""The v20 / v24 training notebooks: up to date with their specs, and they run under
papermill with tiny parameters, writing a checkpoint, OOF logits and metrics."""

import json
from pathlib import Path

import pandas as pd
import pytest
from stage2_phantom import phantom  # noqa: F401  (fixture)

from kernel_src.models.registry import load_checkpoint
from kernel_src.training import train_stage2

ROOT = Path(__file__).resolve().parents[1]
SPECS = {s.filename: s for s in train_stage2.NOTEBOOKS
         if s.filename in ("train_stage2_v20.ipynb", "train_stage2_v24.ipynb")}
TINY = {
    "train_stage2_v20.ipynb": dict(target="foraminal", backbone="test_resnet", crop_unit="mm",
                                   crop_h=50.0, crop_w=50.0, size=24, dim=16),
    "train_stage2_v24.ipynb": dict(axial_backbone="test_resnet", sag_backbone="test_resnet",
                                   crop_unit="mm", crop_size=50.0, size=24, sag_slices=3,
                                   sag_crop_h=30.0, sag_crop_w=50.0, sag_size_h=12,
                                   sag_size_w=24, dim=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("filename", sorted(TINY))
def test_notebook_runs_under_papermill(phantom, tmp_path, filename):  # noqa: F811
    import papermill

    family = SPECS[filename].parameters["family"]
    runs = tmp_path / "runs"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / filename), str(tmp_path / "out.ipynb"),
        parameters=dict(data_dir=str(phantom), cache_dir=str(tmp_path / "cache"),
                        runs_dir=str(runs), config=TINY[filename], model_name="tiny", fold=1,
                        n_folds=4, epochs=1, batch_size=4, device="cpu", num_threads=1,
                        max_studies=8),
        cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    out = runs / family / "tiny"
    metrics = json.loads((out / "metrics_fold1.json").read_text())
    assert metrics["family"] == family and metrics["n_valid"] == 2
    model, config, payload = load_checkpoint(out / "fold1.pt")
    assert payload["family"] == family and config.dim == 16
    oof = pd.read_csv(out / "oof_fold1.csv")
    assert oof["study_id"].nunique() == 2 and len(oof) == 2 * 10   # 2 sides x 5 levels
    assert (runs / "folds.csv").is_file()
