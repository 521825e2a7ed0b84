"""The phantom's DICOM writer produces valid files whose pixels and geometry read back."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from kernel_src.synthetic.dicom_writer import TRANSFER_SYNTAXES, write_stack

ORIENTATION = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])  # sagittal


def _stack(n=3, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 900, (n, h, w))
    positions = np.array([[-10.0 + 3.5 * i, -40.25, 60.125] for i in range(n)])
    return pixels, positions


def _write(tmp_path, pixels, positions, **kwargs):
    args = dict(study_id=4003253, series_id=702807833, description="Sagittal T1",
                instance_numbers=[7, 8, 9], slice_thickness=3.0)
    args.update(kwargs)
    return write_stack(tmp_path / "s", pixels, positions, ORIENTATION, (0.625, 0.75), **args)


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("monochrome1", [False, True])
def test_pixels_and_geometry_read_back(tmp_path, syntax, monochrome1):
    pixels, positions = _stack()
    rescale = (0.5, -100.0)
    paths = _write(tmp_path, pixels, positions, transfer_syntax=syntax,
                   monochrome1=monochrome1, rescale=rescale)
    assert [p.name for p in paths] == ["7.dcm", "8.dcm", "9.dcm"]
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        stored = ds.pixel_array.astype(np.float64)
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
        if monochrome1:
            stored = 65535 - stored
        value = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(value, pixels[i], atol=0.5 * rescale[0] + 1e-9)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], positions[i])
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], ORIENTATION)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.625, 0.75])
        assert float(ds.SpacingBetweenSlices) == pytest.approx(3.5)
        assert float(ds.SliceThickness) == 3.0
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (6, 5, 16, 0)
        assert ds.InstanceNumber == 7 + i
        assert ds.SeriesDescription == "Sagittal T1"
        assert ds.PatientID == "4003253"


def test_uids_deterministic_and_distinct(tmp_path):
    pixels, positions = _stack()
    a = [pydicom.dcmread(p) for p in _write(tmp_path / "a", pixels, positions)]
    b = [pydicom.dcmread(p) for p in _write(tmp_path / "b", pixels, positions)]
    c = pydicom.dcmread(_write(tmp_path / "c", pixels, positions, series_id=1)[0])
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert len({d.SOPInstanceUID for d in a}) == 3
    assert a[0].StudyInstanceUID == c.StudyInstanceUID
    assert a[0].SeriesInstanceUID != c.SeriesInstanceUID
    given = pydicom.dcmread(_write(tmp_path / "d", pixels, positions, series_uid="1.2.3")[0])
    assert given.SeriesInstanceUID == "1.2.3"


def test_no_rescale_tags_without_rescale(tmp_path):
    pixels, positions = _stack()
    ds = pydicom.dcmread(_write(tmp_path, np.rint(pixels), positions)[0])
    assert "RescaleSlope" not in ds
    np.testing.assert_array_equal(ds.pixel_array, np.rint(pixels[0]))


def test_invalid_inputs_are_rejected(tmp_path):
    pixels, positions = _stack()
    with pytest.raises(ValueError, match="0..65535"):
        _write(tmp_path, pixels - 500, positions)
    with pytest.raises(ValueError, match="not unique"):
        _write(tmp_path, pixels, positions, instance_numbers=[1, 1, 2])
    with pytest.raises(ValueError, match="transfer_syntax"):
        _write(tmp_path, pixels, positions, transfer_syntax="jpeg")
    with pytest.raises(ValueError, match=r"\(S, H, W\)"):
        _write(tmp_path, pixels[:2], positions)
