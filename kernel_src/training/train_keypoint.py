"""Train one stage-1 keypoint family on one fold: the function the notebooks call.

`train(params) -> dict` (params: see `DEFAULTS`; unknown keys are an error). For each
variant of the family (`Family.variants()`: e.g. sag2d's "t2" = Sagittal T2/STIR -> 5 spinal
points and "t1" = Sagittal T1 -> 10 foraminal points; a family without `variants` has one,
tagged "") it writes, under `<out>/<run>/<backbone>/` with run = family or family_tag:
- `fold<k>.pt`: registry checkpoint (family, config, EMA state dict, metrics);
- `last_fold<k>.pt`: the loop's resume state;
- `oof_fold<k>.csv`: `Keypoints.to_rows` of the held-out studies (the variant's points);
- `metrics.json`: {"fold<k>": {"model": ..., "baseline": ..., "train": ...}} (merged);
and prints one summary line per variant. `<out>/folds.csv` holds the study folds (made once
from every study of train.csv and the label coordinates, reused afterwards).

How a family is trained is a `KeypointTrainer` registered under the family name:
`make_dataset(family, config, examples, augment) -> Dataset`, `loss(config) -> loss_fn(model,
batch)`, `baseline_models(config, train_dataset) -> [nn.Module]` (run through
`family.infer` as the mean-shape baseline) and an optional `collate`. Trainers of other
modules register themselves on import: list those modules in `TRAINER_MODULES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..competition import load_train
from ..models import registry, zoo  # noqa: F401  (zoo registers every family)
from . import folds as folds_mod
from . import loop
from .keypoint_data import KeypointSource, SagittalDataset
from .keypoint_eval import MeanShapeModel, evaluate, summary_line

TRAINER_MODULES: tuple[str, ...] = ("kernel_src.training.train_axial",)

DEFAULTS: dict[str, Any] = {
    "family": "sag2d",           # registered stage-1 family
    "variants": None,            # list of variant tags to train (None: all)
    "data_dir": "data/phantom",  # competition layout (train_images, CSVs)
    "cache_dir": "data/cache",   # preprocessing cache (built when missing)
    "cache_size": None,          # in-plane size of a cache built here (None: original)
    "out_dir": "runs/stage1",
    "fold": 0,
    "n_folds": 5,
    "folds_seed": 42,
    "backbone": None,            # None: the family's default
    "pretrained": False,         # True: timm ImageNet weights (needs internet)
    "weights_path": None,        # local backbone weights file
    "image_size": None,          # in-plane input size (None: family default)
    "depth": None,               # slices of 3D inputs (None: family default)
    "config_overrides": None,    # other Config fields, e.g. {"head": "soft_argmax"}
    "epochs": 30,
    "lr": 6e-4,
    "weight_decay": 1e-2,
    "warmup_frac": 0.1,
    "ema_decay": 0.99,
    "precise_bn_batches": 8,     # BatchNorm statistics of the EMA model re-estimated
    "batch_size": 16,
    "num_workers": 0,
    "device": "auto",            # auto: cuda when available (cuda:LOCAL_RANK under torchrun)
    "seed": 42,
    "max_studies": None,         # first N studies (ascending id) with labels
    "resume": True,
}
_CONFIG_KEYS = ("backbone", "pretrained", "weights_path", "image_size", "depth")


@dataclass(frozen=True)
class KeypointTrainer:
    make_dataset: Callable
    loss: Callable
    baseline_models: Callable
    collate: Callable | None = None


TRAINERS: dict[str, KeypointTrainer] = {}


def register_trainer(family: str, trainer: KeypointTrainer) -> None:
    TRAINERS[family] = trainer


def get_trainer(family: str) -> KeypointTrainer:
    for name in TRAINER_MODULES:
        importlib.import_module(name)
    if family not in TRAINERS:
        raise KeyError(f"no keypoint trainer for family {family!r} "
                       f"(have: {', '.join(sorted(TRAINERS))})")
    return TRAINERS[family]


def _sagittal_loss(config):
    """Coordinate loss (config.loss) + config.heatmap_weight x heatmap cross entropy."""
    from ..models.keypoint_common import heatmap_loss, keypoint_loss

    def loss_fn(model, batch):
        if not config.heatmap_weight:
            return keypoint_loss(model(batch["image"]), batch["target"], batch["mask"],
                                 kind=config.loss)
        out, heat = model(batch["image"], return_heatmaps=True)
        return (keypoint_loss(out, batch["target"], batch["mask"], kind=config.loss)
                + config.heatmap_weight * heatmap_loss(heat, batch["target"], batch["mask"],
                                                       config.heatmap_sigma))
    return loss_fn


_SAGITTAL = KeypointTrainer(
    make_dataset=SagittalDataset,
    loss=_sagittal_loss,
    baseline_models=lambda config, ds: [MeanShapeModel(ds.mean_target())],
)
register_trainer("sag2d", _SAGITTAL)
register_trainer("sag3d", _SAGITTAL)


# ------------------------------------------------------------------ parameters
def resolve_params(params: dict | None) -> dict:
    unknown = sorted(set(params or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"train_keypoint: unknown parameter(s) {unknown}")
    return {**DEFAULTS, **(params or {})}


def variant_configs(family, p: dict) -> dict[str, Any]:
    """tag -> Config of the family with the parameters applied."""
    base = family.variants() if hasattr(family, "variants") else {"": family.Config()}
    if p["variants"] is not None:
        missing = sorted(set(p["variants"]) - set(base))
        if missing:
            raise ValueError(f"family {family.name}: unknown variant(s) {missing} "
                             f"(have {sorted(base)})")
        base = {t: c for t, c in base.items() if t in p["variants"]}
    fields = {f.name for f in dataclasses.fields(family.Config)}
    changes = {k: p[k] for k in _CONFIG_KEYS if p[k] is not None and p[k] is not False}
    changes.update(p["config_overrides"] or {})
    bad = sorted(set(changes) - fields)
    if bad:
        raise ValueError(f"family {family.name}: Config has no field(s) {bad}")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    return {t: dataclasses.replace(c, **changes) for t, c in base.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def study_ids_for_folds(data_dir: Path, source: KeypointSource) -> list[int]:
    """Every study of train.csv and of the label coordinates (folds cover them all)."""
    ids = set(source.coords["study_id"].astype(int))
    train_csv = data_dir / "train.csv"
    if train_csv.is_file():
        ids |= set(load_train(train_csv)["study_id"].astype(int))
    return sorted(ids)


# ------------------------------------------------------------------ training
@contextmanager
def _rank_zero_first():
    """Under torchrun: rank 0 runs the block first, the other ranks after it."""
    if loop.is_distributed() and loop.rank() != 0:
        torch.distributed.barrier()
    yield
    if loop.is_distributed() and loop.rank() == 0:
        torch.distributed.barrier()


def train(params: dict | None = None) -> dict:
    """Train every selected variant of `family` on `fold`; returns run name -> metrics."""
    p = resolve_params(params)
    seed_everything(int(p["seed"]))
    device = loop.setup_distributed(p["device"])
    family = registry.get_family(p["family"])
    trainer = get_trainer(p["family"])
    configs = variant_configs(family, p)
    out = Path(p["out_dir"])
    with _rank_zero_first():  # rank 0 builds the cache and the folds file, then the rest
        source = KeypointSource(p["data_dir"], p["cache_dir"], p["cache_size"])
        folds = folds_mod.load_or_make_folds(out / "folds.csv",
                                             study_ids_for_folds(Path(p["data_dir"]), source),
                                             p["n_folds"], p["folds_seed"])
    ids = source.study_ids()[: p["max_studies"]]
    train_ids, valid_ids = folds_mod.split(folds, int(p["fold"]), ids)
    if not train_ids or not valid_ids:
        raise ValueError(f"fold {p['fold']}: {len(train_ids)} training and {len(valid_ids)} "
                         f"held-out studies among {len(ids)}; use more studies")
    train_ex, valid_ex = source.examples(train_ids), source.examples(valid_ids)
    results = {}
    for tag, config in configs.items():
        run = family.name if not tag else f"{family.name}_{tag}"
        results[run] = _train_variant(family, trainer, config, run, p, train_ex, valid_ex,
                                      device)
    return results


def _train_variant(family, trainer, config, run, p, train_ex, valid_ex, device) -> dict:
    k = int(p["fold"])
    run_dir = Path(p["out_dir"]) / run / config.backbone
    train_ds = trainer.make_dataset(family, config, train_ex, True)
    if len(train_ds) == 0:
        raise ValueError(f"{run}: no training item (no study has the series and labels)")
    loader = loop.make_loader(train_ds, int(p["batch_size"]), shuffle=True,
                              num_workers=int(p["num_workers"]), seed=int(p["seed"]),
                              drop_last=len(train_ds) > int(p["batch_size"]),
                              collate_fn=trainer.collate)

    def valid_fn(model):
        m = evaluate(family, [model], config, valid_ex, device)[0]["model"]["all"]
        if not m["n"]:
            raise ValueError(f"{run} fold {k}: no labelled held-out point to validate on")
        return {"score": m["mean_mm"], "median_mm": m["median_mm"],
                "level_acc": m["level_acc"]}

    tc = loop.TrainConfig(epochs=int(p["epochs"]), lr=float(p["lr"]),
                          weight_decay=float(p["weight_decay"]),
                          warmup_frac=float(p["warmup_frac"]),
                          ema_decay=float(p["ema_decay"]), device=str(device),
                          precise_bn_batches=int(p["precise_bn_batches"]),
                          resume=bool(p["resume"]), checkpoint_name=f"fold{k}.pt",
                          last_name=f"last_fold{k}.pt")
    fitted = loop.fit(family.build(config), loader, valid_fn, tc, trainer.loss(config),
                      run_dir, family=family.name, model_config=config)
    if loop.rank() != 0:
        return {}
    return _finish(family, trainer, config, run, run_dir, k, train_ds, valid_ex, device,
                   fitted)


def _finish(family, trainer, config, run, run_dir, k, train_ds, valid_ex, device, fitted):
    """Evaluate the best checkpoint next to the baseline; write OOF rows and metrics."""
    model, _, payload = registry.load_checkpoint(run_dir / f"fold{k}.pt", device)
    result, kps = evaluate(family, [model], config, valid_ex, device,
                           trainer.baseline_models(config, train_ds))
    result["train"] = {key: fitted[key] for key in ("best_score", "best_epoch",
                                                    "epochs_run", "seconds")}
    registry.save_checkpoint(run_dir / f"fold{k}.pt", family.name, config, model,
                             {**payload["metrics"], **_flat(result)})
    keep = set(config.points)
    from ..schema import LABEL_COLUMNS
    rows = [r for ex, kp in zip(valid_ex, kps, strict=True)
            for r in kp.to_rows(ex.study.study_id) if LABEL_COLUMNS.index(r["label"]) in keep]
    pd.DataFrame(rows).to_csv(run_dir / f"oof_fold{k}.csv", index=False)
    metrics_path = run_dir / "metrics.json"
    merged = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    merged[f"fold{k}"] = result
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=float))
    tmp.replace(metrics_path)
    print(summary_line(f"{run}/{config.backbone}/fold{k}", result), flush=True)
    return result


def _flat(result: dict) -> dict:
    """model/baseline overall numbers as flat checkpoint metrics."""
    out = {}
    for who in ("model", "baseline"):
        for key, value in result.get(who, {}).get("all", {}).items():
            out[f"{who}_{key}"] = value
    return out


# ------------------------------------------------------------------ notebooks
def _notebook(family: str, title: str, description: str):
    from .notebooks import NotebookSpec

    params = {**DEFAULTS, "family": family}
    return NotebookSpec(
        filename=f"train_keypoint_{family}.ipynb", title=title, description=description,
        module="kernel_src.training.train_keypoint", function="train", parameters=params,
        comments={"family": "stage-1 family (do not change)",
                  "variants": "e.g. ['t2'] or ['t1']; None trains every series variant",
                  "pretrained": "timm ImageNet weights; needs internet",
                  "max_studies": "None: every labelled study"})


NOTEBOOKS = [
    _notebook("sag2d", "Stage 1: sagittal 2D keypoints (sag2d)",
              "timm 2D regression of the 5 spinal points (Sagittal T2/STIR) and the 10 "
              "foraminal points (Sagittal T1) on the centre slice. Run with papermill, e.g. "
              "`papermill notebooks/train_keypoint_sag2d.ipynb out.ipynb -p fold 0`."),
    _notebook("sag3d", "Stage 1: sagittal 3D keypoints (sag3d)",
              "timm_3d regression of the spinal (T2/STIR) and foraminal (T1) points in "
              "(x, y, z) from the resized sagittal volume. Run with papermill, e.g. "
              "`papermill notebooks/train_keypoint_sag3d.ipynb out.ipynb -p fold 0`."),
]
