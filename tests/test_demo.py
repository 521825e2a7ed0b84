"""`make demo` end to end at a tiny scale: every step runs and leaves its outputs (the
quality numbers of the full-size demo are measured by `make demo`, not asserted here)."""

import json

import numpy as np
import pandas as pd
import pytest

from kernel_src import demo, submission
from kernel_src.manifest import load_manifest


@pytest.mark.slow
def test_demo_journey_runs_end_to_end(tmp_path):
    result = demo.main(["--root", str(tmp_path), "--train-studies", "10", "--test-studies",
                        "3", "--size", "64", "--folds", "0", "--epochs-scale", "0.05"])
    runs, dist = tmp_path / "runs/demo", tmp_path / "dist/demo"
    manifest = load_manifest(dist / "weights/weights_manifest.json")
    families = {m.family for m in manifest.models}
    assert families == set(demo.STAGE1) | {f for f, _ in demo.stage2_models().values()}
    assert {m.stage for m in manifest.models} == {1, 2}
    sub = pd.read_csv(runs / "kernel_run/submission.csv")
    labels = pd.read_csv(tmp_path / "data/demo/competition/truth/test_labels.csv")
    submission.validate_submission(sub, labels["study_id"].tolist())
    assert (runs / "kernel_run/debug/keypoints.csv").is_file()
    table = pd.read_csv(runs / "stage1_table.csv")  # held-out error vs mean-shape baseline
    assert set(table["run"]) == {"sag2d_t1", "sag2d_t2", "sag3d_t1", "sag3d_t2", "axial3d",
                                 "axial_level"}
    assert (table["baseline_median_mm"] > 0).all() and table["ratio"].notna().all()
    for part in ("kernel", "priors"):
        assert np.isfinite(result[part]["total"])
    assert json.loads((runs / "demo_score.json").read_text()) == json.loads(
        json.dumps(result))
    html = (runs / "report/post_deadline_scoring.html").read_text()
    assert "data:image/png;base64" in html


def test_until_stops_after_the_named_step(tmp_path, capsys):
    demo.main(["--root", str(tmp_path), "--train-studies", "4", "--test-studies", "1",
               "--size", "64", "--until", "cache"])
    assert (tmp_path / "data/demo/cache/train/index.csv").is_file()
    assert not (tmp_path / "runs/demo").exists()  # no training step ran
    out = capsys.readouterr().out
    assert "[demo] stage1: skipped" in out and "[demo] report: skipped" in out
