"""Stage-2 family `v24`: axial subarticular crops fused with a sagittal T2 branch.

Per level and side, `z_imgs` axial slices around the subarticular point, cropped
(crop_size x crop_size in `crop_unit`: pixels of the normalised study or mm) and resized to
size x size. The
crops are put in a canonical orientation: the left side with the patient's left towards
increasing column and posterior towards increasing row, the right side mirrored
horizontally, so one network serves both sides. The axial branch is a `CropEncoder`
(per-slice encoder + GRU across slices by default). The sagittal branch sees, per level,
`sag_slices` Sagittal T2/STIR slices around the level's spinal point (sag_crop_h x
sag_crop_w pixels, resized to sag_size_h x sag_size_w) as channels; for the right side its
slice order is reversed (mirror through the mid-sagittal plane), matching the axial flip.
Both branches give `dim` features; Linear(2 * dim, 3) gives the logits per side and level.
Flip TTA (vertical flip of the axial crops) averages the logits.

Inputs (from `prepare_inputs`, shared by training and `infer`):
  axial (2, 5, z_imgs, size, size), axial_valid (2, 5) (side 0 left, 1 right),
  sag (5, sag_slices, sag_size_h, sag_size_w), sag_valid (5,); float32, pixels in [0, 1],
  valid 0 = unusable point (the crop's features are replaced by a learned vector).
Output of the module: (B, 2, 5, 3) logits; `label_indices(config)` maps them to
`schema.LABEL_COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import crops, geometry, schema
from ..keypoints import Keypoints
from ..study import Stack, Study
from .grade_v2 import level_points
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

SIDES = ("left_subarticular_stenosis", "right_subarticular_stenosis")


@dataclass(frozen=True)
class V24Config:
    """Everything that rebuilds a v24 model and its inputs. "px" sizes refer to the
    normalised study (`preprocess.normalize_study`); the original's windows were on 512-px
    slices (about 0.6 mm per pixel)."""

    axial_backbone: str = "convnext_small"
    sag_backbone: str = "convnext_small"
    pretrained: bool = False
    z_imgs: int = 3                 # axial slices per crop (3 or 5)
    crop_size: float = 128.0        # axial crop window side, in crop_unit
    size: int = 128                 # axial crops resized to size x size
    axial_mode: str = "gru"         # "gru" (per-slice encoder + GRU) or "channels" (2.5D)
    sag_slices: int = 7             # sagittal T2 slices around the spinal point
    sag_crop_h: float = 64.0        # sagittal crop window, in crop_unit
    sag_crop_w: float = 128.0
    crop_unit: str = "px"           # "px" (pixels of the normalised study) or "mm"
    sag_size_h: int = 64
    sag_size_w: int = 128
    dim: int = 128                  # features per branch; the head is Linear(2 * dim, 3)
    dropout: float = 0.1
    slice_margin: float = 1.0       # points this many slices beyond a stack still crop
    jitter_px: float = 5.0          # training keypoint jitter (crop centre), pixels
    flip_tta: bool = True           # average with vertically flipped axial crops

    def __post_init__(self) -> None:
        if self.axial_mode not in SLICE_MODES:
            raise ValueError(f"V24Config.axial_mode {self.axial_mode!r}: expected {SLICE_MODES}")
        for name in ("z_imgs", "sag_slices"):
            value = getattr(self, name)
            if value < 1 or value % 2 == 0:
                raise ValueError(f"V24Config.{name}={value}: must be odd and >= 1")


class V24Net(nn.Module):
    """axial (B, 2, 5, Z, S, S), axial_valid (B, 2, 5), sag (B, 5, C, h, w),
    sag_valid (B, 5) -> (B, 2, 5, 3) logits (side 0 left, side 1 right)."""

    def __init__(self, config: V24Config) -> None:
        super().__init__()
        self.axial = CropEncoder(config.axial_backbone, config.z_imgs, config.dim,
                                 config.axial_mode, config.pretrained, config.dropout)
        self.sag = CropEncoder(config.sag_backbone, config.sag_slices, config.dim,
                               "channels", config.pretrained, config.dropout)
        self.head = nn.Linear(2 * config.dim, 3)

    def forward(self, axial: torch.Tensor, axial_valid: torch.Tensor, sag: torch.Tensor,
                sag_valid: torch.Tensor) -> torch.Tensor:
        b, n_side, n_lvl = axial.shape[:3]
        ax = self.axial(normalise_unit(axial.flatten(0, 2)), axial_valid.flatten())
        ax = ax.reshape(b, n_side, n_lvl, -1)
        sag_sides = torch.stack([sag, sag.flip(2)], dim=1)[:, :n_side]   # right: mirrored
        sg = self.sag(normalise_unit(sag_sides.flatten(0, 2)),
                      sag_valid[:, None].expand(b, n_side, n_lvl).flatten())
        sg = sg.reshape(b, n_side, n_lvl, -1)
        return self.head(torch.cat([ax, sg], dim=-1))


def locate_axial_point(stacks: list[Stack], world) -> crops.PlanePoint | None:
    """Locate a world point (3,) mm among axial stacks (several stacks or series).

    Among the stacks where the point projects inside the image and inside the slice
    range, the one with the smallest off-plane distance (mm from the nearest slice plane,
    `geometry.project_to_stack`) wins; when none contains it, `crops.locate_point`'s
    nearest stack is returned (its crop is masked unless the point lies within
    `slice_margin` slices of it: `roi_encoder.usable_point`). None for a NaN point or no
    stack.
    """
    points = [crops.locate_point([stack], world) for stack in stacks]
    inside = [(float(geometry.project_to_stack(p.stack, world)[3]), i)
              for i, p in enumerate(points) if p is not None and p.inside]
    if inside:
        return points[min(inside)[1]]
    return crops.locate_point(stacks, world)


def canonical_flips(stack: Stack, side: int) -> tuple[bool, bool]:
    """(flip columns, flip rows) that show an axial crop with posterior at increasing row
    and, for the left side (0), the patient's left (+x world) at increasing column; the
    right side (1) is mirrored so that it looks like a left side."""
    left_to_right = bool(stack.row_cosine[0] >= 0)
    return left_to_right == (side == 1), bool(stack.col_cosine[1] < 0)


def _axial_crop(config: V24Config, stacks: list[Stack], world, side: int,
                rng: np.random.Generator | None) -> crops.Crop:
    point = locate_axial_point(stacks, world)
    flip_x, flip_y = canonical_flips(point.stack, side) if point is not None else (False, False)
    crop = crops.crop_at(usable_point(point, config.slice_margin), config.z_imgs,
                         (config.crop_size, config.crop_size), (config.size, config.size),
                         unit=config.crop_unit,
                         aug=crop_augmentation(rng, config.jitter_px, flip_x))
    return crops.Crop(np.ascontiguousarray(crop.pixels[:, ::-1]) if flip_y else crop.pixels,
                      crop.valid)


@register_family
class V24:
    """The v24 family (stage 2): see the module docstring."""

    name = "v24"
    stage = 2
    Config = V24Config

    @staticmethod
    def build(config: V24Config) -> nn.Module:
        return V24Net(config)

    @staticmethod
    def label_indices(config: V24Config) -> np.ndarray:
        """(2, 5) int: the `LABEL_COLUMNS` index of each output of the module."""
        return np.array([[schema.label_index(c, lv) for lv in schema.LEVELS] for c in SIDES],
                        dtype=np.int64)

    @staticmethod
    def prepare_inputs(config: V24Config, study: Study | None, keypoints: Keypoints,
                       rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Crops of one study -> {"axial": (2, 5, z_imgs, size, size), "axial_valid": (2, 5),
        "sag": (5, sag_slices, sag_size_h, sag_size_w), "sag_valid": (5,)}, float32,
        pixels in [0, 1], side 0 = left, 1 = right (mirrored: `canonical_flips`).

        Axial crops are centred on the subarticular points (stack: `locate_axial_point`),
        sagittal crops on the level's spinal point in Sagittal T2/STIR (else the mean of its
        known subarticular points: `grade_v2.level_points`). A NaN point, a
        missing series or a point outside the image or more than `slice_margin` slices
        beyond the stack gives a masked crop (valid 0). `rng` turns on training augmentation: centre jitter +-config.jitter_px,
        rotation +-10 deg, zoom +-10 %, one vertical flip of all axial crops (p 0.5).
        """
        axial_stacks = crops.series_stacks(study, schema.AXIAL_T2)
        sag_stacks = crops.series_stacks(study, schema.SAG_T2)
        vflip = bool(rng is not None and rng.random() < 0.5)
        axial = np.zeros((2, schema.N_LEVELS, config.z_imgs, config.size, config.size),
                         np.float32)
        axial_valid = np.zeros((2, schema.N_LEVELS), np.float32)
        sag_hw = (config.sag_size_h, config.sag_size_w)
        sag = np.zeros((schema.N_LEVELS, config.sag_slices, *sag_hw), np.float32)
        sag_valid = np.zeros(schema.N_LEVELS, np.float32)
        centres = level_points(keypoints)
        for j, level in enumerate(schema.LEVELS):
            for side, condition in enumerate(SIDES):
                world = keypoints.world[schema.label_index(condition, level)]
                crop = _axial_crop(config, axial_stacks, world, side, rng)
                axial[side, j] = crop.pixels[:, ::-1] if vflip else crop.pixels
                axial_valid[side, j] = float(crop.valid)
            point = usable_point(crops.locate_point(sag_stacks, centres[j]), config.slice_margin)
            crop = crops.crop_at(point, config.sag_slices,
                                 (config.sag_crop_h, config.sag_crop_w), sag_hw,
                                 unit=config.crop_unit,
                                 aug=crop_augmentation(rng, config.jitter_px, False))
            sag[j], sag_valid[j] = crop.pixels, float(crop.valid)
        return {"axial": axial, "axial_valid": axial_valid, "sag": sag, "sag_valid": sag_valid}

    @staticmethod
    def mirror_inputs(config: V24Config, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs of the study mirrored left <-> right (labels follow
        `grade_common.LR_SWAP`): the canonical axial crops of the two sides are exchanged
        (each side is already shown as a left side) and the sagittal slice order is
        reversed (slices run along world x)."""
        return {"axial": inputs["axial"][::-1].copy(),
                "axial_valid": inputs["axial_valid"][::-1].copy(),
                "sag": inputs["sag"][:, ::-1].copy(), "sag_valid": inputs["sag_valid"].copy()}

    @staticmethod
    def infer(models, config: V24Config, study: Study, keypoints: Keypoints,
              device="cpu") -> np.ndarray:
        """(25, 3) logits: subarticular rows (mean over models and vertical-flip TTA of the
        axial crops), NaN elsewhere."""
        inputs = V24.prepare_inputs(config, study, keypoints)
        flips = {"axial": -2} if config.flip_tta else None
        logits = average_logits(models, batch_inputs(inputs, device), flips)
        return scatter_logits(logits, V24.label_indices(config))
