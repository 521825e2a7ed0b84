"""Stage-1 family `axial3d`: a timm_3d network regresses the 10 subarticular points
(left 5 levels, right 5 levels) from one whole axial stack resized to depth x height x width.

Input: one stack -> (1, H, W, D) float32 (depth last, as timm_3d expects), Normalize(0.5, 0.5).
Output per point: (u, v, w) unit coordinates (column, row, slice; see `axial_points`) and a
presence logit: "this point lies inside this stack's extent". Several stacks in one series
and several axial series: every stack runs on its own, and per point the stack with the
highest presence probability wins; that probability is the point's confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from ..keypoints import Keypoints
from ..study import Stack, Study
from .axial_points import (
    N_POINTS,
    SUBARTICULAR,
    axial_stacks,
    from_unit,
    inside,
    resize_slices,
    to_model_range,
    to_unit,
)
from .backbones import create_backbone_3d
from .registry import register_family


class Axial3DNet(nn.Module):
    """timm_3d backbone -> (B, 10, 4): (u, v, w) unit coordinates and a presence logit."""

    def __init__(self, backbone: nn.Module, n_features: int, drop_rate: float):
        super().__init__()
        self.backbone = backbone
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(n_features, N_POINTS * 4)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start at the volume centre, presence 0.5
            self.head.bias.view(N_POINTS, 4).copy_(torch.tensor([0.5, 0.5, 0.5, 0.0]))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """volume (B, 1, H, W, D) float -> (B, 10, 4)."""
        feats = self.backbone(volume)
        return self.head(self.drop(feats)).view(-1, N_POINTS, 4)


@register_family
class Axial3D:
    name = "axial3d"
    stage = 1
    points = SUBARTICULAR

    @dataclass(frozen=True)
    class Config:
        backbone: str = "densenet161"
        depth: int = 96
        height: int = 256
        width: int = 256
        pretrained: bool = False
        weights_path: str | None = None
        drop_rate: float = 0.0

    @staticmethod
    def build(config: Config) -> Axial3DNet:
        backbone = create_backbone_3d(config.backbone, in_chans=1, num_classes=0,
                                      pretrained=config.pretrained,
                                      weights_path=config.weights_path)
        n_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        return Axial3DNet(backbone, n_features, config.drop_rate)

    @staticmethod
    def prepare_volume(stack: Stack, config: Config) -> np.ndarray:
        """Stack (S, H, W) uint8 -> (1, height, width, depth) uint8: in-plane resize with
        antialiasing, then linear resampling along the slices (pixel-centre convention)."""
        planes = resize_slices(stack.pixels, config.height, config.width)
        t = torch.as_tensor(planes).float()[None, None]
        if t.shape[2] != config.depth:
            t = F.interpolate(t, size=(config.depth, config.height, config.width),
                              mode="trilinear", align_corners=False)
        vol = t[0].round().clamp(0, 255).to(torch.uint8)  # (1, D, H, W)
        return vol.permute(0, 2, 3, 1).contiguous().numpy()

    @staticmethod
    def encode_points(stack: Stack, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (10, 3) mm (NaN = unknown) -> unit (u, v, w) (10, 3) float32 and
        presence (10,) float32 (1 inside the stack's extent, 0 outside; NaN stays NaN)."""
        world = np.asarray(world, dtype=np.float64).reshape(N_POINTS, 3)
        S, H, W = stack.pixels.shape
        s, x, y = geometry.world_to_pixel(stack, world)
        uvw = np.stack([to_unit(x, W), to_unit(y, H), to_unit(s, S)], axis=-1)
        present = inside(S, H, W, s, x, y).astype(np.float32)
        present[~np.isfinite(world).all(axis=1)] = np.nan
        return uvw.astype(np.float32), present

    @staticmethod
    def decode_points(stack: Stack, uvw: np.ndarray) -> np.ndarray:
        """Unit (u, v, w) (..., 3) on a stack -> world points (..., 3) mm. The slice
        coordinate is clipped into the stack (geometry interpolates between slices)."""
        uvw = np.asarray(uvw, dtype=np.float64)
        S, H, W = stack.pixels.shape
        s = np.clip(from_unit(uvw[..., 2], S), 0, S - 1)
        return geometry.pixel_to_world(stack, s, from_unit(uvw[..., 0], W),
                                       from_unit(uvw[..., 1], H))

    @classmethod
    @torch.inference_mode()
    def predict_stack(cls, models, config: Config, stack: Stack, device) -> tuple:
        """Fold-averaged prediction on one stack: (unit uvw (10, 3), presence prob (10,))."""
        vol = to_model_range(cls.prepare_volume(stack, config))[None].to(device)
        outs = [m.to(device).eval()(vol)[0].float().cpu() for m in models]
        out = torch.stack(outs).mean(0).numpy()
        return out[:, :3], 1.0 / (1.0 + np.exp(-out[:, 3]))

    @classmethod
    def infer(cls, models, config: Config, study: Study, device) -> Keypoints:
        """The 10 subarticular points of a study; per point the most confident stack wins."""
        result = Keypoints()
        for series_id, k, stack in axial_stacks(study):
            uvw, conf = cls.predict_stack(models, config, stack, device)
            found = Keypoints()
            world = cls.decode_points(stack, uvw)
            for j, label in enumerate(SUBARTICULAR):
                found.set(label, world[j], conf[j], f"{cls.name}:{series_id}/{k}")
            result = result.merged(found)
        return result
