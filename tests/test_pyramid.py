"""The top-down feature pyramid of the soft-argmax keypoint heads (models/pyramid.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kernel_src.models import registry
from kernel_src.models.axial_points import feature_map_backbone
from kernel_src.models.backbones import create_backbone_2d, create_backbone_3d
from kernel_src.models.keypoint_axial3d import Axial3D
from kernel_src.models.keypoint_sag2d import Sag2D
from kernel_src.models.keypoint_sag3d import Sag3D
from kernel_src.models.pyramid import pyramid_backbone
from kernel_src.training.axial_data import axial3d_loss
from kernel_src.training.keypoint_eval import results_table


@pytest.mark.parametrize("create,shape", [(create_backbone_2d, (1, 1, 64, 64)),
                                          (create_backbone_3d, (1, 1, 64, 64, 32))])
def test_one_map_at_the_first_stage_stride(create, shape):
    model, width = pyramid_backbone(create, "resnet10t", 1, 24, 1)
    maps = model.eval()(torch.randn(shape))
    assert width == 24 and len(maps) == 1
    assert maps[0].shape == (1, 24, *[n // 4 for n in shape[2:]])  # stage 1: stride 4


def test_fine_map_sees_the_whole_image_only_with_the_pyramid():
    """A corner cell of the stride-2 map reacts to a change 24+ px away (10x the stem's
    receptive field) through the coarse stages; the plain stride-2 map cannot."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 64)
    far = x.clone()
    far[..., 24:, 24:] += 3.0

    def corner_change(model):
        model.eval()
        with torch.no_grad():
            a, b = model(x)[-1], model(far)[-1]
        return (a[..., :2, :2] - b[..., :2, :2]).abs().max().item()

    with_pyramid, _ = feature_map_backbone(create_backbone_2d, "resnet10t", 2, 1, pyramid=16)
    plain, _ = feature_map_backbone(create_backbone_2d, "resnet10t", 2, 1)
    assert corner_change(with_pyramid) > 1e-4
    assert corner_change(plain) == 0.0


@pytest.mark.parametrize("family,overrides,shape", [
    (Sag2D, {"image_size": 64, "feature_stage": 1}, (2, 1, 64, 64)),
    (Sag3D, {"image_size": 64, "depth": 32, "feature_stage": 1}, (2, 1, 64, 64, 32)),
    (Axial3D, {"image_size": 64, "depth": 32, "feature_stride": 2}, (2, 1, 64, 64, 32)),
])
def test_families_with_a_pyramid_build_run_and_roundtrip(tmp_path, family, overrides, shape):
    config = dataclasses.replace(family.Config(), backbone="resnet10t", head="soft_argmax",
                                 pyramid=16, **overrides)
    torch.manual_seed(0)
    model = registry.build_model(family.name, config).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    path = registry.save_checkpoint(tmp_path / "m.pt", family.name, config, model)
    again, cfg, _ = registry.load_checkpoint(path)
    assert cfg == config
    with torch.no_grad():
        assert torch.allclose(again(x), out, atol=1e-6)


def test_sagittal_pyramid_needs_a_feature_stage():
    config = dataclasses.replace(Sag2D.Config(), backbone="resnet10t", head="soft_argmax",
                                 pyramid=16)
    with pytest.raises(ValueError, match="feature_stage"):
        Sag2D.build(config)


def test_axial3d_heatmap_loss_adds_a_term_and_trains():
    config = dataclasses.replace(Axial3D.Config(), backbone="resnet10t", image_size=32,
                                 depth=32, head="soft_argmax", feature_stride=4, pyramid=8)
    torch.manual_seed(0)
    model = Axial3D.build(config)
    batch = {"volume": torch.randn(2, 1, 32, 32, 32), "uvw": torch.rand(2, 10, 3),
             "present": torch.ones(2, 10), "known": torch.ones(2, 10)}
    plain = axial3d_loss(config)(model, batch)
    with_heat = axial3d_loss(dataclasses.replace(config, heatmap_weight=1.0))(model, batch)
    assert with_heat.item() > plain.item() > 0
    with_heat.backward()
    assert model.heat.weight.grad.abs().sum() > 0


def test_results_table_reads_stage1_metrics_and_flags_targets(tmp_path):
    def write(run, folds):
        path = tmp_path / run / "resnet10t" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(folds))

    def result(model_mm, base_mm, acc):
        return {"model": {"all": {"n": 10, "median_mm": model_mm, "p90_mm": 2 * model_mm,
                                  "level_acc": acc}},
                "baseline": {"all": {"n": 10, "median_mm": base_mm, "p90_mm": 2 * base_mm,
                                     "level_acc": 0.5}},
                "train": {"seconds": 30.0}}

    write("sag3d_t1", {"fold0": result(2.0, 5.0, 1.0), "fold1": result(3.0, 5.0, 1.0)})
    write("axial3d", {"fold0": result(2.0, 5.0, 0.9)})
    write("v2", {"fold0": {"score": 0.4}})  # a stage-2 run: no baseline, not listed
    table = results_table(tmp_path).set_index(["run", "fold"])
    assert len(table) == 3
    assert table.loc[("sag3d_t1", "fold0"), "ratio"] == pytest.approx(2.5)
    assert table.loc[("sag3d_t1", "fold0"), "ok"]
    assert not table.loc[("sag3d_t1", "fold1"), "ok"]  # 1.67x
    assert not table.loc[("axial3d", "fold0"), "ok"]   # level accuracy 0.9
