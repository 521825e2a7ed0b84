"""Conventions shared by the two axial keypoint families (`axial3d`, `axial_level`).

- The 10 axial points: left subarticular at the 5 levels, then right subarticular
  (`SUBARTICULAR`, indices into `schema.LABEL_COLUMNS`).
- Unit coordinates: a pixel coordinate p on an axis of n pixels maps to u = (p + 0.5) / n,
  so u does not change when the image is resized (pixel-centre convention, the one of
  `F.interpolate(..., align_corners=False)`). A horizontal flip maps u to 1 - u.
- Pixels enter the networks as float32 (v / 255 - 0.5) / 0.5 (Normalize(0.5, 0.5)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..schema import AXIAL_T2, LEVELS, N_LEVELS, label_index
from ..study import Stack, Study
from .pyramid import pyramid_backbone, stage_maps

SUBARTICULAR = np.array(
    [label_index("left_subarticular_stenosis", lv) for lv in LEVELS]
    + [label_index("right_subarticular_stenosis", lv) for lv in LEVELS]
)
N_POINTS = len(SUBARTICULAR)  # 10: left x 5 levels, right x 5 levels
SWAP_SIDES = np.r_[np.arange(N_LEVELS, 2 * N_LEVELS), np.arange(N_LEVELS)]  # left <-> right


def axial_stacks(study: Study) -> list[tuple[int, int, Stack]]:
    """Every stack of every Axial T2 series: (series_id, stack index, stack), in series order."""
    return [(s.series_id, k, st) for s in study.by_description(AXIAL_T2)
            for k, st in enumerate(s.stacks)]


def to_unit(p, n):
    """Pixel coordinate(s) on an axis of n pixels -> unit coordinate(s) (pixel-centre)."""
    return (np.asarray(p, dtype=np.float64) + 0.5) / n


def from_unit(u, n):
    """Unit coordinate(s) -> pixel coordinate(s) on an axis of n pixels."""
    return np.asarray(u, dtype=np.float64) * n - 0.5


def to_model_range(pixels) -> torch.Tensor:
    """uint8 array or tensor -> float32 tensor in [-1, 1] (Normalize(0.5, 0.5))."""
    t = torch.as_tensor(np.asarray(pixels)).float()
    return (t / 255.0 - 0.5) / 0.5


def resize_slices(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(S, H, W) uint8 -> (S, height, width) uint8, bilinear with antialiasing."""
    t = torch.as_tensor(np.ascontiguousarray(pixels)).float()[:, None]
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)
    return t[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def inside(n_slices: int, height: int, width: int, slice_index, x, y) -> np.ndarray:
    """Whether pixel points (float slice index, x, y) lie within a stack's extent (bool)."""
    s, x, y = (np.asarray(v, dtype=np.float64) for v in (slice_index, x, y))
    return ((s >= -0.5) & (s <= n_slices - 0.5) & (x >= -0.5) & (x <= width - 0.5)
            & (y >= -0.5) & (y <= height - 0.5))


def neighbours_25d(volume: np.ndarray, index: int) -> np.ndarray:
    """(S, H, W) -> (3, H, W): slices index-1, index, index+1 (clamped at the ends)."""
    last = len(volume) - 1
    picks = [min(max(index + d, 0), last) for d in (-1, 0, 1)]
    return volume[picks]


def soft_argmax(maps: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Integral regression: (B, P, H, W[, D]) logits -> (B, P, 2|3) expected unit
    (u = column, v = row[, w = slice]) under the spatial softmax of each map.

    offsets (B, P, 2|3, H, W[, D]) (optional, same axis order as the output): a per-cell
    correction in cells added to each cell centre before the expectation (sub-cell
    precision on coarse feature maps)."""
    spatial = maps.shape[2:]
    heat = maps.flatten(2).float().softmax(-1)  # (B, P, N)
    grids = torch.meshgrid(*[(torch.arange(n, device=maps.device) + 0.5) / n for n in spatial],
                           indexing="ij")
    order = [1, 0, 2][: len(spatial)]  # spatial axes are (row, col[, slice])
    coords = []
    for d, a in enumerate(order):
        cell = grids[a].reshape(1, 1, -1)
        if offsets is not None:
            cell = cell + offsets[:, :, d].flatten(2).float() / spatial[a]
        coords.append((heat * cell).sum(-1))
    return torch.stack(coords, -1)


def feature_map_backbone(create, name: str, stride: int, in_chans: int, pyramid: int = 0,
                         **kwargs):
    """A timm / timm_3d backbone (`create` = `backbones.create_backbone_2d|3d`) whose output
    is a one-element list: the feature map at `stride` (with `pyramid` > 0: that map fused
    with every deeper stage by a `pyramid.Pyramid` of that width). Returns (module,
    channels); ValueError naming the available strides."""
    strides, channels = stage_maps(create, name, in_chans)
    if stride not in strides:
        raise ValueError(f"backbone {name!r}: no feature map at stride {stride} "
                         f"(available: {strides})")
    index = strides.index(stride)
    if pyramid:
        return pyramid_backbone(create, name, index, int(pyramid), in_chans, **kwargs)
    model = create(name, in_chans=in_chans, features_only=True, out_indices=(index,), **kwargs)
    return model, channels[index]
