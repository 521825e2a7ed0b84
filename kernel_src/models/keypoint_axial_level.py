"""Stage-1 family `axial_level`: which axial slice shows each level, then where on it.

1. Sequence: every axial stack of every Axial T2 series of a study is put on ONE world-z
   grid (`axial_sequence.build_sequence`, `z_spacing` mm). Each position is a 2.5D image
   (the slice and its two neighbours in its own stack, 3 channels, `image_size` px).
   A timm 2D encoder embeds each image (plus features of the position's relative place in
   the study's grid), a 2-layer residual BiLSTM and a 2-layer
   TransformerEncoder (4 heads) mix the positions, and per position two heads give:
   level logits (5 levels + background, class 5) and 10 point logits (left 5, right 5).
   Over the positions of a study the point logits are a distribution; the point's grid
   position is the probability-weighted mean of the positions within POSITION_WINDOW of
   its mode (-> slice-centre z -> stack and float slice), and its confidence is the
   expected level probability under that distribution.
2. Regressor (a second module of the same network, trained jointly): a timm 2D model
   regresses (x_left, y_left, x_right, y_right) in unit coordinates on the 2.5D slice nearest
   the level's grid position (mean of the two sides), `regressor_size` px; the world point
   is that (x, y) on its stack at the side's own float slice. Head "pool" (original:
   pooled features + linear) or "soft_argmax" (left / right heat maps on the stride
   `regressor_stride` map + learned prior + sub-cell offsets, see `axial_points`).
One network, one Config: `AxialLevelNet.forward(batch)` runs both parts on a training batch,
`infer` runs the sequence first, then the regressor on the chosen slices. Slices are in
world order along z (never instance order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..keypoints import Keypoints
from ..schema import N_LEVELS
from ..study import Study
from .axial_points import (
    N_POINTS,
    SUBARTICULAR,
    feature_map_backbone,
    neighbours_25d,
    resize_slices,
    soft_argmax,
    to_model_range,
)
from .axial_sequence import AxialSequence, build_sequence
from .backbones import create_backbone_2d
from .registry import register_family

BACKGROUND = N_LEVELS  # level class index of "no level"
N_FREQUENCIES = 4  # sin / cos pairs of the relative-position features
POSITION_WINDOW = 2.0  # grid positions around the mode entering the weighted mean


def _features(model: nn.Module) -> int:
    return getattr(model, "head_hidden_size", None) or model.num_features


def relative_position_features(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, 2F + 1): each position's place t = (i + 0.5) / length in its study's grid and
    sin / cos(pi k t), k = 1..F (the axial coverage is itself a cue to the level)."""
    t = (torch.arange(n, device=lengths.device)[None] + 0.5) / lengths[:, None].float()
    k = torch.arange(1, N_FREQUENCIES + 1, device=lengths.device).float() * torch.pi
    angles = t[..., None] * k
    return torch.cat([t[..., None], angles.sin(), angles.cos()], dim=-1)


class AxialLevelNet(nn.Module):
    def __init__(self, encoder: nn.Module, regressor: nn.Module, config,
                 regressor_channels: int = 0):
        super().__init__()
        hidden = config.hidden
        self.encoder = encoder
        self.proj = nn.Sequential(nn.Linear(_features(encoder), hidden), nn.LayerNorm(hidden))
        self.position = nn.Linear(2 * N_FREQUENCIES + 1, hidden)
        self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=config.lstm_layers,
                            bidirectional=True, batch_first=True, dropout=config.dropout)
        layer = nn.TransformerEncoderLayer(hidden, config.heads, dim_feedforward=2 * hidden,
                                           dropout=config.dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.transformer_layers,
                                                 enable_nested_tensor=False)
        self.level_head = nn.Linear(hidden, N_LEVELS + 1)
        self.point_head = nn.Linear(hidden, N_POINTS)
        self.regressor, self.regressor_head = regressor, config.regressor_head
        if config.regressor_head == "pool":
            self.xy_head = nn.Linear(_features(regressor), 4)
            nn.init.zeros_(self.xy_head.weight)
            nn.init.constant_(self.xy_head.bias, 0.5)
        else:  # 2 heat maps (left, right) + their (u, v) sub-cell offsets, learned prior
            self.xy_head = nn.Conv2d(regressor_channels, 6, kernel_size=1)
            nn.init.zeros_(self.xy_head.weight[2:])
            nn.init.zeros_(self.xy_head.bias)
            cells = -(-config.regressor_size // config.regressor_stride)
            self.xy_prior = nn.Parameter(torch.zeros(1, 2, cells, cells))

    def forward_sequence(self, slices: torch.Tensor, mask: torch.Tensor):
        """slices (B, N, 3, H, W) float, mask (B, N) bool (True = real position) ->
        level logits (B, N, 6), point logits (B, N, 10) (-inf at padded positions)."""
        B, N = slices.shape[:2]
        feats = self.proj(self.encoder(slices.flatten(0, 1)).float()).view(B, N, -1)
        lengths = mask.sum(1).clamp(min=1)
        feats = feats + self.position(relative_position_features(lengths, N))
        lengths = lengths.cpu()
        packed = pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
        mixed, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=N)
        h = self.transformer(feats + mixed, src_key_padding_mask=~mask)
        points = self.point_head(h).masked_fill(~mask[..., None], float("-inf"))
        return self.level_head(h), points

    def forward_xy(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R) float -> (B, 4) unit (x_left, y_left, x_right, y_right)."""
        if self.regressor_head == "pool":
            return self.xy_head(self.regressor(images).float())
        maps = self.xy_head(self.regressor(images)[-1]).float()
        prior = self.xy_prior
        if prior.shape[2:] != maps.shape[2:]:
            prior = F.interpolate(prior, size=maps.shape[2:], mode="bilinear",
                                  align_corners=False)
        points = soft_argmax(maps[:, :2] + prior, maps[:, 2:].unflatten(1, (2, 2)))
        return points.flatten(1)

    def forward(self, batch: dict) -> dict:
        """Training batch: slices (B, N, 3, H, W), mask (B, N), crops (B, 5, 3, R, R)."""
        level, points = self.forward_sequence(batch["slices"], batch["mask"])
        crops = batch["crops"]
        xy = self.forward_xy(crops.flatten(0, 1)).view(*crops.shape[:2], 4)
        return {"level": level, "points": points, "xy": xy}


def decode_positions(level_probs: np.ndarray, point_probs: np.ndarray,
                     window: float) -> tuple[np.ndarray, np.ndarray]:
    """Per point: grid position g = probability-weighted mean of the positions within
    `window` positions of the mode; confidence = sum over positions of p_point *
    p_level(own level).

    level_probs (N, 6), point_probs (N, 10) (each column sums to 1) -> (10,), (10,).
    """
    n = np.arange(len(point_probs), dtype=np.float64)
    g, conf = np.zeros(N_POINTS), np.zeros(N_POINTS)
    for j in range(N_POINTS):
        p = point_probs[:, j]
        near = np.abs(n - np.argmax(p)) <= window
        g[j] = float(np.sum(p[near] * n[near]) / max(np.sum(p[near]), 1e-12))
        conf[j] = float(np.sum(p * level_probs[:, j % N_LEVELS]))
    return g, conf


@register_family
class AxialLevel:
    name = "axial_level"
    stage = 1
    points = SUBARTICULAR

    @dataclass(frozen=True)
    class Config:
        points = tuple(int(i) for i in SUBARTICULAR)  # class constant, not a field
        backbone: str = "convnext_small"
        image_size: int = 224
        z_spacing: float = 3.0          # mm between grid positions
        max_slices: int = 128           # the grid spacing grows when a study is longer
        hidden: int = 256
        lstm_layers: int = 2
        transformer_layers: int = 2
        heads: int = 4
        dropout: float = 0.1
        regressor_backbone: str = "densenet161"
        regressor_size: int = 224
        regressor_head: str = "pool"    # "pool" (original) or "soft_argmax" (+ offsets)
        regressor_stride: int = 16      # feature map of the soft_argmax regressor head
        regressor_pyramid: int = 0      # soft_argmax: >0 = width of a top-down pyramid
        pretrained: bool = False
        weights_path: str | None = None
        regressor_weights_path: str | None = None

    @staticmethod
    def build(config: Config) -> AxialLevelNet:
        encoder = create_backbone_2d(config.backbone, in_chans=3, pretrained=config.pretrained,
                                     weights_path=config.weights_path)
        common = {"pretrained": config.pretrained, "weights_path": config.regressor_weights_path}
        if config.regressor_head not in ("pool", "soft_argmax"):
            raise ValueError(f"axial_level: unknown regressor_head {config.regressor_head!r}")
        if config.regressor_head == "soft_argmax":
            regressor, channels = feature_map_backbone(
                create_backbone_2d, config.regressor_backbone, config.regressor_stride, 3,
                pyramid=config.regressor_pyramid, **common)
            return AxialLevelNet(encoder, regressor, config, channels)
        regressor = create_backbone_2d(config.regressor_backbone, in_chans=3, **common)
        return AxialLevelNet(encoder, regressor, config)

    @staticmethod
    def sequence(study: Study, config: Config) -> AxialSequence | None:
        return build_sequence(study, config.z_spacing, config.max_slices, config.image_size)

    @staticmethod
    def regressor_image(seq: AxialSequence, k: int, slice_index: int, config: Config):
        """(3, R, R) uint8 2.5D image of slice `slice_index` of stack number k."""
        stack = seq.stacks[k][2]
        lo, hi = max(slice_index - 1, 0), min(slice_index + 2, stack.pixels.shape[0])
        planes = resize_slices(stack.pixels[lo:hi], config.regressor_size, config.regressor_size)
        return neighbours_25d(planes, slice_index - lo)

    @staticmethod
    def level_slice(seq: AxialSequence, g_left: float, g_right: float) -> tuple[int, int]:
        """(stack number, slice index) of the regressor slice of a level: the slice at the
        mean grid position of its two points."""
        g = (g_left + g_right) / 2
        k = seq.stack_at(g)
        z = float(np.interp(g, np.arange(len(seq)), seq.z))
        return k, int(round(seq.slice_index(k, z)))

    @classmethod
    @torch.inference_mode()
    def predict_positions(cls, models, config: Config, seq: AxialSequence, device):
        """Fold-averaged sequence outputs -> (grid positions g (10,), confidence (10,))."""
        slices = to_model_range(seq.images())[None].to(device)
        mask = torch.ones(slices.shape[:2], dtype=torch.bool, device=device)
        levels, points = [], []
        for m in models:
            lv, pt = m.to(device).eval().forward_sequence(slices, mask)
            levels.append(lv[0].float().softmax(-1).cpu())
            points.append(pt[0].float().softmax(0).cpu())
        return decode_positions(torch.stack(levels).mean(0).numpy(),
                                torch.stack(points).mean(0).numpy(), POSITION_WINDOW)

    @classmethod
    @torch.inference_mode()
    def infer(cls, models, config: Config, study: Study, device) -> Keypoints:
        """Left/right subarticular points of a study in world mm with confidences."""
        result = Keypoints()
        seq = cls.sequence(study, config)
        if seq is None:
            return result
        g, conf = cls.predict_positions(models, config, seq, device)
        chosen = [cls.level_slice(seq, g[lv], g[lv + N_LEVELS]) for lv in range(N_LEVELS)]
        images = np.stack([cls.regressor_image(seq, k, s, config) for k, s in chosen])
        batch = to_model_range(images).to(device)
        xy = torch.stack([m.eval().forward_xy(batch).float().cpu() for m in models]).mean(0)
        side = np.arange(N_POINTS) // N_LEVELS
        level = np.arange(N_POINTS) % N_LEVELS
        ug = np.stack([xy[level, 2 * side].numpy(), xy[level, 2 * side + 1].numpy(), g], 1)
        world, ks = seq.decode(ug, stacks=[chosen[lv][0] for lv in level])
        for j, label in enumerate(SUBARTICULAR):
            series_id, stack_index, _ = seq.stacks[ks[j]]
            result.set(label, world[j], conf[j], f"{cls.name}:{series_id}/{stack_index}")
        return result
