"""Training data and losses of the axial keypoint families (`axial3d`, `axial_level`).

Both families read uint8 studies (from the preprocessing cache) and the labelled
subarticular points of `train_label_coordinates.csv`, turned into world mm with
`geometry.label_points_world` (so any stack, of any axial series, can be targeted).
The input preparation is the family's own (`Axial3D.prepare_volume`,
`keypoint_axial_level.build_sequence`): training and inference cannot drift apart.

Augmentations keep the points consistent: a horizontal flip maps u -> 1 - u and swaps
left and right points; shifts move the points with the image; intensity jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import geometry
from ..models.axial_points import (
    N_POINTS,
    SUBARTICULAR,
    SWAP_SIDES,
    axial_stacks,
    neighbours_25d,
    resize_slices,
    to_model_range,
    to_unit,
)
from ..models.keypoint_axial3d import Axial3D
from ..models.keypoint_axial_level import BACKGROUND, AxialSequence, build_sequence
from ..schema import LABEL_COLUMNS, N_LEVELS, TITLE_TO_CONDITION, TITLE_TO_LEVEL
from ..study import Study


@dataclass
class AxialExample:
    """One study (uint8 stacks) and its 10 labelled subarticular points (10, 3) world mm,
    NaN rows for points without a label."""

    study: Study
    world: np.ndarray


def subarticular_world(study: Study, coords: pd.DataFrame, source_shapes=None) -> np.ndarray:
    """(10, 3) world mm of the study's labelled subarticular points (left 5, right 5);
    NaN where unlabelled; duplicates are averaged. `coords`: label-coordinate rows."""
    rows = coords[coords["study_id"] == study.study_id]
    labels = [f"{TITLE_TO_CONDITION.get(c, '?')}_{TITLE_TO_LEVEL.get(lv, '?')}"
              for c, lv in zip(rows["condition"], rows["level"], strict=True)]
    slot = {LABEL_COLUMNS[j]: i for i, j in enumerate(SUBARTICULAR)}
    picks = [(k, slot[lab]) for k, lab in enumerate(labels) if lab in slot]
    out = np.full((N_POINTS, 3), np.nan)
    if not picks:
        return out
    world = geometry.label_points_world(study, rows.iloc[[k for k, _ in picks]], source_shapes)
    for i in range(N_POINTS):
        hits = world[[n for n, (_, s) in enumerate(picks) if s == i]]
        hits = hits[np.isfinite(hits).all(axis=1)]
        if len(hits):
            out[i] = hits.mean(axis=0)
    return out


def _rng() -> np.random.Generator:
    """A generator seeded from torch's RNG (so DataLoader seeding controls augmentation)."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def _jitter_intensity(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random contrast (x0.8-1.2) and brightness (+-0.1) in the [-1, 1] model range."""
    return (x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)).clamp(-1.0, 1.0)


def _shift(volume: torch.Tensor, shifts: list[int], dims: list[int]) -> torch.Tensor:
    """Translate by integer shifts along dims, filling with -1 (black)."""
    out = torch.full_like(volume, -1.0)
    src = [slice(None)] * volume.ndim
    dst = [slice(None)] * volume.ndim
    for d, s in zip(dims, shifts, strict=True):
        n = volume.shape[d]
        src[d] = slice(max(0, -s), n - max(0, s))
        dst[d] = slice(max(0, s), n - max(0, -s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


# ----------------------------------------------------------------------------- axial3d
class Axial3DDataset(Dataset):
    """One item per axial stack with at least one labelled point.

    Item: volume (1, H, W, D) float, uvw (10, 3) unit targets, present (10,) 1/0 (inside
    this stack's extent), known (10,) 1/0 (labelled).
    """

    def __init__(self, examples: list[AxialExample], config, augment: bool = False,
                 max_shift: float = 0.08):
        self.config, self.augment, self.max_shift = config, augment, max_shift
        self.items = []
        for ex in examples:
            known = np.isfinite(ex.world).all(axis=1)
            if not known.any():
                continue
            for _, _, stack in axial_stacks(ex.study):
                uvw, present = Axial3D.encode_points(stack, ex.world)
                self.items.append((Axial3D.prepare_volume(stack, config),
                                   np.nan_to_num(uvw), np.nan_to_num(present), known))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        vol, uvw, present, known = self.items[i]
        vol, uvw = to_model_range(vol), torch.tensor(uvw)
        present, known = torch.tensor(present), torch.tensor(known, dtype=torch.float32)
        if self.augment:
            rng = _rng()
            if rng.random() < 0.5:
                vol, uvw = vol.flip(2), uvw[SWAP_SIDES]
                uvw[:, 0] = 1.0 - uvw[:, 0]
                present, known = present[SWAP_SIDES], known[SWAP_SIDES]
            sizes = vol.shape[1:]  # (H, W, D); uvw columns are (W, H, D)
            shifts = [int(round(rng.uniform(-1, 1) * self.max_shift * n)) for n in sizes]
            vol = _jitter_intensity(_shift(vol, shifts, [1, 2, 3]), rng)
            for col, d in ((0, 1), (1, 0), (2, 2)):
                uvw[:, col] += shifts[d] / sizes[d]
            present = present * ((uvw >= 0) & (uvw <= 1)).all(1).float()
        return {"volume": vol, "uvw": uvw, "present": present, "known": known}


def axial3d_loss(model, batch: dict, beta: float = 0.02) -> torch.Tensor:
    """SmoothL1 on unit coordinates of labelled points inside the stack + BCE presence."""
    out = model(batch["volume"]).float()
    known, present = batch["known"], batch["present"]
    coord_w = (known * present)[..., None].expand_as(batch["uvw"])
    coord = F.smooth_l1_loss(out[..., :3], batch["uvw"], beta=beta, reduction="none")
    coord = (coord * coord_w).sum() / coord_w.sum().clamp(min=1) / beta
    bce = F.binary_cross_entropy_with_logits(out[..., 3], present, reduction="none")
    return coord + (bce * known).sum() / known.sum().clamp(min=1)


# ------------------------------------------------------------------------- axial_level
def level_targets(z: np.ndarray, level_z: np.ndarray, window: float) -> np.ndarray:
    """(N,) int per grid position: the level whose z (mm) is within `window` mm (the
    nearest), else BACKGROUND; -100 (ignored) for positions not near a known level when
    some level is unknown (they might belong to it)."""
    known = np.isfinite(level_z)
    dist = np.abs(z[:, None] - np.where(known, level_z, np.inf)[None, :])
    out = np.where(dist.min(1) <= window, dist.argmin(1), BACKGROUND)
    if not known.all():
        out[out == BACKGROUND] = -100
    return out.astype(np.int64)


def point_targets(z: np.ndarray, point_z: np.ndarray, sigma: float, step: float):
    """Soft targets over positions: (N, 10) Gaussian in z (sigma mm) normalised per point,
    and (10,) validity (labelled and within half a step of the sequence's ends)."""
    valid = np.isfinite(point_z) & (point_z >= z.min() - step / 2) & (point_z <= z.max() + step / 2)
    logw = -0.5 * ((z[:, None] - np.nan_to_num(point_z)[None, :]) / sigma) ** 2
    w = np.exp(logw - logw.max(0, keepdims=True))
    return (w / w.sum(0, keepdims=True)).astype(np.float32), valid


def regressor_targets(seq: AxialSequence, world: np.ndarray):
    """Per level: (stack number, slice index) showing its labelled points, (4,) unit
    (x_left, y_left, x_right, y_right) targets and (4,) validity; None when unlabelled."""
    out = []
    for level in range(N_LEVELS):
        pts = world[[level, level + N_LEVELS]]
        known = np.isfinite(pts).all(axis=1)
        best = None
        for k, (_, _, stack) in enumerate(seq.stacks):
            if not known.any():
                break
            S, H, W = stack.pixels.shape
            s, x, y = geometry.world_to_pixel(stack, np.nan_to_num(pts))
            s_mean = float(np.mean(s[known]))
            if -0.5 <= s_mean <= S - 0.5 and (best is None or abs(s_mean - round(s_mean)) < best[0]):
                xy = np.array([to_unit(x[0], W), to_unit(y[0], H), to_unit(x[1], W),
                               to_unit(y[1], H)], dtype=np.float32)
                best = (abs(s_mean - round(s_mean)), k, int(round(s_mean)), xy,
                        np.repeat(known, 2).astype(np.float32))
        out.append(None if best is None else best[1:])
    return out


class AxialLevelDataset(Dataset):
    """One item per study: the z-grid sequence and the per-level regressor slices.

    Item: slices (N, 3, S, S) float, level (N,) int, points (N, 10) soft targets,
    point_valid (10,), crops (5, 3, R, R) float, xy (5, 4) unit targets, xy_valid (5, 4).
    """

    def __init__(self, examples: list[AxialExample], config, augment: bool = False,
                 level_window: float = 4.5, point_sigma: float = 2.0, min_keep: float = 0.7):
        self.config, self.augment = config, augment
        self.level_window, self.point_sigma, self.min_keep = level_window, point_sigma, min_keep
        self.items = []
        for ex in examples:
            seq = build_sequence(ex.study, config)
            if seq is None or not np.isfinite(ex.world).all(axis=1).any():
                continue
            crops = [self._crops(seq, t) for t in regressor_targets(seq, ex.world)]
            self.items.append((seq, ex.world, crops))

    def _crops(self, seq: AxialSequence, target):
        """Regressor images of a level: (3, 3, R, R) uint8 (slice -1, 0, +1) or None."""
        if target is None:
            return None
        k, s, xy, valid = target
        stack = seq.stacks[k][2]
        size = self.config.regressor_size
        lo, hi = max(s - 2, 0), min(s + 3, stack.pixels.shape[0])
        planes = resize_slices(stack.pixels[lo:hi], size, size)
        idx = [min(max(s + d, 0), stack.pixels.shape[0] - 1) - lo for d in (-1, 0, 1)]
        return np.stack([neighbours_25d(planes, i) for i in idx]), xy, valid

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        seq, world, crops = self.items[i]
        rng = _rng() if self.augment else None
        n = len(seq.z)
        lo, hi = 0, n
        if rng is not None and n > 4:
            keep = int(round(n * rng.uniform(self.min_keep, 1.0)))
            lo = int(rng.integers(0, n - keep + 1))
            hi = lo + keep
        z = seq.z[lo:hi]
        level_z = np.nanmean(np.stack([world[:N_LEVELS, 2], world[N_LEVELS:, 2]]), axis=0) \
            if np.isfinite(world[:, 2]).any() else np.full(N_LEVELS, np.nan)
        step = float(np.median(np.diff(seq.z))) if n > 1 else self.config.z_spacing
        points, valid = point_targets(z, world[:, 2], self.point_sigma, step)
        slices = to_model_range(seq.images(np.arange(lo, hi)))
        crop_img = torch.full((N_LEVELS, 3, self.config.regressor_size,
                               self.config.regressor_size), -1.0)
        xy, xy_valid = torch.zeros(N_LEVELS, 4), torch.zeros(N_LEVELS, 4)
        for level, c in enumerate(crops):
            if c is not None:
                pick = 1 if rng is None else int(rng.integers(0, 3))
                crop_img[level] = to_model_range(c[0][pick])
                xy[level], xy_valid[level] = torch.tensor(c[1]), torch.tensor(c[2])
        item = {"slices": slices, "level": torch.tensor(level_targets(z, level_z, self.level_window)),
                "points": torch.tensor(points), "point_valid": torch.tensor(valid, dtype=torch.float32),
                "crops": crop_img, "xy": xy, "xy_valid": xy_valid}
        return _augment_level_item(item, rng) if rng is not None else item


def _augment_level_item(item: dict, rng: np.random.Generator) -> dict:
    """Horizontal flip (swap left/right targets, x -> 1 - x) and intensity jitter."""
    if rng.random() < 0.5:
        item["slices"], item["crops"] = item["slices"].flip(-1), item["crops"].flip(-1)
        item["points"], item["point_valid"] = item["points"][:, SWAP_SIDES], item["point_valid"][SWAP_SIDES]
        xy, valid = item["xy"][:, [2, 3, 0, 1]], item["xy_valid"][:, [2, 3, 0, 1]]
        xy[:, [0, 2]] = 1.0 - xy[:, [0, 2]]
        item["xy"], item["xy_valid"] = xy * valid, valid
    item["slices"] = _jitter_intensity(item["slices"], rng)
    item["crops"] = _jitter_intensity(item["crops"], rng)
    return item


def collate_level(items: list[dict]) -> dict:
    """Pad the sequences of a batch to the longest; adds mask (B, N) bool."""
    n = max(len(it["slices"]) for it in items)
    out = {"mask": torch.zeros(len(items), n, dtype=torch.bool)}
    for key, fill in (("slices", -1.0), ("level", -100), ("points", 0.0)):
        first = items[0][key]
        padded = torch.full((len(items), n, *first.shape[1:]), fill, dtype=first.dtype)
        for b, it in enumerate(items):
            padded[b, :len(it[key])] = it[key]
        out[key] = padded
    for b, it in enumerate(items):
        out["mask"][b, :len(it["slices"])] = True
    for key in ("point_valid", "crops", "xy", "xy_valid"):
        out[key] = torch.stack([it[key] for it in items])
    return out


def axial_level_loss(model, batch: dict, beta: float = 0.02) -> torch.Tensor:
    """Level CE + soft CE of the point distributions over positions + SmoothL1 on (x, y)."""
    out = model(batch)
    level = F.cross_entropy(out["level"].float().flatten(0, 1), batch["level"].flatten(),
                            ignore_index=-100) if (batch["level"] >= 0).any() else 0.0
    logp = out["points"].float().log_softmax(1).masked_fill(~batch["mask"][..., None], 0.0)
    ce = -(batch["points"] * logp).sum(1)  # (B, 10)
    valid = batch["point_valid"]
    points = (ce * valid).sum() / valid.sum().clamp(min=1)
    xy = F.smooth_l1_loss(out["xy"].float(), batch["xy"], beta=beta, reduction="none")
    xy = (xy * batch["xy_valid"]).sum() / batch["xy_valid"].sum().clamp(min=1) / beta
    return level + points + xy
