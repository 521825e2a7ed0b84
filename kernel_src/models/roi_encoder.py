"""Pieces shared by the ROI stage-2 families (v20, v24): crop encoder, TTA, output layout.

A crop is (Z, H, W): Z neighbouring slices around a keypoint. Two ways to encode it, chosen
by a config value (never two classes):
- `"channels"` (2.5D): the Z slices are the input channels of one timm 2D backbone;
- `"gru"`: each slice goes through the backbone alone (in_chans 1), then a bidirectional
  GRU runs across the Z slices and its outputs are averaged.
Either way a crop becomes a `dim`-wide feature vector. A crop whose point was unusable
(NaN point, point outside the image, missing series) is flagged `valid = 0` by the crop
code; its feature is replaced by a learned "missing" vector so the model sees a defined,
trainable input, never zeros mistaken for anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .. import crops
from ..schema import N_LABELS
from .backbones import create_backbone_2d

SLICE_MODES = ("channels", "gru")


class CropEncoder(nn.Module):
    """(N, Z, H, W) float crops + (N,) validity -> (N, dim) features."""

    def __init__(self, backbone: str, z_imgs: int, dim: int, mode: str = "channels",
                 pretrained: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if mode not in SLICE_MODES:
            raise ValueError(f"slice mode {mode!r}: expected one of {SLICE_MODES}")
        self.mode, self.z_imgs = mode, int(z_imgs)
        in_chans = self.z_imgs if mode == "channels" else 1
        self.backbone = create_backbone_2d(backbone, in_chans=in_chans, pretrained=pretrained)
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        if mode == "gru":
            self.slice_rnn = nn.GRU(width, dim // 2, batch_first=True, bidirectional=True)
            self.proj = nn.Identity() if 2 * (dim // 2) == dim else nn.Linear(2 * (dim // 2), dim)
        else:
            self.proj = nn.Linear(width, dim)
        self.drop = nn.Dropout(dropout)
        self.missing = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.missing, std=0.02)

    def forward(self, crops: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n, z = crops.shape[:2]
        if z != self.z_imgs:
            raise ValueError(f"CropEncoder: expected {self.z_imgs} slices per crop, got {z}")
        if self.mode == "channels":
            feats = self.proj(self.backbone(crops))
        else:
            per_slice = self.backbone(crops.reshape(n * z, 1, *crops.shape[2:]))
            self.slice_rnn.flatten_parameters()   # cuDNN: weights of EMA / loaded copies
            seq, _ = self.slice_rnn(per_slice.reshape(n, z, -1))
            feats = self.proj(seq.mean(dim=1))
        feats = self.drop(feats)
        keep = valid.reshape(n, 1).to(feats.dtype)
        return feats * keep + self.missing.to(feats.dtype) * (1 - keep)


def normalise_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Crop values in [0, 1] (from `kernel_src.crops`) -> [-1, 1]: Normalize(0.5, 0.5)."""
    return pixels.float() * 2.0 - 1.0


def batch_inputs(inputs: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    """One study's prepared arrays -> a batch of one on `device`."""
    return {k: torch.as_tensor(np.ascontiguousarray(v))[None].to(device)
            for k, v in inputs.items()}


@torch.inference_mode()
def average_logits(models: Sequence[nn.Module], batch: dict[str, torch.Tensor],
                   flips: dict[str, int] | None = None) -> np.ndarray:
    """Mean logits of `models` over `batch` (keyword inputs of their forward), plus, when
    `flips` is given (input name -> tensor dim), the same batch with those inputs flipped
    along those dims (test-time augmentation). Returns the first item, numpy float64."""
    if not models:
        raise ValueError("average_logits: no model given")
    views = [batch]
    if flips:
        views.append({k: v.flip(flips[k]) if k in flips else v for k, v in batch.items()})
    outs = [m.eval()(**view).float() for m in models for view in views]
    return torch.stack(outs).mean(0)[0].cpu().numpy().astype(np.float64)


def scatter_logits(logits: np.ndarray, label_indices: np.ndarray) -> np.ndarray:
    """(*grid, 3) logits of one study -> (25, 3) in `LABEL_COLUMNS` order, NaN elsewhere."""
    out = np.full((N_LABELS, 3), np.nan)
    out[np.asarray(label_indices).reshape(-1)] = np.asarray(logits).reshape(-1, 3)
    return out


def crop_augmentation(rng: np.random.Generator | None, jitter_px: float,
                      flip_x: bool) -> crops.CropAug:
    """The geometric augmentation of one training crop: centre jitter +-jitter_px, rotation
    +-10 deg, zoom +-10 %; `flip_x` is decided by the caller (per study or by side). No
    jitter, rotation nor zoom when `rng` is None (inference)."""
    if rng is None:
        return crops.CropAug(flip_x=flip_x)
    aug = crops.CropAug.random(rng, shift_px=jitter_px, angle_deg=10.0, scale_range=0.1)
    return crops.CropAug(aug.shift_xy, aug.angle_deg, aug.scale, flip_x)


def usable_point(point: crops.PlanePoint | None, slice_margin: float) -> crops.PlanePoint | None:
    """`point` when it lies inside the image and at most `slice_margin` slice spacings
    beyond the first or last slice (its crop then uses the end slices), else None (a
    masked crop). Points on the edge of a short series are common (foramina on the last
    sagittal slice); further away the slices would not show the structure."""
    if point is None or not point.in_plane:
        return None
    n_slices = point.stack.shape[0]
    return point if -0.5 - slice_margin <= point.z <= n_slices - 0.5 + slice_margin else None
