"""The kernel frame with tiny test-only families: wiring, never losing a study, the time
guard, manifest check before work, validate mode, the CLI.

`write_tiny_competition` and `write_weights` are also used by tests/test_build_kernel.py.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kernel_src import competition, dicom, ensemble, kernel, preprocess, submission
from kernel_src.keypoints import Keypoints
from kernel_src.manifest import (
    FoldFile,
    Manifest,
    ManifestError,
    ModelEntry,
    save_manifest,
    sha256_file,
)
from kernel_src.models import registry
from kernel_src.schema import AXIAL_T2, GRADES, LABEL_COLUMNS, N_LABELS, SAG_T1, SAG_T2
from kernel_src.synthetic.dicom_writer import write_stack

SERIES = ((SAG_T1, "sag"), (SAG_T2, "sag"), (AXIAL_T2, "ax"))
ORIENT = {"sag": (0, 1, 0, 0, 0, -1), "ax": (1, 0, 0, 0, 1, 0)}


def _register(cls):
    """Register once even if this module is imported twice (test_build_kernel imports it)."""
    return registry.FAMILIES.get(cls.name) or registry.register_family(cls)


@_register
class FakePoints:
    """Stage 1: every point at the first stack's centre plus a learned offset."""

    name, stage = "test_fake_points", 1

    @dataclasses.dataclass(frozen=True)
    class Config:
        fail_study: int = -1

    @staticmethod
    def build(config):
        return nn.Linear(1, 3)

    @staticmethod
    def infer(models, config, study, device):
        if study.study_id == config.fail_study:
            raise RuntimeError("points model exploded")
        stack = next(iter(study.series.values())).stacks[0]
        x = torch.tensor([[float(stack.pixels.mean()) / 255.0]], device=device)
        offset = torch.stack([m(x)[0] for m in models]).mean(0).float().cpu().numpy()
        centre = stack.positions.mean(axis=0) + offset
        return Keypoints(np.tile(centre, (N_LABELS, 1)), np.full(N_LABELS, 0.5),
                         ["test"] * N_LABELS)


@_register
class FakeGrade:
    """Stage 2: logits from the mean pixel of one series and the points; can be slow or
    fail on purpose."""

    name, stage = "test_fake_grade", 2

    @dataclasses.dataclass(frozen=True)
    class Config:
        needs: str = SAG_T1
        delay_s: float = 0.0
        fail_study: int = -1

    @staticmethod
    def build(config):
        return nn.Linear(2, N_LABELS * 3)

    @staticmethod
    def infer(models, config, study, keypoints, device):
        if study.study_id == config.fail_study:
            raise RuntimeError("grading model exploded")
        series = study.by_description(config.needs)
        if not series:
            raise ValueError(f"no {config.needs} series")
        if not keypoints.known.any():
            raise ValueError("no keypoints")
        _sleep(config.delay_s)
        feats = torch.tensor([[float(series[0].stacks[0].pixels.mean()) / 255.0,
                               float(np.nanmean(keypoints.world)) / 100.0]], device=device)
        out = torch.stack([m(feats)[0] for m in models]).mean(0)
        return out.reshape(N_LABELS, 3).float().cpu().numpy()


def write_tiny_competition(root: Path, study_ids=(11, 22, 33, 44), split="test",
                           size=16, seed=0) -> Path:
    """Kaggle layout: {split}_images/{study}/{series}/{n}.dcm, {split}_series_descriptions.csv
    and truth/labels.csv (train.csv format, random grades). Returns root."""
    rng = np.random.default_rng(seed)
    rows = []
    for study in study_ids:
        for k, (description, plane) in enumerate(SERIES):
            series = study * 10 + k
            steps = np.arange(4)[:, None] * (np.array([3.0, 0, 0]) if plane == "sag"
                                              else np.array([0, 0, 4.0]))
            write_stack(root / f"{split}_images/{study}/{series}",
                        rng.uniform(0, 1000, (4, size, size)), steps + [-20.0, -30, 40],
                        ORIENT[plane], (0.8, 0.8), study_id=study, series_id=series,
                        description=description, instance_numbers=np.arange(1, 5),
                        slice_thickness=3.0)
            rows.append((study, series, description))
    pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / f"{split}_series_descriptions.csv", index=False)
    labels = pd.DataFrame(rng.choice(GRADES, (len(study_ids), N_LABELS)),
                          columns=list(LABEL_COLUMNS))
    labels.insert(0, "study_id", list(study_ids))
    (root / "truth").mkdir(parents=True, exist_ok=True)
    labels.to_csv(root / "truth/labels.csv", index=False)
    return root


def write_weights(weights_dir: Path, models: list[tuple[str, type, dict, float]],
                  n_folds: int = 2, blends=None, seed: int = 0) -> Manifest:
    """Checkpoints (random init) + class priors + weights_manifest.json; returns it.
    models: (name, family class, config dict, ensemble weight)."""
    torch.manual_seed(seed)
    entries = []
    for name, fam, config, weight in models:
        folds = []
        for fold in range(n_folds):
            rel = f"{name}/fold{fold}.pt"
            cfg = fam.Config(**config)
            path = registry.save_checkpoint(weights_dir / rel, fam.name, cfg, fam.build(cfg))
            folds.append(FoldFile(fold, rel, sha256_file(path)))
        entries.append(ModelEntry(name, fam.stage, fam.name, dict(config), tuple(folds), weight))
    priors = np.tile([0.6, 0.3, 0.1], (N_LABELS, 1))
    submission.save_priors(weights_dir / "class_priors.json", priors)
    manifest = Manifest(1, "tester/rsna-weights", "tester/rsna-wheels", "class_priors.json",
                        tuple(entries), blends or {})
    save_manifest(weights_dir / "weights_manifest.json", manifest)
    return manifest


STANDARD = [("points", FakePoints, {}, 1.0),
            ("grade_t1", FakeGrade, {"needs": SAG_T1}, 2.0),
            ("grade_t2", FakeGrade, {"needs": SAG_T2}, 1.0)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_competition(tmp_path_factory.mktemp("comp"))


def _params(data_dir: Path, weights: Path, out: Path, **kw) -> kernel.KernelParams:
    return kernel.KernelParams(input_dir=str(data_dir), weights_dir=str(weights),
                               wheels_dir="", output_path=str(out), device="cpu",
                               num_workers=0, **kw)


def _probs(df: pd.DataFrame) -> np.ndarray:
    return df[["normal_mild", "moderate", "severe"]].to_numpy().reshape(-1, N_LABELS, 3)


def _reference(data_dir: Path, manifest: Manifest, weights: Path, study_ids) -> np.ndarray:
    """What the kernel should give, computed here study by study without the kernel."""
    descriptions = competition.series_by_study(
        competition.load_series_descriptions(data_dir / "test_series_descriptions.csv"))
    models = {e.name: [registry.load_checkpoint(weights / f.file)[0] for f in e.folds]
              for e in manifest.models}
    out = []
    for sid in study_ids:
        study = preprocess.normalize_study(
            dicom.read_study(data_dir / "test_images", sid, descriptions[sid]))
        kp, logits = Keypoints(), {}
        with torch.inference_mode():
            for e in manifest.models:
                fam, cfg = registry.get_family(e.family), registry.config_from_dict(
                    e.family, e.config)
                if e.stage == 1:
                    kp = kp.merged(fam.infer(models[e.name], cfg, study, "cpu"))
            for e in manifest.stage(2):
                fam, cfg = registry.get_family(e.family), registry.config_from_dict(
                    e.family, e.config)
                logits[e.name] = fam.infer(models[e.name], cfg, study, kp, "cpu")
        out.append(ensemble.combine_manifest(logits, manifest))
    return np.stack(out)


def test_run_matches_a_study_by_study_reference(data_dir, tmp_path, caplog):
    manifest = write_weights(tmp_path / "w", STANDARD)
    caplog.set_level(logging.INFO, logger="kernel_src.kernel")
    df = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "sub.csv"))
    ids = [11, 22, 33, 44]
    submission.validate_submission(pd.read_csv(tmp_path / "sub.csv"), ids)
    assert list(df["row_id"][:2]) == ["11_spinal_canal_stenosis_l1_l2",
                                      "11_spinal_canal_stenosis_l2_l3"]
    np.testing.assert_allclose(_probs(df), _reference(data_dir, manifest, tmp_path / "w", ids),
                               atol=1e-6)
    assert not (_probs(df) == [0.6, 0.3, 0.1]).all(axis=-1).any(), "no row fell back"
    text = caplog.text
    for stage in ("read", "keypoints", "stage2", "total"):
        assert f"{stage} " in text, f"timing of {stage} not logged"


def _damaged_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / "test_images/22/221/1.dcm").write_bytes(b"not a dicom file at all")  # corrupt file
    shutil.rmtree(dst / "test_images/33/330")  # study 33 lost its Sagittal T1 series
    shutil.rmtree(dst / "test_images/44")  # study 44 unreadable: no directory
    return dst


def test_damaged_studies_fall_back_alone(data_dir, tmp_path, caplog):
    manifest = write_weights(tmp_path / "w", STANDARD)
    clean = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "clean.csv"))
    damaged = _damaged_copy(data_dir, tmp_path / "damaged")
    caplog.set_level(logging.INFO, logger="kernel_src.kernel")
    df = kernel.run(_params(damaged, tmp_path / "w", tmp_path / "sub.csv"))
    submission.validate_submission(df, [11, 22, 33, 44])
    p, c = _probs(df), _probs(clean)
    np.testing.assert_allclose(p[0], c[0], atol=1e-9)  # untouched study identical
    assert np.isfinite(p[1]).all()  # corrupt file: skipped slice, still graded
    t2_only = dataclasses.replace(manifest, models=(manifest.models[0], manifest.models[2]))
    np.testing.assert_allclose(p[2], _reference(damaged, t2_only, tmp_path / "w", [33])[0],
                               atol=1e-6)  # study 33 lost grade_t1: grade_t2 alone
    assert not np.allclose(p[2], c[2])
    np.testing.assert_allclose(p[3], np.tile([0.6, 0.3, 0.1], (N_LABELS, 1)), atol=1e-9)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study ")]
    assert any(m.startswith("study 33: kept 25/25") and "no Sagittal T1 series" in m
               for m in lines)
    assert any(m.startswith("study 44: class priors: read failed") for m in lines)
    assert not any(m.startswith("study 11") for m in lines)


def test_model_that_raises_costs_only_its_output_for_that_study(data_dir, tmp_path, caplog):
    models = [STANDARD[0], ("grade_t1", FakeGrade, {"needs": SAG_T1, "fail_study": 22}, 2.0),
              STANDARD[2]]
    manifest = write_weights(tmp_path / "w", models)
    caplog.set_level(logging.INFO, logger="kernel_src.kernel")
    df = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "sub.csv"))
    ref = _reference(data_dir, dataclasses.replace(manifest, models=manifest.models[::2]),
                     tmp_path / "w", [22])
    np.testing.assert_allclose(_probs(df)[1], ref[0], atol=1e-6)  # grade_t2 alone for 22
    full = _reference(data_dir, manifest, tmp_path / "w", [11])
    np.testing.assert_allclose(_probs(df)[0], full[0], atol=1e-6)
    assert sum("grading model exploded" in r.getMessage() for r in caplog.records) == 1

    write_weights(tmp_path / "w2", [("points", FakePoints, {"fail_study": 33}, 1.0),
                                    STANDARD[1]])
    df = kernel.run(_params(data_dir, tmp_path / "w2", tmp_path / "sub2.csv"))
    np.testing.assert_allclose(_probs(df)[2], np.tile([0.6, 0.3, 0.1], (N_LABELS, 1)))
    assert np.isfinite(_probs(df)).all()


def test_bad_manifest_stops_before_any_work(data_dir, tmp_path):
    write_weights(tmp_path / "w", STANDARD)
    (tmp_path / "w/grade_t2/fold1.pt").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"grade_t2.*fold 1: sha256 mismatch"):
        kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "sub.csv"))
    assert not (tmp_path / "sub.csv").exists()
    write_weights(tmp_path / "w", STANDARD)
    with pytest.raises(ManifestError, match="differs from the"):
        kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "sub.csv",
                           manifest_sha256="0" * 64))


_sleep = time.sleep  # the fake models' delay; the time-guard tests make it virtual


@pytest.fixture
def virtual_clock(monkeypatch):
    """The kernel's clock advances only by the fake models' delays: the time-guard tests
    see exact per-study times whatever the load of the machine."""
    state = {"now": 0.0}

    def advance(seconds: float) -> None:
        state["now"] += float(seconds)

    monkeypatch.setattr(kernel, "clock", lambda: state["now"])
    monkeypatch.setattr(sys.modules[__name__], "_sleep", advance)
    return kernel.clock


def _timed(name, delay, weight):
    return (name, FakeGrade, {"needs": SAG_T2, "delay_s": delay}, weight)


def test_time_guard_drops_lowest_weight_model_and_finishes(tmp_path, caplog, virtual_clock):
    ids = tuple(range(101, 109))
    data = write_tiny_competition(tmp_path / "comp", ids)
    write_weights(tmp_path / "w", [STANDARD[0], _timed("slow", 0.6, 0.5),
                                   _timed("fast", 0.0, 1.0)], n_folds=1)
    caplog.set_level(logging.INFO, logger="kernel_src.kernel")
    budget = 4.0  # 8 studies x 0.6 s of "slow" alone would take 4.8 s
    start = virtual_clock()
    df = kernel.run(_params(data, tmp_path / "w", tmp_path / "sub.csv",
                            time_budget_s=budget, warmup_studies=2))
    assert virtual_clock() - start < budget
    submission.validate_submission(df, list(ids))
    drops = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(drops) == 1 and "slow (stage 2, weight 0.5)" in drops[0]
    assert "fast" not in drops[0] and "points" not in drops[0]
    assert "dropped models: slow" in caplog.text
    p = _probs(df)
    assert np.isfinite(p).all() and not np.allclose(p[-1], [0.6, 0.3, 0.1]), \
        "the last study still has the fast model"


def test_time_guard_last_resort_is_priors_for_the_rest(tmp_path, caplog, virtual_clock):
    ids = tuple(range(201, 207))
    data = write_tiny_competition(tmp_path / "comp", ids)
    write_weights(tmp_path / "w", [STANDARD[0], _timed("slow", 0.8, 1.0)], n_folds=1)
    caplog.set_level(logging.INFO, logger="kernel_src.kernel")
    budget = 2.0  # 6 x 0.8 s would take 4.8 s
    start = virtual_clock()
    df = kernel.run(_params(data, tmp_path / "w", tmp_path / "sub.csv",
                            time_budget_s=budget, warmup_studies=1))
    assert virtual_clock() - start < budget
    submission.validate_submission(df, list(ids))
    p = _probs(df)
    assert not np.allclose(p[0], [0.6, 0.3, 0.1]), "the first study was graded"
    np.testing.assert_allclose(p[-1], np.tile([0.6, 0.3, 0.1], (N_LABELS, 1)))
    assert "dropping slow" in caplog.text or "priors for the last" in caplog.text


def _loaded(name, stage, weight):
    entry = ModelEntry(name, stage, "f", {}, (), weight)
    return kernel.LoadedModel(entry, object, None, [])


def test_time_guard_plan_order_and_forecast():
    models = [_loaded("kp_a", 1, 1.0), _loaded("kp_b", 1, 0.1), _loaded("g_hi", 2, 3.0),
              _loaded("g_lo", 2, 0.5), _loaded("g_mid", 2, 1.0)]
    order = kernel.TimeGuard.drop_order(models)
    assert [[m.entry.name for m in g] for g in order] == [
        ["g_lo"], ["g_mid"], ["g_hi", "kp_a", "kp_b"]]
    guard = kernel.TimeGuard(budget_s=1000.0, start=0.0, warmup=2)
    times = {"kp_a": 1.0, "kp_b": 1.0, "g_hi": 2.0, "g_lo": 5.0, "g_mid": 1.0}
    guard.observe(30.0, {name: 20.0 for name in times})  # first study: start-up costs
    assert guard.per_study(models) == pytest.approx(130.0)
    guard.observe(0.5, times)
    assert guard.per_study(models) == pytest.approx(10.5), "the first study is left out"
    guard.observe(0.5, times)
    assert guard.per_study(models) == pytest.approx(10.5)
    assert guard.plan(now=10.0, n_done=1, n_left=500, active=models) == [], "warm-up"
    # 100 studies left: 10 + 100 * 10.5 > 950 (= 1000 - reserve); without g_lo: 10 + 550 fits
    dropped = guard.plan(now=10.0, n_done=2, n_left=100, active=models)
    assert [m.entry.name for m in dropped] == ["g_lo"]
    dropped = guard.plan(now=10.0, n_done=2, n_left=10_000, active=models)
    assert len(dropped) == 5
    assert guard.must_stop(949.0, models) and not guard.must_stop(900.0, models[:1])


def test_validate_mode_scores_its_submission(data_dir, tmp_path, capsys):
    write_weights(tmp_path / "w", STANDARD)
    from kernel_src import metric

    df = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "sub.csv", mode="validate",
                            labels_path=str(data_dir / "truth/labels.csv")))
    expected = metric.score(competition.load_train(data_dir / "truth/labels.csv"),
                            pd.read_csv(tmp_path / "sub.csv"))
    assert df.attrs["score"] == pytest.approx(expected)
    assert f"total={expected['total']:.6f}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="labels_path"):
        kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "x.csv", mode="validate"))
    fold = pd.read_csv(data_dir / "truth/labels.csv").iloc[[1, 3]]  # one "fold": 22 and 44
    fold.to_csv(tmp_path / "fold.csv", index=False)
    df = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "f.csv", mode="validate",
                            labels_path=str(tmp_path / "fold.csv")))
    assert sorted({int(r.split("_")[0]) for r in df["row_id"]}) == [22, 44]
    expected = metric.score(competition.load_train(tmp_path / "fold.csv"), df)
    assert df.attrs["score"] == pytest.approx(expected)
    fold.assign(study_id=999).iloc[:1].to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(ValueError, match="labels none of the studies"):
        kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "n.csv", mode="validate",
                           labels_path=str(tmp_path / "none.csv")))
    assert not (tmp_path / "n.csv").exists()


def test_cli_mirrors_run(data_dir, tmp_path):
    write_weights(tmp_path / "w", STANDARD)
    df = kernel.main(["--input", str(data_dir), "--weights", str(tmp_path / "w"), "--out",
                      str(tmp_path / "cli.csv"), "--device", "cpu", "--num-workers", "0",
                      "--max-studies", "2"])
    assert sorted(set(df["row_id"].str.split("_").str[0])) == ["11", "22"]
    ref = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "ref.csv", max_studies=2))
    np.testing.assert_allclose(_probs(df), _probs(ref))


def test_reader_workers_give_the_same_submission(data_dir, tmp_path):
    write_weights(tmp_path / "w", STANDARD)
    a = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "a.csv"))
    params = dataclasses.replace(_params(data_dir, tmp_path / "w", tmp_path / "b.csv"),
                                 num_workers=2)
    b = kernel.run(params)
    np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-12)


def test_bad_parameters_stop_before_any_work(data_dir, tmp_path):
    write_weights(tmp_path / "w", STANDARD)
    with pytest.raises(ValueError, match="mode must be"):
        kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "s.csv", mode="score"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            kernel.run(dataclasses.replace(
                _params(data_dir, tmp_path / "w", tmp_path / "s.csv"), device="cuda"))
    assert not (tmp_path / "s.csv").exists()


def test_a_killed_reader_worker_costs_nothing(data_dir, tmp_path, monkeypatch, caplog):
    """A worker process that dies (say, out of memory): the rest is read in the main
    process and the submission equals the normal one. It dies on its first study: the
    main process is then waiting for that study, so torch's SIGCHLD error is raised
    inside the loader (a death later on could surface anywhere in the main process)."""
    import os

    from torch.utils.data import get_worker_info

    write_weights(tmp_path / "w", STANDARD)
    normal = kernel.run(_params(data_dir, tmp_path / "w", tmp_path / "a.csv"))
    real = dicom.read_study

    def dying(images_dir, study_id, descriptions):
        if get_worker_info() is not None and study_id == 11:
            os._exit(3)
        return real(images_dir, study_id, descriptions)

    monkeypatch.setattr(dicom, "read_study", dying)
    caplog.set_level(logging.INFO, logger="kernel_src.kernel")
    params = dataclasses.replace(_params(data_dir, tmp_path / "w", tmp_path / "b.csv"),
                                 num_workers=1)
    df = kernel.run(params)
    assert "reader workers failed after 0 studies" in caplog.text
    np.testing.assert_allclose(_probs(df), _probs(normal), atol=1e-12)
