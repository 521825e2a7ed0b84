"""Trainers and notebooks of the axial keypoint families (`axial3d`, `axial_level`).

Registers a `train_keypoint.KeypointTrainer` per family (dataset, loss, collate, mean-shape
baseline), so `train_keypoint.train({"family": "axial3d", ...})` trains them like the
sagittal ones, and declares their papermill notebooks (`NOTEBOOKS`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.keypoint_axial_level import BACKGROUND
from . import train_keypoint
from .axial_data import (
    Axial3DDataset,
    AxialLevelDataset,
    axial3d_loss,
    axial_level_loss,
    collate_level,
    level_mean_shape,
)
from .keypoint_eval import MeanShapeModel


class LevelMeanShapeModel(nn.Module):
    """`axial_level` stand-in that always answers the training set's mean shape: each point
    at its mean fraction of the z grid (a sharp distribution there), every position of
    unknown level (uniform level logits), and the mean unit (x, y) per level."""

    def __init__(self, fractions: np.ndarray, xy: np.ndarray, sharpness: float = 0.02):
        super().__init__()
        self.register_buffer("fractions", torch.as_tensor(fractions, dtype=torch.float32))
        self.register_buffer("xy", torch.as_tensor(xy, dtype=torch.float32))
        self.sharpness = sharpness

    def forward_sequence(self, slices: torch.Tensor, mask: torch.Tensor):
        n = mask.sum(1, keepdim=True).float()  # (B, 1)
        pos = (torch.arange(mask.shape[1], device=mask.device)[None] + 0.5) / n  # (B, N)
        points = -((pos[..., None] - self.fractions) / self.sharpness) ** 2 / 2
        levels = torch.zeros(*mask.shape, BACKGROUND + 1, device=mask.device)
        return levels, points.masked_fill(~mask[..., None], float("-inf"))

    def forward_xy(self, images: torch.Tensor) -> torch.Tensor:
        return self.xy[: images.shape[0]].to(images.device)


def _loss(fn):
    return lambda config: fn


train_keypoint.register_trainer("axial3d", train_keypoint.KeypointTrainer(
    make_dataset=lambda family, config, examples, augment: Axial3DDataset(examples, config,
                                                                         augment),
    loss=axial3d_loss,
    baseline_models=lambda config, ds: [MeanShapeModel(ds.mean_target())],
))
train_keypoint.register_trainer("axial_level", train_keypoint.KeypointTrainer(
    make_dataset=lambda family, config, examples, augment: AxialLevelDataset(examples, config,
                                                                            augment),
    loss=_loss(axial_level_loss),
    baseline_models=lambda config, ds: [LevelMeanShapeModel(*level_mean_shape(ds))],
    collate=collate_level,
))

NOTEBOOKS = [
    train_keypoint._notebook(
        "axial3d", "Stage 1: axial 3D keypoints (axial3d)",
        "timm_3d regression of the 10 subarticular points (left/right x 5 levels) in "
        "(x, y, z) from each whole axial stack resized to depth x image_size^2, with a "
        "per-point presence score (the most confident stack wins). Run with papermill, e.g. "
        "`papermill notebooks/train_keypoint_axial3d.ipynb out.ipynb -p fold 0`."),
    train_keypoint._notebook(
        "axial_level", "Stage 1: axial level classifier + (x, y) regressor (axial_level)",
        "All axial stacks of a study on one z grid; a 2.5D timm encoder, BiLSTM and "
        "TransformerEncoder give per-slice level and left/right point scores (z = "
        "probability-weighted mean), then a timm 2D regressor places left/right (x, y) on "
        "the chosen slice. Run with papermill, e.g. "
        "`papermill notebooks/train_keypoint_axial_level.ipynb out.ipynb -p fold 0`."),
]
