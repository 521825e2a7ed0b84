"""Grades and continuous narrowing severities for one phantom study.

An ordinal latent model: latent = level effect + rho * age + sqrt(1 - rho^2) * noise, with
one `age` per study (older spines are worse everywhere) and a side factor shared by the
left/right labels of one level. Cut points per condition group give class priors close
to the real data (spinal ~80/11/9 %, foraminal ~71/22/7 %, subarticular ~67/23/10 %).
Within a grade the severity (0..1, the fraction of the space that is narrowed) varies
continuously, so Normal/Mild, Moderate and Severe are separable but not trivially.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from kernel_src import schema

# Prior of (Normal/Mild, Moderate) per condition group; Severe is the rest.
GROUP_PRIORS: dict[str, tuple[float, float]] = {
    "spinal": (0.80, 0.11),
    "foraminal": (0.71, 0.22),
    "subarticular": (0.67, 0.23),
}
# Latent shift per level (L1/L2 .. L5/S1), per group: lower levels degenerate more.
LEVEL_EFFECT: dict[str, tuple[float, ...]] = {
    "spinal": (-0.9, -0.4, 0.2, 0.6, -0.1),
    "foraminal": (-0.9, -0.5, 0.0, 0.5, 0.8),
    "subarticular": (-0.9, -0.5, 0.1, 0.7, 0.4),
}
RHO = 0.6  # weight of the shared study age in each latent
SEVERITY_RANGES = ((0.0, 0.3), (0.42, 0.66), (0.74, 0.95))  # per grade


def _cut_points(group: str) -> tuple[float, float]:
    """Latent thresholds giving the group's prior averaged over the levels."""
    p_normal, p_moderate = GROUP_PRIORS[group]
    effects = np.asarray(LEVEL_EFFECT[group])
    sd = np.sqrt(1.0 + effects.var())  # marginal sd of latent incl. the level spread

    def solve(p: float) -> float:
        t = norm.ppf(p) * sd
        for _ in range(30):  # Newton steps on mean_k Phi(t - e_k) = p
            f = norm.cdf(t - effects).mean() - p
            t -= f / max(norm.pdf(t - effects).mean(), 1e-6)
        return float(t)

    return solve(p_normal), solve(p_normal + p_moderate)


CUT_POINTS = {g: _cut_points(g) for g in GROUP_PRIORS}


def sample_latent(rng: np.random.Generator) -> np.ndarray:
    """(25,) correlated latent degeneration scores, schema.LABEL_COLUMNS order."""
    age = rng.normal()
    level_shared = rng.normal(size=schema.N_LEVELS)
    out = np.empty(schema.N_LABELS)
    for ci, condition in enumerate(schema.CONDITIONS):
        group = schema.CONDITION_GROUP[condition]
        own = 0.6 * level_shared + 0.8 * rng.normal(size=schema.N_LEVELS)
        sl = slice(ci * schema.N_LEVELS, (ci + 1) * schema.N_LEVELS)
        out[sl] = np.asarray(LEVEL_EFFECT[group]) + RHO * age + np.sqrt(1 - RHO**2) * own
    return out


def grades_from_latent(latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(25,) latent -> (grades (25,) int 0/1/2, severity (25,) float 0..1)."""
    grades = np.empty(schema.N_LABELS, dtype=np.int64)
    severity = np.empty(schema.N_LABELS)
    for i, column in enumerate(schema.LABEL_COLUMNS):
        group = next(g for g in schema.GROUPS if g in column)
        t1, t2 = CUT_POINTS[group]
        g = int(latent[i] > t1) + int(latent[i] > t2)
        lo_t, hi_t = ((t1 - 2.0, t1), (t1, t2), (t2, t2 + 1.5))[g]
        frac = np.clip((latent[i] - lo_t) / (hi_t - lo_t), 0.0, 1.0)
        lo, hi = SEVERITY_RANGES[g]
        grades[i], severity[i] = g, lo + frac * (hi - lo)
    return grades, severity


def sample_grades(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One study's (grades (25,) int, severity (25,) float), schema.LABEL_COLUMNS order."""
    return grades_from_latent(sample_latent(rng))
