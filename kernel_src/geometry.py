"""Pixel <-> world (DICOM patient LPS, mm) mapping for stacks, and what follows from it.

For slice i of a stack with ImagePositionPatient P_i (centre of pixel (0, 0)), row cosine
r, column cosine c (ImageOrientationPatient) and PixelSpacing (row spacing dr, column
spacing dc), the pixel (x = column, y = row) lies at

    world = P_i + x * dc * r + y * dr * c.

A float slice index s interpolates (and beyond the ends extrapolates) the positions
linearly: P(s) = P_k + (s - k) * (P_{k+1} - P_k), k = clip(floor(s), 0, S - 2). The inverse
first finds s from the distance along the stack normal n (d = world . n against the sorted
d_i = P_i . n, the same piecewise-linear map), then solves world - P(s) = x*dc*r + y*dr*c
by least squares (exact for orthonormal cosines). A one-slice stack has no slice spacing:
1 mm per slice index along n is assumed.
All functions are vectorised: `...` shapes broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .study import Series, Stack, Study


def _segment(stack: Stack, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower slice k, fraction s - k) of float slice indices, k in [0, S - 2]."""
    k = np.clip(np.floor(s), 0, max(len(stack.positions) - 2, 0)).astype(np.int64)
    return k, s - k


def slice_positions(stack: Stack, slice_index) -> np.ndarray:
    """(..., 3) world mm of pixel (0, 0) at float slice indices (linear in between)."""
    s = np.asarray(slice_index, dtype=np.float64)
    p = stack.positions
    if len(p) == 1:
        return p[0] + s[..., None] * stack.normal
    k, frac = _segment(stack, s)
    return p[k] + frac[..., None] * (p[k + 1] - p[k])


def _in_plane_axes(stack: Stack) -> np.ndarray:
    """(2, 3): world mm step of one pixel in x (column) and in y (row)."""
    row_spacing, col_spacing = stack.pixel_spacing
    return np.stack([col_spacing * stack.row_cosine, row_spacing * stack.col_cosine])


def pixel_to_world(stack: Stack, slice_index, x, y) -> np.ndarray:
    """World mm (..., 3) of pixel (x = col, y = row) on float slice index `slice_index`."""
    s, x, y = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (slice_index, x, y)))
    axes = _in_plane_axes(stack)
    return slice_positions(stack, s) + x[..., None] * axes[0] + y[..., None] * axes[1]


def _in_plane(stack: Stack, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (x, y) pixels of in-plane offsets delta (..., 3) mm."""
    xy = delta @ np.linalg.pinv(_in_plane_axes(stack).T).T
    return xy[..., 0], xy[..., 1]


def world_to_pixel(stack: Stack, world) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice_index float, x, y) of world points (..., 3) mm; inverse of pixel_to_world."""
    world = np.asarray(world, dtype=np.float64)
    n = stack.normal
    d, di = world @ n, stack.positions @ n
    if len(di) == 1:
        s = d - di[0]
    else:
        k = np.clip(np.searchsorted(di, d) - 1, 0, len(di) - 2)
        gap = di[k + 1] - di[k]
        s = k + np.divide(d - di[k], gap, out=np.zeros_like(d), where=gap != 0)
    x, y = _in_plane(stack, world - slice_positions(stack, s))
    return s, x, y


def project_to_stack(stack: Stack, world):
    """Project world points (..., 3) mm into a stack.

    Returns (nearest slice index int64, x, y on that slice's plane in pixels, off-plane
    distance mm >= 0 from that plane).
    """
    world = np.asarray(world, dtype=np.float64)
    n = stack.normal
    di = stack.positions @ n
    nearest = np.argmin(np.abs((world @ n)[..., None] - di), axis=-1)
    delta = world - stack.positions[nearest]
    x, y = _in_plane(stack, delta)
    return nearest, x, y, np.abs(delta @ n)


def instance_to_slice(series: Series, instance_number: int) -> tuple[int, int]:
    """(stack index, slice index) of an instance number; KeyError naming the series."""
    for stack_index, stack in enumerate(series.stacks):
        hits = np.flatnonzero(stack.instance_numbers == int(instance_number))
        if len(hits):
            return stack_index, int(hits[0])
    raise KeyError(f"study {series.study_id} series {series.series_id}: "
                   f"no instance number {instance_number}")


def axial_slice_levels(stack: Stack, level_points) -> np.ndarray:
    """(S,) int level index (0..4, `schema.LEVELS` order) of each slice, -1 for none.

    level_points: (5, 3) world mm, NaN rows for unknown levels. Along the stack normal,
    level k owns the slices between the midpoints to its neighbouring known levels; the
    outermost levels extend as far beyond their point as half the gap to their one
    neighbour. With a single known level only the nearest slice gets it.
    """
    pts = np.asarray(level_points, dtype=np.float64).reshape(-1, 3)
    known = np.flatnonzero(np.isfinite(pts).all(axis=1))
    out = np.full(len(stack.positions), -1, dtype=np.int64)
    n = stack.normal
    di = stack.positions @ n
    if len(known) == 0:
        return out
    if len(known) == 1:
        out[np.argmin(np.abs(di - pts[known[0]] @ n))] = known[0]
        return out
    t = pts[known] @ n
    order = np.argsort(t)
    t, levels = t[order], known[order]
    mids = (t[1:] + t[:-1]) / 2
    bounds = np.concatenate([[t[0] - (mids[0] - t[0])], mids, [t[-1] + (t[-1] - mids[-1])]])
    slot = np.searchsorted(bounds, di, side="right") - 1
    inside = (slot >= 0) & (slot < len(levels))
    out[inside] = levels[slot[inside]]
    return out


def resized_pixel(x, y, source_shape, target_shape) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (x, y) of an (H, W) image in the same image resized to (H', W') with pixel
    centres aligned (cv2.resize): x' = (x + 0.5) * W' / W - 0.5, likewise y."""
    (h0, w0), (h1, w1) = source_shape, target_shape
    x = (np.asarray(x, dtype=np.float64) + 0.5) * w1 / w0 - 0.5
    y = (np.asarray(y, dtype=np.float64) + 0.5) * h1 / h0 - 0.5
    return x, y


def label_points_world(study: Study, coords: pd.DataFrame,
                       source_shapes: Mapping[tuple[int, int], tuple[int, int]] | None = None
                       ) -> np.ndarray:
    """(n, 3) world mm of each row of `train_label_coordinates` (series_id,
    instance_number, x, y in pixels of the original DICOM slice).

    For stacks resized after reading (a cache), pass source_shapes: (series_id, stack
    index) -> original (H, W); the pixels are then mapped with `resized_pixel`. A row
    whose series or instance is missing from the study gives NaN.
    """
    out = np.full((len(coords), 3), np.nan)
    cols = coords[["series_id", "instance_number", "x", "y"]].itertuples(index=False)
    for i, (series_id, instance, x, y) in enumerate(cols):
        series = study.series.get(int(series_id))
        if series is None:
            continue
        try:
            stack_index, slice_index = instance_to_slice(series, instance)
        except KeyError:
            continue
        stack = series.stacks[stack_index]
        if source_shapes is not None and (int(series_id), stack_index) in source_shapes:
            x, y = resized_pixel(x, y, source_shapes[int(series_id), stack_index],
                                 stack.shape[1:])
        out[i] = pixel_to_world(stack, slice_index, x, y)
    return out
