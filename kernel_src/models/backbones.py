"""timm / timm_3d backbone construction: never downloads unless asked.

`pretrained=False` is the default everywhere; the kernel always uses it. Training may ask
for timm's ImageNet weights (`pretrained=True`, needs internet) or give a local weights
file (`weights_path`), which is always accepted and loaded non-strictly (the classifier
head and first conv may differ).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _load_local(model: nn.Module, weights_path: str | Path) -> nn.Module:
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"backbone weights {path}: no tensor matches the model")
    model.load_state_dict(usable, strict=False)
    return model


def create_backbone_2d(name: str, in_chans: int, num_classes: int = 0,
                       pretrained: bool = False, weights_path: str | None = None,
                       **kwargs) -> nn.Module:
    """A timm 2D model; `num_classes=0` gives pooled features (`.num_features` wide).

    Input (B, in_chans, H, W).
    """
    import timm

    model = timm.create_model(name, pretrained=bool(pretrained), in_chans=in_chans,
                              num_classes=num_classes, **kwargs)
    return _load_local(model, weights_path) if weights_path else model


def create_backbone_3d(name: str, in_chans: int, num_classes: int = 0,
                       pretrained: bool = False, weights_path: str | None = None,
                       **kwargs) -> nn.Module:
    """A timm_3d model. Input (B, in_chans, H, W, D): depth LAST, as timm_3d expects."""
    import timm  # noqa: F401  (timm_3d needs timm imported first)
    import timm_3d

    model = timm_3d.create_model(name, pretrained=bool(pretrained), in_chans=in_chans,
                                 num_classes=num_classes, **kwargs)
    return _load_local(model, weights_path) if weights_path else model
