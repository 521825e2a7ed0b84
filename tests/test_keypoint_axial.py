"""The axial keypoint families: build, forward, checkpoints, decoding, datasets, training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from axial_phantom import make_studies, make_study

from kernel_src.geometry import pixel_to_world, world_to_pixel
from kernel_src.models import registry
from kernel_src.models.axial_points import SUBARTICULAR, from_unit, to_model_range
from kernel_src.models.axial_sequence import build_sequence
from kernel_src.models.keypoint_axial3d import Axial3D
from kernel_src.models.keypoint_axial_level import AxialLevel, decode_positions
from kernel_src.schema import N_LABELS
from kernel_src.training import train_keypoint
from kernel_src.training.axial_data import (
    Axial3DDataset,
    AxialLevelDataset,
    axial3d_loss,
    axial_level_loss,
    collate_level,
    level_targets,
    point_targets,
)
from kernel_src.training.keypoint_data import KeypointExample

TINY_3D = Axial3D.Config(backbone="resnet10t", depth=32, image_size=32)
TINY_LEVEL = AxialLevel.Config(backbone="resnet10t", image_size=32, hidden=32,
                               regressor_backbone="resnet10t", regressor_size=32)


@pytest.fixture(scope="module")
def studies():
    return make_studies(3, seed=1)


def example(study, truth) -> KeypointExample:
    """The 25-point training example of a phantom study (only subarticular points known)."""
    world = np.full((N_LABELS, 3), np.nan)
    world[SUBARTICULAR] = truth
    series = np.full(N_LABELS, -1)
    series[SUBARTICULAR] = next(iter(study.series))
    return KeypointExample(study, world, series)


def examples(pairs):
    return [example(study, truth) for study, truth in pairs]


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


def test_sequence_point_encoding_roundtrips_to_world(studies):
    """Known world points -> (u, v, g) on the grid -> world again, exactly, also across the
    two stacks of a split series."""
    for study, truth in studies:
        seq = build_sequence(study, 3.0, 128, 40)
        ug, ok = seq.encode(truth)
        assert ok.all()
        world, _ = seq.decode(ug)
        np.testing.assert_allclose(world, truth, atol=1e-6)


def test_sequence_is_world_ordered_and_dense(studies):
    study, _ = studies[2]  # two stacks
    seq = build_sequence(study, 3.0, 128, 32)
    assert np.all(np.diff(seq.z) >= 0) and len(seq.z) == len(seq.refs)
    stacks_z = np.concatenate(seq.slice_z)
    assert seq.z.min() == stacks_z.min() and seq.z.max() == stacks_z.max()
    assert np.max(np.diff(seq.z)) <= 2 * seq.step and {k for k, _ in seq.refs} == {0, 1}
    assert seq.images().shape == (len(seq), 3, 32, 32)


def test_axial3d_prepared_volume_and_decoding_agree_with_world(studies):
    """A bright voxel in a stack, after the family's input preparation, decodes back to the
    world position of that voxel (centroid of the resampled blob, within 0.1 pixel)."""
    study, truth = studies[0]
    stack = next(iter(study.series.values())).stacks[0]
    stack.pixels = np.zeros_like(stack.pixels)
    S, H, W = stack.pixels.shape
    s, x, y = (int(round(float(v))) for v in world_to_pixel(stack, truth[3]))
    stack.pixels[s, y, x] = 255
    dz = float(np.diff(stack.positions[:, 2]).mean())
    cfg = Axial3D.Config(depth=S * 2, image_size=H * 2, z_spacing=dz)
    seq = Axial3D.sequence(study, cfg)
    assert len(seq) == S
    vol = Axial3D.prepare_volume(seq, cfg)[0].astype(float)  # (H, W, D)
    grid = np.stack(np.meshgrid(*(np.arange(n) + 0.5 for n in vol.shape), indexing="ij"))
    centroid = (grid * vol).reshape(3, -1).sum(1) / vol.sum()  # (row, col, depth) + 0.5
    found, _ = Axial3D.decode_points(seq, [centroid[1] / (2 * W), centroid[0] / (2 * H),
                                           centroid[2] / (2 * S)])
    voxel = pixel_to_world(stack, s, x, y)
    assert np.linalg.norm(found[0] - voxel) < 0.1 * min(stack.pixel_spacing)
    target, present = Axial3D.encode_points(seq, truth)
    assert present.all()
    back, _ = Axial3D.decode_points(seq, target)
    np.testing.assert_allclose(back, truth, atol=1e-3)  # float32 unit coordinates


def test_level_decoding_and_targets():
    n = 20
    probs = np.full((n, 10), 1e-9)
    probs[7, 3], probs[8, 3] = 0.75, 0.25
    probs /= probs.sum(0)
    levels = np.zeros((n, 6))
    levels[:, 3] = 1.0
    g, conf = decode_positions(levels, probs, 2.0)
    assert abs(g[3] - 7.25) < 1e-6 and conf[3] > 0.99 and conf[4] < 1e-6
    lv = level_targets(5, np.array([4.0, 3.0, 0.0, np.nan, np.nan]), 0.5)
    assert lv.tolist() == [2, -100, -100, 1, 0]
    lv = level_targets(5, np.array([4.0, 3.0, 0.0, -3.0, -6.0]), 0.5)
    assert lv.tolist() == [2, 5, 5, 1, 0]
    w, valid = point_targets(6, np.array([2.0, np.nan, 9.0] + [1.0] * 7), 1.0)
    assert valid.tolist()[:3] == [True, False, False] and np.argmax(w[:, 0]) == 2
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)


def test_axial3d_flip_keeps_points_on_their_dots():
    """Augmented items (flip, affine): every target sits on a dot, and the left point keeps
    the larger column (image columns run towards patient left), so a flip swapped sides."""
    study, truth = make_study(1, np.random.default_rng(3), size=48)
    ds = Axial3DDataset([example(study, truth)], Axial3D.Config(depth=48, image_size=48),
                        augment=True)
    torch.manual_seed(0)
    for _ in range(6):
        item = ds[0]
        vol = item["volume"][0]  # (H, W, D)
        for j in (0, 5):
            u, v, w = item["uvw"][j].tolist()
            col, row, dep = (int(from_unit(a, 48).round()) for a in (u, v, w))
            patch = vol[row - 1: row + 2, col - 1: col + 2, dep]
            assert patch.max() > vol[..., dep].mean() + 0.5, (j, u, v, w)
        assert item["uvw"][0, 0] > item["uvw"][5, 0]


def test_level_dataset_batches_and_losses(studies):
    ds = AxialLevelDataset(examples(studies), TINY_LEVEL, augment=True)
    batch = collate_level([ds[0], ds[1], ds[2]])
    for _ in range(4):
        item = ds[0]
        ok = item["xy_valid"][:, 0] > 0
        assert ok.any() and (item["xy"][ok, 0] > item["xy"][ok, 2]).all()
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
    assert torch.isfinite(axial3d_loss(TINY_3D)(Axial3D.build(TINY_3D), batch3))
    assert to_model_range(np.array([0, 255])).tolist() == [-1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("family,config,epochs", [
    ("axial3d", Axial3D.Config(backbone="resnet10t", depth=32, image_size=48,
                               head="soft_argmax", feature_stride=8), 8),
    ("axial_level", AxialLevel.Config(backbone="resnet10t", image_size=32, hidden=32,
                                      regressor_backbone="resnet10t", regressor_size=48), 8),
])
def test_short_training_beats_the_mean_shape_baseline(tmp_path, family, config, epochs):
    """The family's trainer through the shared pipeline (loop, evaluation, checkpoint, OOF):
    held-out median error below the mean-shape baseline's on the in-memory phantom."""
    pairs = make_studies(16, seed=11)
    train_ex, valid_ex = examples(pairs[:12]), examples(pairs[12:])
    p = train_keypoint.resolve_params({"family": family, "out_dir": str(tmp_path),
                                       "epochs": epochs, "batch_size": 2, "lr": 2e-3,
                                       "device": "cpu", "resume": False})
    torch.manual_seed(0)
    result = train_keypoint._train_variant(registry.get_family(family),
                                           train_keypoint.get_trainer(family), config, family,
                                           p, train_ex, valid_ex, "cpu")
    model, base = result["model"]["all"], result["baseline"]["all"]
    assert model["n"] == 40 and base["n"] == 40
    assert model["median_mm"] < base["median_mm"], (model, base)
    oof = pd.read_csv(tmp_path / family / "resnet10t" / "oof_fold0.csv")
    assert len(oof) == 40 and oof["confidence"].between(0, 1).all()
