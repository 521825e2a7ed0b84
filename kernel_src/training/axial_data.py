"""Training data and losses of the axial keypoint families (`axial3d`, `axial_level`).

Both families read `keypoint_data.KeypointExample`s (uint8 studies from the preprocessing
cache, labelled points in world mm), so any stack of any axial series can be targeted.
The input preparation is the family's own (`Axial3D.sequence` / `prepare_volume`,
`AxialLevel.sequence` / `regressor_image`, `axial_sequence.AxialSequence.encode`):
training and inference cannot drift apart.

Augmentations keep the points consistent: a horizontal flip maps u -> 1 - u and swaps
left and right points; in-plane affines move the points with the image; intensity jitter.
Losses follow the train loop's `loss_fn(model, batch)` contract.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import geometry
from ..models.axial_points import (
    SUBARTICULAR,
    SWAP_SIDES,
    neighbours_25d,
    resize_slices,
    to_model_range,
    to_unit,
)
from ..models.axial_sequence import AxialSequence
from ..models.keypoint_axial3d import Axial3D
from ..models.keypoint_axial_level import BACKGROUND, AxialLevel
from ..models.keypoint_common import heatmap_loss
from ..schema import N_LEVELS
from .keypoint_data import (
    KeypointExample,
    jitter_intensity,
    random_affine,
    torch_rng,
    warp_planes,
    warp_unit_points,
)

FLIP_SIDES = [2, 3, 0, 1]  # (x_left, y_left, x_right, y_right) columns after a flip


def axial_world(example: KeypointExample) -> np.ndarray:
    """(10, 3) world mm of the example's subarticular points (left 5, right 5), NaN unknown."""
    return np.asarray(example.world, dtype=np.float64)[SUBARTICULAR]


def flip_affine(width: int) -> np.ndarray:
    """(2, 3) pixel affine of a horizontal flip x -> width - 1 - x."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(2, 3) affine of applying b first, then a."""
    full = lambda m: np.vstack([m, [0.0, 0.0, 1.0]])  # noqa: E731
    return (full(a) @ full(b))[:2]


# ----------------------------------------------------------------------------- axial3d
class Axial3DDataset(Dataset):
    """One item per study with axial slices and labelled subarticular points.

    Item: volume (1, H, W, D) float, uvw (10, 3) unit targets, present (10,) 1/0 (inside
    the scanned extent; after augmentation: inside the volume), known (10,) 1/0 (labelled).
    Augmentation: horizontal flip (sides swap), in-plane affine, intensity jitter.
    """

    def __init__(self, examples: list[KeypointExample], config, augment: bool = False):
        self.config, self.augment = config, augment
        self.items = []
        for ex in examples:
            world = axial_world(ex)
            known = np.isfinite(world).all(axis=1)
            seq = Axial3D.sequence(ex.study, config)
            if seq is None or not known.any():
                continue
            uvw, present = Axial3D.encode_points(seq, world)
            self.items.append((Axial3D.prepare_volume(seq, config), np.nan_to_num(uvw),
                               np.nan_to_num(present), known.astype(np.float32)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        vol, uvw, present, known = self.items[i]
        uvw, present, known = uvw.copy(), present.copy(), known.copy()
        if self.augment:
            rng = torch_rng()
            _, H, W, _ = vol.shape
            m = random_affine(rng, H, W)
            if rng.random() < 0.5:
                m = compose(m, flip_affine(W))
                uvw, present, known = uvw[SWAP_SIDES], present[SWAP_SIDES], known[SWAP_SIDES]
            vol = warp_planes(np.ascontiguousarray(vol[0]), m)[None]
            uvw = warp_unit_points(uvw, m, H, W)
            present = present * ((uvw >= 0) & (uvw <= 1)).all(1)
        x = to_model_range(vol)
        if self.augment:
            x = jitter_intensity(x, rng)
        return {"volume": x, "uvw": torch.from_numpy(uvw.astype(np.float32)),
                "present": torch.from_numpy(present.astype(np.float32)),
                "known": torch.from_numpy(known.astype(np.float32))}

    def mean_target(self) -> np.ndarray:
        """(10, 3) mean unit coordinates of labelled points inside their stack (the
        mean-shape baseline, for `keypoint_eval.MeanShapeModel` through `Axial3D.infer`)."""
        uvw = np.stack([it[1] for it in self.items])
        w = np.stack([it[2] * it[3] for it in self.items])[..., None]
        return (uvw * w).sum(0) / np.maximum(w.sum(0), 1)


def axial3d_loss(config, beta: float = 0.02):
    """loss_fn(model, batch): SmoothL1 on unit coordinates of labelled points inside the
    stack + BCE presence (+ config.heatmap_weight x the heat maps' cross entropy against a
    Gaussian at each such point, `keypoint_common.heatmap_loss`)."""
    weight = float(getattr(config, "heatmap_weight", 0.0) or 0.0)

    def loss_fn(model, batch: dict) -> torch.Tensor:
        if weight:
            out, heat = model(batch["volume"], return_heatmaps=True)
        else:
            out, heat = model(batch["volume"]), None
        out = out.float()
        known, present = batch["known"], batch["present"]
        coord_w = (known * present)[..., None].expand_as(batch["uvw"])
        coord = F.smooth_l1_loss(out[..., :3], batch["uvw"], beta=beta, reduction="none")
        coord = (coord * coord_w).sum() / coord_w.sum().clamp(min=1) / beta
        bce = F.binary_cross_entropy_with_logits(out[..., 3], present, reduction="none")
        total = coord + (bce * known).sum() / known.sum().clamp(min=1)
        if weight:
            total = total + weight * heatmap_loss(heat, batch["uvw"], known * present,
                                                  config.heatmap_sigma)
        return total
    return loss_fn


# ------------------------------------------------------------------------- axial_level
def level_targets(n: int, level_g: np.ndarray, window: float) -> np.ndarray:
    """(n,) int per grid position: the level whose grid position (5,) is within `window`
    positions (the nearest), else BACKGROUND; -100 (ignored) for positions not near a known
    level when some level is unknown (they might belong to it)."""
    known = np.isfinite(level_g)
    dist = np.abs(np.arange(n)[:, None] - np.where(known, level_g, np.inf)[None, :])
    out = np.where(dist.min(1) <= window, dist.argmin(1), BACKGROUND)
    if not known.all():
        out[out == BACKGROUND] = -100
    return out.astype(np.int64)


def point_targets(n: int, g: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft targets over n positions: (n, 10) Gaussians around the points' grid positions g
    (10,) (sigma in positions), normalised per point, and (10,) validity (g known and
    within half a position of the ends)."""
    valid = np.isfinite(g) & (g >= -0.5) & (g <= n - 0.5)
    logw = -0.5 * ((np.arange(n)[:, None] - np.nan_to_num(g)[None, :]) / sigma) ** 2
    w = np.exp(logw - logw.max(0, keepdims=True))
    return (w / w.sum(0, keepdims=True)).astype(np.float32), valid


def regressor_targets(seq: AxialSequence, world: np.ndarray, g: np.ndarray):
    """Per level: (stack number, slice index) of its regressor slice (`level_slice` of the
    known sides' positions g), (4,) unit (x_left, y_left, x_right, y_right) targets there
    and (4,) validity; None for a level without a labelled point."""
    out = []
    for level in range(N_LEVELS):
        sides = [level, level + N_LEVELS]
        known = np.isfinite(g[sides])
        if not known.any():
            out.append(None)
            continue
        gl, gr = (g[j] if ok else g[sides][known][0] for j, ok in zip(sides, known, strict=True))
        k, s = AxialLevel.level_slice(seq, gl, gr)
        stack = seq.stacks[k][2]
        _, H, W = stack.pixels.shape
        _, x, y = geometry.world_to_pixel(stack, np.nan_to_num(world[sides]))
        xy = np.array([to_unit(x[0], W), to_unit(y[0], H), to_unit(x[1], W), to_unit(y[1], H)],
                      dtype=np.float32)
        out.append((k, s, xy, np.repeat(known, 2).astype(np.float32)))
    return out


class AxialLevelDataset(Dataset):
    """One item per study: the z-grid sequence and the per-level regressor slices.

    Item: slices (N, 3, S, S) float, level (N,) int, points (N, 10) soft targets,
    point_valid (10,), crops (5, 3, R, R) float, xy (5, 4) unit targets, xy_valid (5, 4).
    Windows are in mm (`level_window` around a level's position is that level; the point
    targets are Gaussians of `point_sigma`); augmentation: a random contiguous run of
    >= `min_keep` of the positions, flip (sides swap), an in-plane affine of the regressor
    images, one of the 3 slices around the labelled one, intensity jitter.
    """

    def __init__(self, examples: list[KeypointExample], config, augment: bool = False,
                 level_window: float = 4.5, point_sigma: float = 2.0, min_keep: float = 0.7):
        self.config, self.augment = config, augment
        self.level_window, self.point_sigma, self.min_keep = level_window, point_sigma, min_keep
        self.items = []
        for ex in examples:
            seq, world = AxialLevel.sequence(ex.study, config), axial_world(ex)
            if seq is None or not np.isfinite(world).all(axis=1).any():
                continue
            ug, _ = seq.encode(world)
            g = ug[:, 2]
            crops = [self._crops(seq, t) for t in regressor_targets(seq, world, g)]
            self.items.append((seq, g, crops))

    def _crops(self, seq: AxialSequence, target):
        """Regressor images of a level: ((3, 3, R, R) uint8 (slices -1, 0, +1), xy, valid)."""
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
        seq, g, crops = self.items[i]
        rng = torch_rng() if self.augment else None
        lo, hi = self._window(len(seq), rng)
        g = g - lo
        level_g = np.array([np.nanmean(g[[lv, lv + N_LEVELS]])
                            if np.isfinite(g[[lv, lv + N_LEVELS]]).any() else np.nan
                            for lv in range(N_LEVELS)])
        points, valid = point_targets(hi - lo, g, self.point_sigma / seq.step)
        levels = level_targets(hi - lo, level_g, self.level_window / seq.step)
        flip = rng is not None and rng.random() < 0.5
        crop_img, xy, xy_valid = self._regressor_items(crops, rng, flip)
        slices = to_model_range(seq.images(np.arange(lo, hi)))
        if flip:
            slices, points, valid = slices.flip(-1), points[:, SWAP_SIDES], valid[SWAP_SIDES]
        if rng is not None:
            slices, crop_img = jitter_intensity(slices, rng), jitter_intensity(crop_img, rng)
        return {"slices": slices, "level": torch.from_numpy(levels),
                "points": torch.from_numpy(points),
                "point_valid": torch.from_numpy(valid.astype(np.float32)),
                "crops": crop_img, "xy": xy, "xy_valid": xy_valid}

    def _window(self, n: int, rng) -> tuple[int, int]:
        """A random contiguous run of >= min_keep of the n positions (all without rng)."""
        if rng is None or n <= 4:
            return 0, n
        keep = int(round(n * rng.uniform(self.min_keep, 1.0)))
        lo = int(rng.integers(0, n - keep + 1))
        return lo, lo + keep

    def _regressor_items(self, crops, rng, flip: bool):
        """(5, 3, R, R) float images, (5, 4) unit targets, (5, 4) validity. With rng: a
        random one of the 3 slices around the labelled one and a random in-plane affine."""
        size = self.config.regressor_size
        images = torch.full((N_LEVELS, 3, size, size), -1.0)
        xy, valid = np.zeros((N_LEVELS, 4), np.float32), np.zeros((N_LEVELS, 4), np.float32)
        for level, c in enumerate(crops):
            if c is None:
                continue
            image, target, ok = c[0][1 if rng is None else int(rng.integers(0, 3))], c[1], c[2]
            if rng is not None:
                m = random_affine(rng, size, size)
                if flip:
                    m = compose(m, flip_affine(size))
                    target, ok = target[FLIP_SIDES], ok[FLIP_SIDES]
                image = np.moveaxis(warp_planes(np.ascontiguousarray(np.moveaxis(image, 0, -1)),
                                                m), -1, 0)
                target = warp_unit_points(target.reshape(2, 2), m, size, size).reshape(4)
            images[level] = to_model_range(image)
            xy[level], valid[level] = target * ok, ok
        return images, torch.from_numpy(xy), torch.from_numpy(valid)


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


def level_mean_shape(dataset: AxialLevelDataset) -> tuple[np.ndarray, np.ndarray]:
    """Mean-shape baseline of `axial_level`: (10,) mean position of each point as a
    fraction of its study's z grid, (5, 4) mean unit (x, y) targets of the regressor."""
    fracs, xys = [], []
    for seq, g, crops in dataset.items:
        fracs.append((g + 0.5) / len(seq))
        xys.append([np.full(4, np.nan) if c is None else np.where(c[2] > 0, c[1], np.nan)
                    for c in crops])
    return np.nan_to_num(np.nanmean(fracs, axis=0), nan=0.5), \
        np.nan_to_num(np.nanmean(np.array(xys, dtype=float), axis=0), nan=0.5)
