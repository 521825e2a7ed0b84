"""Stage-1 family `sag2d`: a timm 2D network regresses sagittal points on one slice.

Input: the centre of `n_slices` evenly sampled slices of the chosen sagittal stack
(sampled indices round(linspace(0, S - 1, n_slices)), centre = sampled[n_slices // 2]),
resized to image_size x image_size: (1, H, W) uint8 -> Normalize(0.5, 0.5).
Output: per point (u, v) unit coordinates on that slice and a predicted error (see
`keypoint_common`). Decoding puts the point on the input slice, so its lateral (slice-normal)
coordinate is only that slice's position: errors of this family are measured in-plane.
Configs: Sagittal T2/STIR -> 5 spinal points, Sagittal T1 -> 10 foraminal (left 5, right 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import geometry
from ..preprocess import resize_volume
from ..schema import SAG_T2
from ..study import Stack, Study
from .backbones import create_backbone_2d
from .keypoint_common import (
    SPINAL,
    SagittalFamily,
    from_unit,
    to_unit,
)
from .registry import register_family


@register_family
class Sag2D(SagittalFamily):
    name = "sag2d"
    stage = 1
    n_dims = 2
    create_backbone = staticmethod(create_backbone_2d)
    depth_flip = False  # one slice: a lateral mirror would only relabel left/right

    @dataclass(frozen=True)
    class Config:
        backbone: str = "densenet161"
        image_size: int = 512
        n_slices: int = 10
        series: str = SAG_T2
        points: tuple[int, ...] = SPINAL
        head: str = "pool"               # "pool" | "soft_argmax" (keypoint_common)
        feature_stage: int | None = None  # None: whole backbone; k: timm out_indices=(k,)
        pyramid: int = 0                  # >0 (with feature_stage): width of a top-down
                                          # pyramid fusing the deeper stages into that map
        heatmap_weight: float = 0.0       # soft_argmax: weight of the auxiliary heatmap CE
        heatmap_sigma: float = 1.0        # its Gaussian width, feature-map cells
        loss: str = "l1"
        pretrained: bool = False
        weights_path: str | None = None
        drop_rate: float = 0.0

    @staticmethod
    def centre_slice(n_slices_in_stack: int, config: Config) -> int:
        sampled = np.round(np.linspace(0, n_slices_in_stack - 1, config.n_slices))
        return int(sampled[config.n_slices // 2])

    @classmethod
    def prepare(cls, stack: Stack, config: Config) -> tuple[np.ndarray, int]:
        """Stack (S, H, W) uint8 -> ((1, size, size) uint8, slice index used)."""
        s = cls.centre_slice(stack.shape[0], config)
        size = config.image_size
        plane = resize_volume(stack.pixels[s:s + 1].astype(np.float32), (size, size))
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8), s

    @staticmethod
    def encode(stack: Stack, context: int, world: np.ndarray) -> np.ndarray:
        """World points (P, 3) mm -> (P, 2) unit (u, v) on the input slice (NaN stays)."""
        _, x, y = geometry.world_to_pixel(stack, np.asarray(world, dtype=np.float64))
        _, h, w = stack.shape
        return np.stack([to_unit(x, w), to_unit(y, h)], axis=-1)

    @staticmethod
    def decode(stack: Stack, context: int, coords: np.ndarray, config: Config) -> np.ndarray:
        """(P, 2) unit coordinates on slice `context` -> (P, 3) world mm."""
        _, h, w = stack.shape
        return geometry.pixel_to_world(stack, context, from_unit(coords[:, 0], w),
                                       from_unit(coords[:, 1], h))

    @classmethod
    def eval_normal(cls, study: Study, config: Config) -> np.ndarray | None:
        chosen = cls.select(study, config)
        return None if chosen is None else chosen[1].normal
