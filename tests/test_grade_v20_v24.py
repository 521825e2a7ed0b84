"""Stage-2 families v20 (sagittal 3D ROIs) and v24 (axial + sagittal T2): inputs, models,
checkpoints, inference layout.

The in-memory studies below have analytic geometry, so the expected pixel of every world
point is known without the code under test: a one-pixel marker painted there must come
out at the centre of its crop (and, for v24's right side, mirrored).
"""

import dataclasses
import time

import numpy as np
import pandas as pd
import pytest
import torch
from stage2_phantom import phantom  # noqa: F401  (fixture)

from kernel_src import competition, crops, dicom, geometry, schema
from kernel_src.keypoints import Keypoints
from kernel_src.models import grade_v20, grade_v24, registry
from kernel_src.study import Series, Stack, Study

TINY = "mobilenetv3_small_050"
SAG_ORIGIN = np.array([-20.0, -40.0, 40.0])   # world mm of pixel (0, 0) of slice 0
SAG_GAP = 4.0                                  # mm between sagittal slices (+x)


def sagittal_stack(n=11, size=64):
    """Columns run +y (posterior), rows run -z (feet), slices +x; 1 mm pixels."""
    positions = SAG_ORIGIN[None] + np.arange(n)[:, None] * np.array([SAG_GAP, 0, 0])
    return Stack(np.zeros((n, size, size), np.uint8), positions,
                 np.array([0, 1, 0, 0, 0, -1], float), np.array([1.0, 1.0]),
                 np.arange(1, n + 1))


def sag_world(slice_index, col, row):
    return SAG_ORIGIN + np.array([slice_index * SAG_GAP, col, -row])


def axial_stack(n=20, size=64, row_cos_x=1.0, z0=-20.0):
    """Rows run +y (posterior); columns run +x (row_cos_x=1) or -x (row_cos_x=-1);
    slice k at world z = z0 + 2 k; 1 mm pixels; pixel (0, 0) at x = -32 * row_cos_x."""
    positions = np.stack([np.full(n, -32.0 * row_cos_x), np.full(n, -32.0),
                          z0 + 2.0 * np.arange(n)], axis=1)
    return Stack(np.zeros((n, size, size), np.uint8), positions,
                 np.array([row_cos_x, 0, 0, 0, 1, 0], float), np.array([1.0, 1.0]),
                 np.arange(1, n + 1))


def axial_pixel(stack, world):
    """(slice, col, row) of a world point in `axial_stack` geometry (analytic)."""
    row_cos_x = stack.orientation[0]
    col = (world[0] - stack.positions[0, 0]) * row_cos_x
    return int(round((world[2] - stack.positions[0, 2]) / 2.0)), col, world[1] + 32.0


def make_study(sag=True, axial_stacks=None):
    study = Study(1)
    if sag:
        study.series[10] = Series(1, 10, schema.SAG_T2, [sagittal_stack()])
        study.series[11] = Series(1, 11, schema.SAG_T1, [sagittal_stack()])
    if axial_stacks:
        study.series[12] = Series(1, 12, schema.AXIAL_T2, list(axial_stacks))
    return study


def paint(stack, slice_index, col, row, value=255):
    stack.pixels[slice_index, int(round(row)), int(round(col))] = value


def centroid(image):
    rows, cols = np.nonzero(image > 0.2 * image.max())
    weights = image[rows, cols]
    return np.average(cols, weights=weights), np.average(rows, weights=weights)


def v20_config(**kw):
    base = dict(backbone=TINY, size=17, crop_h=17, crop_w=17, dim=32, z_imgs=3)
    return grade_v20.V20Config(**{**base, **kw})


def v24_config(**kw):
    base = dict(axial_backbone=TINY, sag_backbone=TINY, size=17, crop_size=17, dim=32,
                sag_slices=3, sag_crop_h=9, sag_crop_w=17, sag_size_h=9, sag_size_w=17)
    return grade_v24.V24Config(**{**base, **kw})


# ---------------------------------------------------------------- v20 inputs
@pytest.mark.parametrize("target", ["spinal", "foraminal"])
def test_v20_crops_are_centred_on_their_points(target):
    study = make_study()
    series, conditions = grade_v20.TARGETS[target]
    stack = study.by_description(series)[0].stacks[0]
    kp = Keypoints()
    targets = {}
    for i, condition in enumerate(conditions):
        for j, level in enumerate(schema.LEVELS):
            sl, col, row = 2 + 5 * i + (j % 2), 20 + 4 * j, 12 + 9 * j
            paint(stack, sl, col, row)
            kp.set(schema.label_index(condition, level), sag_world(sl, col, row), 1.0, "test")
            targets[i, j] = sl
    inputs = grade_v20.V20.prepare_inputs(v20_config(target=target), study, kp)
    assert inputs["crops"].shape == (len(conditions), 5, 3, 17, 17)
    assert inputs["valid"].all()
    for (i, j), _ in targets.items():
        crop = inputs["crops"][i, j]
        # the marker is on the middle slice only, at the crop centre (8, 8)
        assert crop[1].max() > 0.9 and crop[0].max() < 0.5 and crop[2].max() < 0.5
        cx, cy = centroid(crop[1])
        assert abs(cx - 8) <= 1 and abs(cy - 8) <= 1


def test_v20_crop_size_is_resized_and_unusable_points_are_masked():
    study = make_study()
    kp = Keypoints()
    idx = [schema.label_index("spinal_canal_stenosis", lv) for lv in schema.LEVELS]
    kp.set(idx[0], sag_world(5, 30, 30), 1.0, "test")          # inside
    kp.set(idx[1], sag_world(5, 200, 30), 1.0, "test")         # outside the image
    kp.set(idx[2], sag_world(40, 30, 30), 1.0, "test")         # beyond the slices
    # idx[3], idx[4]: NaN
    stack = study.series[10].stacks[0]
    stack.pixels[:] = 100
    inputs = grade_v20.V20.prepare_inputs(v20_config(crop_h=24, crop_w=40, z_imgs=5),
                                          study, kp)
    assert inputs["crops"].shape == (1, 5, 5, 17, 17)
    np.testing.assert_array_equal(inputs["valid"][0], [1, 0, 0, 0, 0])
    assert np.allclose(inputs["crops"][0, 0], 100 / 255, atol=1e-3)
    assert not inputs["crops"][0, 1:].any()
    no_series = grade_v20.V20.prepare_inputs(v20_config(), make_study(sag=False), kp)
    assert not no_series["valid"].any() and not no_series["crops"].any()


def test_points_just_beyond_the_last_slice_use_the_end_slices():
    study = make_study()
    stack = study.series[10].stacks[0]                 # 11 slices, 0..10
    paint(stack, 10, 30, 30)
    kp = Keypoints()
    kp.set(0, sag_world(10.8, 30, 30), 1.0, "test")   # 0.3 slice beyond the half-slice edge
    kp.set(1, sag_world(11.8, 30, 30), 1.0, "test")   # 1.3 slices beyond: masked
    inputs = grade_v20.V20.prepare_inputs(v20_config(), study, kp)
    assert inputs["valid"][0, :2].tolist() == [1, 0]
    assert inputs["crops"][0, 0, 1].max() > 0.9
    strict = grade_v20.V20.prepare_inputs(v20_config(slice_margin=0.0), study, kp)
    assert strict["valid"][0, :2].tolist() == [0, 0]


def test_v20_training_augmentation_jitters_within_bounds():
    study = make_study()
    stack = study.series[10].stacks[0]
    paint(stack, 5, 30, 30)
    kp = Keypoints()
    kp.set(0, sag_world(5, 30, 30), 1.0, "test")
    rng = np.random.default_rng(0)
    centres = []
    for _ in range(12):
        crop = grade_v20.V20.prepare_inputs(v20_config(jitter_px=3.0), study, kp, rng=rng)
        centres.append(centroid(crop["crops"][0, 0, 1]))
    offsets = np.abs(np.array(centres) - 8)
    assert offsets.max() > 0.5          # something moved
    assert offsets.max() <= 3 * 1.1 + 1.5   # jitter bound, zoom and rotation slack


# ---------------------------------------------------------------- v24 inputs
@pytest.mark.parametrize("row_cos_x", [1.0, -1.0])
def test_v24_right_side_is_mirrored_onto_the_left(row_cos_x):
    """A marker 4 mm lateral of each subarticular point (patient's left of the left point,
    patient's right of the right point) lands on the same side of both canonical crops:
    columns increase towards lateral, whatever the stack's row direction."""
    stack = axial_stack(row_cos_x=row_cos_x)
    kp = Keypoints()
    for side, condition in enumerate(grade_v24.SIDES):
        lateral = 1.0 if side == 0 else -1.0          # +x world = patient left
        world = np.array([lateral * 10.0, 4.0, -10.0 + 4.0 * 2])   # level l3_l4
        kp.set(schema.label_index(condition, "l3_l4"), world, 1.0, "test")
        marker = world + np.array([lateral * 4.0, 0.0, 0.0])
        sl, col, row = axial_pixel(stack, marker)
        paint(stack, sl, col, row)
    inputs = grade_v24.V24.prepare_inputs(v24_config(), make_study(True, [stack]), kp)
    np.testing.assert_array_equal(inputs["axial_valid"][:, 2], [1, 1])
    assert inputs["axial_valid"].sum() == 2
    for side in (0, 1):
        cx, cy = centroid(inputs["axial"][side, 2, 1])
        assert abs(cx - (8 + 4)) <= 1 and abs(cy - 8) <= 1, (side, cx, cy)


def test_v24_posterior_is_down_and_sagittal_branch_is_centred():
    stack = axial_stack()
    flipped = dataclasses.replace(stack, pixels=stack.pixels.copy(),
                                  orientation=np.array([1, 0, 0, 0, -1, 0], float),
                                  positions=stack.positions * [1, -1, 1])
    kp = Keypoints()
    world = np.array([10.0, 4.0, 0.0])
    kp.set(schema.label_index("left_subarticular_stenosis", "l1_l2"), world, 1.0, "test")
    # marker 5 mm posterior of the point, in the stack with rows running anterior
    marker = world + [0, 5.0, 0]
    sl = int(round((marker[2] + 20) / 2))
    paint(flipped, sl, marker[0] + 32, 32 - marker[1])
    study = make_study(True, [flipped])
    sag = study.series[10].stacks[0]
    paint(sag, 6, 33, 25)
    kp.set(schema.label_index("spinal_canal_stenosis", "l1_l2"), sag_world(6, 33, 25), 1.0, "t")
    inputs = grade_v24.V24.prepare_inputs(v24_config(), study, kp)
    cx, cy = centroid(inputs["axial"][0, 0, 1])
    assert abs(cx - 8) <= 1 and abs(cy - (8 + 5)) <= 1
    assert inputs["sag_valid"].tolist() == [1, 0, 0, 0, 0]
    cx, cy = centroid(inputs["sag"][0, 1])
    assert abs(cx - 8) <= 1 and abs(cy - 4) <= 1


def test_v24_picks_the_stack_that_contains_the_point():
    low, high = axial_stack(n=10, z0=-40.0), axial_stack(n=10, z0=10.0)   # z -40..-22, 10..28
    kp = Keypoints()
    world = np.array([10.0, 0.0, 14.3])
    kp.set(schema.label_index("left_subarticular_stenosis", "l2_l3"), world, 1.0, "test")
    sl, col, row = axial_pixel(high, world)
    paint(high, sl, col, row)
    inputs = grade_v24.V24.prepare_inputs(v24_config(), make_study(False, [low, high]), kp)
    assert inputs["axial_valid"][0, 1] == 1 and inputs["axial"][0, 1, 1].max() > 0.9
    point = grade_v24.locate_axial_point([low, high], world)
    assert point.stack is high
    # outside both slabs: masked
    kp.set(schema.label_index("left_subarticular_stenosis", "l2_l3"), [10, 0, -5.0], 1, "t")
    inputs = grade_v24.V24.prepare_inputs(v24_config(), make_study(False, [low, high]), kp)
    assert inputs["axial_valid"][0, 1] == 0 and not inputs["axial"][0, 1].any()


# ---------------------------------------------------------------- models
FAMILY_CASES = [
    ("v20", v20_config(target="spinal")),
    ("v20", v20_config(target="foraminal", slice_mode="gru", z_imgs=5)),
    ("v24", v24_config()),
    ("v24", v24_config(axial_mode="channels", z_imgs=5, flip_tta=False)),
]


def random_inputs(family, config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    kp = Keypoints()
    study = make_study(True, [axial_stack()])
    for stack in (s for series in study.series.values() for s in series.stacks):
        stack.pixels[:] = rng.integers(0, 255, stack.pixels.shape, dtype=np.uint8)
    kp.world[:] = [0.0, 0.0, 0.0]   # inside every stack of this study
    kp.world[::3] = np.nan
    cls = registry.get_family(family)
    items = [cls.prepare_inputs(config, study, kp) for _ in range(batch)]
    return study, kp, {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}


@pytest.mark.parametrize("family,config", FAMILY_CASES)
def test_family_forward_and_checkpoint_round_trip(tmp_path, family, config):
    torch.manual_seed(0)
    model = registry.build_model(family, config).eval()
    study, kp, batch = random_inputs(family, config)
    cls = registry.get_family(family)
    grid = cls.label_indices(config).shape
    with torch.no_grad():
        out = model(**batch)
    assert out.shape == (2, *grid, 3) and torch.isfinite(out).all()
    path = registry.save_checkpoint(tmp_path / "fold0.pt", family, config, model, {"score": 1})
    loaded, loaded_config, payload = registry.load_checkpoint(path)
    assert loaded_config == config and payload["family"] == family
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), out)
    logits = cls.infer([model, loaded], config, study, kp, "cpu")
    graded = np.zeros(schema.N_LABELS, bool)
    graded[cls.label_indices(config).ravel()] = True
    assert logits.shape == (25, 3)
    assert np.isfinite(logits[graded]).all() and np.isnan(logits[~graded]).all()


def test_missing_inputs_use_the_learned_vector_not_the_pixels():
    config = v20_config()
    model = registry.build_model("v20", config).eval()
    crops = torch.rand(1, 1, 5, 3, 17, 17)
    valid = torch.ones(1, 5)
    valid[0, 2] = 0
    with torch.no_grad():
        a = model.encoder(crops[0, 0], valid[0])
        b = model.encoder(torch.zeros_like(crops[0, 0]), valid[0])
    torch.testing.assert_close(a[2], model.encoder.missing)
    torch.testing.assert_close(a[2], b[2])
    assert not torch.allclose(a[0], b[0])


def test_flip_tta_averages_the_mirrored_view():
    config = v20_config()
    model = registry.build_model("v20", config).eval()
    study, kp, _ = random_inputs("v20", config)
    with_tta = grade_v20.V20.infer([model], config, study, kp)
    without = grade_v20.V20.infer([model], dataclasses.replace(config, flip_tta=False), study, kp)
    inputs = grade_v20.V20.prepare_inputs(config, study, kp)
    batch = {k: torch.as_tensor(v)[None] for k, v in inputs.items()}
    with torch.no_grad():
        mirrored = model(batch["crops"].flip(-1), batch["valid"])[0].numpy()
    idx = grade_v20.V20.label_indices(config).ravel()
    np.testing.assert_allclose(with_tta[idx], (without[idx] + mirrored.reshape(-1, 3)) / 2,
                               atol=1e-5)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="target"):
        grade_v20.V20Config(target="subarticular")
    with pytest.raises(ValueError, match="z_imgs"):
        grade_v20.V20Config(z_imgs=4)
    with pytest.raises(ValueError, match="axial_mode"):
        grade_v24.V24Config(axial_mode="lstm")


def mirrored_study(study):
    """The same study mirrored through the mid-sagittal plane (world x -> -x): slices are
    re-sorted along +x, columns that ran along +x now run along -x."""
    out = Study(study.study_id)
    flip = np.array([-1.0, 1.0, 1.0])
    for sid, series in study.series.items():
        stacks = []
        for st in series.stacks:
            orientation = st.orientation * np.tile(flip, 2)
            positions = st.positions * flip
            normal = np.cross(orientation[:3], orientation[3:])
            order = np.argsort(positions @ (normal if normal[np.argmax(abs(normal))] > 0
                                            else -normal))
            stacks.append(Stack(st.pixels[order].copy(), positions[order], orientation,
                                st.pixel_spacing, st.instance_numbers[order]))
        out.series[sid] = Series(series.study_id, sid, series.description, stacks)
    return out


@pytest.mark.parametrize("family,config", FAMILY_CASES)
def test_mirror_inputs_equal_the_inputs_of_the_mirrored_study(family, config):
    from kernel_src.models.grade_common import LR_SWAP

    study, kp, _ = random_inputs(family, config, batch=1, seed=3)
    kp.world[:] = np.random.default_rng(1).uniform(-8, 8, (25, 3))
    mirrored_kp = Keypoints(kp.world[LR_SWAP] * [-1.0, 1.0, 1.0])
    cls = registry.get_family(family)
    expected = cls.mirror_inputs(config, cls.prepare_inputs(config, study, kp))
    got = cls.prepare_inputs(config, mirrored_study(study), mirrored_kp)
    assert set(got) == set(expected)
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)
    assert any(got[k].any() for k in got if "valid" not in k)


# ---------------------------------------------------------------- phantom
TINY_V20 = dict(backbone="test_resnet", crop_unit="mm", crop_h=50.0, crop_w=50.0, size=32,
                dim=32, jitter_px=1.0)
TINY_V24 = dict(axial_backbone="test_resnet", sag_backbone="test_resnet", crop_unit="mm",
                crop_size=50.0, size=32, sag_slices=5, sag_crop_h=30.0, sag_crop_w=50.0,
                sag_size_h=16, sag_size_w=32, dim=32, jitter_px=1.0)


def phantom_studies(phantom, n=3):  # noqa: F811
    """The first n phantom studies as read from DICOM, with truth landmarks as Keypoints."""
    names = competition.series_by_study(competition.load_series_descriptions(
        phantom / "train_series_descriptions.csv"))
    landmarks = pd.read_csv(phantom / "truth" / "landmarks.csv")
    for sid in sorted(names)[:n]:
        kp = Keypoints()
        for row in landmarks[landmarks["study_id"] == sid].itertuples(index=False):
            index = schema.label_index(schema.TITLE_TO_CONDITION[row.condition],
                                       schema.TITLE_TO_LEVEL[row.level])
            kp.set(index, (row.x, row.y, row.z), 1.0, "truth")
        yield dicom.read_study(phantom / "train_images", sid, names[sid]), kp


def with_ramps(study, axis):
    """A copy of the study whose pixels hold their own column ("x"), row ("y") or slice
    ("z") index as float32, so a crop's centre pixel reports where it sampled."""
    out = Study(study.study_id)
    for sid, series in study.series.items():
        stacks = []
        for st in series.stacks:
            s, h, w = st.shape
            grids = np.meshgrid(np.arange(s), np.arange(h), np.arange(w), indexing="ij")
            ramp = grids[{"z": 0, "y": 1, "x": 2}[axis]].astype(np.float32)
            stacks.append(dataclasses.replace(st, pixels=ramp))
        out.series[sid] = Series(series.study_id, sid, series.description, stacks)
    return out


def expected_projection(stacks, world):
    """(nearest slice, x, y) in the stack that contains the point with the least off-plane
    distance (geometry only); None when no stack contains it."""
    found = []
    for st in stacks:
        z, x, y = (float(v) for v in geometry.world_to_pixel(st, world))
        nearest, px, py, off = geometry.project_to_stack(st, world)
        n, h, w = st.shape
        if -0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5 and -0.5 <= z <= n - 0.5:
            found.append((float(off), int(nearest), float(px), float(py)))
    return min(found)[1:] if found else None


def test_phantom_crops_centre_on_projected_truth_landmarks(phantom):  # noqa: F811
    """On the phantom's real geometry (oblique stacks, several axial stacks), every crop of
    both families around a truth landmark is centred within one pixel of the landmark's
    projection, on its nearest slice; right-side axial crops too (mirroring keeps the
    centre). Odd output sizes put a pixel exactly on the centre."""
    v20s = [grade_v20.V20Config(**{**TINY_V20, "size": 21, "target": t})
            for t in grade_v20.TARGETS]
    v24 = grade_v24.V24Config(**{**TINY_V24, "size": 21, "sag_size_h": 11, "sag_size_w": 21})
    checked = 0
    for study, kp in phantom_studies(phantom):
        ramps = {axis: with_ramps(study, axis) for axis in "xyz"}
        cases = []   # (inputs key, crop index, series, label index)
        for cfg in v20s:
            series, conditions = grade_v20.TARGETS[cfg.target]
            got = {a: grade_v20.V20.prepare_inputs(cfg, ramps[a], kp)["crops"] for a in "xyz"}
            for i, c in enumerate(conditions):
                for j, lv in enumerate(schema.LEVELS):
                    cases.append((got, (i, j), series, schema.label_index(c, lv)))
        got = {a: grade_v24.V24.prepare_inputs(v24, ramps[a], kp)["axial"] for a in "xyz"}
        for side, c in enumerate(grade_v24.SIDES):
            for j, lv in enumerate(schema.LEVELS):
                cases.append((got, (side, j), schema.AXIAL_T2, schema.label_index(c, lv)))
        for got, where, series, index in cases:
            expected = expected_projection(crops.series_stacks(study, series), kp.world[index])
            if expected is None:
                continue
            crop = {a: got[a][where] for a in "xyz"}
            mid, centre = crop["x"].shape[0] // 2, crop["x"].shape[-1] // 2
            assert crop["z"][mid, centre, centre] == pytest.approx(expected[0], abs=1e-3)
            assert abs(crop["x"][mid, centre, centre] - expected[1]) < 1.0, (index, expected)
            assert abs(crop["y"][mid, centre, centre] - expected[2]) < 1.0, (index, expected)
            checked += 1
    assert checked >= 60   # of 3 x 35 crops; the rest lie outside their series (quirks)


def test_phantom_inputs_and_missing_series(phantom):  # noqa: F811
    study, kp = next(phantom_studies(phantom))
    v24 = grade_v24.V24Config(**TINY_V24)
    inputs = grade_v24.V24.prepare_inputs(v24, study, kp)
    assert inputs["axial_valid"].sum() >= 8 and inputs["sag_valid"].all()
    assert inputs["axial"][inputs["axial_valid"] == 1].std() > 0.05
    study.series = {k: s for k, s in study.series.items() if s.description != schema.SAG_T2}
    no_t2 = grade_v24.V24.prepare_inputs(v24, study, kp)
    assert not no_t2["sag_valid"].any() and not no_t2["sag"].any()
    np.testing.assert_array_equal(no_t2["axial"], inputs["axial"])
    spinal = grade_v20.V20.prepare_inputs(grade_v20.V20Config(**TINY_V20), study, kp)
    assert not spinal["valid"].any()
    model = registry.build_model("v20", grade_v20.V20Config(**TINY_V20))
    logits = grade_v20.V20.infer([model], grade_v20.V20Config(**TINY_V20), study, kp)
    assert np.isfinite(logits[:5]).all()     # masked inputs still give a defined output


TRAINING_CASES = [
    ("v20", {**TINY_V20, "target": "spinal"}, "spinal"),
    ("v20", {**TINY_V20, "target": "foraminal"}, "foraminal"),
    ("v24", TINY_V24, "subarticular"),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,config,group", TRAINING_CASES)
def test_short_training_beats_class_priors_on_its_labels(phantom, tmp_path, family,  # noqa: F811
                                                          config, group):
    from kernel_src.training.train_stage2 import train_fold

    start = time.time()
    metrics = train_fold(dict(
        data_dir=str(phantom), cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"),
        family=family, config=config, fold=0, n_folds=4, epochs=12, lr=2e-3, batch_size=4,
        device="cpu", num_threads=1))
    elapsed = time.time() - start
    oof = pd.read_csv(metrics["checkpoint"].replace(".pt", ".csv").replace("fold0", "oof_fold0"))
    graded = registry.get_family(family).label_indices(
        registry.config_from_dict(family, config)).ravel()
    assert set(oof["label"]) == {schema.LABEL_COLUMNS[i] for i in graded}
    assert metrics["oof_metric"][group] < metrics["prior_metric"][group], metrics
    assert elapsed < 90, f"training took {elapsed:.0f} s"
