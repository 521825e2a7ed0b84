"""Stage-1 family `axial_level`: which axial slice shows each level, then where on it.

1. Sequence: every axial stack of every Axial T2 series of a study is put on ONE world-z
   grid (`z_spacing` mm, each grid position takes the nearest slice of any stack; positions
   farther than `z_spacing` from every slice are dropped). Each position is a 2.5D image
   (the slice and its two neighbours in its own stack, 3 channels, `image_size` px).
   A timm 2D encoder embeds each image, a 2-layer residual BiLSTM and a 2-layer
   TransformerEncoder (4 heads) mix the positions, and per position two heads give:
   level logits (5 levels + background, class 5) and 10 point logits (left 5, right 5).
   Over the positions of a study the point logits are a distribution; the point's z is
   the probability-weighted mean of the slice z within `2 * z_spacing` of its mode, and its
   confidence is the expected level probability under that distribution.
2. Regressor (a second module of the same network, trained jointly): a timm 2D model
   regresses (x_left, y_left, x_right, y_right) in unit coordinates on the 2.5D slice nearest
   the level's z (mean of the two sides), `regressor_size` px.
One network, one Config: `AxialLevelNet.forward(batch)` runs both parts on a training batch,
`infer` runs the sequence first, then the regressor on the chosen slices. Slices are in
world order along z (never instance order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import geometry
from ..keypoints import Keypoints
from ..schema import N_LEVELS
from ..study import Stack, Study
from .axial_points import (
    N_POINTS,
    SUBARTICULAR,
    axial_stacks,
    from_unit,
    neighbours_25d,
    resize_slices,
    to_model_range,
)
from .backbones import create_backbone_2d
from .registry import register_family

BACKGROUND = N_LEVELS  # level class index of "no level"


def _features(model: nn.Module) -> int:
    return getattr(model, "head_hidden_size", None) or model.num_features


class AxialLevelNet(nn.Module):
    def __init__(self, encoder: nn.Module, regressor: nn.Module, config):
        super().__init__()
        hidden = config.hidden
        self.encoder = encoder
        self.proj = nn.Sequential(nn.Linear(_features(encoder), hidden), nn.LayerNorm(hidden))
        self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=config.lstm_layers,
                            bidirectional=True, batch_first=True, dropout=config.dropout)
        layer = nn.TransformerEncoderLayer(hidden, config.heads, dim_feedforward=2 * hidden,
                                           dropout=config.dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.transformer_layers,
                                                 enable_nested_tensor=False)
        self.level_head = nn.Linear(hidden, N_LEVELS + 1)
        self.point_head = nn.Linear(hidden, N_POINTS)
        self.regressor = regressor
        self.xy_head = nn.Linear(_features(regressor), 4)
        nn.init.zeros_(self.xy_head.weight)
        nn.init.constant_(self.xy_head.bias, 0.5)

    def forward_sequence(self, slices: torch.Tensor, mask: torch.Tensor):
        """slices (B, N, 3, H, W) float, mask (B, N) bool (True = real position) ->
        level logits (B, N, 6), point logits (B, N, 10) (-inf at padded positions)."""
        B, N = slices.shape[:2]
        feats = self.proj(self.encoder(slices.flatten(0, 1)).float()).view(B, N, -1)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
        mixed, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=N)
        h = self.transformer(feats + mixed, src_key_padding_mask=~mask)
        points = self.point_head(h).masked_fill(~mask[..., None], float("-inf"))
        return self.level_head(h), points

    def forward_xy(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R) float -> (B, 4) unit (x_left, y_left, x_right, y_right)."""
        return self.xy_head(self.regressor(images).float())

    def forward(self, batch: dict) -> dict:
        """Training batch: slices (B, N, 3, H, W), mask (B, N), crops (B, 5, 3, R, R)."""
        level, points = self.forward_sequence(batch["slices"], batch["mask"])
        crops = batch["crops"]
        xy = self.forward_xy(crops.flatten(0, 1)).view(*crops.shape[:2], 4)
        return {"level": level, "points": points, "xy": xy}


@dataclass
class AxialSequence:
    """The axial slices of a study on one world-z grid.

    stacks: (series_id, stack index, Stack) of every axial stack; volumes: each stack
    resized to (S, image_size, image_size) uint8; slice_z: each stack's (S,) world z (mm)
    of its slice centres; refs: (N, 2) int (stack number, slice index) per grid position;
    z: (N,) world z (mm) of the slice at each position (ascending).
    """

    stacks: list[tuple[int, int, Stack]]
    volumes: list[np.ndarray]
    slice_z: list[np.ndarray]
    refs: np.ndarray
    z: np.ndarray

    def images(self, positions=None) -> np.ndarray:
        """(N, 3, size, size) uint8 2.5D images of the grid positions (all by default)."""
        rows = self.refs if positions is None else self.refs[positions]
        return np.stack([neighbours_25d(self.volumes[k], s) for k, s in rows])

    def locate(self, z: float) -> tuple[int, float]:
        """World z (mm) -> (stack number of the nearest grid position, float slice index)."""
        k = int(self.refs[np.argmin(np.abs(self.z - z)), 0])
        zs = self.slice_z[k]
        return k, float(np.interp(z, zs, np.arange(len(zs))))


def slice_centre_z(stack: Stack) -> np.ndarray:
    """(S,) world z (mm) of the centre pixel of every slice."""
    S, H, W = stack.pixels.shape
    idx = np.arange(S, dtype=np.float64)
    world = geometry.pixel_to_world(stack, idx, np.full(S, (W - 1) / 2), np.full(S, (H - 1) / 2))
    return np.asarray(world)[:, 2]


def _grid_refs(slice_z: list[np.ndarray], grid: np.ndarray, step: float) -> np.ndarray:
    """(N, 2) (stack number, slice index) per kept grid position. A position takes the
    nearest slice of the longest stack having one within step / 2 (so overlapping stacks
    do not alternate), else the nearest slice of any stack within `step`, else is dropped."""
    priority = sorted(range(len(slice_z)), key=lambda k: -len(slice_z[k]))
    refs = []
    for g in grid:
        best = [(abs(slice_z[k] - g).min(), k, int(np.argmin(abs(slice_z[k] - g))))
                for k in priority]
        close = [b for b in best if b[0] <= step / 2]
        pick = close[0] if close else min(best)
        if pick[0] <= step:
            refs.append((pick[1], pick[2]))
    return np.asarray(refs, dtype=np.int64).reshape(-1, 2)


def build_sequence(study: Study, config) -> AxialSequence | None:
    """All axial stacks of a study on one z grid (None when the study has no axial slice)."""
    stacks = [t for t in axial_stacks(study) if t[2].pixels.shape[0] > 0]
    if not stacks:
        return None
    slice_z = [slice_centre_z(st) for _, _, st in stacks]
    lo = min(z.min() for z in slice_z)
    span = max(z.max() for z in slice_z) - lo
    step = max(config.z_spacing, span / max(1, config.max_slices - 1))
    grid = lo + step * np.arange(int(np.floor(span / step + 1e-6)) + 1)
    refs = _grid_refs(slice_z, grid, step)
    z = np.array([slice_z[k][s] for k, s in refs])
    order = np.argsort(z, kind="stable")
    volumes = [resize_slices(st.pixels, config.image_size, config.image_size)
               for _, _, st in stacks]
    return AxialSequence(stacks, volumes, slice_z, refs[order], z[order])


def decode_z(level_probs: np.ndarray, point_probs: np.ndarray, z: np.ndarray,
             window: float) -> tuple[np.ndarray, np.ndarray]:
    """Per point: z (mm) = probability-weighted mean of z within `window` mm of the mode;
    confidence = sum over positions of p_point * p_level(own level).

    level_probs (N, 6), point_probs (N, 10) (each column sums to 1), z (N,) -> (10,), (10,).
    """
    out_z, conf = np.zeros(N_POINTS), np.zeros(N_POINTS)
    for j in range(N_POINTS):
        p = point_probs[:, j]
        near = np.abs(z - z[np.argmax(p)]) <= window
        out_z[j] = float(np.sum(p[near] * z[near]) / max(np.sum(p[near]), 1e-12))
        conf[j] = float(np.sum(p * level_probs[:, j % N_LEVELS]))
    return out_z, conf


@register_family
class AxialLevel:
    name = "axial_level"
    stage = 1
    points = SUBARTICULAR

    @dataclass(frozen=True)
    class Config:
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
        pretrained: bool = False
        weights_path: str | None = None
        regressor_weights_path: str | None = None

    @staticmethod
    def build(config: Config) -> AxialLevelNet:
        encoder = create_backbone_2d(config.backbone, in_chans=3, pretrained=config.pretrained,
                                     weights_path=config.weights_path)
        regressor = create_backbone_2d(config.regressor_backbone, in_chans=3,
                                       pretrained=config.pretrained,
                                       weights_path=config.regressor_weights_path)
        return AxialLevelNet(encoder, regressor, config)

    @staticmethod
    def regressor_image(seq: AxialSequence, k: int, slice_index: int, config: Config):
        """(3, R, R) uint8 2.5D image of slice `slice_index` of stack number k."""
        stack = seq.stacks[k][2]
        lo, hi = max(slice_index - 1, 0), min(slice_index + 2, stack.pixels.shape[0])
        planes = resize_slices(stack.pixels[lo:hi], config.regressor_size, config.regressor_size)
        return neighbours_25d(planes, slice_index - lo)

    @classmethod
    @torch.inference_mode()
    def predict_z(cls, models, config: Config, seq: AxialSequence, device):
        """Fold-averaged sequence outputs -> (z (10,) mm, confidence (10,))."""
        slices = to_model_range(seq.images())[None].to(device)
        mask = torch.ones(slices.shape[:2], dtype=torch.bool, device=device)
        levels, points = [], []
        for m in models:
            lv, pt = m.to(device).eval().forward_sequence(slices, mask)
            levels.append(lv[0].float().softmax(-1).cpu())
            points.append(pt[0].float().softmax(0).cpu())
        return decode_z(torch.stack(levels).mean(0).numpy(), torch.stack(points).mean(0).numpy(),
                        seq.z, 2 * config.z_spacing)

    @classmethod
    @torch.inference_mode()
    def infer(cls, models, config: Config, study: Study, device) -> Keypoints:
        """Left/right subarticular points of a study in world mm with confidences."""
        result = Keypoints()
        seq = build_sequence(study, config)
        if seq is None:
            return result
        z, conf = cls.predict_z(models, config, seq, device)
        level_z = (z[:N_LEVELS] + z[N_LEVELS:]) / 2
        chosen = [seq.locate(zl) for zl in level_z]
        images = np.stack([cls.regressor_image(seq, k, int(round(s)), config) for k, s in chosen])
        batch = to_model_range(images).to(device)
        xy = torch.stack([m.eval().forward_xy(batch).float().cpu() for m in models]).mean(0)
        for j, label in enumerate(SUBARTICULAR):
            level, side = j % N_LEVELS, j // N_LEVELS
            k = chosen[level][0]
            series_id, stack_index, stack = seq.stacks[k]
            s = float(np.interp(z[j], seq.slice_z[k], np.arange(len(seq.slice_z[k]))))
            _, H, W = stack.pixels.shape
            u, v = xy[level, 2 * side].item(), xy[level, 2 * side + 1].item()
            world = geometry.pixel_to_world(stack, s, from_unit(u, W), from_unit(v, H))
            result.set(label, world, conf[j], f"{cls.name}:{series_id}/{stack_index}")
        return result
