"""Every axial stack of a study on ONE world-z grid: the input of both axial families.

A study may hold one continuous axial stack, several tilted blocks in one series, or
several Axial T2 series. `build_sequence` puts them all in world order along z at
`z_spacing` mm: each grid position takes the nearest slice of the longest stack having one
within half a step (so overlapping stacks do not alternate), else the nearest slice of any
stack within a step, else the position is dropped. The z of a slice is the world z of its
centre pixel ("slice-centre z").

A point's sequence coordinate g (float grid position) comes from its slice coordinate in
the stack of its grid position: s (from `geometry.world_to_pixel`) -> slice-centre z at s
-> g by interpolation over the positions' z. Decoding inverts exactly those steps, so tilted
stacks do not bias z. In-plane coordinates are the unit (u, v) of that stack's own slice
(every slice is resized to the same square size, so units agree across stacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import geometry
from ..study import Stack, Study
from .axial_points import axial_stacks, from_unit, inside, neighbours_25d, resize_slices, to_unit


@dataclass
class AxialSequence:
    """stacks: (series_id, stack index, Stack) of every axial stack; volumes: each stack
    resized to (S, size, size) uint8; slice_z: each stack's (S,) slice-centre z (mm);
    refs: (N, 2) int (stack number, slice index) per grid position; z: (N,) ascending
    slice-centre z (mm) of the slice at each position; step: the grid step (mm)."""

    stacks: list[tuple[int, int, Stack]]
    volumes: list[np.ndarray]
    slice_z: list[np.ndarray]
    refs: np.ndarray
    z: np.ndarray
    step: float

    def __len__(self) -> int:
        return len(self.z)

    def images(self, positions=None) -> np.ndarray:
        """(N, 3, size, size) uint8 2.5D images (slice and its two neighbours in its own
        stack) of the grid positions (all by default)."""
        rows = self.refs if positions is None else self.refs[positions]
        return np.stack([neighbours_25d(self.volumes[k], s) for k, s in rows])

    def planes(self) -> np.ndarray:
        """(N, size, size) uint8: the slice at every grid position."""
        return np.stack([self.volumes[k][s] for k, s in self.refs])

    def stack_at(self, g: float) -> int:
        """Stack number of the grid position nearest to float position g."""
        return int(self.refs[int(np.clip(np.rint(g), 0, len(self.z) - 1)), 0])

    def slice_index(self, k: int, z: float) -> float:
        """Float slice index of stack k at slice-centre z (mm), clipped into the stack."""
        zs = self.slice_z[k]
        return float(np.interp(z, zs, np.arange(len(zs))))

    def encode(self, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (P, 3) mm -> (P, 3) (u, v, g) with g the float grid position, and
        (P,) inside flags (within the grid's z range and the chosen stack's slice); NaN
        points give NaN and False."""
        world = np.asarray(world, dtype=np.float64).reshape(-1, 3)
        out = np.full((len(world), 3), np.nan)
        ok = np.zeros(len(world), dtype=bool)
        n = np.arange(len(self.z))
        for i, p in enumerate(world):
            if not np.isfinite(p).all():
                continue
            g = float(np.interp(p[2], self.z, n))
            for _ in range(2):  # the stack depends on g, g on the stack
                k = self.stack_at(g)
                stack = self.stacks[k][2]
                s, x, y = (float(v) for v in geometry.world_to_pixel(stack, p))
                zc = np.interp(s, np.arange(len(self.slice_z[k])), self.slice_z[k])
                g = float(np.interp(zc, self.z, n, left=-np.inf, right=np.inf))
                g = g if np.isfinite(g) else (-1.0 if zc < self.z[0] else len(n) * 1.0)
            S, H, W = stack.pixels.shape
            out[i] = (to_unit(x, W), to_unit(y, H), g)
            ok[i] = bool(inside(S, H, W, s, x, y)) and -0.5 <= g <= len(n) - 0.5
        return out, ok

    def decode(self, ug: np.ndarray, stacks=None) -> tuple[np.ndarray, list[int]]:
        """(P, 3) (u, v, g) -> world points (P, 3) mm and the stack number of each (the
        stack at g, or the given `stacks` (P,) when (u, v) were measured on those)."""
        ug = np.asarray(ug, dtype=np.float64).reshape(-1, 3)
        world, ks = np.zeros((len(ug), 3)), []
        for i, (u, v, g) in enumerate(ug):
            g = float(np.clip(g, 0, len(self.z) - 1))
            k = self.stack_at(g) if stacks is None else int(stacks[i])
            stack = self.stacks[k][2]
            z = float(np.interp(g, np.arange(len(self.z)), self.z))
            _, H, W = stack.pixels.shape
            world[i] = geometry.pixel_to_world(stack, self.slice_index(k, z),
                                               from_unit(u, W), from_unit(v, H))
            ks.append(k)
        return world, ks


def slice_centre_z(stack: Stack) -> np.ndarray:
    """(S,) world z (mm) of the centre pixel of every slice."""
    S, H, W = stack.pixels.shape
    world = geometry.pixel_to_world(stack, np.arange(S, dtype=np.float64),
                                    np.full(S, (W - 1) / 2), np.full(S, (H - 1) / 2))
    return np.asarray(world)[:, 2]


def _grid_refs(slice_z: list[np.ndarray], grid: np.ndarray, step: float) -> np.ndarray:
    """(N, 2) (stack number, slice index) per kept grid position (rule: module doc)."""
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


def build_sequence(study: Study, z_spacing: float, max_slices: int,
                   image_size: int) -> AxialSequence | None:
    """All axial stacks of a study on one z grid from the lowest to the highest slice,
    step <= max(z_spacing, span / (max_slices - 1)) mm (evenly dividing the span), slices
    resized to image_size; None without an axial slice."""
    stacks = [t for t in axial_stacks(study) if t[2].pixels.shape[0] > 0]
    if not stacks:
        return None
    slice_z = [slice_centre_z(st) for _, _, st in stacks]
    lo = min(z.min() for z in slice_z)
    span = max(z.max() for z in slice_z) - lo
    n = int(np.ceil(span / max(z_spacing, span / max(1, max_slices - 1), 1e-6) - 1e-6)) + 1
    grid = np.linspace(lo, lo + span, n)  # both ends included, step <= z_spacing
    step = span / (n - 1) if n > 1 else z_spacing
    refs = _grid_refs(slice_z, grid, step)
    z = np.array([slice_z[k][s] for k, s in refs])
    order = np.argsort(z, kind="stable")
    volumes = [resize_slices(st.pixels, image_size, image_size) for _, _, st in stacks]
    return AxialSequence(stacks, volumes, slice_z, refs[order], z[order], float(step))
