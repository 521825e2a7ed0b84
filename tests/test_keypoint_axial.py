"""The axial keypoint families: build, forward, checkpoints, decoding, datasets, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from axial_phantom import make_studies, make_study

from kernel_src.models import registry
from kernel_src.models.axial_points import SUBARTICULAR, from_unit, to_model_range
from kernel_src.models.keypoint_axial3d import Axial3D
from kernel_src.models.keypoint_axial_level import AxialLevel, build_sequence, decode_z
from kernel_src.training.axial_data import (
    Axial3DDataset,
    AxialExample,
    AxialLevelDataset,
    axial3d_loss,
    axial_level_loss,
    collate_level,
    level_targets,
)

TINY_3D = Axial3D.Config(backbone="resnet10t", depth=32, height=32, width=32)
TINY_LEVEL = AxialLevel.Config(backbone="resnet10t", image_size=32, hidden=32,
                               regressor_backbone="resnet10t", regressor_size=32)


@pytest.fixture(scope="module")
def studies():
    return make_studies(3, seed=1)


def examples(pairs):
    return [AxialExample(study, truth) for study, truth in pairs]


@pytest.mark.parametrize("family,config", [("axial3d", TINY_3D), ("axial_level", TINY_LEVEL)])
def test_registered_build_infer_and_checkpoint_roundtrip(tmp_path, studies, family, config):
    cls = registry.get_family(family)
    assert cls.stage == 1 and cls.name == family
    torch.manual_seed(0)
    model = registry.build_model(family, config).eval()
    study = studies[2][0]  # two stacks
    kp = cls.infer([model], config, study, "cpu")
    assert kp.known[SUBARTICULAR].all() and kp.known.sum() == 10
    assert ((kp.confidence[SUBARTICULAR] >= 0) & (kp.confidence[SUBARTICULAR] <= 1)).all()
    path = registry.save_checkpoint(tmp_path / "fold0.pt", family, config, model, {"score": 1.0})
    loaded, cfg, payload = registry.load_checkpoint(path)
    assert cfg == config and payload["metrics"]["score"] == 1.0
    again = cls.infer([loaded], cfg, study, "cpu")
    np.testing.assert_allclose(again.world[SUBARTICULAR], kp.world[SUBARTICULAR], atol=1e-4)
    assert again.source[SUBARTICULAR[0]].startswith(family + ":")


def test_axial3d_prepared_volume_and_decoding_agree_with_world(studies):
    """A bright voxel at a world point, after prepare_volume, decodes back to that point."""
    study, truth = studies[0]
    stack = next(iter(study.series.values())).stacks[0]
    stack.pixels = np.zeros_like(stack.pixels)
    uvw, present = Axial3D.encode_points(stack, truth)
    assert present.all()
    S, H, W = stack.pixels.shape
    s, x, y = (int(round(from_unit(uvw[3, i], n))) for i, n in ((2, S), (0, W), (1, H)))
    stack.pixels[s, y, x] = 255
    cfg = Axial3D.Config(depth=S * 2, height=H * 2, width=W * 2)
    vol = Axial3D.prepare_volume(stack, cfg)[0].astype(float)  # (H, W, D)
    grid = np.stack(np.meshgrid(*(np.arange(n) + 0.5 for n in vol.shape), indexing="ij"))
    centroid = (grid * vol).reshape(3, -1).sum(1) / vol.sum()  # (row, col, depth) + 0.5
    found = Axial3D.decode_points(
        stack, [centroid[1] / (2 * W), centroid[0] / (2 * H), centroid[2] / (2 * S)])
    exact = Axial3D.decode_points(stack, uvw[3])
    assert np.linalg.norm(exact - truth[3]) < 1e-3  # float32 unit coordinates
    on_voxel = Axial3D.decode_points(stack, [(x + 0.5) / W, (y + 0.5) / H, (s + 0.5) / S])
    assert np.linalg.norm(found - on_voxel) < 0.1 * min(stack.pixel_spacing)
    assert np.linalg.norm(on_voxel - truth[3]) <= np.linalg.norm(
        [*stack.pixel_spacing, np.diff(stack.positions[:2, 2])[0]]) / 2


def test_axial_level_sequence_is_world_ordered_and_decodes(studies):
    study, truth = studies[2]
    seq = build_sequence(study, TINY_LEVEL)
    assert np.all(np.diff(seq.z) >= 0) and len(seq.z) == len(seq.refs)
    stacks_z = np.concatenate(seq.slice_z)
    assert seq.z.min() == stacks_z.min() and seq.z.max() == stacks_z.max()
    assert np.max(np.diff(seq.z)) <= 2 * TINY_LEVEL.z_spacing
    n = len(seq.z)
    j = 7  # a known point: a sharp distribution at its nearest position decodes near it
    i = int(np.argmin(np.abs(seq.z - truth[j, 2])))
    probs = np.full((n, 10), 1e-6)
    probs[i, j] = 1.0
    levels = np.zeros((n, 6))
    levels[:, j % 5] = 1.0
    z, conf = decode_z(levels, probs / probs.sum(0), seq.z, 6.0)
    assert abs(z[j] - seq.z[i]) < 1e-3 and conf[j] > 0.99
    k, s = seq.locate(truth[j, 2])
    assert abs(seq.slice_z[k][int(round(s))] - truth[j, 2]) <= 2.5


def test_level_targets_window_and_unknown_levels():
    z = np.array([0.0, 3.0, 6.0, 30.0, 60.0])
    lv = level_targets(z, np.array([60.0, 30.0, 0.0, np.nan, np.nan]), 4.5)
    assert lv.tolist() == [2, 2, -100, 1, 0]
    lv = level_targets(z, np.array([60.0, 30.0, 0.0, -30.0, -60.0]), 4.5)
    assert lv.tolist() == [2, 2, 5, 1, 0]


def test_axial3d_flip_keeps_points_on_their_dots():
    """After a flipped item, the left target sits on the left dot of the flipped image."""
    study, truth = make_study(1, np.random.default_rng(3), size=48)
    ds = Axial3DDataset([AxialExample(study, truth)], Axial3D.Config(depth=48, height=48, width=48),
                        augment=True, max_shift=0.0)
    torch.manual_seed(0)
    for _ in range(6):
        item = ds[0]
        vol = item["volume"][0]  # (H, W, D)
        for j in (0, 5):
            u, v, w = item["uvw"][j].tolist()
            col, row, dep = (int(from_unit(a, 48).round()) for a in (u, v, w))
            patch = vol[row - 1: row + 2, col - 1: col + 2, dep]
            assert patch.max() > vol[..., dep].mean() + 0.5, (j, u, v, w)


def test_level_dataset_batches_and_losses(studies):
    ds = AxialLevelDataset(examples(studies), TINY_LEVEL, augment=True)
    batch = collate_level([ds[0], ds[1], ds[2]])
    assert batch["slices"].shape[:2] == batch["mask"].shape == batch["level"].shape
    assert torch.allclose(batch["points"].sum(1)[batch["point_valid"] > 0],
                          torch.ones(int(batch["point_valid"].sum())), atol=1e-4)
    model = AxialLevel.build(TINY_LEVEL)
    loss = axial_level_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.regressor.conv1[0].weight.grad is not None
    ds3 = Axial3DDataset(examples(studies), TINY_3D, augment=True)
    items = [ds3[i] for i in range(len(ds3))]
    batch3 = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    assert torch.isfinite(axial3d_loss(Axial3D.build(TINY_3D), batch3))
    assert to_model_range(np.array([0, 255])).tolist() == [-1.0, 1.0]
