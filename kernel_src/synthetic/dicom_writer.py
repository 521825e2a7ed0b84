"""Write one stack of MR slices as a valid DICOM series (pydicom 3).

Used by the phantom generator and by the reader tests. Each slice becomes
`{series_dir}/{instance_number}.dcm`, MR Image Storage, 16-bit unsigned stored values.
Geometry follows DICOM: `positions` are ImagePositionPatient (centre of pixel (0, 0), LPS mm),
`orientation` is ImageOrientationPatient (row cosines, column cosines), `pixel_spacing` is
PixelSpacing = (row spacing, column spacing) mm.

Stored values: `stored = (v - intercept) / slope` rounded (identity without `rescale`); for
MONOCHROME1 the stored value is inverted as `65535 - stored`, so a reader that inverts in
stored space (`2**BitsStored - 1 - stored`) and then rescales recovers `v` exactly
(up to the rounding to integers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

TRANSFER_SYNTAXES = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "rle": RLELossless,
}
STORED_MAX = 65535  # BitsStored = 16, unsigned


def _ds(values) -> list[str]:
    """Decimal String values at the full precision that fits in 16 characters."""
    return [format_number_as_ds(float(v)) for v in np.ravel(values)]


def _uid(*parts) -> str:
    """A deterministic UID from the given identifiers."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def to_stored(pixels: np.ndarray, rescale, monochrome1: bool, where: str) -> np.ndarray:
    """(S, H, W) float physical values -> (S, H, W) uint16 stored values; ValueError if out of range."""
    v = np.asarray(pixels, dtype=np.float64)
    if rescale is not None:
        slope, intercept = rescale
        if slope == 0:
            raise ValueError(f"{where}: rescale slope must be non-zero")
        v = (v - intercept) / slope
    v = np.rint(v)
    if not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > STORED_MAX:
        raise ValueError(
            f"{where}: stored values must lie in 0..{STORED_MAX} after rescale, "
            f"got {np.nanmin(v)}..{np.nanmax(v)}"
        )
    if monochrome1:
        v = STORED_MAX - v
    return v.astype(np.uint16)


def _slice_spacing(positions: np.ndarray, orientation: np.ndarray) -> float | None:
    """Median distance (mm) between consecutive slices along the normal, None for one slice."""
    if len(positions) < 2:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.sort(positions @ normal)
    return float(np.median(np.diff(along)))


def _base_dataset(meta: dict) -> Dataset:
    """Patient/study/series/image-plane attributes shared by all slices of one call."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.PatientID = str(meta["study_id"])
    ds.PatientName = f"phantom^{meta['study_id']}"
    ds.StudyID = str(meta["study_id"])[:16]
    ds.StudyInstanceUID = meta["study_uid"]
    ds.SeriesInstanceUID = meta["series_uid"]
    ds.FrameOfReferenceUID = _uid("frame", meta["study_id"])
    ds.SeriesDescription = meta["description"]
    ds.ImageOrientationPatient = _ds(meta["orientation"])
    ds.PixelSpacing = _ds(meta["pixel_spacing"])
    ds.SliceThickness = _ds([meta["slice_thickness"]])[0]
    if meta["spacing_between_slices"] is not None:
        ds.SpacingBetweenSlices = _ds([meta["spacing_between_slices"]])[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if meta["monochrome1"] else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if meta["rescale"] is not None:
        ds.RescaleSlope = _ds([meta["rescale"][0]])[0]
        ds.RescaleIntercept = _ds([meta["rescale"][1]])[0]
        ds.RescaleType = "US"
    return ds


def _write_slice(path: Path, base: Dataset, image: np.ndarray, position, instance: int,
                 sop_uid: str, syntax: str) -> None:
    """Write one slice (H, W) uint16 with its own position and instance number."""
    ds = base.copy()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = TRANSFER_SYNTAXES[syntax]
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = _ds(position)
    ds.Rows, ds.Columns = image.shape
    if syntax == "rle":
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = image.astype("<u2").tobytes()
        ds.compress(RLELossless, image, generate_instance_uid=False)
    else:
        # pydicom writes OW bytes as given: big endian needs big-endian bytes.
        ds.PixelData = image.astype(">u2" if syntax == "explicit_be" else "<u2").tobytes()
        ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


def write_stack(series_dir, pixels, positions, orientation, pixel_spacing, *, study_id,
                series_id, description, instance_numbers, slice_thickness,
                spacing_between_slices=None, monochrome1=False, rescale=None,
                study_uid=None, series_uid=None, transfer_syntax="explicit_le") -> list[Path]:
    """Write a stack of S slices as `{series_dir}/{instance}.dcm`; returns the paths.

    pixels: (S, H, W) float physical intensities; positions: (S, 3) LPS mm (pixel (0, 0)
    centre); orientation: (6,) ImageOrientationPatient; pixel_spacing: (row, col) mm;
    instance_numbers: (S,) unique ints; rescale: (slope, intercept) or None;
    spacing_between_slices: mm, computed from the positions when None (S > 1);
    transfer_syntax: one of TRANSFER_SYNTAXES. UIDs default to deterministic values from the
    ids. Several stacks of one series = several calls with disjoint instance numbers (an
    existing file with the same instance number is overwritten).
    """
    series_dir = Path(series_dir)
    pixels = np.asarray(pixels)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    orientation = np.asarray(orientation, dtype=np.float64).reshape(6)
    instance_numbers = np.asarray(instance_numbers, dtype=np.int64).reshape(-1)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"{series_dir}: transfer_syntax {transfer_syntax!r} not in "
                         f"{sorted(TRANSFER_SYNTAXES)}")
    if pixels.ndim != 3 or not len(pixels) == len(positions) == len(instance_numbers):
        raise ValueError(f"{series_dir}: need pixels (S, H, W), positions (S, 3), instance "
                         f"numbers (S,); got {pixels.shape}, {positions.shape}, "
                         f"{instance_numbers.shape}")
    if len(np.unique(instance_numbers)) != len(instance_numbers):
        raise ValueError(f"{series_dir}: instance numbers are not unique: {instance_numbers}")
    stored = to_stored(pixels, rescale, monochrome1, str(series_dir))
    if spacing_between_slices is None:
        spacing_between_slices = _slice_spacing(positions, orientation)
    base = _base_dataset({
        "study_id": study_id, "description": description, "orientation": orientation,
        "pixel_spacing": pixel_spacing, "slice_thickness": slice_thickness,
        "spacing_between_slices": spacing_between_slices, "monochrome1": monochrome1,
        "rescale": rescale, "study_uid": study_uid or _uid("study", study_id),
        "series_uid": series_uid or _uid("series", study_id, series_id),
    })
    series_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, position, instance in zip(stored, positions, instance_numbers, strict=True):
        path = series_dir / f"{int(instance)}.dcm"
        sop_uid = _uid("sop", study_id, series_id, int(instance))
        _write_slice(path, base, image, position, instance, sop_uid, transfer_syntax)
        paths.append(path)
    return paths
