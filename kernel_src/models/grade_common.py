"""Pieces shared by every stage-2 grading family: label layout, left/right mirror, loss.

The stage-2 family protocol (what `training/train_stage2.py` and the kernel rely on):
- `Family.prepare_inputs(config, study, keypoints, rng=None) -> dict[str, np.ndarray]`:
  one study's inputs (training augmentation when `rng` is given, none when None);
- `Family.label_indices(config) -> np.ndarray (*grid) int`: the `LABEL_COLUMNS` index of
  each output of the module, whose `forward(**inputs)` returns (B, *grid, 3) logits;
- optional `Family.mirror_inputs(config, inputs) -> inputs`: the same study mirrored
  left <-> right (patient sides swapped); the labels then follow `LR_SWAP`;
- `Family.infer(models, config, study, keypoints, device) -> (25, 3)` logits, NaN rows for
  labels it does not grade.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..schema import CLASS_WEIGHTS, CONDITIONS, LABEL_COLUMNS, N_LEVELS

_MIRROR_CONDITION = {c: c.replace("left", "@").replace("right", "left").replace("@", "right")
                     for c in CONDITIONS}
# (25,) index: the label that a left <-> right mirror of the study puts at each position.
LR_SWAP: np.ndarray = np.array(
    [CONDITIONS.index(_MIRROR_CONDITION[c]) * N_LEVELS + lv
     for c in CONDITIONS for lv in range(N_LEVELS)], dtype=np.int64)


def mirror_labels(labels: np.ndarray) -> np.ndarray:
    """(..., 25) grade codes (or (..., 25, K) values) of a study -> those of its mirror:
    left and right foraminal / subarticular labels exchanged, spinal unchanged."""
    labels = np.asarray(labels)
    axis = -1 if labels.shape[-1] == len(LABEL_COLUMNS) else -2
    return np.take(labels, LR_SWAP, axis=axis)


def grid_targets(labels: np.ndarray, label_indices: np.ndarray) -> np.ndarray:
    """(25,) grade codes (-1 = unlabelled) -> (*grid) int64 targets for a family's outputs."""
    return np.asarray(labels, dtype=np.int64)[np.asarray(label_indices)]


def class_weighted_ce(logits: torch.Tensor, targets: torch.Tensor,
                      weights=CLASS_WEIGHTS) -> torch.Tensor:
    """Cross entropy with class weights [1, 2, 4] normalised like the metric:
    sum_i w_i * nll_i / sum_i w_i over rows with a target >= 0.

    logits (..., 3), targets (...) int (-1 ignored). 0 (with grad) when nothing is labelled.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1).long()
    keep = targets >= 0
    if not keep.any():
        return logits.sum() * 0.0
    w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits[keep], targets[keep], weight=w)
