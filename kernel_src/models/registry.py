"""Registry of model families, in the spirit of timm's `register_model`.

A family is a class decorated with `@register_family`, holding:
- `name`: the registry key (also stored in checkpoints and the manifest);
- `stage`: 1 (keypoints) or 2 (grading);
- `Config`: a frozen dataclass of everything needed to rebuild the model and its inputs;
- `build(config) -> nn.Module` (staticmethod);
- the input preparation and output decoding used by BOTH training and the kernel
  (family-specific methods; see each family's module).

Checkpoints are plain dicts `{"family", "config", "state_dict", "metrics"}` so a model is
rebuilt from the file (or the manifest) alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Class decorator: add a family to the registry under `cls.name`."""
    for attr in ("name", "stage", "Config", "build"):
        if not hasattr(cls, attr):
            raise TypeError(f"family {cls.__name__} lacks {attr!r}")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"family {cls.name}: Config must be a dataclass")
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise ValueError(f"family {cls.name!r} registered twice")
    FAMILIES[cls.name] = cls
    return cls


def get_family(name: str) -> type:
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES)) or "none registered"
        raise KeyError(f"unknown model family {name!r} (known: {known})")
    return FAMILIES[name]


def config_from_dict(family: str, values: dict[str, Any]):
    """Rebuild a family's Config from a dict; unknown keys are an error naming them."""
    cfg_cls = get_family(family).Config
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"family {family!r}: unknown config field(s) {unknown}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cfg_cls(**fixed)


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def build_model(family: str, config) -> nn.Module:
    if isinstance(config, dict):
        config = config_from_dict(family, config)
    return get_family(family).build(config)


def save_checkpoint(path: str | Path, family: str, config, model: nn.Module,
                    metrics: dict[str, Any] | None = None) -> Path:
    """Write `{"family", "config", "state_dict", "metrics"}` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    payload = {
        "family": family,
        "config": config_to_dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint: returns (model in eval mode, config, payload)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("family", "config", "state_dict"):
        if key not in payload:
            raise ValueError(f"checkpoint {path}: missing key {key!r}")
    config = inference_config(config_from_dict(payload["family"], payload["config"]))
    model = build_model(payload["family"], config)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), config, payload


# Config fields that only say where a backbone's STARTING weights came from in training.
_INIT_FIELDS = {"pretrained": False, "weights_path": None}


def inference_config(config):
    """The config with its initial-weights fields neutralised (`pretrained=False`,
    `weights_path=None`): a model rebuilt from a checkpoint takes every weight from the
    state dict, so it never reaches for a hub (no internet on Kaggle) or for a local file
    of the training machine."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {k: v for k, v in _INIT_FIELDS.items() if k in names}
    return dataclasses.replace(config, **changes) if changes else config


# The inference contract each family class implements (used by the kernel and by the
# out-of-fold prediction of training; see docs/ARCHITECTURE.md):
#   stage 1: Family.infer(models, config, study, device) -> keypoints.Keypoints
#   stage 2: Family.infer(models, config, study, keypoints, device) -> np.ndarray (25, 3)
#            logits, rows the family does not predict are NaN.
# `models` is the list of fold models of one manifest entry (their outputs are averaged),
# `study` a `study.Study` whose stacks hold uint8 pixels from `preprocess.normalize_study`.
