"""Stage-1 family `sag3d`: a timm_3d network regresses sagittal points in 3D.

Input: the chosen sagittal stack resized to depth x image_size x image_size (in-plane
pixel-centre-aligned cv2 resize, then linear resampling along the slices), laid out
(1, H, W, D) uint8, depth last as timm_3d expects -> Normalize(0.5, 0.5).
Output: per point (u, v, w) unit coordinates (column, row, slice) and a predicted error.
Configs: Sagittal T2/STIR -> 5 spinal points, Sagittal T1 -> 10 foraminal (left 5, right 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry
from ..preprocess import resize_volume
from ..schema import SAG_T2
from ..study import Stack
from .backbones import create_backbone_3d
from .keypoint_common import (
    SPINAL,
    SagittalFamily,
    from_unit,
    to_unit,
)
from .registry import register_family


@register_family
class Sag3D(SagittalFamily):
    name = "sag3d"
    stage = 1
    n_dims = 3
    create_backbone = staticmethod(create_backbone_3d)
    depth_flip = True  # mirroring the slices swaps left and right points

    @dataclass(frozen=True)
    class Config:
        backbone: str = "densenet161"
        image_size: int = 384
        depth: int = 32
        series: str = SAG_T2
        points: tuple[int, ...] = SPINAL
        head: str = "pool"               # "pool" | "soft_argmax" (keypoint_common)
        feature_stage: int | None = None  # None: whole backbone; k: timm out_indices=(k,)
        pyramid: int = 0                  # >0 (with feature_stage): width of a top-down
                                          # pyramid fusing the deeper stages into that map
        heatmap_weight: float = 0.0       # soft_argmax: weight of the auxiliary heatmap CE
        heatmap_sigma: float = 1.0        # its Gaussian width, feature-map cells
        loss: str = "smooth_l1"
        pretrained: bool = False
        weights_path: str | None = None
        drop_rate: float = 0.0

    @staticmethod
    def prepare(stack: Stack, config: Config) -> tuple[np.ndarray, None]:
        """Stack (S, H, W) uint8 -> ((1, size, size, depth) uint8, None)."""
        size = config.image_size
        planes = resize_volume(stack.pixels.astype(np.float32), (size, size))
        t = torch.from_numpy(planes)[None, None]
        if t.shape[2] != config.depth:
            t = F.interpolate(t, size=(config.depth, size, size), mode="trilinear",
                              align_corners=False)
        vol = t[0].round().clamp(0, 255).to(torch.uint8)  # (1, D, H, W)
        return vol.permute(0, 2, 3, 1).contiguous().numpy(), None

    @staticmethod
    def encode(stack: Stack, context, world: np.ndarray) -> np.ndarray:
        """World points (P, 3) mm -> (P, 3) unit (u, v, w) (NaN stays NaN)."""
        s, x, y = geometry.world_to_pixel(stack, np.asarray(world, dtype=np.float64))
        n, h, w = stack.shape
        return np.stack([to_unit(x, w), to_unit(y, h), to_unit(s, n)], axis=-1)

    @staticmethod
    def decode(stack: Stack, context, coords: np.ndarray, config: Config) -> np.ndarray:
        """(P, 3) unit coordinates -> (P, 3) world mm (slice kept within half a slice of
        the stack's ends)."""
        n, h, w = stack.shape
        s = np.clip(from_unit(coords[:, 2], n), -0.5, n - 0.5)
        return geometry.pixel_to_world(stack, s, from_unit(coords[:, 0], w),
                                       from_unit(coords[:, 1], h))
