"""Kernel-side combination of stage-2 logits: manifest weights, per-group blends, softmax.

1. Per family: weighted mean of the logits of its manifest entries; per label row, the
   entries with a NaN row are ignored and the weights renormalised over the others.
2. Per condition group (`schema.CONDITION_GROUP`): the families' logits are blended with
   the manifest's `blends[group]` weights, renormalised per row over the families present
   (a group without blends weights the present families equally).
3. Softmax last. A row no model produced stays NaN (the submission writer puts priors).
Flip TTA is done by the families, not here. Fitting the weights is training-side.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .schema import CONDITION_GROUP, CONDITIONS, N_LABELS, N_LEVELS

# (25,) the condition group of each label row
ROW_GROUPS: tuple[str, ...] = tuple(CONDITION_GROUP[c] for c in CONDITIONS for _ in range(N_LEVELS))


def weighted_nanmean(logits: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean over models of (..., 25, 3) logits, ignoring NaN rows.

    Per row the weights of the models with a finite row are renormalised to sum 1; a row
    with no finite model (or zero total weight) is NaN. Returns (..., 25, 3) float64.
    """
    if len(logits) != len(weights):
        raise ValueError(f"{len(logits)} logit arrays but {len(weights)} weights")
    if not logits:
        return np.full((N_LABELS, 3), np.nan)
    stack = np.stack([np.asarray(x, dtype=np.float64) for x in logits])  # (M, ..., 25, 3)
    if stack.shape[-2:] != (N_LABELS, 3):
        raise ValueError(f"logits must be (..., {N_LABELS}, 3), got {stack.shape[1:]}")
    present = np.isfinite(stack).all(axis=-1)  # (M, ..., 25)
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (present.ndim - 1))
    w = np.where(present, w, 0.0)
    total = w.sum(axis=0)  # (..., 25)
    summed = (np.where(present[..., None], stack, 0.0) * w[..., None]).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = summed / total[..., None]
    mean[total <= 0] = np.nan
    return mean


def blend_families(family_logits: Mapping[str, np.ndarray],
                   blends: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """Blend per-family (..., 25, 3) logits row by row with each row's group weights."""
    if not family_logits:
        return np.full((N_LABELS, 3), np.nan)
    names = sorted(family_logits)
    logits = [np.asarray(family_logits[n], dtype=np.float64) for n in names]
    out = np.full(np.broadcast_shapes(*(x.shape for x in logits)), np.nan)
    for group in set(ROW_GROUPS):
        rows = np.array([g == group for g in ROW_GROUPS])
        table = blends.get(group)
        weights = [1.0 if table is None else float(table.get(n, 0.0)) for n in names]
        out[..., rows, :] = weighted_nanmean(logits, weights)[..., rows, :]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; NaN rows stay NaN."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def combine(model_logits: Mapping[str, np.ndarray], families: Mapping[str, str],
            weights: Mapping[str, float],
            blends: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """Probabilities (..., 25, 3) from the logits of the models that ran.

    model_logits: model name -> (..., 25, 3) logits (NaN rows allowed);
    families / weights: model name -> family name / ensemble weight (from the manifest).
    """
    by_family: dict[str, list[str]] = {}
    for name in model_logits:
        by_family.setdefault(families[name], []).append(name)
    family_logits = {
        fam: weighted_nanmean([model_logits[n] for n in names], [weights[n] for n in names])
        for fam, names in by_family.items()}
    return softmax(blend_families(family_logits, blends))


def combine_manifest(model_logits: Mapping[str, np.ndarray], manifest) -> np.ndarray:
    """`combine` with the families, weights and blends of a `manifest.Manifest`."""
    entries = {m.name: m for m in manifest.models}
    return combine(model_logits, {n: entries[n].family for n in model_logits},
                   {n: entries[n].weight for n in model_logits}, manifest.blends)
