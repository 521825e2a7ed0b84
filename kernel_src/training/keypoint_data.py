"""Keypoint training data shared by the stage-1 families.

- `KeypointSource`: the competition CSVs plus the preprocessing cache (built on first use
  when missing); `examples(study_ids)` gives `KeypointExample`s: a uint8 Study and its
  labelled points in world mm (25, 3) via `geometry.label_points_world` (duplicates
  averaged, NaN where unlabelled), plus the series each label was drawn on.
- Point-consistent augmentation: an in-plane affine (scale, rotation, shift) applied to
  every slice and to the points, a lateral mirror (slice order reversed, w -> 1 - w,
  left/right points swapped) for 3D inputs, intensity jitter.
- `SagittalDataset`: one item per study that has the config's series and labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .. import geometry, preprocess
from ..competition import load_label_coordinates
from ..models.keypoint_common import swap_sides, to_model_range
from ..schema import LABEL_COLUMNS, N_LABELS
from ..study import Study

_LABEL_INDEX = {c: i for i, c in enumerate(LABEL_COLUMNS)}


@dataclass
class KeypointExample:
    """A uint8 study with its labelled points: world (25, 3) mm (NaN: unlabelled) and
    label_series (25,) series_id of each label's coordinate row (-1: none)."""

    study: Study
    world: np.ndarray
    label_series: np.ndarray


class KeypointSource:
    """Label coordinates of DATA plus the uint8 stacks of CACHE (split `train`).

    The cache is built (`preprocess.build_cache`, in-plane `cache_size`) when its index is
    missing.
    """

    def __init__(self, data_dir: str | Path, cache_dir: str | Path,
                 cache_size: int | None = None, workers: int = 1):
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.coords = load_label_coordinates(self.data_dir / "train_label_coordinates.csv")
        if not (self.cache_dir / "train" / "index.csv").is_file():
            preprocess.build_cache(self.data_dir, self.cache_dir, "train", cache_size, workers)
        self.index = preprocess.read_index(self.cache_dir, "train")

    def study_ids(self) -> list[int]:
        """Studies with label coordinates and cached stacks, ascending."""
        cached = set(self.index["study_id"].astype(int))
        return sorted(s for s in set(self.coords["study_id"].astype(int)) if s in cached)

    def example(self, study_id: int) -> KeypointExample:
        study = preprocess.load_cached_study(self.cache_dir, "train", study_id, self.index)
        rows = self.coords[self.coords["study_id"] == int(study_id)]
        pts = geometry.label_points_world(study, rows,
                                          preprocess.source_shapes(self.index, study_id))
        world = np.full((N_LABELS, 3), np.nan)
        series = np.full(N_LABELS, -1, dtype=np.int64)
        for label in sorted(set(rows["label"])):
            mine = (rows["label"] == label).to_numpy()
            good = mine & np.isfinite(pts).all(axis=1)
            if good.any():
                world[_LABEL_INDEX[label]] = pts[good].mean(axis=0)
                series[_LABEL_INDEX[label]] = int(rows.loc[good, "series_id"].iloc[0])
        return KeypointExample(study, world, series)

    def examples(self, study_ids) -> list[KeypointExample]:
        return [self.example(s) for s in study_ids]


def labelled_series(example: KeypointExample, points) -> list[int]:
    """Series ids carrying labels of `points`, in first-appearance order of the points."""
    ids = [int(example.label_series[i]) for i in points if example.label_series[i] >= 0]
    return list(dict.fromkeys(ids))


# ------------------------------------------------------------------- augmentation
def random_affine(rng: np.random.Generator, height: int, width: int, scale: float = 0.1,
                  rotate_deg: float = 10.0, shift: float = 0.08) -> np.ndarray:
    """(2, 3) pixel affine about the image centre: scale 1 +- scale, rotation +- deg,
    shift +- shift * size."""
    angle = rng.uniform(-rotate_deg, rotate_deg)
    m = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle,
                                1.0 + rng.uniform(-scale, scale))
    m[:, 2] += rng.uniform(-shift, shift, 2) * (width, height)
    return m


def warp_planes(planes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) pixel affine to (H, W, C) uint8 planes (C <= 512), zero fill."""
    h, w = planes.shape[:2]
    out = cv2.warpAffine(planes, m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(planes.shape)


def warp_unit_points(coords: np.ndarray, m: np.ndarray, height: int, width: int
                     ) -> np.ndarray:
    """Move unit (u, v, ...) points (P, D) with the pixel affine m; other axes unchanged."""
    out = coords.copy()
    x, y = coords[:, 0] * width - 0.5, coords[:, 1] * height - 0.5
    out[:, 0] = (m[0, 0] * x + m[0, 1] * y + m[0, 2] + 0.5) / width
    out[:, 1] = (m[1, 0] * x + m[1, 1] * y + m[1, 2] + 0.5) / height
    return out


def mirror_depth(volume: np.ndarray, coords: np.ndarray, mask: np.ndarray, swap: np.ndarray):
    """Reverse the last (slice) axis of (C, H, W, D): w -> 1 - w, left/right points swap."""
    coords = coords[swap].copy()
    coords[:, 2] = 1.0 - coords[:, 2]
    return volume[..., ::-1].copy(), coords, mask[swap].copy()


def jitter_intensity(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Contrast x0.8-1.2 and brightness +-0.1 in the [-1, 1] model range."""
    return (x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)).clamp(-1.0, 1.0)


def torch_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG (DataLoader seeding drives augmentation)."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


# ------------------------------------------------------------------- dataset
class SagittalDataset(Dataset):
    """Items of a sagittal family (`sag2d`, `sag3d`): image (C, H, W[, D]) float in [-1, 1],
    target (P, D) unit coordinates, mask (P,) 1 for labelled points.

    Inputs are prepared once (`family.prepare`, the inference code) and kept as uint8.
    """

    def __init__(self, family, config, examples: list[KeypointExample], augment: bool = False):
        self.family, self.config, self.augment = family, config, augment
        self.swap = swap_sides(config.points)
        self.items = []
        for ex in examples:
            pts = ex.world[list(config.points)]
            known = np.isfinite(pts).all(axis=1)
            chosen = family.select(ex.study, config, labelled_series(ex, config.points))
            if chosen is None or not known.any():
                continue
            stack = chosen[1]
            image, context = family.prepare(stack, config)
            coords = family.encode(stack, context, np.nan_to_num(pts))
            coords[~known] = 0.5
            self.items.append((image, coords.astype(np.float32), known.astype(np.float32)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, coords, mask = self.items[i]
        if self.augment:
            rng = torch_rng()
            image, coords, mask = self._augment(image, coords, mask, rng)
        x = to_model_range(image)
        if self.augment:
            x = jitter_intensity(x, rng)
        return {"image": x, "target": torch.from_numpy(np.ascontiguousarray(coords)),
                "mask": torch.from_numpy(np.ascontiguousarray(mask))}

    def _augment(self, image, coords, mask, rng):
        h, w = image.shape[1:3]
        m = random_affine(rng, h, w)
        planes = np.moveaxis(image, 0, -1) if image.ndim == 3 else image[0]  # (H, W, C|D)
        warped = warp_planes(np.ascontiguousarray(planes), m)
        image = np.moveaxis(warped, -1, 0) if image.ndim == 3 else warped[None]
        coords = warp_unit_points(coords, m, h, w)
        if self.family.depth_flip and rng.random() < 0.5:
            image, coords, mask = mirror_depth(image, coords, mask, self.swap)
        return image, coords, mask

    def mean_target(self) -> np.ndarray:
        """(P, D) mean unit coordinates over labelled points (the mean-shape baseline)."""
        coords = np.stack([c for _, c, _ in self.items])
        mask = np.stack([m for _, _, m in self.items])[..., None]
        return (coords * mask).sum(0) / np.maximum(mask.sum(0), 1)

