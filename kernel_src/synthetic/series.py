"""Acquisition geometry of the phantom series: sagittal and axial stacks around one spine.

A `StackGeometry` is one set of parallel slices, stored sorted along its sign-canonical
normal (docs/ARCHITECTURE.md), with square pixels. Sagittal stacks are planned along the
spine's lateral axis; axial stacks are tilted to the discs they cover (one continuous
stack, an upper and a lower stack, or one short block per disc).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernel_src import schema
from kernel_src.synthetic.anatomy import (
    DIMS,
    FIRST_LABELLED,
    Spine,
    lateral_world,
    local_to_world,
    rotation_matrix,
    tangent_world,
)

AXIAL_LAYOUTS = {
    "single": ((0, 1, 2, 3, 4),),
    "two_stacks": ((0, 1, 2), (3, 4)),
    "per_level": ((0,), (1,), (2,), (3,), (4,)),
}


@dataclass
class StackGeometry:
    """positions (S, 3) LPS mm of pixel (0, 0), ascending along `normal`; orientation (6,);
    pixel_spacing (row, col) mm; shape (H, W); slice_thickness mm."""

    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    shape: tuple[int, int]
    slice_thickness: float

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n if n[np.argmax(np.abs(n))] > 0 else -n

    def pixel_world(self) -> np.ndarray:
        """(S, H, W, 3) float32 world mm of every pixel centre."""
        h, w = self.shape
        row, col = self.orientation[:3], self.orientation[3:]
        ys = np.arange(h)[:, None, None] * self.pixel_spacing[0] * col
        xs = np.arange(w)[None, :, None] * self.pixel_spacing[1] * row
        plane = (ys + xs).astype(np.float32)
        return self.positions.astype(np.float32)[:, None, None, :] + plane[None]

    def project(self, world: np.ndarray):
        """World (N, 3) -> (nearest slice (N,) int, x (N,), y (N,), off-plane mm (N,))."""
        world = np.atleast_2d(world)
        along = (world[:, None, :] - self.positions[None]) @ self.normal  # (N, S)
        k = np.abs(along).argmin(axis=1)
        rel = world - self.positions[k]
        x = rel @ self.orientation[:3] / self.pixel_spacing[1]
        y = rel @ self.orientation[3:] / self.pixel_spacing[0]
        return k, x, y, np.abs(along[np.arange(len(k)), k])

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        h, w = self.shape
        return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


@dataclass
class SeriesPlan:
    """One series: its stacks (cranial / patient-right first) and how it is stored."""

    series_id: int
    description: str
    contrast: str
    stacks: list[StackGeometry]
    instance_numbers: list[np.ndarray] = field(default_factory=list)
    monochrome1: bool = False
    rescale: tuple[float, float] | None = None
    gain: float = 1000.0
    reversed_instances: bool = False


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def make_stack(centre, normal, row_hint, col_hint, n_slices: int, spacing: float,
               shape: tuple[int, int], pixel_mm: float, thickness: float) -> StackGeometry:
    """Slices centred on `centre` (3,) along `normal`; rows/columns follow the hints."""
    normal = _unit(np.asarray(normal, dtype=np.float64))
    row = _unit(row_hint - (row_hint @ normal) * normal)
    col = np.cross(normal, row)
    col = col if col @ col_hint > 0 else -col
    canonical = np.cross(row, col)
    canonical = canonical if canonical[np.argmax(np.abs(canonical))] > 0 else -canonical
    h, w = shape
    offsets = (np.arange(n_slices) - (n_slices - 1) / 2.0) * spacing
    corner = centre - (w - 1) / 2.0 * pixel_mm * row - (h - 1) / 2.0 * pixel_mm * col
    positions = corner[None, :] + offsets[:, None] * canonical[None, :]
    return StackGeometry(positions, np.concatenate([row, col]), np.array([pixel_mm, pixel_mm]),
                         (int(h), int(w)), float(thickness))


def sample_shape(rng: np.random.Generator, size: int, square: bool) -> tuple[int, int]:
    """(H, W) around `size` (0.75x..1.25x), even numbers."""
    h = int(round(size * rng.uniform(0.75, 1.25) / 2)) * 2
    w = h if square else int(round(size * rng.uniform(0.75, 1.25) / 2)) * 2
    return h, w


def _jitter(rng: np.random.Generator, direction: np.ndarray, degrees: float) -> np.ndarray:
    return rotation_matrix(rng.uniform(-degrees, degrees, 3)) @ direction


def _pixel_mm(points: np.ndarray, centre, row, col, shape, target_fov: float) -> float:
    """Pixel size so that the FOV is ~target_fov mm and holds the points with 25 mm margin."""
    rel = points - centre
    need_w = 2 * (np.abs(rel @ row).max() + 25.0)
    need_h = 2 * (np.abs(rel @ col).max() + 25.0)
    return float(max(target_fov / max(shape), need_w / shape[1], need_h / shape[0]))


def plan_sagittal(rng: np.random.Generator, spine: Spine, landmarks: np.ndarray, size: int,
                  square: bool) -> StackGeometry:
    """A sagittal stack (12-20 slices) covering both foramina and all five levels."""
    normal = _jitter(rng, lateral_world(spine), 3.0)
    row_hint, col_hint = spine.rotation[:, 1], -spine.rotation[:, 2]
    n_slices = int(rng.integers(12, 21))
    half_cover = DIMS.foramen_u * spine.scale + 9.0
    spacing = max(rng.uniform(3.0, 4.5), 2 * half_cover / (n_slices - 1))
    centre = landmarks[: schema.N_LEVELS].mean(axis=0)
    centre = centre + normal * rng.uniform(-1.5, 1.5)
    centre = centre - spine.rotation[:, 1] * rng.uniform(0, 25) + rng.normal(0, 6, 3)
    shape = sample_shape(rng, size, square)
    probe = make_stack(centre, normal, row_hint, col_hint, 1, 1.0, shape, 1.0, 1.0)
    row, col = probe.orientation[:3], probe.orientation[3:]
    pixel_mm = _pixel_mm(landmarks, centre, row, col, shape, rng.uniform(210, 270))
    return make_stack(centre, normal, row_hint, col_hint, n_slices, spacing, shape, pixel_mm,
                      spacing * rng.uniform(0.8, 1.0))


def plan_axial_block(rng: np.random.Generator, spine: Spine, landmarks: np.ndarray,
                     levels: tuple[int, ...], size: int, square: bool) -> StackGeometry:
    """An axial stack tilted to the mean disc plane of `levels`, covering them."""
    s = spine.disc_s[FIRST_LABELLED + np.asarray(levels)]
    normal = _jitter(rng, _unit(sum(tangent_world(spine, v) for v in s)), 2.0)
    discs = local_to_world(spine, 0.0, DIMS.body_q, s)
    along = discs @ normal
    margin = rng.uniform(6.0, 12.0)
    extent = along.max() - along.min() + 2 * margin
    if len(levels) == 1:
        n_slices, spacing = int(rng.integers(3, 7)), rng.uniform(3.0, 4.0)
    else:
        max_slices = 8 * len(levels)  # <= 40 per series whatever the layout
        spacing = max(rng.uniform(3.5, 5.0), extent / (max_slices - 1))
        n_slices = int(round(extent / spacing)) + 1
    centre = discs.mean(axis=0)
    centre = centre + normal * ((along.max() + along.min()) / 2 - centre @ normal)
    centre = centre + rng.normal(0, 5, 3) * (1 - np.abs(normal))
    row_hint, col_hint = lateral_world(spine), spine.rotation[:, 1]
    shape = sample_shape(rng, size, square)
    probe = make_stack(centre, normal, row_hint, col_hint, 1, 1.0, shape, 1.0, 1.0)
    row, col = probe.orientation[:3], probe.orientation[3:]
    idx = [c * schema.N_LEVELS + lv for c in range(schema.N_CONDITIONS) for lv in levels]
    pixel_mm = _pixel_mm(landmarks[idx], centre, row, col, shape, rng.uniform(150, 220))
    return make_stack(centre, normal, row_hint, col_hint, n_slices, spacing, shape, pixel_mm,
                      spacing * rng.uniform(0.8, 1.0))


def number_instances(plan: SeriesPlan, cranial_first: bool) -> None:
    """Set `plan.instance_numbers`: 1.. in acquisition order, reversed when flagged.

    Stacks are numbered in list order; within a stack, ascending along the normal unless
    `cranial_first` (axial: descending z first).
    """
    order = []
    for k, stack in enumerate(plan.stacks):
        idx = np.arange(len(stack.positions))
        order += [(k, i) for i in (idx[::-1] if cranial_first else idx)]
    if plan.reversed_instances:
        order = order[::-1]
    numbers = [np.zeros(len(st.positions), dtype=np.int64) for st in plan.stacks]
    for n, (k, i) in enumerate(order, start=1):
        numbers[k][i] = n
    plan.instance_numbers = numbers
