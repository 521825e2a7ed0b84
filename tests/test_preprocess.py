"""Normalisation, exact-geometry resizing and the resumable, atomic stack cache."""

import numpy as np
import pandas as pd
import pytest

from kernel_src import preprocess
from kernel_src.dicom import read_study
from kernel_src.geometry import pixel_to_world, resized_pixel, world_to_pixel
from kernel_src.preprocess import (
    build_cache,
    load_cached_study,
    normalize_stack,
    normalize_study,
    read_index,
    resize_volume,
    resized_geometry,
    source_shapes,
)
from kernel_src.study import Stack
from kernel_src.synthetic.dicom_writer import write_stack

OBLIQUE = np.array([0.0, np.cos(0.2), np.sin(0.2), 0.1, -np.sin(0.2), -np.cos(0.2)])
OBLIQUE[3:] -= OBLIQUE[:3] * (OBLIQUE[:3] @ OBLIQUE[3:])
OBLIQUE[3:] /= np.linalg.norm(OBLIQUE[3:])


def _ramp_stack(shape=(6, 24, 40), spacing=(0.7, 0.45), grad=(2.0, -1.0, 0.5)):
    """Oblique stack whose intensity is a linear function of world position."""
    positions = np.array([[4.0 * i - 5.0, -20.0, 30.0] for i in range(shape[0])])
    stack = Stack(np.zeros(shape, np.float32), positions, OBLIQUE.copy(),
                  np.array(spacing), np.arange(1, shape[0] + 1))
    s, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    stack.pixels = (500.0 + pixel_to_world(stack, s, x, y) @ np.array(grad)).astype(np.float32)
    return stack, np.array(grad)


@pytest.mark.parametrize("target", [(12, 20), (48, 80), (30, 16)])
def test_resize_keeps_world_geometry_and_content(target):
    stack, grad = _ramp_stack()
    volume = resize_volume(stack.pixels, target)
    positions, spacing = resized_geometry(stack, target)
    resized = Stack(volume, positions, stack.orientation, spacing, stack.instance_numbers)
    # a world point keeps its world position through both pixel grids
    rng = np.random.default_rng(0)
    world = pixel_to_world(stack, rng.uniform(0, 5, 50), rng.uniform(0, 39, 50),
                           rng.uniform(0, 23, 50))
    s0, x0, y0 = world_to_pixel(stack, world)
    s1, x1, y1 = world_to_pixel(resized, world)
    np.testing.assert_allclose(s1, s0, atol=1e-9)
    np.testing.assert_allclose(pixel_to_world(resized, s1, x1, y1), world, atol=1e-9)
    np.testing.assert_allclose(np.stack([x1, y1]), np.stack(
        resized_pixel(x0, y0, stack.shape[1:], target)), atol=1e-9)
    # and cv2's pixels agree with that geometry: the ramp is still the world ramp inside
    s, y, x = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    expected = 500.0 + pixel_to_world(resized, s, x, y) @ grad
    np.testing.assert_allclose(volume[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=0.05)


def test_normalize_stack_uint8_percentiles():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(100, 200, (4, 32, 32)).astype(np.float32)
    pixels[0, 0, 0] = 1e6  # an outlier must not squash the rest
    stack = Stack(pixels, np.zeros((4, 3)), OBLIQUE.copy(), np.array([1.0, 1.0]),
                  np.arange(4))
    out = normalize_stack(stack)
    assert out.pixels.dtype == np.uint8 and out.shape == stack.shape
    assert out.pixels.min() == 0 and out.pixels.max() == 255
    lo, hi = np.percentile(pixels, (1, 99.5))
    inside = (pixels > lo) & (pixels < hi)
    expected = (pixels[inside] - lo) / (hi - lo) * 255
    assert np.abs(out.pixels[inside] - expected).max() <= 0.5 + 1e-3
    assert np.median(out.pixels) == pytest.approx(127, abs=8)
    flat = normalize_stack(Stack(np.full((2, 4, 4), 7.0, np.float32), np.zeros((2, 3)),
                                 OBLIQUE.copy(), np.ones(2), np.arange(2)), size=8)
    assert flat.pixels.shape == (2, 8, 8) and not flat.pixels.any()


def _competition(tmp_path):
    """2 studies: a sagittal series, a two-stack axial series, a broken series."""
    data = tmp_path / "data"
    images = data / "train_images"
    rng = np.random.default_rng(0)
    sag = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    write_stack(images / "1" / "10", rng.uniform(0, 900, (3, 40, 32)),
                [[x, -30.0, 40.0] for x in (4.0, 0.0, -4.0)], sag, (0.5, 0.6), study_id=1,
                series_id=10, description="Sagittal T1", instance_numbers=[1, 2, 3],
                slice_thickness=4.0)
    for orient, instances, z in (([1, 0, 0, 0, 1, 0], [1, 2], 0.0),
                                 ([1, 0, 0, 0, 0.995, -0.0998], [3, 4], 40.0)):
        write_stack(images / "1" / "11", rng.uniform(0, 900, (2, 30, 30)),
                    [[-20.0, -20.0, z], [-20.0, -20.0, z + 4]], orient, (0.8, 0.8),
                    study_id=1, series_id=11, description="Axial T2",
                    instance_numbers=instances, slice_thickness=4.0)
    write_stack(images / "2" / "20", rng.uniform(0, 900, (2, 36, 36)),
                [[x, -30.0, 40.0] for x in (0.0, 4.0)], sag, (0.5, 0.5), study_id=2,
                series_id=20, description="Sagittal T2/STIR", instance_numbers=[2, 1],
                slice_thickness=4.0)
    (images / "2" / "21").mkdir(parents=True)
    (images / "2" / "21" / "1.dcm").write_bytes(b"not dicom")
    pd.DataFrame({"study_id": [1, 1, 2, 2], "series_id": [10, 11, 20, 21],
                  "series_description": ["Sagittal T1", "Axial T2", "Sagittal T2/STIR",
                                         "Axial T2"]}).to_csv(
        data / "train_series_descriptions.csv", index=False)
    return data


@pytest.mark.filterwarnings("ignore:skipping")
def test_cache_matches_reader_and_is_resumable(tmp_path, capsys):
    data, cache = _competition(tmp_path), tmp_path / "cache"
    summary = build_cache(data, cache, "train", size=16, workers=1)
    assert (summary["cached"], summary["already"], summary["failed"]) == (3, 0, 1)
    assert "skipped bad series" in capsys.readouterr().err.replace("\n", " ")
    index = read_index(cache, "train")
    assert list(zip(index.series_id, index["stack"], strict=True)) == [
        (10, 0), (11, 0), (11, 1), (20, 0)]
    assert (index.height == 16).all() and list(index.n_slices) == [3, 2, 2, 2]
    assert list(index.source_height) == [40, 30, 30, 36]
    for study_id in (1, 2):
        raw = read_study(data / "train_images", study_id, {})
        expected = normalize_study(raw, 16)
        cached = load_cached_study(cache, "train", study_id)
        assert sorted(cached.series) == sorted(expected.series)
        for sid, series in expected.series.items():
            assert cached.series[sid].description == series.description
            for a, b in zip(cached.series[sid].stacks, series.stacks, strict=True):
                np.testing.assert_array_equal(a.pixels, b.pixels)
                np.testing.assert_allclose(a.positions, b.positions)
                np.testing.assert_allclose(a.pixel_spacing, b.pixel_spacing)
                np.testing.assert_array_equal(a.instance_numbers, b.instance_numbers)
    assert source_shapes(index, 1) == {(10, 0): (40, 32), (11, 0): (30, 30), (11, 1): (30, 30)}
    files = sorted((cache / "train").rglob("*.npz"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = build_cache(data, cache, "train", size=16, workers=1)
    assert (again["cached"], again["already"], again["failed"]) == (0, 3, 1)
    assert sorted((cache / "train").rglob("*.npz")) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    resized = build_cache(data, cache, "train", size=8, workers=1)  # new size: redone
    assert resized["cached"] == 3 and (read_index(cache, "train").height == 8).all()


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    data, cache = _competition(tmp_path), tmp_path / "cache"

    def interrupted(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(preprocess.np, "savez_compressed", interrupted)
    summary = build_cache(data, cache, "train", size=16)
    assert summary["failed"] == 4 and summary["cached"] == 0
    leftovers = [p for p in (cache / "train").rglob("*") if p.is_file()]
    assert [p.name for p in leftovers] == ["index.csv"]
    assert read_index(cache, "train").empty
    monkeypatch.undo()
    assert build_cache(data, cache, "train", size=16)["cached"] == 3


def test_cli_with_worker_processes(tmp_path, capsys):
    data, cache = _competition(tmp_path), tmp_path / "cache"
    assert preprocess.main(["--data", str(data), "--out", str(cache), "--size", "12",
                            "--workers", "2"]) == 0
    out = capsys.readouterr()
    assert "cached 3 series, 0 already cached, 1 failed" in out.out
    assert "2/21" in out.err
    index = read_index(cache, "train")
    assert len(index) == 4 and (index.width == 12).all()
    study = load_cached_study(cache, "train", 2)
    assert study.series[20].description == "Sagittal T2/STIR"
    assert study.series[20].stacks[0].pixels.dtype == np.uint8
    with pytest.raises(KeyError, match="study 3"):
        load_cached_study(cache, "train", 3)
