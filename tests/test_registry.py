"""Model registry: checkpoints rebuild a model from the file alone, offline."""

import dataclasses

import torch

from kernel_src.models import registry, zoo  # noqa: F401
from kernel_src.models.keypoint_sag2d import Sag2D


def test_checkpoint_rebuilds_without_initial_weights_sources(tmp_path):
    """A model trained from timm's ImageNet weights or a local file of the training
    machine rebuilds from its checkpoint alone: no hub, no missing file."""
    config = Sag2D.Config(backbone="test_resnet", image_size=32)
    model = Sag2D.build(config)
    trained_with = dataclasses.replace(config, pretrained=True,
                                       weights_path=str(tmp_path / "gone/imagenet.pth"))
    path = registry.save_checkpoint(tmp_path / "fold0.pt", "sag2d", trained_with, model)
    rebuilt, cfg, payload = registry.load_checkpoint(path)
    assert cfg.pretrained is False and cfg.weights_path is None
    assert payload["config"]["weights_path"].endswith("imagenet.pth")  # history kept
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_unknown_config_field_is_an_error_naming_it():
    try:
        registry.config_from_dict("sag2d", {"backbone": "x", "nonsense": 1})
    except ValueError as err:
        assert "nonsense" in str(err)
    else:
        raise AssertionError("unknown field accepted")
