"""Stage-1 family `axial3d`: a timm_3d network regresses the 10 subarticular points
(left 5 levels, right 5 levels) from the whole axial volume of a study.

Input: every axial stack of every Axial T2 series on one world-z grid (`axial_sequence`,
`z_spacing` mm; one continuous series gives its own slices), resized to depth x
image_size x image_size -> (1, H, W, D) float32 (depth last, as timm_3d expects),
Normalize(0.5, 0.5). Several stacks or series are thus one volume in world order, so the
network sees all levels together (a per-level block alone does not show which level it
is). Output per point: (u, v, w) unit coordinates (column, row, grid position) and a
presence logit ("the point lies inside the scanned extent"), whose sigmoid is the
confidence. Decoding maps w to the grid position, its stack and slice, then to world mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..keypoints import Keypoints
from ..study import Study
from .axial_points import N_POINTS, SUBARTICULAR, feature_map_backbone, soft_argmax, to_model_range
from .axial_sequence import AxialSequence, build_sequence
from .backbones import create_backbone_3d
from .registry import register_family

HEADS = ("pool", "soft_argmax")


class Axial3DNet(nn.Module):
    """timm_3d backbone -> (B, 10, 4): (u, v, w) unit coordinates and a presence logit.

    head "pool": global pooling + linear (the original's direct regression); head
    "soft_argmax": a 1x1x1 conv on the feature map at `feature_stride` plus a learned
    per-point prior map (the mean shape, learned) gives one heat map per point, whose
    spatial softmax expectation is the point (integral regression), optionally with each
    cell centre moved by a predicted sub-cell offset (`offsets`, 3 more channels per point);
    the pooled map gives the presence logits. With `pyramid` the map at `feature_stride`
    also carries every deeper stage (`pyramid.Pyramid`): stride 2 resolves z to ~1 mm.
    """

    def __init__(self, backbone: nn.Module, channels: int, head: str, drop_rate: float,
                 map_shape: tuple[int, int, int] = (1, 1, 1), offsets: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"axial3d: unknown head {head!r} (known: {HEADS})")
        self.backbone, self.head_kind = backbone, head
        self.drop = nn.Dropout(drop_rate)
        if head == "pool":
            self.head = nn.Linear(channels, N_POINTS * 4)
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():  # start at the volume centre, presence 0.5
                self.head.bias.view(N_POINTS, 4).copy_(torch.tensor([0.5, 0.5, 0.5, 0.0]))
        else:
            self.offsets = offsets
            self.heat = nn.Conv3d(channels, N_POINTS * (4 if offsets else 1), kernel_size=1)
            nn.init.zeros_(self.heat.weight[N_POINTS:])
            nn.init.zeros_(self.heat.bias)
            self.prior = nn.Parameter(torch.zeros(1, N_POINTS, *map_shape))
            self.presence = nn.Linear(channels, N_POINTS)

    def forward(self, volume: torch.Tensor, return_heatmaps: bool = False):
        """volume (B, 1, H, W, D) float -> (B, 10, 4); with return_heatmaps (soft_argmax
        head only) also the heat map logits (B, 10, h, w, d) for an auxiliary loss."""
        if self.head_kind == "pool":
            if return_heatmaps:
                raise ValueError("axial3d: the pool head has no heat maps")
            return self.head(self.drop(self.backbone(volume))).view(-1, N_POINTS, 4)
        fmap = self.drop(self.backbone(volume)[-1])
        presence = self.presence(fmap.float().mean(dim=(2, 3, 4)))
        prior = self.prior
        if prior.shape[2:] != fmap.shape[2:]:
            prior = F.interpolate(prior, size=fmap.shape[2:], mode="trilinear",
                                  align_corners=False)
        maps = self.heat(fmap)
        heat = maps[:, :N_POINTS] + prior
        offsets = maps[:, N_POINTS:].unflatten(1, (N_POINTS, 3)) if self.offsets else None
        out = torch.cat([soft_argmax(heat, offsets), presence[..., None]], dim=-1)
        return (out, heat) if return_heatmaps else out


@register_family
class Axial3D:
    name = "axial3d"
    stage = 1
    points = SUBARTICULAR

    @dataclass(frozen=True)
    class Config:
        points = tuple(int(i) for i in SUBARTICULAR)  # class constant, not a field
        backbone: str = "densenet161"
        depth: int = 96                 # grid positions after resampling
        image_size: int = 256           # in-plane size (square)
        z_spacing: float = 3.0          # mm between grid positions before resampling
        max_slices: int = 128           # the grid step grows for longer studies
        head: str = "pool"              # "pool" (original) or "soft_argmax"
        feature_stride: int = 16        # feature map of the soft_argmax head
        offsets: bool = False           # soft_argmax: predicted sub-cell offsets
        pyramid: int = 0                # soft_argmax: >0 = width of a top-down pyramid
                                        # fusing the deeper stages into that map
        heatmap_weight: float = 0.0     # soft_argmax: weight of the auxiliary heatmap CE
        heatmap_sigma: float = 1.0      # its Gaussian width, feature-map cells
        pretrained: bool = False
        weights_path: str | None = None
        drop_rate: float = 0.0

    @staticmethod
    def build(config: Config) -> Axial3DNet:
        common = {"pretrained": config.pretrained, "weights_path": config.weights_path}
        if config.head == "soft_argmax":
            backbone, channels = feature_map_backbone(create_backbone_3d, config.backbone,
                                                      config.feature_stride, 1,
                                                      pyramid=config.pyramid, **common)
            cells = (-(-config.image_size // config.feature_stride),) * 2
            map_shape = (*cells, -(-config.depth // config.feature_stride))
        else:
            backbone = create_backbone_3d(config.backbone, in_chans=1, num_classes=0, **common)
            channels = getattr(backbone, "head_hidden_size", None) or backbone.num_features
            map_shape = (1, 1, 1)
        return Axial3DNet(backbone, channels, config.head, config.drop_rate, map_shape,
                          config.offsets)

    @staticmethod
    def sequence(study: Study, config: Config) -> AxialSequence | None:
        return build_sequence(study, config.z_spacing, config.max_slices, config.image_size)

    @staticmethod
    def prepare_volume(seq: AxialSequence, config: Config) -> np.ndarray:
        """Sequence (N positions) -> (1, size, size, depth) uint8, linear resampling along
        the positions (pixel-centre convention)."""
        t = torch.as_tensor(seq.planes()).float()[None, None]  # (1, 1, N, size, size)
        size = config.image_size
        if t.shape[2] != config.depth:
            t = F.interpolate(t, size=(config.depth, size, size), mode="trilinear",
                              align_corners=False)
        vol = t[0].round().clamp(0, 255).to(torch.uint8)  # (1, D, H, W)
        return vol.permute(0, 2, 3, 1).contiguous().numpy()

    @staticmethod
    def encode_points(seq: AxialSequence, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (10, 3) mm (NaN = unknown) -> unit (u, v, w) (10, 3) float32 and
        presence (10,) float32 (1 inside the scanned extent, 0 outside, NaN unknown)."""
        ug, ok = seq.encode(world)
        uvw = np.concatenate([ug[:, :2], (ug[:, 2:] + 0.5) / len(seq)], axis=1)
        present = ok.astype(np.float32)
        present[~np.isfinite(ug).all(axis=1)] = np.nan
        return uvw.astype(np.float32), present

    @staticmethod
    def decode_points(seq: AxialSequence, uvw: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Unit (u, v, w) (P, 3) -> world points (P, 3) mm and their stack numbers."""
        uvw = np.asarray(uvw, dtype=np.float64).reshape(-1, 3)
        g = uvw[:, 2] * len(seq) - 0.5
        return seq.decode(np.concatenate([uvw[:, :2], g[:, None]], axis=1))

    @classmethod
    @torch.inference_mode()
    def predict(cls, models, config: Config, seq: AxialSequence, device) -> tuple:
        """Fold-averaged prediction: (unit uvw (10, 3), presence probability (10,))."""
        vol = to_model_range(cls.prepare_volume(seq, config))[None].to(device)
        outs = [m.to(device).eval()(vol)[0].float().cpu() for m in models]
        out = torch.stack(outs).mean(0).numpy()
        return out[:, :3], 1.0 / (1.0 + np.exp(-out[:, 3]))

    @classmethod
    def infer(cls, models, config: Config, study: Study, device) -> Keypoints:
        """The 10 subarticular points of a study (empty Keypoints without axial slices)."""
        result = Keypoints()
        seq = cls.sequence(study, config)
        if seq is None:
            return result
        uvw, conf = cls.predict(models, config, seq, device)
        world, ks = cls.decode_points(seq, uvw)
        for j, label in enumerate(SUBARTICULAR):
            series_id, stack_index, _ = seq.stacks[ks[j]]
            result.set(label, world[j], conf[j], f"{cls.name}:{series_id}/{stack_index}")
        return result
