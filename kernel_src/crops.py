"""Region-of-interest crops for the stage-2 grading families, driven by world-mm points.

Shared by training datasets and the kernel, so both compute identical inputs.

Conventions (see docs/ARCHITECTURE.md): a pixel point is (x = column, y = row); a slice
index counts along the sorted stack normal; pixel values are uint8 (from
`preprocess.normalize_stack`) and come out as float32 in [0, 1].

Building blocks:
- `locate_point(stacks, world)`: where a world point falls (stack, fractional slice, x, y)
  and whether it is inside the image (`in_plane`) and the slice range (`in_range`);
- `crop_slices(pixels, slices, center_xy, window_hw, out_hw, ...)`: one affine crop per
  slice (cv2.warpAffine), window centred on (x, y), resized to `out_hw`; optional
  rotation / scale / horizontal flip for augmentation;
- `window_pixels(stack, size, unit)`: a crop window given in "px" or "mm" -> pixels;
- `slices_around`, `evenly_spaced_slices`, `choose_evenly`, `neighbour_slices`: slice
  index pickers; `slice_image` samples a fractional slice (nearest or linear);
- `fill_level_points`, `axial_level_slices`: axial slices of one level, between the
  world midpoints of the neighbouring levels (via `geometry.axial_slice_levels`).

Missing data is never silent: a NaN point, a missing series, or a point whose projection
falls outside the image gives `Crop(pixels=zeros, valid=False)`; models receive the
`valid` flags and replace the features of invalid inputs by a learned "missing" vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from . import geometry
from .schema import N_LEVELS
from .study import Stack, Study


@dataclass(frozen=True)
class PlanePoint:
    """A world point located in one stack.

    stack: the stack it was located in; z: fractional slice index; x, y: pixel (col, row).
    in_plane: (x, y) lies inside the image (within half a pixel of the border pixels);
    in_range: z lies within the slice range (within half a slice of the end slices).
    """

    stack: Stack
    z: float
    x: float
    y: float
    in_plane: bool
    in_range: bool

    @property
    def inside(self) -> bool:
        return self.in_plane and self.in_range

    @property
    def nearest_slice(self) -> int:
        """The slice index closest to z, clamped to the stack."""
        return int(np.clip(np.rint(self.z), 0, self.stack.shape[0] - 1))


@dataclass(frozen=True)
class Crop:
    """Crops of one region: pixels (n, out_h, out_w) float32 in [0, 1]; zeros when not valid."""

    pixels: np.ndarray
    valid: bool


def series_stacks(study: Study | None, description: str) -> list[Stack]:
    """All stacks of all series with this description (series_id order); [] when none."""
    if study is None:
        return []
    return [st for series in study.by_description(description) for st in series.stacks]


def _outside_distance(value: float, size: int) -> float:
    """How far `value` lies outside [-0.5, size - 0.5] (0 when inside)."""
    return max(-0.5 - value, value - (size - 0.5), 0.0)


def locate_point(stacks: Sequence[Stack], world) -> PlanePoint | None:
    """Locate a world point (3,) mm in the best of `stacks`.

    Preference: the stack where the point is inside (image and slice range); otherwise the
    one it lies nearest to (in pixels + slices outside). None for a non-finite point or no
    stacks. The caller decides which of `in_plane` / `in_range` it needs.
    """
    world = np.asarray(world, dtype=np.float64).reshape(3)
    if not np.isfinite(world).all() or not stacks:
        return None
    best, best_key = None, None
    for stack in stacks:
        z, x, y = (float(np.asarray(v)) for v in geometry.world_to_pixel(stack, world))
        n_slices, height, width = stack.shape
        plane_out = _outside_distance(x, width) + _outside_distance(y, height)
        range_out = _outside_distance(z, n_slices)
        key = (plane_out + range_out, abs(z - (n_slices - 1) / 2) / max(n_slices, 1))
        if best_key is None or key < best_key:
            best_key = key
            best = PlanePoint(stack, z, x, y, plane_out == 0.0, range_out == 0.0)
    return best


def window_pixels(stack: Stack, size_hw: Sequence[float], unit: str = "px") -> tuple[float, float]:
    """A crop window (h, w) given in "px" (pixels of this stack) or "mm" -> (h, w) pixels."""
    h, w = float(size_hw[0]), float(size_hw[1])
    if unit == "px":
        return h, w
    if unit == "mm":
        row_mm, col_mm = (float(s) for s in stack.pixel_spacing)
        return h / row_mm, w / col_mm
    raise ValueError(f"crop window unit must be 'px' or 'mm', got {unit!r}")


def crop_matrix(center_xy: Sequence[float], window_hw: Sequence[float], out_hw: Sequence[int],
                angle_deg: float = 0.0, scale: float = 1.0, flip_x: bool = False) -> np.ndarray:
    """(2, 3) affine taking output pixel (u, v) to input pixel (x, y).

    The output centre ((out_w - 1) / 2, (out_h - 1) / 2) maps exactly to `center_xy`; the
    output spans `window_hw` input pixels (divided by `scale`: scale > 1 zooms in), rotated
    by `angle_deg` about the centre, mirrored left-right when `flip_x`.
    """
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    sx = float(window_hw[1]) / out_w / scale * (-1.0 if flip_x else 1.0)
    sy = float(window_hw[0]) / out_h / scale
    theta = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    lin = rot @ np.diag([sx, sy])
    centre_out = np.array([(out_w - 1) / 2.0, (out_h - 1) / 2.0])
    offset = np.asarray(center_xy, dtype=np.float64) - lin @ centre_out
    return np.hstack([lin, offset[:, None]])


def crop_slices(pixels: np.ndarray, slices: Sequence[int], center_xy: Sequence[float],
                window_hw: Sequence[float], out_hw: Sequence[int], *, angle_deg: float = 0.0,
                scale: float = 1.0, flip_x: bool = False) -> np.ndarray:
    """Crop the same window from several slices: pixels (S, H, W) -> (n, out_h, out_w) float32.

    uint8 input is scaled to [0, 1]; area outside the image is 0 (bilinear sampling).
    """
    matrix = crop_matrix(center_xy, window_hw, out_hw, angle_deg, scale, flip_x)
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    factor = 1.0 / 255.0 if pixels.dtype == np.uint8 else 1.0
    out = np.empty((len(slices), out_h, out_w), dtype=np.float32)
    for i, s in enumerate(slices):
        image = np.asarray(pixels[int(s)], dtype=np.float32)
        out[i] = cv2.warpAffine(image, matrix, (out_w, out_h),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return out * factor


@dataclass(frozen=True)
class CropAug:
    """Geometric augmentation of one crop: shift of the centre (dx, dy) in input pixels
    (keypoint jitter), rotation in degrees, zoom factor, horizontal flip. Default: none."""

    shift_xy: tuple[float, float] = (0.0, 0.0)
    angle_deg: float = 0.0
    scale: float = 1.0
    flip_x: bool = False

    @staticmethod
    def random(rng: np.random.Generator, shift_px: float = 3.0, angle_deg: float = 10.0,
               scale_range: float = 0.1, flip_p: float = 0.0) -> CropAug:
        """Uniform jitter +-shift_px, rotation +-angle_deg, zoom 1 +- scale_range."""
        return CropAug((float(rng.uniform(-shift_px, shift_px)),
                        float(rng.uniform(-shift_px, shift_px))),
                       float(rng.uniform(-angle_deg, angle_deg)),
                       float(rng.uniform(1 - scale_range, 1 + scale_range)),
                       bool(rng.random() < flip_p))


def crop_at(point: PlanePoint | None, n: int, window_hw: Sequence[float],
            out_hw: Sequence[int], *, pick=None, unit: str = "px",
            require_in_range: bool = False, aug: CropAug | None = None) -> Crop:
    """Crop n slices of `point.stack` around the point's (x, y) -> Crop (n, out_h, out_w).

    pick: callable PlanePoint -> (n,) slice indices; default `slices_around(point.z, n)`.
    window_hw: in `unit` ("px" or "mm"). Masked (zeros, valid=False) when the point is None,
    outside the image, or (with `require_in_range`) outside the slice range.
    """
    if point is None or not point.in_plane or (require_in_range and not point.in_range):
        return masked(n, out_hw)
    if pick is None:
        indices = slices_around(point.z, n, point.stack.shape[0])
    else:
        indices = np.asarray(pick(point), dtype=np.int64)
        if len(indices) != n:
            raise ValueError(f"crop_at: pick returned {len(indices)} slices, expected {n}")
    aug = aug or CropAug()
    centre = (point.x + aug.shift_xy[0], point.y + aug.shift_xy[1])
    window = window_pixels(point.stack, window_hw, unit)
    pixels = crop_slices(point.stack.pixels, indices, centre, window, out_hw,
                         angle_deg=aug.angle_deg, scale=aug.scale, flip_x=aug.flip_x)
    return Crop(pixels, True)


def masked(n: int, out_hw: Sequence[int]) -> Crop:
    """The defined input for a missing region: zeros (n, out_h, out_w), valid=False."""
    return Crop(np.zeros((n, int(out_hw[0]), int(out_hw[1])), dtype=np.float32), False)


def slice_image(pixels: np.ndarray, z: float, mode: str = "nearest") -> np.ndarray:
    """One (H, W) float32 image at fractional slice index z (clamped): "nearest" or "linear"."""
    n = pixels.shape[0]
    z = float(np.clip(z, 0, n - 1))
    if mode == "nearest":
        return np.asarray(pixels[int(np.rint(z))], dtype=np.float32)
    if mode != "linear":
        raise ValueError(f"slice interpolation mode must be 'nearest' or 'linear', got {mode!r}")
    lo = int(np.floor(z))
    hi = min(lo + 1, n - 1)
    t = z - lo
    return (1 - t) * pixels[lo].astype(np.float32) + t * pixels[hi].astype(np.float32)


def slices_around(z: float, n: int, n_slices: int, step: int = 1) -> np.ndarray:
    """(n,) int: n slices centred on round(z), `step` apart, clamped to [0, n_slices - 1].

    For even n the extra slice goes to the higher side.
    """
    centre = int(np.rint(z))
    offsets = (np.arange(n) - (n - 1) // 2) * step
    return np.clip(centre + offsets, 0, n_slices - 1).astype(np.int64)


def evenly_spaced_slices(n_slices: int, n: int) -> np.ndarray:
    """(n,) int: n slice indices spread evenly over the stack, ends included (repeats if short)."""
    return np.rint(np.linspace(0, n_slices - 1, n)).astype(np.int64)


def choose_evenly(indices: Sequence[int], n: int) -> np.ndarray:
    """(n,) int: n entries of `indices` taken evenly (repeats when fewer than n); [] -> []."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return indices
    return indices[evenly_spaced_slices(indices.size, n)]


def neighbour_slices(centres: Sequence[int], n_slices: int, k: int = 3) -> np.ndarray:
    """(n, k) int: each centre with its neighbours (k odd), clamped to the stack."""
    offsets = np.arange(k) - k // 2
    return np.clip(np.asarray(centres, dtype=np.int64)[:, None] + offsets, 0, n_slices - 1)


def fill_level_points(points: np.ndarray) -> np.ndarray:
    """(5, 3) world mm with NaN rows -> NaN rows filled by linear inter/extrapolation over
    the level index from the known rows (needs >= 2 known; else returned unchanged)."""
    points = np.asarray(points, dtype=np.float64).reshape(N_LEVELS, 3).copy()
    known = np.isfinite(points).all(axis=1)
    if known.sum() < 2 or known.all():
        return points
    idx = np.flatnonzero(known)
    for missing in np.flatnonzero(~known):
        lo, hi = (idx[:2] if missing < idx[0] else idx[-2:] if missing > idx[-1]
                  else (idx[idx < missing][-1], idx[idx > missing][0]))
        t = (missing - lo) / (hi - lo)
        points[missing] = (1 - t) * points[lo] + t * points[hi]
    return points


def axial_level_slices(stack: Stack, level_points: np.ndarray, level: int) -> np.ndarray:
    """Slice indices of `stack` assigned to `level` (0..4): those between the world
    midpoints of the neighbouring levels along the stack normal. level_points (5, 3) mm;
    missing rows are filled by `fill_level_points`; [] when the level is not covered."""
    points = fill_level_points(level_points)
    if not np.isfinite(points).all():
        return np.zeros(0, dtype=np.int64)
    levels = np.asarray(geometry.axial_slice_levels(stack, points))
    return np.flatnonzero(levels == level).astype(np.int64)
