"""Fit the stage-2 ensemble on out-of-fold logits and write it into weights_manifest.json.

What the kernel computes (`kernel_src.ensemble.combine`): per family a weighted mean of its
models' logits, then per condition group a weighted blend of the families, softmax last.
Here, on the out-of-fold logits of every model (runs/<name>/<family>/<model>/oof_fold*.csv):
1. per family, the model weights (>= 0, summing to 1) that minimise the official metric
   (`kernel_src.metric`, total) of that family's logits;
2. per condition group, the family weights that minimise that group's part of the metric
   (the spinal group also counts any_severe_spinal);
both with scipy (SLSQP on the simplex, never worse than the uniform start or any single
candidate). Rows a model does not grade are NaN and ignored as the kernel ignores them;
rows no model grades get the class priors. A table of the out-of-fold metric per group
for each model, each family, the blend and the class-prior baseline is printed and
returned. `fit_and_write(params)` is what notebooks/fit_ensemble.ipynb calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from .. import ensemble, metric
from ..competition import load_train
from ..manifest import FoldFile, Manifest, ModelEntry, load_manifest, save_manifest, sha256_file
from ..models import zoo  # noqa: F401  (registers every family)
from ..models.registry import FAMILIES
from ..schema import GROUPS, LABEL_COLUMNS, N_LABELS
from ..submission import compute_priors, save_priors
from .notebooks import NotebookSpec

ROW_GROUP = np.array(ensemble.ROW_GROUPS)
COLUMNS = ("model", "family", "kind", "total", *metric.PARTS)


@dataclasses.dataclass
class OOFModel:
    """Out-of-fold logits of one model: name (manifest name), family, its runs folder."""

    name: str
    family: str
    folder: Path
    logits: np.ndarray  # (N, 25, 3) in the order of the study ids, NaN = not graded


def read_oof(folder: Path, study_ids: Sequence[int]) -> np.ndarray:
    """(N, 25, 3) logits from folder/oof_fold*.csv (study_id, label, logit_0..2), NaN
    where a (study, label) has no row. A row of an unknown study or label is an error."""
    files = sorted(Path(folder).glob("oof_fold*.csv"))
    if not files:
        raise FileNotFoundError(f"no oof_fold*.csv in {folder}")
    table = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    position = {int(s): i for i, s in enumerate(study_ids)}
    out = np.full((len(study_ids), N_LABELS, 3), np.nan)
    for row in table.itertuples(index=False):
        if int(row.study_id) not in position or row.label not in LABEL_COLUMNS:
            raise ValueError(f"{folder}: OOF row for unknown study/label "
                             f"({row.study_id}, {row.label})")
        out[position[int(row.study_id)], LABEL_COLUMNS.index(row.label)] = (
            row.logit_0, row.logit_1, row.logit_2)
    return out


def discover_models(runs_dir: Path, study_ids: Sequence[int]) -> list[OOFModel]:
    """Every runs_dir/<family>/<model>/ with OOF files whose family is a stage-2 family."""
    models = []
    for folder in sorted(Path(runs_dir).glob("*/*")):
        family = folder.parent.name
        if family in FAMILIES and FAMILIES[family].stage == 2 and \
                any(folder.glob("oof_fold*.csv")):
            models.append(OOFModel(f"{family}_{folder.name}", family, folder,
                                   read_oof(folder, study_ids)))
    return models


def probabilities(logits: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """softmax(logits) (N, 25, 3); rows with NaN get the priors (25, 3)."""
    probs = ensemble.softmax(np.where(np.isfinite(logits), logits, 0.0))
    return np.where(np.isfinite(logits).all(-1, keepdims=True), probs, priors[None])


def score(logits: np.ndarray, labels: np.ndarray, priors: np.ndarray) -> dict[str, float]:
    return metric.score_arrays(labels, probabilities(logits, priors))


def group_objective(result: Mapping[str, float], group: str | None) -> float:
    """The quantity a fit minimises: total, or one group's part (+ any_severe for spinal)."""
    if group is None:
        return result["total"]
    return result[group] + (result["any_severe_spinal"] if group == "spinal" else 0.0)


def fit_simplex(n: int, loss: Callable[[np.ndarray], float]) -> np.ndarray:
    """Weights (n,) >= 0 summing to 1 minimising `loss` (SLSQP from uniform); the best of
    the optimum, the uniform weights and each one-hot vector is returned."""
    if n == 1:
        return np.ones(1)
    uniform = np.full(n, 1.0 / n)
    found = minimize(loss, uniform, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                     constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                     options={"maxiter": 100, "eps": 1e-3})
    optimum = np.clip(found.x, 0.0, None)
    optimum = optimum / optimum.sum() if optimum.sum() > 0 else uniform
    candidates = [optimum, uniform, *np.eye(n)]
    return min(candidates, key=loss)


def fit_family(models: list[OOFModel], labels: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Weights of one family's models minimising the family's total metric."""
    logits = [m.logits for m in models]
    return fit_simplex(len(models), lambda w: score(
        ensemble.weighted_nanmean(logits, list(w)), labels, priors)["total"])


def fit_blends(family_logits: Mapping[str, np.ndarray], labels: np.ndarray,
               priors: np.ndarray) -> dict[str, dict[str, float]]:
    """Per group, weights of the families that grade it (minimising that group's part)."""
    blends = {}
    for group in GROUPS:
        rows = ROW_GROUP == group
        names = [f for f, x in sorted(family_logits.items()) if np.isfinite(x[:, rows]).any()]
        if not names:
            continue

        def loss(w, names=names, group=group):
            blended = ensemble.weighted_nanmean([family_logits[n] for n in names], list(w))
            return group_objective(score(blended, labels, priors), group)

        blends[group] = {n: float(w) for n, w in zip(names, fit_simplex(len(names), loss),
                                                     strict=True)}
    return blends


def metric_table(models: list[OOFModel], weights: Mapping[str, float],
                 blends: Mapping[str, Mapping[str, float]], labels: np.ndarray,
                 priors: np.ndarray) -> pd.DataFrame:
    """OOF metric per group for each model, each family, the blend, and the priors."""
    rows = [{"model": "class priors", "family": "", "kind": "baseline",
             **score(np.full(labels.shape + (3,), np.nan), labels, priors)}]
    rows += [{"model": m.name, "family": m.family, "kind": "model",
              **score(m.logits, labels, priors)} for m in models]
    by_family = _family_logits(models, weights)
    rows += [{"model": f"{fam} (weighted)", "family": fam, "kind": "family",
              **score(x, labels, priors)} for fam, x in sorted(by_family.items())]
    rows.append({"model": "ensemble", "family": "", "kind": "blend",
                 **score(ensemble.blend_families(by_family, blends), labels, priors)})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _family_logits(models: list[OOFModel], weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    out = {}
    for fam in sorted({m.family for m in models}):
        members = [m for m in models if m.family == fam]
        out[fam] = ensemble.weighted_nanmean([m.logits for m in members],
                                             [weights[m.name] for m in members])
    return out


def fit_ensemble(models: list[OOFModel], labels: np.ndarray, priors: np.ndarray
                 ) -> tuple[dict[str, float], dict[str, dict[str, float]], pd.DataFrame]:
    """(model weights, group blends, metric table) from OOF logits and (N, 25) labels."""
    if not models:
        raise ValueError("fit_ensemble: no model with out-of-fold logits")
    weights: dict[str, float] = {}
    for fam in sorted({m.family for m in models}):
        members = [m for m in models if m.family == fam]
        weights.update(zip([m.name for m in members], map(float, fit_family(
            members, labels, priors)), strict=True))
    blends = fit_blends(_family_logits(models, weights), labels, priors)
    return weights, blends, metric_table(models, weights, blends, labels, priors)


def checkpoint_entry(name: str, folder: Path, weight: float, weights_dir: Path) -> ModelEntry:
    """Manifest entry of the fold<k>.pt files in `folder` (paths relative to weights_dir,
    sha256); family, stage and config are read from the first checkpoint."""
    import torch

    files = sorted(Path(folder).glob("fold*.pt"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise FileNotFoundError(f"{folder}: no fold*.pt checkpoint")
    payload = torch.load(files[0], map_location="cpu", weights_only=False)
    family = payload["family"]
    folds = tuple(FoldFile(int(p.stem[4:]), p.relative_to(weights_dir).as_posix(),
                           sha256_file(p)) for p in files)
    return ModelEntry(name, FAMILIES[family].stage, family, payload["config"], folds,
                      float(weight))


def model_entry(model: OOFModel, weight: float, weights_dir: Path) -> ModelEntry:
    """Manifest entry of a fitted stage-2 model."""
    return checkpoint_entry(model.name, model.folder, weight, weights_dir)


def keypoint_entries(runs_dir: Path) -> list[ModelEntry]:
    """Entries of every stage-1 run under runs_dir: <run>/<backbone>/fold*.pt
    whose checkpoints hold a stage-1 family (run = family or family_variant)."""
    import torch

    entries = []
    for folder in sorted(Path(runs_dir).glob("*/*")):
        first = next(iter(sorted(folder.glob("fold*.pt"))), None)
        if first is None:
            continue
        family = torch.load(first, map_location="cpu", weights_only=False).get("family")
        if family in FAMILIES and FAMILIES[family].stage == 1:
            name = f"{folder.parent.name}_{folder.name}"
            entries.append(checkpoint_entry(name, folder, keypoint_weight(folder), runs_dir))
    return entries


def keypoint_weight(folder: Path) -> float:
    """A stage-1 run's merge weight: 1 / (its mean held-out median error in mm) from
    metrics.json (written by train_keypoint), so the kernel prefers the more accurate
    family per point; 1.0 when the run has no metrics."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return 1.0
    folds = json.loads(path.read_text()).values()
    errors = [f["model"]["all"]["median_mm"] for f in folds
              if np.isfinite(f.get("model", {}).get("all", {}).get("median_mm", np.nan))]
    return 1.0 / max(float(np.mean(errors)), 0.1) if errors else 1.0


def write_manifest(path: Path, models: list[OOFModel], weights: Mapping[str, float],
                   blends: Mapping[str, Mapping[str, float]], weights_dir: Path,
                   defaults: Mapping[str, str]) -> Manifest:
    """Put the fitted stage-2 entries, the stage-1 runs found in weights_dir (unless
    defaults["include_stage1"] is False) and the blends into the manifest at `path`
    (created with `defaults` when absent); other entries already there are kept."""
    if path.is_file():
        base = load_manifest(path)
    else:
        base = Manifest(1, defaults["weights_dataset"], defaults["wheels_dataset"],
                        defaults["class_priors"])
    fitted = [model_entry(m, weights[m.name], weights_dir) for m in models]
    if defaults.get("include_stage1", True):
        fitted = keypoint_entries(weights_dir) + fitted
    names = {e.name for e in fitted}
    kept = [e for e in base.models if e.name not in names]
    manifest = dataclasses.replace(base, models=tuple(kept + fitted),
                                   blends={g: dict(t) for g, t in blends.items()})
    save_manifest(path, manifest)
    return manifest


DEFAULTS: dict[str, Any] = {
    "data_dir": "data/phantom",       # train.csv (labels of the out-of-fold studies)
    "runs_dir": "runs/phantom",       # runs/<name>: <family>/<model>/oof_fold*.csv, fold*.pt
    "manifest_path": None,            # default: <runs_dir>/weights_manifest.json
    "weights_dataset": "your-kaggle-username/rsna-lumbar-weights",
    "wheels_dataset": "your-kaggle-username/rsna-lumbar-wheels",
    "class_priors": "class_priors.json",  # written into runs_dir when missing
    "include_stage1": True,           # also list every stage-1 run under runs_dir
}


def fit_and_write(params: dict[str, Any]) -> dict[str, Any]:
    """Fit on every stage-2 model's OOF logits in runs_dir, print the metric table, write
    the manifest (weights dir = runs_dir). Returns {weights, blends, table, manifest}."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"fit_and_write: unknown parameter(s) {unknown}")
    p = {**DEFAULTS, **params}
    runs_dir = Path(p["runs_dir"])
    train = load_train(Path(p["data_dir"]) / "train.csv")
    priors = compute_priors(train)
    if not (runs_dir / p["class_priors"]).is_file():
        save_priors(runs_dir / p["class_priors"], priors)
    models = discover_models(runs_dir, train["study_id"].tolist())
    covered = np.zeros(len(train), bool)
    for m in models:
        covered |= np.isfinite(m.logits).all(-1).any(-1)
    for m in models:
        m.logits = m.logits[covered]
    labels = train[list(LABEL_COLUMNS)].to_numpy(dtype=np.int64)[covered]
    weights, blends, table = fit_ensemble(models, labels, priors)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"out-of-fold metric on {int(covered.sum())} studies:")
        print(table.round(4).to_string(index=False))
    print("weights:", {k: round(v, 3) for k, v in weights.items()})
    print("blends:", {g: {f: round(w, 3) for f, w in t.items()} for g, t in blends.items()})
    path = Path(p["manifest_path"] or runs_dir / "weights_manifest.json")
    write_manifest(path, models, weights, blends, runs_dir, p)
    print(f"wrote {path}")
    return {"weights": weights, "blends": blends, "table": table, "manifest": str(path)}


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m kernel_src.training.fit_ensemble --params '{"runs_dir": ...}'`."""
    parser = argparse.ArgumentParser(prog="python -m kernel_src.training.fit_ensemble",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="{}", help="JSON object overriding DEFAULTS")
    fit_and_write(json.loads(parser.parse_args(argv).params))
    return 0


NOTEBOOKS: list[NotebookSpec] = [NotebookSpec(
    filename="fit_ensemble.ipynb",
    title="Fit the stage-2 ensemble on out-of-fold predictions",
    description="Per-model weights within each family and per-condition-group blends "
    "between families, fitted with scipy on the out-of-fold logits of every stage-2 model "
    "under `runs_dir`; prints the out-of-fold metric per group and writes the weights into "
    "`weights_manifest.json` (kernel_src/training/fit_ensemble.py).",
    module="kernel_src.training.fit_ensemble", function="fit_and_write",
    parameters=dict(DEFAULTS), result_name="ensemble")]


if __name__ == "__main__":
    raise SystemExit(main())
