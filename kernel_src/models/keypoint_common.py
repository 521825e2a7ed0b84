"""Pieces shared by the sagittal keypoint families (`sag2d`, `sag3d`).

- Points: Sagittal T2/STIR gives the 5 spinal points, Sagittal T1 the 10 foraminal points
  (left 5 levels, then right 5), as indices into `schema.LABEL_COLUMNS`.
- Series choice: in training the first series of the description (series_id order) that
  carries labels of the config's points; in inference (and when no series is labelled)
  the series whose largest stack has the most slices, ties to the lowest series_id. Within
  a series the stack with the most slices (the first on ties).
- Unit coordinates: pixel p on an axis of n pixels -> u = (p + 0.5) / n (unchanged by
  resizing with aligned pixel centres). Outputs are (u, v[, w]) = (column, row[, slice]).
- Network output per point: unit coordinates plus a predicted absolute error e >= 0 (unit
  coordinates, mean over axes), trained on the detached true error. Confidence =
  exp(-(e + s) / ERROR_SCALE), s = spread (std) of the fold models' coordinates.
- Heads: "pool" = global pooling + linear (the original's direct regression); "soft_argmax"
  = a 1x1 conv on the last feature map, spatial softmax, expected unit position (integral
  regression: also direct coordinate regression, far more data-efficient). Config
  `feature_stage` = k builds the backbone with features_only / out_indices=(k,) (timm
  stage k has stride 2**(k+1) on resnets), None uses the whole backbone; `pyramid` = width
  > 0 fuses every deeper stage into that map top-down (`pyramid.Pyramid`): fine AND
  context-aware maps, which is what makes the soft-argmax precise on small data.
- Pixels enter networks as (v / 255 - 0.5) / 0.5 (Normalize(0.5, 0.5)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..keypoints import Keypoints
from ..schema import LABEL_COLUMNS, LEVELS, SAG_T1, SAG_T2, label_index
from ..study import Series, Stack, Study
from .pyramid import pyramid_backbone

SPINAL = tuple(label_index("spinal_canal_stenosis", lv) for lv in LEVELS)
FORAMINAL = tuple(label_index(f"{side}_neural_foraminal_narrowing", lv)
                  for side in ("left", "right") for lv in LEVELS)
SERIES_POINTS = {SAG_T2: SPINAL, SAG_T1: FORAMINAL}
ERROR_SCALE = 0.05  # unit-coordinate error at which the confidence is 1/e
HEADS = ("pool", "soft_argmax")


def to_unit(p, n):
    return (np.asarray(p, dtype=np.float64) + 0.5) / n


def from_unit(u, n):
    return np.asarray(u, dtype=np.float64) * n - 0.5


def to_model_range(pixels) -> torch.Tensor:
    """uint8 array / tensor -> float32 tensor in [-1, 1]."""
    return torch.as_tensor(np.asarray(pixels)).float() / 127.5 - 1.0


def swap_sides(points: tuple[int, ...]) -> np.ndarray:
    """Permutation of a point list exchanging left and right labels (identity if none)."""
    names = [LABEL_COLUMNS[i] for i in points]
    swapped = [n.replace("left_", "@").replace("right_", "left_").replace("@", "right_")
               for n in names]
    return np.array([names.index(s) for s in swapped])


def largest_stack(series: Series) -> tuple[int, Stack] | None:
    if not series.stacks:
        return None
    k = max(range(len(series.stacks)), key=lambda i: (series.stacks[i].shape[0], -i))
    return k, series.stacks[k]


def pick_series(study: Study, description: str, prefer: list[int] | None = None
                ) -> tuple[int, Stack] | None:
    """(series_id, stack) to use for `description` (see module doc), None if absent."""
    candidates = [s for s in study.by_description(description) if s.stacks]
    if not candidates:
        return None
    labelled = [s for s in candidates if prefer and s.series_id in prefer]
    if labelled:
        chosen = labelled[0]
    else:
        chosen = max(candidates, key=lambda s: (largest_stack(s)[1].shape[0], -s.series_id))
    return chosen.series_id, largest_stack(chosen)[1]


class KeypointNet(nn.Module):
    """Backbone + keypoint head -> (B, P, D + 1): D unit coordinates and an error >= 0.

    `backbone`: a timm / timm_3d model built with num_classes=0, or with features_only=True
    (then its last returned map is used: an earlier stage gives a finer map for the
    soft-argmax head). Input (B, C, H, W) or (B, C, H, W, D) (depth last).
    """

    def __init__(self, backbone: nn.Module, n_points: int, n_dims: int, head: str = "pool",
                 drop_rate: float = 0.0, channels: int | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown keypoint head {head!r} (known: {HEADS})")
        self.backbone, self.head_kind = backbone, head
        self.n_points, self.n_dims = n_points, n_dims
        # features_only models carry a FeatureInfo (with .channels()); plain timm_3d
        # models may lack forward_head but keep feature_info as a list of dicts.
        # `channels` given: the backbone returns [one map] of that width (a `Pyramid`).
        self.feature_maps = channels is not None or (
            hasattr(getattr(backbone, "feature_info", None), "channels")
            and not hasattr(backbone, "forward_head"))
        if channels is not None:
            width = channels
        elif self.feature_maps:
            width = backbone.feature_info.channels()[-1]
        else:
            width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.drop = nn.Dropout(drop_rate)
        if head == "pool":
            self.head = nn.Linear(width, n_points * (n_dims + 1))
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            conv = nn.Conv2d if n_dims == 2 else nn.Conv3d
            self.head = conv(width, 2 * n_points, kernel_size=1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) last feature map."""
        return self.backbone(x)[-1] if self.feature_maps else self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor, return_heatmaps: bool = False):
        """(B, P, D + 1); with return_heatmaps (soft_argmax head only) also the heatmap
        logits (B, P, *spatial) for an auxiliary heatmap loss."""
        if self.head_kind == "pool":
            if return_heatmaps:
                raise ValueError("the pool head has no heatmaps")
            feats = (self.feature_map(x).flatten(2).mean(-1) if self.feature_maps
                     else self.backbone(x))
            out = self.head(self.drop(feats)).view(-1, self.n_points, self.n_dims + 1)
            return torch.cat([0.5 + out[..., :-1], F.softplus(out[..., -1:])], dim=-1)
        maps = self.head(self.drop(self.feature_map(x)))
        out = self._soft_argmax(maps)
        return (out, maps[:, : self.n_points]) if return_heatmaps else out

    def _soft_argmax(self, maps: torch.Tensor) -> torch.Tensor:
        b, p = maps.shape[0], self.n_points
        spatial = maps.shape[2:]
        heat = maps[:, :p].flatten(2).float().softmax(-1)            # (B, P, N)
        err = F.softplus(maps[:, p:].flatten(2).float())
        grids = torch.meshgrid(*[(torch.arange(n, device=maps.device) + 0.5) / n
                                 for n in spatial], indexing="ij")
        # spatial axes are (row, col[, slice]); outputs are (col, row[, slice])
        order = [1, 0, 2][: len(spatial)]
        coords = [(heat * grids[a].reshape(1, 1, -1)).sum(-1) for a in order]
        e = (heat * err).sum(-1, keepdim=True)
        return torch.cat([torch.stack(coords, -1), e], dim=-1).view(b, p, self.n_dims + 1)


def backbone_kwargs(config) -> dict:
    """Extra timm arguments for a config's `feature_stage` (None: the whole network)."""
    stage = getattr(config, "feature_stage", None)
    if stage is None:
        return {"num_classes": 0}
    return {"features_only": True, "out_indices": (int(stage),)}


def keypoint_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  kind: str = "l1", beta: float = 0.02, error_weight: float = 0.1
                  ) -> torch.Tensor:
    """Masked coordinate loss (L1 or SmoothL1 on unit coordinates) plus the error head's L1
    to the detached true error. out (B, P, D + 1), target (B, P, D), mask (B, P) 0/1."""
    out = out.float()
    coords, err = out[..., :-1], out[..., -1]
    if kind == "l1":
        per = (coords - target).abs()
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(coords, target, beta=beta, reduction="none")
    else:
        raise ValueError(f"unknown keypoint loss {kind!r} (l1, smooth_l1)")
    n = mask.sum().clamp(min=1)
    coord = (per.mean(-1) * mask).sum() / n
    true_err = (coords - target).abs().mean(-1).detach()
    return coord + error_weight * ((err - true_err).abs() * mask).sum() / n


def heatmap_loss(heat_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 sigma: float = 1.0) -> torch.Tensor:
    """Cross entropy of the spatial softmax of heatmap logits (B, P, *spatial; spatial axes
    (row, col[, slice])) against a Gaussian of `sigma` cells at the unit target (B, P, D)
    = (u, v[, w]); masked mean over points. A dense signal that speeds up learning."""
    spatial = heat_logits.shape[2:]
    logp = heat_logits.float().flatten(2).log_softmax(-1)
    grids = torch.meshgrid(*[(torch.arange(n, device=target.device) + 0.5) / n
                             for n in spatial], indexing="ij")
    order = [1, 0, 2][: len(spatial)]
    d2 = sum(((grids[a].reshape(1, 1, -1) - target[..., c, None]) * n) ** 2
             for a, c, n in zip(range(len(spatial)), order, spatial, strict=True))
    weights = torch.exp(-d2 / (2 * sigma ** 2))
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    ce = -(weights * logp).sum(-1)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def confidence(errors: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Confidence in [0, 1] from predicted unit errors and fold spread (same shape)."""
    return np.exp(-(np.maximum(errors, 0) + spread) / ERROR_SCALE)


class SagittalFamily:
    """Shared model building and inference of the sagittal families. Subclasses define
    `name`, `Config`, `n_dims`, `create_backbone` (timm 2D or timm_3d constructor),
    `prepare(stack, config) -> (input uint8, context)` and `decode(stack, context,
    coords (P, D), config) -> world (P, 3)`."""

    name = ""
    n_dims = 2
    create_backbone = None

    @classmethod
    def variants(cls) -> dict:
        """One model per series type: T2 -> 5 spinal points, T1 -> 10 foraminal points."""
        return {"t2": cls.Config(series=SAG_T2, points=SPINAL),
                "t1": cls.Config(series=SAG_T1, points=FORAMINAL)}

    @classmethod
    def build(cls, config) -> KeypointNet:
        if config.pyramid:
            if config.feature_stage is None:
                raise ValueError(f"{cls.name}: pyramid needs a feature_stage (the map to "
                                 "fuse the deeper stages into)")
            backbone, width = pyramid_backbone(cls.create_backbone, config.backbone,
                                               int(config.feature_stage), int(config.pyramid),
                                               1, pretrained=config.pretrained,
                                               weights_path=config.weights_path)
            return KeypointNet(backbone, len(config.points), cls.n_dims, config.head,
                               config.drop_rate, channels=width)
        backbone = cls.create_backbone(config.backbone, in_chans=1,
                                       pretrained=config.pretrained,
                                       weights_path=config.weights_path,
                                       **backbone_kwargs(config))
        return KeypointNet(backbone, len(config.points), cls.n_dims, config.head,
                           config.drop_rate)

    @classmethod
    def select(cls, study: Study, config, prefer: list[int] | None = None):
        return pick_series(study, config.series, prefer)

    @classmethod
    @torch.inference_mode()
    def predict(cls, models, config, stack: Stack, device):
        """Fold-averaged outputs on one stack: (coords (P, D), error (P,), spread (P,),
        context)."""
        image, context = cls.prepare(stack, config)
        x = to_model_range(image)[None].to(device)
        outs = torch.stack([m.to(device).eval()(x)[0].float().cpu() for m in models])
        coords = outs[..., :-1]
        spread = coords.std(0, unbiased=False).mean(-1) if len(models) > 1 \
            else torch.zeros(coords.shape[1])
        return (coords.mean(0).numpy(), outs[..., -1].mean(0).numpy(), spread.numpy(),
                context)

    @classmethod
    def infer(cls, models, config, study: Study, device) -> Keypoints:
        """Points of `config.points` in world mm; empty Keypoints without such a series."""
        result = Keypoints()
        chosen = cls.select(study, config)
        if chosen is None:
            return result
        series_id, stack = chosen
        coords, err, spread, context = cls.predict(models, config, stack, device)
        world = cls.decode(stack, context, coords, config)
        conf = confidence(err, spread)
        # a 2D model places points on its input slice: their depth is not an estimate
        normal = stack.normal if cls.n_dims == 2 else None
        for j, label in enumerate(config.points):
            result.set(label, world[j], conf[j], f"{cls.name}:{series_id}", normal)
        return result

    @classmethod
    def eval_normal(cls, study: Study, config) -> np.ndarray | None:
        """Stack normal whose component is left out of errors (in-plane models), or None."""
        return None
