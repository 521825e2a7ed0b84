"""Intensity of the spine model at world points, and rendering of a whole stack.

Tissues are painted in order with soft masks (a linear ramp of `edge` mm across each
boundary, signed-distance approximations of ellipses/ellipsoids), each with one intensity
per contrast (T1, T2, STIR). Pathology, per disc, narrows:
- the dural sac (bright CSF on T2) by a posterior disc bulge and ligamentum flavum
  thickening, by `severity` of spinal canal stenosis (profile along s ~ exp(-(ds/5)^2));
- the foraminal fat (bright on T1) around the exiting nerve root, by its foraminal severity;
- the subarticular recess (CSF on axial T2) by facet/flavum hypertrophy, by its severity.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from kernel_src.synthetic.anatomy import DIMS, Spine, world_to_spine
from kernel_src.synthetic.series import StackGeometry

CONTRASTS = ("T1", "T2", "STIR")
# tissue: intensity for (T1, T2, STIR), arbitrary units ~0..1
TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (0.0, 0.0, 0.0),
    "fat": (0.95, 0.70, 0.08),
    "viscera": (0.35, 0.42, 0.40),
    "muscle": (0.32, 0.22, 0.20),
    "bone": (0.52, 0.33, 0.20),
    "cortex": (0.08, 0.06, 0.06),
    "marrow": (0.62, 0.42, 0.20),
    "annulus": (0.25, 0.14, 0.16),
    "nucleus": (0.33, 0.88, 0.85),
    "csf": (0.12, 1.00, 1.00),
    "ligament": (0.12, 0.10, 0.10),
    "nerve": (0.30, 0.30, 0.32),
}


def _ramp(sdf: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask 0..1 from a signed distance (mm, negative inside)."""
    return np.clip(0.5 - sdf / edge, 0.0, 1.0)


def _ellipse_sdf(a: np.ndarray, b: np.ndarray, ra, rb) -> np.ndarray:
    """Approximate signed distance (mm) to the ellipse a^2/ra^2 + b^2/rb^2 = 1."""
    k = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    return (k - 1.0) * np.minimum(ra, rb)


def _ellipsoid_sdf(a, b, c, ra, rb, rc) -> np.ndarray:
    k = np.sqrt((a / ra) ** 2 + (b / rb) ** 2 + (c / rc) ** 2)
    return (k - 1.0) * np.minimum(np.minimum(ra, rb), rc)


class _Painter:
    """Accumulates one contrast's intensity over painted tissue masks."""

    def __init__(self, n: int, contrast: str, edge: float):
        self.col = CONTRASTS.index(contrast)
        self.edge = edge
        self.value = np.zeros(n, dtype=np.float32)

    def paint(self, sdf: np.ndarray, tissue: str, scale=1.0) -> None:
        """Blend `tissue` (intensity times `scale`, scalar or per point) inside sdf < 0."""
        m = _ramp(sdf, self.edge)
        level = np.float32(TISSUES[tissue][self.col]) * scale
        self.value += m * (level - self.value)


def _nearest_disc(spine: Spine, s: np.ndarray):
    """(N,) index of the nearest disc and ds = s - its centre (mm, + head)."""
    centres = spine.disc_s.astype(np.float32)
    j = np.abs(s[:, None] - centres[None, :]).argmin(axis=1)
    return j, s - centres[j]


def _paint_soft_tissue(p: _Painter, u, q, texture) -> None:
    p.paint(_ellipse_sdf(u, q + 45.0, 165.0, 125.0), "fat")
    p.paint(_ellipse_sdf(u, q + 40.0, 150.0, 106.0), "muscle", 1.1 * texture)
    p.paint(_ellipse_sdf(u, q + 95.0, 125.0, 62.0), "viscera")
    for side in (-1.0, 1.0):  # erector spinae, psoas: muscle inside a thin fat plane
        for cu, cq, ru, rq in ((26.0, 50.0, 22.0, 20.0), (37.0, -2.0, 13.0, 14.0)):
            p.paint(_ellipse_sdf(u - side * cu, q - cq, ru + 1.2, rq + 1.2), "fat")
            p.paint(_ellipse_sdf(u - side * cu, q - cq, ru, rq), "muscle", texture)


def _texture(spine: Spine, u, q, s) -> np.ndarray:
    """(N,) smooth multiplicative texture around 1 (sum of a few plane waves)."""
    out = np.ones_like(u)
    for fu, fq, fs, phase, amp in spine.texture.astype(np.float32):
        out += amp * np.sin(fu * u + fq * q + fs * s + phase)
    return out


def _paint_column(p: _Painter, spine: Spine, u, q, j, ds, sev_sc, texture) -> None:
    """Vertebral bodies, endplates, discs (with the posterior bulge), posterior arch."""
    d = DIMS
    half_h = spine.disc_height.astype(np.float32)[j] / 2
    arch = _ellipse_sdf(u, q - (d.canal_centre_q + 5.0), d.arch_u, d.arch_q)
    spinous = np.maximum(np.abs(u) - 3.5, np.abs(q - d.canal_centre_q - 27.0) - 17.0)
    spinous = np.maximum(spinous, 5.5 - np.abs(ds))  # interspinous gap at the disc level
    p.paint(np.minimum(arch, spinous), "bone")
    body = _ellipse_sdf(u, q, d.body_u, d.body_q)
    p.paint(body - 0.3, "cortex")
    p.paint(np.maximum(body + 1.5, half_h + 1.2 - np.abs(ds)), "marrow", texture)
    bulge = _ellipsoid_sdf(u, q - d.body_q, ds, 13.0, 0.2 + sev_sc * 7.5, half_h + 2.0)
    p.paint(np.minimum(np.maximum(body - 0.6, np.abs(ds) - half_h), bulge), "annulus")
    nucleus = _ellipsoid_sdf(u, q + 1.0, ds, 0.6 * d.body_u, 0.55 * d.body_q, 0.7 * half_h)
    p.paint(nucleus, "nucleus", spine.hydration.astype(np.float32)[j])


def _paint_neural(p: _Painter, spine: Spine, u, qc, s) -> None:
    """Spinal cord tapering to the conus above L1/L2, cauda equina roots below it."""
    taper = np.sqrt(np.clip((s - spine.conus_s) / 15.0, 0.0, 1.0))
    p.paint(_ellipse_sdf(u, qc + 0.5, 0.05 + 4.5 * taper, 0.05 + 3.5 * taper), "nerve")
    for du, dq in ((-3.5, 3.0), (3.5, 3.0), (-6.5, 1.5), (6.5, 1.5), (0.0, 4.5)):
        root = _ellipse_sdf(u - du, qc - dq, 0.9, 0.9)
        p.paint(np.maximum(root, s - spine.conus_s), "nerve", 0.8)


def _paint_canal(p: _Painter, spine: Spine, u, q, j, ds, s) -> None:
    """Epidural fat, dural sac and recesses, then the narrowing tissue that intrudes."""
    d = DIMS
    qc = q - d.canal_centre_q
    sev = {c: spine.disc_severity(c).astype(np.float32)[j] for c in (
        "spinal_canal_stenosis", "left_subarticular_stenosis", "right_subarticular_stenosis")}
    p.paint(_ellipse_sdf(u, qc, d.canal_u + 2.5, d.canal_q + 2.0), "fat")
    sac = _ellipse_sdf(u, qc, d.canal_u, d.canal_q)
    for side in (-1.0, 1.0):
        recess = _ellipsoid_sdf(u - side * d.recess_u, q - d.recess_q, ds, 4.5, 3.5, 9.0)
        sac = np.minimum(sac, recess)
    p.paint(sac, "csf")
    _paint_neural(p, spine, u, qc, s)
    profile = np.exp(-((ds / 6.0) ** 2))
    flavum = sev["spinal_canal_stenosis"] * profile * 0.38 * 2 * d.canal_q
    p.paint(_ellipse_sdf(u, qc - d.canal_q, 10.0, 0.2 + flavum), "ligament")
    bulge = sev["spinal_canal_stenosis"] * profile * 0.6 * 2 * d.canal_q
    p.paint(_ellipse_sdf(u, qc + d.canal_q + 1.0, 13.0, 1.0 + bulge), "annulus")
    for side, name in ((1.0, "left_subarticular_stenosis"), (-1.0, "right_subarticular_stenosis")):
        r = 0.3 + 6.0 * sev[name] * np.exp(-((ds / 7.0) ** 2))
        facet = _ellipse_sdf(u - side * (d.recess_u + 4.0), q - d.recess_q - 4.5, r, r)
        p.paint(facet, "ligament")


def _paint_foramina(p: _Painter, spine: Spine, u, q, j, ds) -> None:
    """Per side: foramen outline (osteophyte), its fat shrunk by severity, the nerve root."""
    d = DIMS
    for side, name in ((1.0, "left_neural_foraminal_narrowing"),
                       (-1.0, "right_neural_foraminal_narrowing")):
        sev = spine.disc_severity(name).astype(np.float32)[j]
        du, dq, dz = u - side * d.foramen_u, q - d.foramen_q, ds - d.foramen_ds
        p.paint(_ellipsoid_sdf(du, dq, dz, 7.0, 5.5, 9.0), "ligament")
        p.paint(_ellipsoid_sdf(du, dq, dz, 7.0, 5.5 * (1 - 0.8 * sev), 9.0 * (1 - 0.5 * sev)),
                "fat")
        p.paint(_ellipsoid_sdf(du, dq + 0.5, dz - 3.0, 8.0, 2.2, 2.4), "nerve")


def intensity(spine: Spine, world: np.ndarray, contrast: str, edge: float = 1.0) -> np.ndarray:
    """Noise-free intensity (N,) float32 of the model at world points (N, 3) mm."""
    u, q, s = world_to_spine(spine, world)
    j, ds = _nearest_disc(spine, s)
    sev_sc = spine.disc_severity("spinal_canal_stenosis").astype(np.float32)[j]
    p = _Painter(len(u), contrast, edge)
    texture = _texture(spine, u, q, s)
    _paint_soft_tissue(p, u, q, texture)
    _paint_column(p, spine, u, q, j, ds, sev_sc, texture)
    _paint_canal(p, spine, u, q, j, ds, s)
    _paint_foramina(p, spine, u, q, j, ds)
    return p.value


def render_stack(spine: Spine, stack: StackGeometry, contrast: str,
                 rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """(S, H, W) float32 physical intensities (>= 0) of one stack: model, blur, bias, noise."""
    world = stack.pixel_world()  # (S, H, W, 3)
    edge = float(max(0.8, 0.6 * stack.pixel_spacing.min()))
    img = intensity(spine, world.reshape(-1, 3), contrast, edge).reshape(world.shape[:3])
    img = gaussian_filter(img, sigma=(0.0, 0.6, 0.6))
    centre = world.reshape(-1, 3).mean(axis=0)
    grad = rng.normal(0.0, 0.0015, 3)
    bias = 1.0 + (world - centre) @ grad.astype(np.float32)
    img = img * np.clip(bias, 0.6, 1.4)
    n1, n2 = rng.normal(0.0, noise, (2, *img.shape)).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)
