"""A 3D lumbar-spine model in world millimetres (DICOM LPS) and its 25 landmarks.

The spine is built in a *local* frame (u = patient left, v = posterior, w = head) around a
curved centre line v_c(w) (lordosis: the mid-lumbar spine bows anteriorly, the sacrum turns
posteriorly), then scaled, rotated and shifted into world coordinates:
`world = offset + scale * R @ local`.

Structures are described in *spine coordinates* (u, q, s): s = position along the centre
line (mm, + head), q = distance from the centre line along its posterior normal (mm),
u = lateral (mm, + patient left). `local_to_world` and `world_to_spine` are exact inverses
(the latter by a fixed-point projection onto the centre line, converged to < 1e-4 mm for
points within ~150 mm of the spine).

Seven discs are modelled, two thoracolumbar ones above the labelled five; index j = 2..6 is
level L1/L2..L5/S1 (`schema.LEVELS`). Below L5/S1 the column continues as the sacrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernel_src import schema

N_DISCS = 7  # T11/T12, T12/L1, then the five labelled levels
FIRST_LABELLED = 2


@dataclass(frozen=True)
class Dimensions:
    """Nominal sizes of the cross-section in mm (before the per-study scale)."""

    body_u: float = 24.0       # vertebral body half-width
    body_q: float = 15.0       # vertebral body half-depth (centre line = body centre)
    epidural: float = 2.0      # fat between the body's back and the dural sac
    canal_u: float = 11.0      # dural sac half-width
    canal_q: float = 8.0       # dural sac half-depth
    foramen_u: float = 19.0    # lateral offset of the foramen centre from the midline
    foramen_ds: float = 3.0    # foramen centre above the disc centre
    recess_u: float = 8.5      # lateral offset of the subarticular recess
    arch_u: float = 27.0       # posterior arch (pedicles, laminae, facets) half-width
    arch_q: float = 18.0       # posterior arch half-depth

    @property
    def canal_centre_q(self) -> float:
        return self.body_q + self.epidural + self.canal_q

    @property
    def recess_q(self) -> float:
        return self.canal_centre_q - 0.45 * self.canal_q

    @property
    def foramen_q(self) -> float:
        return self.canal_centre_q - 1.5


DIMS = Dimensions()


@dataclass(frozen=True)
class Spine:
    """One study's spine: pose, curvature, disc positions and pathology.

    rotation: (3, 3) local -> world; offset: (3,) world mm of the local origin;
    scale: size factor; lordosis: mm of anterior bow at `w_mid`; half_length: mm;
    disc_s: (7,) s of each disc centre (descending: cranial first);
    disc_height: (7,) mm; hydration: (7,) 0..1 (nucleus T2 brightness);
    severity: (25,) 0..1 narrowing per label (schema.LABEL_COLUMNS order);
    conus_s: s of the spinal cord's tip (mm); texture: (K, 5) smooth tissue texture
    components in spine coordinates (frequency u, q, s in rad/mm, phase, amplitude).
    """

    rotation: np.ndarray
    offset: np.ndarray
    scale: float
    lordosis: float
    w_mid: float
    half_length: float
    disc_s: np.ndarray
    disc_height: np.ndarray
    hydration: np.ndarray
    severity: np.ndarray
    conus_s: float
    texture: np.ndarray

    def slope(self, w: np.ndarray) -> np.ndarray:
        """dv_c/dw of the centre line."""
        return 2.0 * self.lordosis * (w - self.w_mid) / self.half_length**2

    def centre_v(self, w: np.ndarray) -> np.ndarray:
        """v_c(w): anterior bow of -lordosis mm at w_mid, 0 at w_mid +- half_length."""
        return self.lordosis * (((w - self.w_mid) / self.half_length) ** 2 - 1.0)

    def disc_severity(self, condition: str) -> np.ndarray:
        """(7,) severity of `condition` per disc (0.05 at the unlabelled discs)."""
        out = np.full(N_DISCS, 0.05)
        i = schema.CONDITIONS.index(condition) * schema.N_LEVELS
        out[FIRST_LABELLED:] = self.severity[i:i + schema.N_LEVELS]
        return out


def rotation_matrix(angles_deg) -> np.ndarray:
    """(3, 3) rotation from (about x, about y, about z) angles in degrees, applied x, y, z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_spine(rng: np.random.Generator, severity: np.ndarray) -> Spine:
    """Random pose, size and curvature for one study; `severity` (25,) from pathology."""
    gaps = rng.uniform(34.0, 40.0, N_DISCS - 1)
    disc_s = np.concatenate([[0.0], -np.cumsum(gaps)])
    disc_s = disc_s - disc_s[4]  # L3/L4 at s = 0
    degeneration = np.full(N_DISCS, 0.05)
    degeneration[FIRST_LABELLED:] = severity.reshape(schema.N_CONDITIONS, -1).mean(axis=0)
    height = rng.uniform(8.5, 11.5, N_DISCS) * (1.0 - 0.45 * degeneration)
    height[-2:] += 1.0  # lower lumbar discs are taller
    offset = np.array([rng.uniform(-15, 15), rng.uniform(-40, 10), rng.uniform(-60, 60)])
    return Spine(
        rotation=rotation_matrix([rng.uniform(-6, 6), rng.uniform(-4, 4), rng.uniform(-5, 5)]),
        offset=offset, scale=float(rng.uniform(0.88, 1.12)),
        lordosis=float(rng.uniform(4.0, 16.0)), w_mid=float(rng.uniform(-15.0, 15.0)),
        half_length=float(rng.uniform(95.0, 115.0)), disc_s=disc_s, disc_height=height,
        hydration=np.clip(1.0 - 0.9 * degeneration + rng.normal(0, 0.05, N_DISCS), 0.15, 1.0),
        severity=np.asarray(severity, dtype=np.float64),
        conus_s=float(disc_s[FIRST_LABELLED] + rng.uniform(4.0, 24.0)),
        texture=np.column_stack([rng.normal(0, 0.25, (4, 3)), rng.uniform(0, 2 * np.pi, 4),
                                 rng.uniform(0.02, 0.05, 4)]),
    )


def _frame(spine: Spine, s: np.ndarray):
    """Centre point (..., 3) local, tangent and posterior normal (..., 3) at s."""
    d = spine.slope(s)
    n = np.sqrt(1.0 + d * d)
    zero = np.zeros_like(s)
    centre = np.stack([zero, spine.centre_v(s), s], axis=-1)
    tangent = np.stack([zero, d / n, 1.0 / n], axis=-1)
    normal = np.stack([zero, 1.0 / n, -d / n], axis=-1)
    return centre, tangent, normal


def local_to_world(spine: Spine, u, q, s) -> np.ndarray:
    """Spine coordinates (u, q, s) mm -> world (..., 3) LPS mm."""
    u, q, s = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (u, q, s)))
    centre, _, normal = _frame(spine, s)
    local = centre + q[..., None] * normal
    local[..., 0] += u
    return spine.offset + spine.scale * local @ spine.rotation.T


def world_to_spine(spine: Spine, world: np.ndarray, iterations: int = 6):
    """World (..., 3) mm -> spine coordinates (u, q, s), each (...,) float32 mm."""
    rel = [np.asarray(world[..., i], dtype=np.float32) - np.float32(spine.offset[i])
           for i in range(3)]  # contiguous columns: much faster than (N, 3) @ (3, 3)
    m = spine.rotation / spine.scale
    u, v, w = (sum(rel[i] * np.float32(m[i, k]) for i in range(3)) for k in range(3))
    s = w.copy()
    for _ in range(iterations):  # foot of the perpendicular onto the centre line
        s = w + spine.slope(s) * (v - spine.centre_v(s))
    d = spine.slope(s)
    q = ((v - spine.centre_v(s)) - d * (w - s)) / np.sqrt(1.0 + d * d)
    return u, q.astype(np.float32), s.astype(np.float32)


def tangent_world(spine: Spine, s: float) -> np.ndarray:
    """(3,) unit world direction of the centre line (towards the head) at s."""
    _, tangent, _ = _frame(spine, np.asarray(float(s)))
    t = spine.rotation @ tangent
    return t / np.linalg.norm(t)


def lateral_world(spine: Spine) -> np.ndarray:
    """(3,) unit world direction of the patient's left in the spine frame."""
    return spine.rotation[:, 0].copy()


def landmark_spine_coords(dims: Dimensions = DIMS) -> np.ndarray:
    """(25, 3) nominal (u, q, ds) of each landmark relative to its disc centre, schema order."""
    per_condition = {
        "spinal_canal_stenosis": (0.0, dims.canal_centre_q, 0.0),
        "left_neural_foraminal_narrowing": (dims.foramen_u, dims.foramen_q, dims.foramen_ds),
        "right_neural_foraminal_narrowing": (-dims.foramen_u, dims.foramen_q, dims.foramen_ds),
        "left_subarticular_stenosis": (dims.recess_u, dims.recess_q, 0.0),
        "right_subarticular_stenosis": (-dims.recess_u, dims.recess_q, 0.0),
    }
    return np.array([per_condition[c] for c in schema.CONDITIONS for _ in schema.LEVELS])


def landmarks_world(spine: Spine) -> np.ndarray:
    """(25, 3) world mm of the 25 landmarks in schema.LABEL_COLUMNS order."""
    rel = landmark_spine_coords()
    level = np.tile(np.arange(schema.N_LEVELS), schema.N_CONDITIONS)
    s = spine.disc_s[FIRST_LABELLED + level] + rel[:, 2]
    return local_to_world(spine, rel[:, 0], rel[:, 1], s)
