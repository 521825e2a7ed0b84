"""A tiny in-memory axial phantom for the axial keypoint tests (no DICOM, no cache).

Each study: one Axial T2 series (optionally split in two stacks) of uint8 slices along
world z; a bright disc at each of the 5 levels (L1/L2 highest z, spacing ~30 mm, random
offset) and two bright dots (the left / right subarticular points) on the disc's slices;
a dark "sacrum" bar below L5/S1 so the order of levels is visible. Random in-plane offset
(up to a quarter of the field of view), level spacing, pixel spacing and slice spacing per study.
"""

from __future__ import annotations

import numpy as np

from kernel_src.geometry import pixel_to_world, world_to_pixel
from kernel_src.schema import AXIAL_T2
from kernel_src.study import Series, Stack, Study


def _stack(pixels, z0, dz, x0, y0, spacing) -> Stack:
    n = len(pixels)
    positions = np.stack([np.full(n, x0), np.full(n, y0), z0 + dz * np.arange(n)], axis=1)
    return Stack(pixels, positions, np.array([1.0, 0, 0, 0, 1.0, 0]),
                 np.array([spacing, spacing]), np.arange(1, n + 1))


def _paint(stack: Stack, world_points: np.ndarray, radius_px: float, value: float,
           thickness_mm: float) -> None:
    """Add `value` in discs of radius_px around world points on the slices within
    thickness_mm of them (in place, float pixels)."""
    S, H, W = stack.pixels.shape
    yy, xx = np.mgrid[0:H, 0:W]
    slice_z = stack.positions[:, 2]
    for p in world_points:
        _, x, y = world_to_pixel(stack, p)
        for s in np.flatnonzero(np.abs(slice_z - p[2]) <= thickness_mm):
            fall = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * radius_px ** 2))
            stack.pixels[s] += value * fall


def make_study(study_id: int, rng: np.random.Generator, size: int = 48, two_stacks=False):
    """(Study with uint8 stacks, truth (10, 3) world mm: left 5 levels then right 5)."""
    spacing = rng.uniform(2.2, 2.8)
    dz = rng.uniform(3.5, 4.5)
    top = rng.uniform(150, 170)
    level_z = top - rng.uniform(24, 36) * np.arange(5) + rng.normal(0, 1.5, 5)
    z0 = level_z[-1] - rng.uniform(10, 40)
    n = int(np.ceil((level_z[0] + rng.uniform(10, 40) - z0) / dz))
    x0, y0 = -size * spacing / 2 + rng.normal(0, 8, 2)
    shift = np.clip(rng.normal(0, 14, 2), -0.25 * size * spacing, 0.25 * size * spacing)
    centre = np.array([x0, y0]) + size * spacing / 2 + shift
    stack = _stack(rng.normal(20, 6, (n, size, size)).clip(0), z0, dz, x0, y0, spacing)
    half = rng.uniform(9, 12)
    truth = np.full((10, 3), np.nan)
    for lv, z in enumerate(level_z):
        c = np.array([centre[0], centre[1] - 4 + 2 * lv, z])
        truth[lv] = c + [half, 8, 0]       # patient left = +x
        truth[5 + lv] = c + [-half, 8, 0]
        _paint(stack, [c], 5.0 / spacing * 2, 120, 5)
        _paint(stack, [truth[lv], truth[5 + lv]], 1.2, 160, 5)
    below = np.flatnonzero(stack.positions[:, 2] < level_z[-1] - 8)
    stack.pixels[below, size // 3: 2 * size // 3, size // 3: 2 * size // 3] += 90
    stack.pixels = np.clip(stack.pixels, 0, 255).astype(np.uint8)
    stacks = [stack]
    if two_stacks:
        cut = n // 2
        stacks = [_stack(stack.pixels[:cut], z0, dz, x0, y0, spacing),
                  _stack(stack.pixels[cut:], z0 + cut * dz, dz, x0, y0, spacing)]
    series = Series(study_id, 1000 + study_id, AXIAL_T2, stacks)
    return Study(study_id, {series.series_id: series}), truth


def make_studies(n: int, seed: int = 0, size: int = 48):
    rng = np.random.default_rng(seed)
    return [make_study(i + 1, rng, size, two_stacks=(i % 3 == 2)) for i in range(n)]


__all__ = ["make_study", "make_studies", "pixel_to_world"]
