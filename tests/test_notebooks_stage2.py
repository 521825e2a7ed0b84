"""The stage-2 notebooks: up to date with their specs, and they run under papermill with
tiny parameters (train one v2 fold on the phantom, then fit the ensemble on its OOF)."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from stage2_phantom import TINY_V2, phantom  # noqa: F401  (fixture)

from kernel_src.manifest import load_manifest, validate_manifest
from kernel_src.training import fit_ensemble, train_stage2

ROOT = Path(__file__).resolve().parents[1]
SPECS = {s.filename: s for s in fit_ensemble.NOTEBOOKS + train_stage2.NOTEBOOKS[:1]}


@pytest.mark.slow
def test_train_then_fit_notebooks_run_under_papermill(phantom, tmp_path):  # noqa: F811
    import papermill

    runs = tmp_path / "runs"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "train_stage2_v2.ipynb"), str(tmp_path / "train_out.ipynb"),
        parameters=dict(data_dir=str(phantom), cache_dir=str(tmp_path / "cache"),
                        runs_dir=str(runs), config=TINY_V2, model_name="tiny", fold=0,
                        n_folds=4, epochs=1, batch_size=4, device="cpu", num_threads=1,
                        max_studies=12),
        cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    metrics = json.loads((runs / "v2" / "tiny" / "metrics_fold0.json").read_text())
    oof = pd.read_csv(runs / "v2" / "tiny" / "oof_fold0.csv")
    assert metrics["n_valid"] == oof["study_id"].nunique() >= 2
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "fit_ensemble.ipynb"), str(tmp_path / "fit_out.ipynb"),
        parameters=dict(data_dir=str(phantom), runs_dir=str(runs)),
        cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    manifest = load_manifest(runs / "weights_manifest.json")
    validate_manifest(manifest, runs)
    assert [m.name for m in manifest.models] == ["v2_tiny"]
    output = nbformat.read(tmp_path / "fit_out.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in output.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "class priors" in printed and "ensemble" in printed
