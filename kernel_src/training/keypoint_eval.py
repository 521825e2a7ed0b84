"""Held-out evaluation of stage-1 keypoints, always next to a mean-shape baseline.

- Error: distance in mm between predicted and labelled world points. For an in-plane
  family (`family.eval_normal` returns the stack normal) the component along that normal
  is left out, since such a model never estimates it.
- Level accuracy: a predicted point counts as on its level when it is nearer (same
  distance) to its own level's labelled point than to the labelled points of the
  neighbouring levels of the same condition (points without a labelled neighbour are not
  counted).
- Mean-shape baseline: `MeanShapeModel` outputs the training set's mean unit coordinates
  for every input; it runs through the family's own `infer`, so the decoding is identical.
- Summary per condition and overall: n, median and p90 error (mm), level accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..keypoints import Keypoints
from ..schema import CONDITIONS, LABEL_COLUMNS, N_LEVELS


class MeanShapeModel(nn.Module):
    """Constant network output: mean unit coordinates (P, D) and zero predicted error."""

    def __init__(self, mean: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self.mean, torch.zeros_like(self.mean[:, :1])], dim=-1)
        return out.to(x.device).expand(x.shape[0], *out.shape)


def predict_examples(family, models, config, examples, device) -> tuple[np.ndarray, list]:
    """(N, 25, 3) world mm predictions (NaN where not estimated) and the Keypoints."""
    kps = [family.infer(models, config, ex.study, device) for ex in examples]
    return np.stack([k.world for k in kps]), kps


def _normals(family, config, examples) -> np.ndarray:
    out = np.full((len(examples), 3), np.nan)
    for i, ex in enumerate(examples):
        n = family.eval_normal(ex.study, config) if hasattr(family, "eval_normal") else None
        if n is not None:
            out[i] = n
    return out


def distances(pred: np.ndarray, truth: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """pred (N, P, 3), truth (N, ..., P, 3) or broadcastable, normals (N, 3) (NaN rows: 3D
    distance) -> distances mm, NaN where either point is missing."""
    d = pred - truth
    n = np.nan_to_num(normals)[:, None, :]
    while n.ndim < d.ndim:
        n = n[:, None]
    d = d - (d * n).sum(-1, keepdims=True) * n
    return np.sqrt((d ** 2).sum(-1))


def level_hits(pred: np.ndarray, truth: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(N, 25) 1.0 / 0.0 level accuracy per point, NaN where not decidable."""
    own = distances(pred, truth, normals)
    out = np.full(own.shape, np.nan)
    for c in range(len(CONDITIONS)):
        for lv in range(N_LEVELS):
            j = c * N_LEVELS + lv
            nbrs = [c * N_LEVELS + k for k in (lv - 1, lv + 1) if 0 <= k < N_LEVELS]
            other = np.stack([distances(pred[:, j:j + 1], truth[:, k:k + 1], normals)[:, 0]
                              for k in nbrs], axis=1)
            nearest = np.nanmin(np.where(np.isfinite(other), other, np.inf), axis=1)
            ok = np.isfinite(own[:, j]) & np.isfinite(nearest)
            out[ok, j] = (own[ok, j] < nearest[ok]).astype(float)
    return out


def summarize(pred: np.ndarray, truth: np.ndarray, normals: np.ndarray, points) -> dict:
    """Metrics over the `points` (label indices): overall and per condition."""
    err, hits = distances(pred, truth, normals), level_hits(pred, truth, normals)
    groups = {"all": list(points)}
    for c in CONDITIONS:
        mine = [j for j in points if LABEL_COLUMNS[j].startswith(c)]
        if mine:
            groups[c] = mine
    out = {}
    for name, cols in groups.items():
        e, h = err[:, cols].ravel(), hits[:, cols].ravel()
        e, h = e[np.isfinite(e)], h[np.isfinite(h)]
        out[name] = {"n": int(len(e)),
                     "mean_mm": float(e.mean()) if len(e) else float("nan"),
                     "median_mm": float(np.median(e)) if len(e) else float("nan"),
                     "p90_mm": float(np.percentile(e, 90)) if len(e) else float("nan"),
                     "level_acc": float(h.mean()) if len(h) else float("nan")}
    return out


def evaluate(family, models, config, examples, device, baseline_models=None
             ) -> tuple[dict, list[Keypoints]]:
    """Summaries of the models (and of the baseline models, e.g. [MeanShapeModel(mean)],
    when given) on `examples`; also returns the models' Keypoints per example."""
    truth = np.stack([ex.world for ex in examples])
    normals = _normals(family, config, examples)
    pred, kps = predict_examples(family, models, config, examples, device)
    result = {"model": summarize(pred, truth, normals, config.points)}
    if baseline_models is not None:
        base, _ = predict_examples(family, baseline_models, config, examples, device)
        result["baseline"] = summarize(base, truth, normals, config.points)
    return result, kps


def summary_line(name: str, result: dict) -> str:
    """One line: model median / p90 mm, level accuracy, baseline median mm."""
    m = result["model"]["all"]
    line = (f"{name}: median {m['median_mm']:.2f} mm, p90 {m['p90_mm']:.2f} mm, "
            f"level acc {m['level_acc']:.3f}, n {m['n']}")
    if "baseline" in result:
        b = result["baseline"]["all"]
        line += (f" | mean-shape baseline: median {b['median_mm']:.2f} mm, "
                 f"p90 {b['p90_mm']:.2f} mm, level acc {b['level_acc']:.3f}")
    return line


# Targets of the stage-1 acceptance check (issue 4): beat the mean-shape baseline's median
# error by this factor, with at least this level accuracy.
TARGET_RATIO = 2.0
TARGET_LEVEL_ACC = 0.95


def results_table(runs_dir) -> pd.DataFrame:
    """One row per stage-1 run and fold found under `runs_dir/<run>/<backbone>/metrics.json`
    (written by train_keypoint): held-out model and baseline median / p90 mm, their ratio,
    level accuracy and whether both targets are met. Stage-2 runs (no baseline) are
    skipped."""
    rows = []
    for path in sorted(Path(runs_dir).glob("*/*/metrics.json")):
        for fold, result in sorted(json.loads(path.read_text()).items()):
            if not isinstance(result, dict) or "baseline" not in result:
                continue
            m, b = result["model"]["all"], result["baseline"]["all"]
            ratio = b["median_mm"] / m["median_mm"] if m["median_mm"] > 0 else float("inf")
            rows.append({"run": path.parent.parent.name, "backbone": path.parent.name,
                         "fold": fold, "n": m["n"], "median_mm": m["median_mm"],
                         "p90_mm": m["p90_mm"], "baseline_median_mm": b["median_mm"],
                         "ratio": ratio, "level_acc": m["level_acc"],
                         "seconds": result.get("train", {}).get("seconds", float("nan")),
                         "ok": bool(ratio >= TARGET_RATIO
                                    and m["level_acc"] >= TARGET_LEVEL_ACC)})
    return pd.DataFrame(rows)
