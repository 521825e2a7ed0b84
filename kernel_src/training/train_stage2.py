"""Train one stage-2 family on one fold; what every `train_stage2_<family>` notebook calls.

`train_fold(params) -> dict`. Steps: folds (`runs/<name>/folds.csv`, shared with stage 1),
StudyRecords of the fold's train / validation studies (cache built when missing), the
family's model from `config` overrides, then the shared loop `training.loop.fit` with
- loss: class-weighted cross entropy [1, 2, 4] on the family's outputs,
- validation / model selection: the official metric (`kernel_src.metric`, total, lower is
  better) of `Family.infer` (the kernel's code path) on the validation studies, rows the
  family does not grade filled with the training fold's class priors.
Writes, under runs/<name>/<family>/<model_name>/: fold<k>.pt (best checkpoint, registry
format), oof_fold<k>.csv (study_id, label, logit_0, logit_1, logit_2; graded rows of the
validation studies), metrics_fold<k>.json, and fold<k>_state/ (loop state, for resuming).
Validation points are the stage-1 out-of-fold points when `keypoints_csv` is given (what
the kernel will see), the ground truth otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import metric
from ..competition import load_train
from ..models import zoo  # noqa: F401  (registers every family)
from ..models.grade_common import class_weighted_ce
from ..models.registry import config_from_dict, get_family, load_checkpoint
from ..schema import LABEL_COLUMNS
from ..submission import compute_priors
from . import fit_ensemble
from . import folds as folds_mod
from .loop import TrainConfig, fit, make_loader, setup_distributed
from .notebooks import NotebookSpec
from .stage2_data import AugConfig, Stage2Dataset, StudyRecord, load_records, mixed_keypoints

DEFAULTS: dict[str, Any] = {
    "data_dir": "data/phantom",
    "cache_dir": "data/phantom_cache",
    "cache_size": None,
    "runs_dir": "runs/phantom",
    "family": "v2",
    "config": {},
    "model_name": "",
    "keypoints_csv": None,
    "fold": 0,
    "n_folds": 5,
    "epochs": 10,
    "lr": 2e-4,
    "batch_size": 4,
    "num_workers": 0,
    "device": "auto",
    "num_threads": None,
    "seed": 0,
    "max_studies": None,
    "augment": {},
}
COMMENTS: dict[str, str] = {
    "data_dir": "competition layout (train.csv, train_images/, ...)",
    "cache_dir": "preprocess cache (built when missing)",
    "cache_size": "in-plane size of the cached stacks, None: native like the kernel",
    "runs_dir": "runs/<name>: folds.csv and every model's outputs",
    "config": "overrides of the family's Config fields",
    "model_name": "output folder name; default: the config's backbone",
    "keypoints_csv": "stage-1 OOF keypoints: CSV path / glob / list (None: truth only)",
    "fold": "validation fold, 0 .. n_folds - 1",
    "lr": "AdamW peak learning rate",
    "device": "auto, cpu or cuda",
    "num_threads": "torch CPU threads (None: torch's default)",
    "max_studies": "first N labelled studies only (smoke tests)",
    "augment": "overrides of stage2_data.AugConfig",
}


def default_model_name(config) -> str:
    """The runs-layout folder name: the first `*backbone` field of a family config, with
    `_<target>` appended when the config has a `target` (v20's spinal / foraminal)."""
    names = [f.name for f in dataclasses.fields(config)]
    backbone = next((str(getattr(config, n)) for n in names if n.endswith("backbone")), "model")
    return f"{backbone}_{config.target}" if "target" in names else backbone


def family_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class-weighted CE of the module's (B, *grid, 3) logits against batch["target"]."""
    inputs = {k: v for k, v in batch.items() if k != "target"}
    return class_weighted_ce(model(**inputs), batch["target"])


def predict_logits(family, config, model, records: list[StudyRecord], device) -> np.ndarray:
    """(N, 25, 3) logits of `Family.infer` (NaN rows not graded); points: stage-1 when
    present, else the truth."""
    model.eval()
    out = [family.infer([model], config, r.study, mixed_keypoints(r, True), device)
           for r in records]
    return np.stack(out) if out else np.zeros((0, len(LABEL_COLUMNS), 3))


def score_logits(logits: np.ndarray, labels: np.ndarray, priors: np.ndarray) -> dict[str, float]:
    """Official metric of softmax(logits) with NaN rows replaced by `priors` (25, 3);
    adds "score" = total (what model selection minimises)."""
    result = fit_ensemble.score(logits, labels, priors)
    return {"score": result["total"], **result}


def oof_frame(study_ids, logits: np.ndarray) -> pd.DataFrame:
    """Long OOF table (study_id, label, logit_0..2) of the graded (finite) rows."""
    rows = [{"study_id": int(s), "label": LABEL_COLUMNS[j], "logit_0": row[0],
             "logit_1": row[1], "logit_2": row[2]}
            for s, study in zip(study_ids, logits, strict=True) for j, row in enumerate(study)
            if np.isfinite(row).all()]
    return pd.DataFrame(rows, columns=["study_id", "label", "logit_0", "logit_1", "logit_2"])


def _split(p: dict) -> tuple[list[int], list[int]]:
    data_dir, runs_dir = Path(p["data_dir"]), Path(p["runs_dir"])
    train = load_train(data_dir / "train.csv")
    ids = sorted(int(s) for s in train["study_id"])
    folds = folds_mod.load_or_make_folds(runs_dir / "folds.csv", ids, p["n_folds"])
    if p["max_studies"]:
        ids = ids[: int(p["max_studies"])]
    return folds_mod.split(folds, int(p["fold"]), ids)


def train_fold(params: dict[str, Any]) -> dict[str, Any]:
    """Train one family / fold (parameters: `DEFAULTS`); returns the metrics dict."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"train_fold: unknown parameter(s) {unknown}")
    p = {**DEFAULTS, **params}
    torch.manual_seed(int(p["seed"]))
    if p["num_threads"]:
        torch.set_num_threads(int(p["num_threads"]))
    family = get_family(p["family"])
    config = config_from_dict(p["family"], dict(p["config"]))
    out_dir = Path(p["runs_dir"]) / p["family"] / (p["model_name"] or default_model_name(config))
    train_ids, valid_ids = _split(p)
    device = setup_distributed(p["device"])
    load = dict(keypoints_csv=p["keypoints_csv"], size=p["cache_size"])
    train_records = load_records(p["data_dir"], p["cache_dir"], train_ids, **load)
    valid_records = load_records(p["data_dir"], p["cache_dir"], valid_ids, **load)
    priors = compute_priors(pd.DataFrame(
        [r.labels for r in train_records], columns=list(LABEL_COLUMNS)))
    valid_labels = np.stack([r.labels for r in valid_records])

    def valid_fn(model) -> dict[str, float]:
        return score_logits(predict_logits(family, config, model, valid_records, device),
                            valid_labels, priors)

    dataset = Stage2Dataset(family, config, train_records,
                            AugConfig(**dict(p["augment"])), seed=int(p["seed"]))
    loader = make_loader(dataset, int(p["batch_size"]), num_workers=int(p["num_workers"]),
                         seed=int(p["seed"]))
    k = int(p["fold"])
    train_config = TrainConfig(epochs=int(p["epochs"]), lr=float(p["lr"]), device=device)
    start = time.time()
    result = fit(family.build(config), loader, valid_fn, train_config, family_loss,
                 out_dir / f"fold{k}_state", family=p["family"], model_config=config)
    best = out_dir / f"fold{k}.pt"
    shutil.copyfile(result["checkpoint"], best)
    model, _, _ = load_checkpoint(best, device)
    logits = predict_logits(family, config, model, valid_records, device)
    oof_frame(valid_ids, logits).to_csv(out_dir / f"oof_fold{k}.csv", index=False)
    prior_score = metric.score_arrays(valid_labels, np.repeat(priors[None], len(valid_ids), 0))
    metrics = {"family": p["family"], "fold": k, "checkpoint": str(best),
               "oof_metric": score_logits(logits, valid_labels, priors),
               "prior_metric": prior_score, "best_epoch": result["best_epoch"],
               "seconds": time.time() - start, "n_train": len(train_ids),
               "n_valid": len(valid_ids), "history": result["history"]}
    (out_dir / f"metrics_fold{k}.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"{p['family']} fold {k}: oof total {metrics['oof_metric']['total']:.4f} "
          f"(class priors {prior_score['total']:.4f}) in {metrics['seconds']:.0f} s")
    return metrics


# Small CPU-sized models for the phantom competition (64-160 px images): every stage-2
# family, trained on every fold by `train_recipe` (CLI `--recipe phantom`).
_TINY_SAG = dict(sag_backbone="test_resnet", axial_backbone="test_resnet", sag_window="point",
                 crop_unit="mm", sag_crop_h=30.0, sag_crop_w=30.0, sag_size=32, axial_crop=40.0,
                 axial_size=32, axial_center="point", axial_slices=3, axial_dim=64, embed_dim=32)
# jitter_px: the families' default (5 px, the original's on 0.6 mm pixels) is +-10 mm on
# the phantom's ~2 mm pixels and stalls learning; 1-1.5 px keeps it at a few mm.
_TINY_V20 = dict(backbone="test_resnet", crop_unit="mm", crop_h=50.0, crop_w=50.0, size=32,
                 dim=32, jitter_px=1.5)
_TINY_V24 = dict(axial_backbone="test_resnet", sag_backbone="test_resnet", crop_unit="mm",
                 crop_size=40.0, size=32, sag_slices=5, sag_crop_h=30.0, sag_crop_w=50.0,
                 sag_size_h=16, sag_size_w=32, dim=32, jitter_px=1.0)
RECIPES: dict[str, list[dict[str, Any]]] = {"phantom": [
    {"family": "v2", "config": _TINY_SAG, "model_name": "tiny"},
    {"family": "v20", "config": {**_TINY_V20, "target": "spinal"}, "model_name": "tiny_spinal"},
    {"family": "v20", "config": {**_TINY_V20, "target": "foraminal"},
     "model_name": "tiny_foraminal"},
    {"family": "v24", "config": _TINY_V24, "model_name": "tiny"},
]}
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "phantom": {"epochs": 30, "lr": 2e-3, "batch_size": 4, "num_threads": 1}}


def train_recipe(name: str, params: dict[str, Any], folds=None) -> dict[str, Any]:
    """Train every model of recipe `name` on every fold (or `folds`), then fit the
    ensemble on their OOF logits (`fit_ensemble.fit_and_write`). params: `DEFAULTS` keys
    shared by all models (data_dir, cache_dir, runs_dir, ...)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r} (known: {sorted(RECIPES)})")
    base = {**RECIPE_DEFAULTS.get(name, {}), **params}
    n_folds = int(base.get("n_folds", DEFAULTS["n_folds"]))
    start, trained = time.time(), []
    for entry in RECIPES[name]:
        for k in range(n_folds) if folds is None else folds:
            trained.append(train_fold({**base, **entry, "fold": k}))
    seconds = time.time() - start
    print(f"recipe {name}: {len(trained)} model folds trained in {seconds:.0f} s")
    fit_params = {k: base[k] for k in ("data_dir", "runs_dir") if k in base}
    return {"seconds": seconds, "folds": trained, "ensemble": fit_ensemble.fit_and_write(fit_params)}


def main(argv: list[str] | None = None) -> int:
    """CLI: train folds of one family, or every model of a recipe and the ensemble;
    parameters as JSON (keys of `DEFAULTS`)."""
    parser = argparse.ArgumentParser(prog="python -m kernel_src.training.train_stage2",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="{}", help="JSON object overriding DEFAULTS")
    parser.add_argument("--folds", type=int, nargs="*", default=None,
                        help="folds to train (default: every fold)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="train every model of this recipe, then fit the ensemble")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    if args.recipe:
        train_recipe(args.recipe, params, args.folds)
        return 0
    n_folds = int(params.get("n_folds", DEFAULTS["n_folds"]))
    for k in range(n_folds) if args.folds is None else args.folds:
        train_fold({**params, "fold": k})
    return 0


def notebook_spec(family: str, config: dict[str, Any], description: str) -> NotebookSpec:
    """The `train_stage2_<family>.ipynb` spec: the DEFAULTS with this family and config."""
    return NotebookSpec(
        filename=f"train_stage2_{family}.ipynb",
        title=f"Train stage-2 family {family} (one fold)",
        description=description + "\n\nRun one fold per process: `papermill "
        f"notebooks/train_stage2_{family}.ipynb out.ipynb -p fold 1 -p epochs 25`.",
        module="kernel_src.training.train_stage2", function="train_fold",
        parameters={**DEFAULTS, "family": family, "config": config}, comments=COMMENTS)


NOTEBOOKS: list[NotebookSpec] = [
    notebook_spec("v2", {"sag_backbone": "convnext_nano", "axial_backbone": "convnext_nano"},
                  "Three-view fusion: sagittal crops per condition and level, axial slices "
                  "per level with a BiGRU, fused logits (see kernel_src/models/grade_v2.py)."),
    notebook_spec("v20", {"target": "spinal", "backbone": "convnext_nano"},
                  "Sagittal 3D ROIs: z_imgs slices around each keypoint, a 2.5D encoder per "
                  "crop and a BiLSTM across the levels; `target` 'spinal' (Sagittal T2) or "
                  "'foraminal' (Sagittal T1), one model each, e.g. `-y 'config: {target: "
                  "foraminal, backbone: convnext_nano}'` (see kernel_src/models/grade_v20.py)."),
    notebook_spec("v24", {"axial_backbone": "convnext_nano", "sag_backbone": "convnext_nano"},
                  "Axial subarticular crops (right side mirrored onto the left) with a GRU "
                  "across slices, fused with a sagittal T2 branch per level "
                  "(see kernel_src/models/grade_v24.py)."),
]


if __name__ == "__main__":
    raise SystemExit(main())
