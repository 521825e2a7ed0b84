"""Stage-2 family `v2`: three views fused in feature space (sagittal T1, T2 and axial T2).

Inputs (from `prepare_inputs`, shared by training and `infer`; L = 5 levels, C = 5
conditions in `schema.CONDITIONS` order):
- sag (L, C, sag_slices, sag_size, sag_size) float32 in [0, 1]: per condition a sagittal
  series is sampled at `n_sag_samples` evenly spaced slices; spinal and subarticular use
  T2/STIR samples [t2_start, t2_start + sag_slices), left foraminal T1 samples
  [t1_left_start, ...), right foraminal T1 [t1_right_start, ...) (index 0 = patient right);
  with `sag_window="point"` the samples are centred on the point's slice instead;
  each crop (sag_crop_h x sag_crop_w `crop_unit`) is centred on that condition-level's
  point, the same (x, y) on every slice. sag_valid (L, C) float32.
- axial (L, axial_slices, axial_channels, axial_size, axial_size): per level, the axial T2
  slices between the world midpoints of the neighbouring levels (`crops.axial_level_slices`,
  level points = spinal points, else the mean of the two subarticular points), of which
  `axial_slices` are chosen evenly, each with its neighbours as channels; crop
  axial_crop x axial_crop around the image centre (or the level point: `axial_center`).
  axial_valid (L,) float32.
Model: sagittal branch = timm 2D backbone (in_chans sag_slices) per crop, features gated
by a learned condition embedding (sigmoid) -> 3 logits + `embed_dim` embedding; axial
branch = timm 2D backbone per slice -> BiGRU over the slices -> `axial_dim` features;
a linear layer on [C x embed_dim sagittal, axial] gives (C, 3) added to the sagittal
logits. An invalid crop (NaN point, missing series, point outside the image) has its
features replaced by a learned "missing" vector. Output of the module (B, L, C, 3).
Flip TTA: horizontal flip of the sagittal crops with a vertical flip of the axial ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import crops, geometry, schema
from ..keypoints import Keypoints
from ..study import Study
from .backbones import create_backbone_2d
from .registry import register_family
from .roi_encoder import (
    average_logits,
    batch_inputs,
    crop_augmentation,
    normalise_unit,
    scatter_logits,
)

L, C = schema.N_LEVELS, schema.N_CONDITIONS
# The mirrored condition of each condition (left <-> right), for `mirror_inputs`.
MIRROR_CONDITIONS = [schema.CONDITIONS.index(
    c.replace("left", "@").replace("right", "left").replace("@", "right"))
    for c in schema.CONDITIONS]


@dataclass(frozen=True)
class V2Config:
    """Everything that rebuilds a v2 model and its inputs. Pixel sizes refer to the
    normalised study (`preprocess.normalize_study`)."""

    sag_backbone: str = "convnext_nano"
    axial_backbone: str = "convnext_nano"
    n_sag_samples: int = 10         # evenly spaced slices sampled per sagittal series
    sag_slices: int = 5             # consecutive samples per crop (the branch's in_chans)
    t2_start: int = 2               # spinal + subarticular: T2 samples [2, 7)
    t1_left_start: int = 5          # left foraminal: T1 samples [5, 10)
    t1_right_start: int = 0         # right foraminal: T1 samples [0, 5)
    sag_window: str = "fixed"       # "fixed": the sample windows above (the original);
    #                                 "point": sag_slices samples centred on the point's slice
    sag_crop_h: float = 128.0       # sagittal crop window, in crop_unit
    sag_crop_w: float = 128.0
    sag_size: int = 128             # sagittal crops resized to sag_size x sag_size
    axial_slices: int = 6           # axial slices chosen per level
    axial_channels: int = 3         # each slice with its neighbours (odd)
    axial_crop: float = 256.0       # axial crop window side, in crop_unit
    axial_size: int = 256           # axial crops resized to axial_size x axial_size
    axial_center: str = "image"     # "image" (centre crop) or "point" (level point)
    crop_unit: str = "px"           # "px" or "mm"
    embed_dim: int = 128            # sagittal embedding per condition
    axial_dim: int = 1024           # BiGRU output width (2 x axial_dim // 2)
    dropout: float = 0.1
    jitter_px: float = 3.0          # training keypoint jitter (crop centre), pixels
    flip_tta: bool = True

    def __post_init__(self) -> None:
        starts = (self.t2_start, self.t1_left_start, self.t1_right_start)
        if any(s < 0 or s + self.sag_slices > self.n_sag_samples for s in starts):
            raise ValueError(f"V2Config: sagittal windows {starts} + {self.sag_slices} "
                             f"exceed n_sag_samples={self.n_sag_samples}")
        if self.sag_window not in ("fixed", "point"):
            raise ValueError(f"V2Config.sag_window {self.sag_window!r}: 'fixed' or 'point'")
        if self.axial_center not in ("image", "point"):
            raise ValueError(f"V2Config.axial_center {self.axial_center!r}: 'image' or 'point'")
        if self.axial_channels < 1 or self.axial_channels % 2 == 0:
            raise ValueError(f"V2Config.axial_channels={self.axial_channels}: must be odd")


def _width(backbone: nn.Module) -> int:
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class V2Net(nn.Module):
    """sag (B, L, C, S, h, w), sag_valid (B, L, C), axial (B, L, A, K, H, W),
    axial_valid (B, L) -> (B, L, C, 3) logits."""

    def __init__(self, config: V2Config) -> None:
        super().__init__()
        self.sag_encoder = create_backbone_2d(config.sag_backbone, in_chans=config.sag_slices)
        width = _width(self.sag_encoder)
        self.condition = nn.Embedding(C, width)
        self.sag_missing = nn.Parameter(torch.randn(width) * 0.02)
        self.sag_head = nn.Linear(width, 3)
        self.sag_embed = nn.Linear(width, config.embed_dim)
        self.axial_encoder = create_backbone_2d(config.axial_backbone,
                                                in_chans=config.axial_channels)
        hidden = config.axial_dim // 2
        self.axial_rnn = nn.GRU(_width(self.axial_encoder), hidden, batch_first=True,
                                bidirectional=True)
        self.axial_missing = nn.Parameter(torch.randn(2 * hidden) * 0.02)
        self.fuse = nn.Linear(C * config.embed_dim + 2 * hidden, C * 3)
        self.drop = nn.Dropout(config.dropout)

    @staticmethod
    def _substitute(feats: torch.Tensor, valid: torch.Tensor, missing: torch.Tensor):
        keep = valid[..., None].to(feats.dtype)
        return feats * keep + missing.to(feats.dtype) * (1 - keep)

    def forward(self, sag, sag_valid, axial, axial_valid) -> torch.Tensor:
        b, n_lvl = sag.shape[:2]
        f = self.sag_encoder(normalise_unit(sag.flatten(0, 2))).reshape(b, n_lvl, C, -1)
        f = self._substitute(f, sag_valid, self.sag_missing)
        f = self.drop(f * torch.sigmoid(self.condition.weight))
        sag_logits = self.sag_head(f)
        embedding = self.sag_embed(f).flatten(2)                       # (B, L, C * E)
        a = self.axial_encoder(normalise_unit(axial.flatten(0, 2)))
        a, _ = self.axial_rnn(a.reshape(b * n_lvl, axial.shape[2], -1))
        a = self._substitute(a.mean(dim=1).reshape(b, n_lvl, -1), axial_valid,
                             self.axial_missing)
        fused = self.fuse(self.drop(torch.cat([embedding, a], dim=-1)))
        return sag_logits + fused.reshape(b, n_lvl, C, 3)


def sagittal_sources(config: V2Config) -> list[tuple[str, int]]:
    """(series description, first sample) of each condition, in `schema.CONDITIONS` order."""
    return [(schema.SAG_T2, config.t2_start), (schema.SAG_T1, config.t1_left_start),
            (schema.SAG_T1, config.t1_right_start), (schema.SAG_T2, config.t2_start),
            (schema.SAG_T2, config.t2_start)]


def sagittal_slices(config: V2Config, point: crops.PlanePoint, start: int) -> np.ndarray:
    """(sag_slices,) slice indices of one sagittal crop: samples [start, start + sag_slices)
    of `n_sag_samples` evenly spaced ones ("fixed"), or as many samples at the same spacing
    centred on the point's slice ("point"), clamped to the stack."""
    n_slices = point.stack.shape[0]
    if config.sag_window == "fixed":
        samples = crops.evenly_spaced_slices(n_slices, config.n_sag_samples)
        return samples[start:start + config.sag_slices]
    step = (n_slices - 1) / (config.n_sag_samples - 1)
    offsets = (np.arange(config.sag_slices) - (config.sag_slices - 1) / 2) * step
    return np.clip(np.rint(point.z + offsets), 0, n_slices - 1).astype(np.int64)


def level_points(keypoints: Keypoints) -> np.ndarray:
    """(5, 3) world mm per level: the spinal point, else the mean of the known subarticular
    points (NaN when none); `crops.fill_level_points` fills the gaps later."""
    world = keypoints.world.reshape(C, L, 3)
    sides = world[3:5]
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(sides).all(-1).sum(0)[:, None]
        side_mean = np.where(counts > 0, np.nansum(sides, axis=0) / np.maximum(counts, 1), np.nan)
    return np.where(np.isfinite(world[0]).all(-1, keepdims=True), world[0], side_mean)


def _sagittal(config: V2Config, study: Study | None, keypoints: Keypoints, rng, flip: bool):
    size = (config.sag_size, config.sag_size)
    pixels = np.zeros((L, C, config.sag_slices, *size), np.float32)
    valid = np.zeros((L, C), np.float32)
    for c, (series, start) in enumerate(sagittal_sources(config)):
        stacks = crops.series_stacks(study, series)

        def pick(point, start=start):
            return sagittal_slices(config, point, start)

        for lv in range(L):
            point = crops.locate_point(stacks, keypoints.world[c * L + lv])
            crop = crops.crop_at(point, config.sag_slices, (config.sag_crop_h, config.sag_crop_w),
                                 size, pick=pick, unit=config.crop_unit,
                                 aug=crop_augmentation(rng, config.jitter_px, flip))
            pixels[lv, c], valid[lv, c] = crop.pixels, float(crop.valid)
    return pixels, valid


def _axial_level(config: V2Config, stacks, points: np.ndarray, lv: int, rng, flip: bool):
    """(A, K, H, W) crops of one level and whether they are valid."""
    size = (config.axial_size, config.axial_size)
    found = [(st, crops.axial_level_slices(st, points, lv)) for st in stacks]
    found = [f for f in found if len(f[1])]
    if not found:
        return np.zeros((config.axial_slices, config.axial_channels, *size), np.float32), False
    stack, indices = max(found, key=lambda f: len(f[1]))
    chosen = crops.choose_evenly(indices, config.axial_slices)
    channels = crops.neighbour_slices(chosen, stack.shape[0], config.axial_channels)
    _, height, width = stack.shape
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    if config.axial_center == "point":
        _, x, y = geometry.world_to_pixel(stack, crops.fill_level_points(points)[lv])
        centre = np.array([float(x), float(y)]) if np.isfinite([x, y]).all() else centre
    aug = crop_augmentation(rng, config.jitter_px, False)
    window = crops.window_pixels(stack, (config.axial_crop, config.axial_crop), config.crop_unit)
    pixels = crops.crop_slices(stack.pixels, channels.reshape(-1), centre + aug.shift_xy, window,
                               size, angle_deg=aug.angle_deg, scale=aug.scale)
    pixels = pixels.reshape(config.axial_slices, config.axial_channels, *size)
    return (pixels[..., ::-1, :].copy() if flip else pixels), True


@register_family
class V2:
    """The v2 family (stage 2): see the module docstring."""

    name = "v2"
    stage = 2
    Config = V2Config

    @staticmethod
    def build(config: V2Config) -> nn.Module:
        return V2Net(config)

    @staticmethod
    def label_indices(config: V2Config) -> np.ndarray:
        """(L, C) int: the `LABEL_COLUMNS` index of each output of the module."""
        return np.array([[c * L + lv for c in range(C)] for lv in range(L)], dtype=np.int64)

    @staticmethod
    def prepare_inputs(config: V2Config, study: Study | None, keypoints: Keypoints,
                       rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """One study -> {"sag", "sag_valid", "axial", "axial_valid"} (shapes: module doc).

        `rng` turns on training augmentation: crop-centre jitter +-jitter_px, rotation
        +-10 deg, zoom +-10 %, and (p 0.5 each, per study) the TTA flips: horizontal for
        the sagittal crops, vertical for the axial ones (neither swaps patient sides).
        """
        flip_sag = bool(rng is not None and rng.random() < 0.5)
        flip_axial = bool(rng is not None and rng.random() < 0.5)
        sag, sag_valid = _sagittal(config, study, keypoints, rng, flip_sag)
        stacks = crops.series_stacks(study, schema.AXIAL_T2)
        points = level_points(keypoints)
        size = (config.axial_size, config.axial_size)
        axial = np.zeros((L, config.axial_slices, config.axial_channels, *size), np.float32)
        axial_valid = np.zeros(L, np.float32)
        for lv in range(L):
            axial[lv], ok = _axial_level(config, stacks, points, lv, rng, flip_axial)
            axial_valid[lv] = float(ok)
        return {"sag": sag, "sag_valid": sag_valid, "axial": axial, "axial_valid": axial_valid}

    @staticmethod
    def mirror_inputs(config: V2Config, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs of the left <-> right mirrored study: left and right conditions
        exchanged, sagittal slice order reversed, axial images flipped left-right."""
        return {
            "sag": inputs["sag"][:, MIRROR_CONDITIONS, ::-1].copy(),
            "sag_valid": inputs["sag_valid"][:, MIRROR_CONDITIONS].copy(),
            "axial": inputs["axial"][..., ::-1].copy(),
            "axial_valid": inputs["axial_valid"].copy(),
        }

    @staticmethod
    def infer(models, config: V2Config, study: Study, keypoints: Keypoints,
              device="cpu") -> np.ndarray:
        """(25, 3) logits (mean over models and flip TTA); NaN for a condition-level whose
        sagittal crop and level axial stack are both missing."""
        inputs = V2.prepare_inputs(config, study, keypoints)
        flips = {"sag": -1, "axial": -2} if config.flip_tta else None
        logits = average_logits(models, batch_inputs(inputs, device), flips)
        unseen = (inputs["sag_valid"] == 0) & (inputs["axial_valid"][:, None] == 0)
        logits[unseen] = np.nan
        return scatter_logits(logits, V2.label_indices(config))
