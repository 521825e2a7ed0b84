"""report: the kernel's debug outputs, the ablation against a real rerun, the tables against
hand-computed cases, and the HTML report built on a tiny run with embedded images."""

from __future__ import annotations

import json
import re

import nbformat
import numpy as np
import pandas as pd
import pytest
from test_kernel import STANDARD, write_tiny_competition, write_weights

from kernel_src import ensemble, report
from kernel_src.schema import LABEL_COLUMNS, N_LABELS

STUDIES = (11, 22, 33)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-study competition, random fake-family weights, one source-mode kernel run."""
    root = tmp_path_factory.mktemp("report")
    data = write_tiny_competition(root / "comp", study_ids=STUDIES)
    write_weights(root / "weights", STANDARD)
    labels = data / "truth/labels.csv"
    run_dir = report.run_kernel(data, root / "weights", root / "run", labels_path=labels,
                                device="cpu")
    return {"root": root, "data": data, "weights": root / "weights", "labels": labels,
            "run_dir": run_dir}


def test_kernel_debug_outputs_cover_every_study_and_model(tiny):
    debug = tiny["run_dir"] / report.DEBUG
    kp = pd.read_csv(debug / "keypoints.csv")
    logits = pd.read_csv(debug / "logits.csv")
    timings = pd.read_csv(debug / "timings.csv")
    assert sorted(kp["study_id"].unique()) == list(STUDIES)
    assert (kp.groupby("study_id").size() == N_LABELS).all()
    assert logits.groupby("model").size().to_dict() == {"grade_t1": 3 * N_LABELS,
                                                        "grade_t2": 3 * N_LABELS}
    assert set(timings["step"]) == {"read", "points", "grade_t1", "grade_t2"}
    assert (timings.groupby("study_id").size() == 4).all() and (timings["seconds"] >= 0).all()


def test_cached_logits_recombine_to_the_submission(tiny):
    run = report.load_run(tiny["run_dir"], tiny["labels"], tiny["weights"])
    probs = ensemble.combine_manifest(report.model_logits(run), run.manifest)
    assert np.allclose(probs, run.probs, atol=1e-9)


def test_ablation_matches_a_kernel_rerun_without_the_model(tiny):
    run = report.load_run(tiny["run_dir"], tiny["labels"], tiny["weights"])
    table = report.ablation_table(run)
    assert table.loc["(all)", "total"] == pytest.approx(report.scores_table(run).loc["kernel",
                                                                                     "total"])
    rerun_dir = report.rerun_without("grade_t2", tiny["data"], tiny["weights"],
                                     tiny["root"] / "without_t2", labels_path=tiny["labels"],
                                     device="cpu")
    rerun = report.load_run(rerun_dir, tiny["labels"], tiny["weights"])
    assert set(pd.read_csv(rerun_dir / "debug/logits.csv")["model"]) == {"grade_t1"}
    assert table.loc["without grade_t2", "total"] == pytest.approx(
        report.scores_table(rerun).loc["kernel", "total"], abs=1e-9)
    assert table.loc["without grade_t2", "delta_total"] == pytest.approx(
        table.loc["without grade_t2", "total"] - table.loc["(all)", "total"])


def test_per_study_loss_by_hand():
    codes = np.full((2, N_LABELS), -1)
    codes[0, 0], codes[0, 7] = 0, 2
    probs = np.full((2, N_LABELS, 3), 1 / 3)
    probs[0, 0], probs[0, 7] = [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]
    loss = report.per_study_loss(codes, probs)
    assert loss[0] == pytest.approx((-np.log(0.5) - 4 * np.log(0.8)) / 5)
    assert np.isnan(loss[1])


def test_confusion_and_calibration_by_hand():
    codes = np.full((1, N_LABELS), -1)
    codes[0, :3] = [0, 1, 2]          # spinal rows
    codes[0, 5] = 2                   # a left foraminal row
    probs = np.tile(np.eye(3)[0], (1, N_LABELS, 1)).astype(float)  # always Normal/Mild
    probs[0, 2] = [0, 0, 1]
    conf = report.confusion_matrices(codes, probs)
    assert conf["spinal"].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert conf["foraminal"].sum() == 1 and conf["foraminal"][2, 0] == 1
    assert conf["subarticular"].sum() == 0
    cal = report.calibration_table(codes, probs, bins=10).set_index(["grade", "bin_mid"])
    # P(Normal/Mild) = 1 on 3 rows of which 1 is Normal/Mild
    assert cal.loc[("Normal/Mild", 0.95), "observed"] == pytest.approx(1 / 3)
    assert cal.loc[("Normal/Mild", 0.95), "count"] == 3
    assert cal.loc[("Severe", 0.95), "observed"] == 1.0


def test_keypoint_errors_and_timings_by_hand():
    pred = pd.DataFrame({"study_id": [1, 1], "label": list(LABEL_COLUMNS[:2]),
                         "x": [3.0, np.nan], "y": [4.0, 0.0], "z": [0.0, 0.0]})
    truth = pd.DataFrame({"study_id": [1, 1], "label": list(LABEL_COLUMNS[:2]),
                          "x": [0.0, 0.0], "y": [0.0, 0.0], "z": [0.0, 0.0]})
    errors = report.keypoint_errors(pred, truth)
    assert errors["error_mm"].tolist() == [5.0]
    assert errors.loc[0, "condition"] == "spinal_canal_stenosis"
    assert errors.loc[0, "level"] == "l1_l2"
    timings = pd.DataFrame({"study_id": [1, 1, 1, 2, 2, 2],
                            "step": ["read", "kp", "g", "read", "kp", "g"],
                            "stage": [0, 1, 2, 0, 1, 2],
                            "seconds": [1.0, 2.0, 3.0, 3.0, 4.0, 5.0]})
    table = report.timing_table(timings)
    assert table.loc["read", "per_study_s"] == 2.0 and table.loc["stage2", "total_s"] == 8.0
    assert table.loc["keypoints", "max_study_s"] == 4.0
    assert table.loc["  keypoints: kp", "total_s"] == 6.0
    assert list(table.index[3:]) == ["  keypoints: kp", "  stage2: g"]


def test_submission_commands_use_the_cli_flags():
    text = report.submission_commands("alice", "my-kernel", 7, "late run")
    assert "kaggle kernels push -p dist/kernel" in text
    assert ("kaggle competitions submit rsna-2024-lumbar-spine-degenerative-classification "
            "-k alice/my-kernel -v 7 -f submission.csv -m \"late run\"") in text


def test_committed_notebook_is_the_generated_one(tmp_path):
    fresh = nbformat.read(report.write_notebook(tmp_path / "nb.ipynb"), 4)
    committed = nbformat.read(report.NOTEBOOK, 4)
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells]
    tagged = [c for c in committed.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


def test_build_report_renders_html_with_embedded_images(tiny):
    data = tiny["data"]
    # truth landmarks for the keypoint-error histogram: the fake points plus (3, 4, 0) mm
    kp = pd.read_csv(tiny["run_dir"] / "debug/keypoints.csv")
    lm = kp.assign(condition=kp["label"].str[:-6], level=kp["label"].str[-5:],
                   x=kp["x"] + 3.0, y=kp["y"] + 4.0)
    lm[["study_id", "condition", "level", "x", "y", "z"]].to_csv(data / "truth/landmarks.csv",
                                                                 index=False)
    html = report.build_report(data, tiny["root"] / "html", tiny["weights"],
                               labels_path=tiny["labels"], precomputed_dir=tiny["run_dir"],
                               n_worst=1, kaggle_user="alice", kernel_version=3)
    text = html.read_text()
    assert html.suffix == ".html" and html.exists()
    # confusion, calibration, keypoint histogram, the worst study's two overlays
    assert len(re.findall(r"data:image/png;base64,", text)) >= 5
    assert "class priors" in text and "without grade_t1" in text and "per_study_s" in text
    assert "-k alice/rsna-lumbar-offline-kernel -v 3" in text
    # the median error table: every point is 5 mm off its landmark
    assert "l5_s1" in text and len(re.findall(r"<td>5\.0+</td>", text)) == 25
    executed = nbformat.read(html.with_suffix(".ipynb"), 4)
    errors = [o for c in executed.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, json.dumps(errors)[:500]


def test_logged_timings_parse_the_kernel_summary_line():
    log = ("2026 INFO 3 studies; timings: %s\n"  # the kernel's source: no numbers
           "2026 INFO wrote sub.csv: 2 studies; timings: load 9.16 s (4.579 s/study), "
           "keypoints 6.36 s (3.182 s/study), total 21.15 s (10.577 s/study)\nnext line")
    table = report.logged_timings(log)
    assert list(table.index) == ["load", "keypoints", "total"]
    assert table.loc["keypoints", "per_study_s"] == 3.182
    assert table.loc["total", "total_s"] == 21.15
    assert report.logged_timings("no summary here") is None


def test_stage1_ablation_reruns_the_kernel(tiny):
    """Without its only stage-1 model no grader gets points: every study falls back to the
    class priors, so the ablated score is the prior baseline's."""
    run = report.load_run(tiny["run_dir"], tiny["labels"], tiny["weights"])
    table = report.stage1_ablation(run, tiny["data"], tiny["weights"], tiny["root"] / "abl1",
                                   tiny["labels"], device="cpu")
    assert list(table.index) == ["(all)", "without points"]
    baseline = report.scores_table(run).loc["class priors", "total"]
    assert table.loc["without points", "total"] == pytest.approx(baseline, abs=1e-9)
    assert table.loc["(all)", "delta_total"] == 0.0
