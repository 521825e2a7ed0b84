"""A top-down feature pyramid over a timm / timm_3d backbone: fine maps that still see the
whole image.

A soft-argmax keypoint head wants a fine feature map (a point's expectation over 4 coarse
cells is not precise) that also carries deep context (which disc is which). `Pyramid`
builds the backbone with `features_only=True`, keeps the maps from stage `first` to the
last, and fuses them from coarse to fine (FPN: a 1x1 lateral conv per stage, nearest
upsampling and a sum, then one 3x3 conv + BatchNorm + ReLU), so the output is ONE map at
the stride of stage `first`, `width` channels wide. Like `features_only` models, it returns
a one-element list, so the heads that read `backbone(x)[-1]` take either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone_3d


class Pyramid(nn.Module):
    """features_only backbone `body` (maps of `channels`, fine to coarse) -> [(B, width,
    *map of stage `first`)]. `dims` = 2 (images) or 3 (volumes, depth last)."""

    def __init__(self, body: nn.Module, channels: list[int], first: int, width: int,
                 dims: int):
        super().__init__()
        if not 0 <= first < len(channels):
            raise ValueError(f"pyramid: stage {first} does not exist "
                             f"({len(channels)} stages)")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.body, self.first = body, first
        self.lateral = nn.ModuleList(conv(c, width, kernel_size=1) for c in channels[first:])
        self.smooth = nn.Sequential(conv(width, width, kernel_size=3, padding=1, bias=False),
                                    norm(width), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(x)[self.first:]
        y = self.lateral[-1](maps[-1])
        for fmap, lateral in zip(maps[-2::-1], list(self.lateral)[-2::-1], strict=True):
            y = F.interpolate(y, size=fmap.shape[2:], mode="nearest") + lateral(fmap)
        return [self.smooth(y)]


def stage_maps(create, name: str, in_chans: int) -> tuple[list[int], list[int]]:
    """(strides, channels) of the maps a backbone gives with features_only, fine to coarse."""
    info = create(name, in_chans=in_chans, features_only=True).feature_info
    return list(info.reduction()), list(info.channels())


def pyramid_backbone(create, name: str, first: int, width: int, in_chans: int, **kwargs
                     ) -> tuple[Pyramid, int]:
    """(Pyramid over `create(name, ...)` fused down to stage index `first`, its width).
    `create` is `backbones.create_backbone_2d` or `create_backbone_3d`."""
    body = create(name, in_chans=in_chans, features_only=True, **kwargs)
    dims = 3 if create is create_backbone_3d else 2
    return Pyramid(body, list(body.feature_info.channels()), first, width, dims), width
