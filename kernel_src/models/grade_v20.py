"""Stage-2 family `v20`: sagittal 3D regions of interest around the keypoints.

Per level, `z_imgs` slices around the point's nearest slice, cropped (crop_h x crop_w in
`crop_unit`: pixels of the normalised study or mm) and resized to `size` x `size`. `target` picks the model:
- `"spinal"`: Sagittal T2/STIR crops around the 5 spinal points -> 1 sequence of 5 levels;
- `"foraminal"`: Sagittal T1 crops around the 5 left and 5 right foraminal points -> 2
  sequences (left, right) of 5 levels, one shared network plus a learned side embedding.
Each crop goes through a `CropEncoder` (2.5D channels or per-slice GRU, a config value),
then a bidirectional LSTM runs across the 5 levels (residual), and a linear head gives
3 logits per level. Flip TTA (horizontal) averages the logits of the crops and their
mirror images.

Inputs (from `prepare_inputs`, shared by training and `infer`):
  crops (n_seq, 5, z_imgs, size, size) float32 in [0, 1], valid (n_seq, 5) float32
  (0 = unusable point: the crop's features are replaced by a learned vector).
Output of the module: (B, n_seq, 5, 3) logits; `label_indices(config)` maps them to
`schema.LABEL_COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import crops, schema
from ..keypoints import Keypoints
from ..study import Study
from .registry import register_family
from .roi_encoder import (
    SLICE_MODES,
    CropEncoder,
    average_logits,
    batch_inputs,
    crop_augmentation,
    normalise_unit,
    scatter_logits,
    usable_point,
)

TARGETS = {
    # target -> (series description, conditions graded, one sequence per condition)
    "spinal": (schema.SAG_T2, ("spinal_canal_stenosis",)),
    "foraminal": (schema.SAG_T1, ("left_neural_foraminal_narrowing",
                                  "right_neural_foraminal_narrowing")),
}


@dataclass(frozen=True)
class V20Config:
    """Everything that rebuilds a v20 model and its inputs. "px" sizes refer to the
    normalised study (`preprocess.normalize_study`); the original's 128x128, 72x128 and
    64x96 px windows were on 512-px slices (about 0.6 mm per pixel)."""

    target: str = "spinal"          # "spinal" (Sagittal T2) or "foraminal" (Sagittal T1)
    backbone: str = "convnext_small"
    pretrained: bool = False
    z_imgs: int = 3                 # slices per crop (3 or 5), centred on the point's slice
    crop_h: float = 128.0           # crop window height (rows), in crop_unit
    crop_w: float = 128.0           # crop window width (cols), in crop_unit
    crop_unit: str = "px"           # "px" (pixels of the normalised study) or "mm"
    size: int = 128                 # crops resized to size x size
    slice_mode: str = "channels"    # "channels" (2.5D) or "gru" (per-slice encoder + GRU)
    dim: int = 256                  # crop feature width
    dropout: float = 0.1
    slice_margin: float = 1.0       # points this many slices beyond the series still crop
    jitter_px: float = 5.0          # training keypoint jitter (crop centre), pixels
    flip_tta: bool = True           # average with horizontally flipped crops at inference

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"V20Config.target {self.target!r}: expected one of {tuple(TARGETS)}")
        if self.slice_mode not in SLICE_MODES:
            raise ValueError(f"V20Config.slice_mode {self.slice_mode!r}: expected {SLICE_MODES}")
        if self.z_imgs < 1 or self.z_imgs % 2 == 0:
            raise ValueError(f"V20Config.z_imgs={self.z_imgs}: must be odd and >= 1")


class V20Net(nn.Module):
    """(B, n_seq, 5, Z, S, S) crops + (B, n_seq, 5) valid -> (B, n_seq, 5, 3) logits."""

    def __init__(self, config: V20Config) -> None:
        super().__init__()
        self.n_seq = len(TARGETS[config.target][1])
        self.encoder = CropEncoder(config.backbone, config.z_imgs, config.dim,
                                   config.slice_mode, config.pretrained, config.dropout)
        self.side = nn.Parameter(torch.zeros(self.n_seq, 1, config.dim))
        self.level_rnn = nn.LSTM(config.dim, config.dim // 2, batch_first=True,
                                 bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(2 * (config.dim // 2), 3))
        self.skip = nn.Linear(config.dim, 2 * (config.dim // 2))

    def forward(self, crops: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n_seq, n_lvl = crops.shape[:3]
        feats = self.encoder(normalise_unit(crops.flatten(0, 2)), valid.flatten())
        feats = feats.reshape(b, n_seq, n_lvl, -1) + self.side[:n_seq]
        seq = feats.flatten(0, 1)
        self.level_rnn.flatten_parameters()   # cuDNN: weights of EMA / loaded copies
        out, _ = self.level_rnn(seq)
        logits = self.head(out + self.skip(seq))
        return logits.reshape(b, n_seq, n_lvl, 3)


@register_family
class V20:
    """The v20 family (stage 2): see the module docstring."""

    name = "v20"
    stage = 2
    Config = V20Config

    @staticmethod
    def build(config: V20Config) -> nn.Module:
        return V20Net(config)

    @staticmethod
    def label_indices(config: V20Config) -> np.ndarray:
        """(n_seq, 5) int: the `LABEL_COLUMNS` index of each output of the module."""
        conditions = TARGETS[config.target][1]
        return np.array([[schema.label_index(c, lv) for lv in schema.LEVELS]
                         for c in conditions], dtype=np.int64)

    @staticmethod
    def prepare_inputs(config: V20Config, study: Study | None, keypoints: Keypoints,
                       rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Crops of one study -> {"crops": (n_seq, 5, z_imgs, size, size) float32 in [0, 1],
        "valid": (n_seq, 5) float32}.

        Each point is located in the target series' stacks (`crops.locate_point`); its
        `z_imgs` nearest slices are cropped around its (x, y). A NaN point, a missing series
        or a point outside the image or more than `slice_margin` slices beyond the series
        gives a masked crop (valid 0).
        `rng` turns on training augmentation: centre jitter +-config.jitter_px, rotation
        +-10 deg, zoom +-10 %, and one horizontal flip (p 0.5) for the whole study.
        """
        series, conditions = TARGETS[config.target]
        stacks = crops.series_stacks(study, series)
        flip = bool(rng is not None and rng.random() < 0.5)
        out_hw = (config.size, config.size)
        pixels = np.zeros((len(conditions), schema.N_LEVELS, config.z_imgs, *out_hw), np.float32)
        valid = np.zeros((len(conditions), schema.N_LEVELS), np.float32)
        for i, condition in enumerate(conditions):
            for j, level in enumerate(schema.LEVELS):
                world = keypoints.world[schema.label_index(condition, level)]
                aug = crop_augmentation(rng, config.jitter_px, flip)
                point = usable_point(crops.locate_point(stacks, world), config.slice_margin)
                crop = crops.crop_at(point, config.z_imgs, (config.crop_h, config.crop_w),
                                     out_hw, unit=config.crop_unit, aug=aug)
                pixels[i, j], valid[i, j] = crop.pixels, float(crop.valid)
        return {"crops": pixels, "valid": valid}

    @staticmethod
    def mirror_inputs(config: V20Config, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs of the study mirrored left <-> right (labels follow
        `grade_common.LR_SWAP`): the sagittal slice order of every crop is reversed (slices
        run along world x) and, for foraminal, the left and right sequences are exchanged;
        the in-plane image does not change."""
        return {"crops": inputs["crops"][::-1, :, ::-1].copy(),
                "valid": inputs["valid"][::-1].copy()}

    @staticmethod
    def infer(models, config: V20Config, study: Study, keypoints: Keypoints,
              device="cpu") -> np.ndarray:
        """(25, 3) logits: the target's rows (mean over models and flip TTA), NaN elsewhere."""
        inputs = V20.prepare_inputs(config, study, keypoints)
        flips = {"crops": -1} if config.flip_tta else None
        logits = average_logits(models, batch_inputs(inputs, device), flips)
        return scatter_logits(logits, V20.label_indices(config))
