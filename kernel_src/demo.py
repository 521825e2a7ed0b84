"""`make demo`: the whole user journey on a phantom competition, end to end.

generate the phantom -> cache -> train every stage-1 family through its papermill notebook
-> merge the stage-1 out-of-fold keypoints -> train every stage-2 family through its
notebook -> fit the ensemble (notebook) -> gather the weights dataset -> build the kernel
-> run the BUILT notebook offline on the phantom test studies -> score it against the
truth next to the class-prior baseline -> write the scoring report (HTML).

Small settings so that it fits a 2-core CPU machine (one fold of five; tiny backbones;
96-128 px); `--help` lists what can be changed. Everything goes under `data/demo`,
`runs/demo` and `dist/demo` (git-ignored). Training side only: never inlined.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

# Per stage-1 family: papermill parameters of notebooks/train_keypoint_<family>.ipynb.
# CPU-sized (tiny backbones, 64 px, soft-argmax heads on a stride-2 map that a top-down
# pyramid fuses with every deeper stage: the settings measured on the 40-study phantom,
# see `make keypoints`); the families' defaults are the original's full-size backbones.
_FINE = {"head": "soft_argmax", "feature_stage": 0, "pyramid": 32, "heatmap_weight": 1.0}
STAGE1: dict[str, dict] = {
    "sag2d": {"backbone": "resnet18", "image_size": 64, "epochs": 30, "batch_size": 4,
              "lr": 3e-3, "precise_bn_batches": 4, "config_overrides": _FINE},
    "sag3d": {"backbone": "resnet10t", "image_size": 64, "depth": 32, "epochs": 13,
              "batch_size": 4, "lr": 3e-3, "precise_bn_batches": 4,
              "config_overrides": _FINE},
    "axial3d": {"backbone": "resnet10t", "image_size": 64, "depth": 48, "epochs": 13,
                "batch_size": 4, "lr": 2e-3, "precise_bn_batches": 2,
                "config_overrides": {"head": "soft_argmax", "feature_stride": 2,
                                     "pyramid": 32, "heatmap_weight": 1.0}},
    "axial_level": {"backbone": "resnet10t", "image_size": 32, "epochs": 12,
                    "batch_size": 2, "lr": 1e-3, "precise_bn_batches": 4,
                    "config_overrides": {"regressor_backbone": "resnet10t",
                                         "regressor_size": 96, "hidden": 64,
                                         "regressor_head": "soft_argmax",
                                         "regressor_stride": 2, "regressor_pyramid": 32}},
}


def stage2_models() -> dict[str, tuple[str, dict]]:
    """Per stage-2 model: (family, papermill parameters of train_stage2_<family>.ipynb),
    from the phantom recipe of `training.train_stage2` (tiny CPU-sized models)."""
    from .training.train_stage2 import RECIPE_DEFAULTS, RECIPES

    shared = RECIPE_DEFAULTS["phantom"]
    return {f"{e['family']}_{e['model_name']}": (e["family"], {**shared, **e})
            for e in RECIPES["phantom"]}


@dataclass
class DemoSettings:
    train_studies: int = 40
    test_studies: int = 10
    size: int = 128
    seed: int = 0
    folds: tuple[int, ...] = (0, 1)  # of 5: each model is trained on these folds
    root: Path = REPO               # data/demo, runs/demo and dist/demo go under it
    skip: set[str] = field(default_factory=set)
    epochs_scale: float = 1.0

    @property
    def data_dir(self) -> Path:
        return self.root / "data/demo/competition"

    @property
    def cache_dir(self) -> Path:
        return self.root / "data/demo/cache"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs/demo"

    @property
    def dist_dir(self) -> Path:
        return self.root / "dist/demo"


class Journey:
    """Runs the demo's steps in order, timing each and printing one line per step."""

    def __init__(self, s: DemoSettings):
        self.s = s
        self.timings: dict[str, float] = {}

    def step(self, name: str, fn, *args):
        if name in self.s.skip:
            print(f"[demo] {name}: skipped")
            return None
        print(f"[demo] {name} ...", flush=True)
        start = time.time()
        result = fn(*args)
        self.timings[name] = time.time() - start
        print(f"[demo] {name}: done in {self.timings[name]:.0f} s", flush=True)
        return result


def papermill(notebook: Path, executed: Path, params: dict, cwd: Path = REPO,
              env: dict | None = None, prefix: list[str] | None = None) -> None:
    """Execute a notebook with the papermill CLI in this interpreter's environment."""
    executed.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(executed),
           "--cwd", str(cwd), "--no-progress-bar"]
    for key, value in params.items():
        cmd += ["-y", json.dumps({key: value})]
    done = subprocess.run((prefix or []) + cmd, cwd=cwd, env=env)
    if done.returncode != 0:
        raise SystemExit(f"[demo] notebook failed: {notebook.name} (see {executed})")


def generate(s: DemoSettings) -> None:
    from .synthetic import generate_competition

    if (s.data_dir / "sample_submission.csv").is_file():
        print(f"[demo] phantom exists: {s.data_dir}")
        return
    generate_competition(s.data_dir, s.train_studies, s.test_studies, seed=s.seed,
                         size=s.size)


def cache(s: DemoSettings) -> None:
    from .preprocess import build_cache

    build_cache(s.data_dir, s.cache_dir, split="train", size=None, workers=2)


def _epochs(s: DemoSettings, params: dict) -> dict:
    out = dict(params)
    out["epochs"] = max(1, round(params["epochs"] * s.epochs_scale))
    return out


def train_stage1(s: DemoSettings) -> None:
    for family, params in STAGE1.items():
        for fold in s.folds:
            papermill(NOTEBOOKS / f"train_keypoint_{family}.ipynb",
                      s.runs_dir / "executed" / f"train_keypoint_{family}_fold{fold}.ipynb",
                      {**_epochs(s, params), "data_dir": str(s.data_dir),
                       "cache_dir": str(s.cache_dir), "out_dir": str(s.runs_dir),
                       "fold": fold, "device": "cpu"})


def stage1_table(s: DemoSettings) -> pd.DataFrame:
    """Held-out keypoint error of every stage-1 run next to its mean-shape baseline (the
    issue-4 targets: ratio >= 2, level accuracy >= 0.95), printed and saved as CSV."""
    from .training.keypoint_eval import TARGET_LEVEL_ACC, TARGET_RATIO, results_table

    table = results_table(s.runs_dir)
    if table.empty:
        raise SystemExit(f"[demo] no stage-1 metrics under {s.runs_dir}")
    table.to_csv(s.runs_dir / "stage1_table.csv", index=False)
    print(f"[demo] stage 1, held-out studies: median error (mm) vs the mean-shape baseline; "
          f"target ratio >= {TARGET_RATIO:g} and level accuracy >= {TARGET_LEVEL_ACC:g}")
    shown = table.drop(columns=["backbone"]).round(
        {"median_mm": 2, "p90_mm": 2, "baseline_median_mm": 2, "ratio": 2, "level_acc": 3,
         "seconds": 0})
    print(shown.to_string(index=False))
    print(f"[demo] stage 1: {int(table['ok'].sum())} of {len(table)} runs x folds meet both "
          f"targets; training time {table['seconds'].sum() / 60:.1f} min")
    return table


def merge_stage1_oof(s: DemoSettings) -> Path:
    """One keypoints CSV (Keypoints.to_rows) from every stage-1 run's out-of-fold file,
    merged per study as the kernel merges (`keypoints.merge_weighted`, weights from the
    runs' held-out errors as `fit_ensemble` writes them into the manifest)."""
    from .keypoints import merge_weighted
    from .training.fit_ensemble import keypoint_weight
    from .training.stage2_data import read_keypoints_csv

    parts: dict[int, list] = {}
    for path in sorted(s.runs_dir.glob("*/*/oof_fold*.csv")):
        if "logit_0" in pd.read_csv(path, nrows=0).columns:
            continue  # a stage-2 run
        weight = keypoint_weight(path.parent)
        for study_id, kp in read_keypoints_csv(path).items():
            parts.setdefault(study_id, []).append((kp, weight))
    if not parts:
        raise SystemExit(f"[demo] no stage-1 out-of-fold keypoints under {s.runs_dir}")
    rows = [r for sid, p in sorted(parts.items()) for r in merge_weighted(p).to_rows(sid)]
    table = pd.DataFrame(rows).dropna(subset=["x", "y", "z"])
    path = s.runs_dir / "stage1_oof_keypoints.csv"
    table.to_csv(path, index=False)
    print(f"[demo] stage-1 out-of-fold keypoints: {len(table)} points of "
          f"{table['study_id'].nunique()} studies -> {path}")
    return path


def train_stage2(s: DemoSettings, keypoints_csv: Path) -> None:
    for name, (family, params) in stage2_models().items():
        for fold in s.folds:
            papermill(NOTEBOOKS / f"train_stage2_{family}.ipynb",
                      s.runs_dir / "executed" / f"train_stage2_{name}_fold{fold}.ipynb",
                      {**_epochs(s, params), "data_dir": str(s.data_dir),
                       "cache_dir": str(s.cache_dir), "runs_dir": str(s.runs_dir),
                       "keypoints_csv": str(keypoints_csv), "fold": fold, "device": "cpu"})


def fit_ensemble(s: DemoSettings) -> Path:
    """The fit_ensemble notebook: stage-2 weights and blends (and the stage-1 entries)
    into runs/demo/weights_manifest.json."""
    manifest = s.runs_dir / "weights_manifest.json"
    papermill(NOTEBOOKS / "fit_ensemble.ipynb", s.runs_dir / "executed" / "fit_ensemble.ipynb",
              {"data_dir": str(s.data_dir), "runs_dir": str(s.runs_dir),
               "manifest_path": str(manifest)})
    return manifest


def package(s: DemoSettings, manifest: Path) -> dict:
    """Weights dataset (files + sha256) and the built kernel, as `build_kernel.py` does."""
    import build_kernel

    weights = s.dist_dir / "weights"
    info = build_kernel.gather_weights(manifest, s.runs_dir, weights)
    wheels = s.dist_dir / "wheels"  # timm_3d is installed here: nothing to bundle
    wheels.mkdir(parents=True, exist_ok=True)
    built = build_kernel.build(s.dist_dir / "kernel", manifest)
    print(f"[demo] weights dataset: {info['files']} files in {weights}; kernel: "
          f"{built['notebook']} ({built['bytes'] / 1024:.0f} KiB, "
          f"{len(built['modules'])} modules)")
    return {"weights": weights, "wheels": wheels, "notebook": built["notebook"]}


def run_kernel_offline(s: DemoSettings, dist: dict) -> Path:
    """The BUILT notebook, executed with papermill with no network, from a directory where
    the repository is not importable, on the phantom's test studies (validate mode)."""
    import build_kernel

    run_dir = s.runs_dir / "kernel_run"
    work = s.dist_dir / "working"
    shutil.rmtree(run_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    params = {"input_dir": str(s.data_dir), "weights_dir": str(dist["weights"]),
              "wheels_dir": str(dist["wheels"]), "output_path": str(run_dir / "submission.csv"),
              "device": "cpu", "num_workers": 1, "mode": "validate",
              "labels_path": str(s.data_dir / "truth/test_labels.csv"),
              "debug_dir": str(run_dir / "debug")}
    cmd = [sys.executable, "-m", "papermill", str(dist["notebook"]),
           str(run_dir / "kernel_run.ipynb"), "--cwd", str(work), "--no-progress-bar"]
    for key, value in params.items():
        cmd += ["-y", json.dumps({key: value})]
    cmd, env = build_kernel.offline_command(cmd, s.dist_dir / "offline")
    run_dir.mkdir(parents=True)
    if subprocess.run(cmd, cwd=work, env=env).returncode != 0:
        raise SystemExit(f"[demo] the built kernel failed: see {run_dir / 'kernel_run.ipynb'}")
    return run_dir


def score(s: DemoSettings, run_dir: Path) -> dict:
    """The kernel's submission and the class-prior submission, scored on the truth."""
    from . import metric
    from .competition import load_train
    from .submission import compute_priors, write_submission

    labels = pd.read_csv(s.data_dir / "truth/test_labels.csv")
    kernel_sub = pd.read_csv(run_dir / "submission.csv")
    priors = compute_priors(load_train(s.data_dir / "train.csv"))
    ids = [int(i) for i in labels["study_id"]]
    prior_sub = write_submission(run_dir / "priors_submission.csv", ids, None, priors)
    result = {"kernel": metric.score(labels, kernel_sub),
              "priors": metric.score(labels, prior_sub)}
    table = pd.DataFrame(result).T[["spinal", "foraminal", "subarticular",
                                    "any_severe_spinal", "total"]]
    print("[demo] phantom test set, official metric (lower is better):")
    print(table.round(4).to_string())
    (s.runs_dir / "demo_score.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def write_report(s: DemoSettings, run_dir: Path, dist: dict) -> Path:
    from .report import build_report

    html = build_report(s.data_dir, s.runs_dir / "report", dist["weights"],
                        precomputed_dir=run_dir, device="cpu")
    print(f"[demo] scoring report: {html}")
    return html


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-studies", type=int, default=DemoSettings.train_studies)
    parser.add_argument("--test-studies", type=int, default=DemoSettings.test_studies)
    parser.add_argument("--size", type=int, default=DemoSettings.size)
    parser.add_argument("--seed", type=int, default=DemoSettings.seed)
    parser.add_argument("--folds", type=int, nargs="+", default=list(DemoSettings.folds),
                        help="folds (of 5) each model is trained on")
    parser.add_argument("--root", type=Path, default=REPO,
                        help="folder for data/demo, runs/demo and dist/demo")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply every model's demo epochs (e.g. 0.2 for a smoke run)")
    parser.add_argument("--skip", action="append", default=[], choices=STEPS,
                        help="skip a step whose outputs already exist (repeatable)")
    parser.add_argument("--until", choices=STEPS, default=STEPS[-1],
                        help="stop after this step (e.g. stage1_table: stage 1 only)")
    args = parser.parse_args(argv)
    skip = set(args.skip) | set(STEPS[STEPS.index(args.until) + 1:])
    s = DemoSettings(args.train_studies, args.test_studies, args.size, args.seed,
                     tuple(args.folds), args.root.resolve(), skip, args.epochs_scale)
    j = Journey(s)
    start = time.time()
    j.step("generate", generate, s)
    j.step("cache", cache, s)
    j.step("stage1", train_stage1, s)
    j.step("stage1_table", stage1_table, s)
    oof = j.step("stage1_oof", merge_stage1_oof, s) or s.runs_dir / "stage1_oof_keypoints.csv"
    j.step("stage2", train_stage2, s, oof)
    manifest = j.step("ensemble", fit_ensemble, s) or s.runs_dir / "weights_manifest.json"
    dist = j.step("package", package, s, manifest)
    run_dir = j.step("kernel", run_kernel_offline, s, dist) or s.runs_dir / "kernel_run"
    result = j.step("score", score, s, run_dir)
    j.step("report", write_report, s, run_dir, dist)
    print("[demo] timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in j.timings.items())
          + f"; total {(time.time() - start) / 60:.1f} min")
    return result


STEPS = ("generate", "cache", "stage1", "stage1_table", "stage1_oof", "stage2", "ensemble",
         "package", "kernel", "score", "report")

if __name__ == "__main__":
    main()
