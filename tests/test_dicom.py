"""DICOM reader: stacks by orientation, spatial sort, pixel conversion, bad files."""

import shutil
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from kernel_src import dicom
from kernel_src.dicom import DicomReadError, read_series, read_study
from kernel_src.synthetic.dicom_writer import write_stack

SAGITTAL = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])  # raw normal r x c = -x
AXIAL_TILTED = np.array([1.0, 0.0, 0.0, 0.0, np.cos(0.3), -np.sin(0.3)])


def _sagittal(series_dir, instance_numbers, xs=(-6.0, -2.0, 2.0, 6.0), **kwargs):
    """Slice i lies at world x = xs[i] and has constant value 100 * (i + 1)."""
    pixels = np.stack([np.full((8, 6), 100.0 * (i + 1)) for i in range(len(xs))])
    positions = np.array([[x, -30.0, 40.0] for x in xs])
    args = dict(study_id=1, series_id=2, description="Sagittal T2/STIR",
                instance_numbers=instance_numbers, slice_thickness=4.0)
    args.update(kwargs)
    write_stack(series_dir, pixels, positions, SAGITTAL, (0.5, 0.5), **args)
    return pixels, positions


@pytest.mark.parametrize("instances", [[1, 2, 3, 4], [4, 3, 2, 1], [3, 1, 4, 2]])
def test_slices_sorted_along_normal_not_by_instance(tmp_path, instances):
    pixels, positions = _sagittal(tmp_path / "2", instances)
    (stack,) = read_series(tmp_path / "2").stacks
    np.testing.assert_allclose(stack.normal, [1.0, 0.0, 0.0])
    along = stack.positions @ stack.normal
    assert np.all(np.diff(along) > 0)
    np.testing.assert_allclose(stack.positions, positions)  # written in ascending x
    np.testing.assert_array_equal(stack.instance_numbers, instances)
    np.testing.assert_allclose(stack.pixels[:, 0, 0], pixels[:, 0, 0])
    assert stack.pixels.dtype == np.float32


def test_shuffled_write_order_and_ids(tmp_path):
    xs = (9.0, -3.0, 5.0, 1.0)
    _sagittal(tmp_path / "77" / "88", [10, 11, 12, 13], xs=xs)
    series = read_series(tmp_path / "77" / "88")
    (stack,) = series.stacks
    np.testing.assert_allclose(stack.positions[:, 0], sorted(xs))
    np.testing.assert_array_equal(stack.instance_numbers, [11, 13, 12, 10])
    assert (series.study_id, series.series_id, series.description) == (
        77, 88, "Sagittal T2/STIR")


@pytest.mark.parametrize("monochrome1", [False, True])
@pytest.mark.parametrize("rescale", [None, (0.25, -50.0)])
def test_monochrome1_and_rescale_round_trip(tmp_path, monochrome1, rescale):
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 400, (3, 7, 5))
    positions = np.array([[0.0, 0.0, z] for z in (0.0, 3.0, 6.0)])
    write_stack(tmp_path, pixels, positions, AXIAL_TILTED, (0.7, 0.7), study_id=1,
                series_id=2, description="Axial T2", instance_numbers=[1, 2, 3],
                slice_thickness=3.0, monochrome1=monochrome1, rescale=rescale)
    (stack,) = read_series(tmp_path).stacks
    step = 1.0 if rescale is None else rescale[0]
    np.testing.assert_allclose(stack.pixels, pixels, atol=step / 2 + 1e-4)


def test_several_orientations_become_several_stacks(tmp_path):
    rng = np.random.default_rng(2)
    second = np.array([1.0, 0.0, 0.0, 0.0, np.cos(-0.2), -np.sin(-0.2)])
    for orientation, instances, z0 in ((AXIAL_TILTED, [1, 2, 3], 0.0), (second, [4, 5], 50.0)):
        n = len(instances)
        positions = np.array([[-20.0, -20.0, z0 + 4.0 * i] for i in range(n)])[::-1]
        write_stack(tmp_path, rng.uniform(0, 100, (n, 6, 6)), positions, orientation,
                    (1.0, 1.0), study_id=1, series_id=2, description="Axial T2",
                    instance_numbers=instances, slice_thickness=4.0)
    stacks = read_series(tmp_path).stacks
    assert [s.shape[0] for s in stacks] == [3, 2]
    np.testing.assert_allclose(stacks[0].orientation, AXIAL_TILTED, atol=1e-6)
    np.testing.assert_allclose(stacks[1].orientation, second, atol=1e-6)
    for s in stacks:
        assert np.all(np.diff(s.positions @ s.normal) > 0)
    np.testing.assert_array_equal(stacks[0].instance_numbers, [3, 2, 1])


def test_odd_shaped_slice_resized_with_geometry(tmp_path):
    """A half-resolution slice of the same field of view: resized to the stack shape, its
    pixels land where a world-linear ramp says they should."""
    grad = np.array([0.0, 3.0, -2.0])  # intensity = 500 + grad . world

    def ramp(position, spacing, shape):
        ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
        world = (position + xs[..., None] * spacing * SAGITTAL[:3]
                 + ys[..., None] * spacing * SAGITTAL[3:])
        return 500.0 + world @ grad

    corner = np.array([0.0, -10.0, 20.0])  # field-of-view corner, 16 x 16 mm
    positions = [corner + [x, 0.5, -0.5] for x in (0.0, 4.0, 8.0)]
    pixels = np.stack([ramp(p, 1.0, (16, 16)) for p in positions])
    write_stack(tmp_path, pixels, positions, SAGITTAL, (1.0, 1.0), study_id=1, series_id=2,
                description="", instance_numbers=[1, 2, 3], slice_thickness=4.0,
                transfer_syntax="explicit_le")
    odd_position = corner + [4.0, 1.0, -1.0]  # centre of a 2 mm pixel
    write_stack(tmp_path, ramp(odd_position, 2.0, (8, 8))[None], [odd_position], SAGITTAL,
                (2.0, 2.0), study_id=1, series_id=2, description="", instance_numbers=[2],
                slice_thickness=4.0)
    with pytest.warns(UserWarning, match=r"2\.dcm.*resized"):
        (stack,) = read_series(tmp_path).stacks
    assert stack.shape == (3, 16, 16)
    np.testing.assert_allclose(stack.pixel_spacing, [1.0, 1.0])
    np.testing.assert_allclose(stack.positions[1], positions[1], atol=1e-6)
    expected = ramp(stack.positions[1], 1.0, (16, 16))
    np.testing.assert_allclose(stack.pixels[1, 1:-1, 1:-1], expected[1:-1, 1:-1], atol=0.6)


def test_unreadable_file_skipped_with_warning(tmp_path):
    _sagittal(tmp_path, [1, 2, 3, 4])
    (tmp_path / "5.dcm").write_bytes(b"not a dicom file")
    with pytest.warns(UserWarning, match=r"5\.dcm"):
        (stack,) = read_series(tmp_path).stacks
    assert stack.shape[0] == 4


def test_no_readable_slice_is_an_error_naming_the_directory(tmp_path):
    with pytest.raises(DicomReadError, match=str(tmp_path)):
        read_series(tmp_path)
    (tmp_path / "1.dcm").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DicomReadError, match=r"1\.dcm"):
        read_series(tmp_path)


MR_SMALL = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
            "MR_small_expb.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_jp2klossless.dcm", "MR_small_padded.dcm"]


@pytest.mark.parametrize("name", MR_SMALL)
def test_pydicom_bundled_files_decode(tmp_path, name):
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    shutil.copy(get_testdata_file(name), tmp_path / "1.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (stack,) = read_series(tmp_path).stacks
    assert not [w for w in caught if "skipping" in str(w.message)]
    np.testing.assert_array_equal(stack.pixels[0], reference.pixel_array.astype(np.float32))
    np.testing.assert_allclose(stack.positions[0], [-83.9063, -91.2, 6.6406])
    np.testing.assert_allclose(stack.pixel_spacing, [0.3125, 0.3125])


def test_missing_decoder_is_named(tmp_path, monkeypatch):
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    monkeypatch.setattr(JPEGLSLosslessDecoder, "_available", {})
    monkeypatch.setattr(JPEGLSLosslessDecoder, "_unavailable",
                        {"pylibjpeg": ("pylibjpeg-libjpeg>=2.1",)})
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "1.dcm")
    with pytest.warns(UserWarning, match="JPEG-LS"), \
            pytest.raises(DicomReadError, match="pylibjpeg-libjpeg"):
        read_series(tmp_path)


def test_read_study_reads_each_file_once(tmp_path, monkeypatch):
    images = tmp_path / "train_images"
    _sagittal(images / "5" / "20", [1, 2, 3, 4])
    _sagittal(images / "5" / "3", [4, 3, 2, 1], series_id=3, description="in the file")
    (images / "5" / "9").mkdir()
    (images / "5" / "9" / "1.dcm").write_bytes(b"broken series")
    calls = []
    real = dicom.pydicom.dcmread
    monkeypatch.setattr(dicom.pydicom, "dcmread",
                        lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = read_study(images, 5, {20: "Sagittal T1"})
    messages = [str(w.message) for w in caught]
    assert any("9/1.dcm" in m and "unreadable" in m for m in messages)
    assert any(m.startswith("skipping series") and "5/9" in m for m in messages)
    assert len(calls) == 9 and len(set(calls)) == 9
    assert sorted(study.series) == [3, 20]
    assert study.series[20].description == "Sagittal T1"
    assert study.series[3].description == "in the file"
    assert study.by_description("Sagittal T1")[0].series_id == 20
    with pytest.raises(FileNotFoundError, match="6"):
        read_study(images, 6, {})
