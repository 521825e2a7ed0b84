"""Read DICOM series into stacks of parallel slices, sorted along the stack normal.

`read_series` reads every `*.dcm` file of a series directory once (pixels included) and:
- groups the slices into stacks by ImageOrientationPatient: a slice joins the first stack
  whose reference orientation differs by at most `ORIENTATION_TOLERANCE` in every cosine;
  stacks are ordered by their smallest instance number;
- sorts each stack along its sign-canonical normal (`Stack.normal`) by the projection of
  ImagePositionPatient, never by instance number (ties broken by instance number);
- converts pixels to float32 "physical" values: MONOCHROME1 is inverted in stored-value
  space (`min + max - stored`, e.g. `65535 - stored` for unsigned 16 bit), then
  RescaleSlope/RescaleIntercept are applied;
- resizes a slice whose (H, W) differs from the stack's majority shape to that shape
  (bilinear, pixel centres aligned) assuming it covers the same field of view; its
  ImagePositionPatient is moved to the centre of the new pixel (0, 0) and a warning names
  the file. The stack's pixel spacing is the majority slices' spacing;
- skips unreadable files (not DICOM, no pixels, missing geometry, missing decoder) with a
  `warnings.warn` naming each file and the reason; a directory without any readable slice
  raises `DicomReadError` naming the directory and the first failure.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom

from .study import Series, Stack, Study

ORIENTATION_TOLERANCE = 1e-2  # max |difference| of direction cosines within one stack


class DicomReadError(RuntimeError):
    """A series or study directory without any readable slice."""


@dataclass
class _Slice:
    path: Path
    pixels: np.ndarray  # (H, W) float32
    position: np.ndarray  # (3,) mm
    orientation: np.ndarray  # (6,)
    pixel_spacing: np.ndarray  # (2,) (row, col) mm
    instance_number: int
    description: str


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise ValueError(f"missing {keyword}")
    out = np.asarray([float(v) for v in value], dtype=np.float64)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise ValueError(f"{keyword} must be {n} finite numbers, got {value!r}")
    return out


def physical_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """(H, W) float32 pixels of a single-frame grey-level slice: MONOCHROME1 inverted,
    then rescale slope/intercept applied. Raises if the pixels cannot be decoded (the
    pydicom message names the missing decoder plugins)."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("only single-frame grey-level images are supported")
    stored = ds.pixel_array.astype(np.float32)
    if stored.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {stored.shape}")
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (
            0, 2**bits - 1)
        stored = np.float32(lo + hi) - stored
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        stored = stored * np.float32(slope) + np.float32(intercept)
    return stored


def _read_slice(path: Path) -> _Slice:
    """Read one file fully (once); raises on anything that makes it unusable."""
    ds = pydicom.dcmread(path)
    return _Slice(
        path=path,
        pixels=physical_pixels(ds),
        position=_floats(ds, "ImagePositionPatient", 3),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
        description=str(ds.get("SeriesDescription", "")),
    )


def _group_by_orientation(slices: list[_Slice]) -> list[list[_Slice]]:
    """Slices grouped by orientation (greedy, within ORIENTATION_TOLERANCE)."""
    groups: list[list[_Slice]] = []
    for s in slices:
        for group in groups:
            if np.max(np.abs(group[0].orientation - s.orientation)) <= ORIENTATION_TOLERANCE:
                group.append(s)
                break
        else:
            groups.append([s])
    return sorted(groups, key=lambda g: min(s.instance_number for s in g))


def _resize_slice(s: _Slice, shape: tuple[int, int]) -> np.ndarray:
    """Resize one odd-shaped slice to `shape` (same field of view, pixel centres aligned);
    moves its position to the centre of the new pixel (0, 0). Returns (H, W) float32."""
    (h0, w0), (h1, w1) = s.pixels.shape, shape
    warnings.warn(f"{s.path}: slice shape {(h0, w0)} resized to the stack shape {shape}",
                  stacklevel=3)
    x0, y0 = 0.5 * w0 / w1 - 0.5, 0.5 * h0 / h1 - 0.5  # old pixel coords of new (0, 0)
    row_spacing, col_spacing = s.pixel_spacing
    s.position = (s.position + x0 * col_spacing * s.orientation[:3]
                  + y0 * row_spacing * s.orientation[3:])
    return cv2.resize(s.pixels, (w1, h1), interpolation=cv2.INTER_LINEAR)


def _build_stack(group: list[_Slice]) -> Stack:
    """Sort one orientation group along its normal and assemble the Stack."""
    shape = Counter(s.pixels.shape for s in group).most_common(1)[0][0]
    spacing = Counter(tuple(s.pixel_spacing) for s in group
                      if s.pixels.shape == shape).most_common(1)[0][0]
    mean = np.mean([s.orientation for s in group], axis=0)
    orientation = np.concatenate([mean[:3] / np.linalg.norm(mean[:3]),
                                  mean[3:] / np.linalg.norm(mean[3:])])
    pixels = [s.pixels if s.pixels.shape == shape else _resize_slice(s, shape) for s in group]
    stack = Stack(
        pixels=np.stack(pixels).astype(np.float32, copy=False),
        positions=np.array([s.position for s in group], dtype=np.float64),
        orientation=orientation,
        pixel_spacing=np.asarray(spacing, dtype=np.float64),
        instance_numbers=np.array([s.instance_number for s in group], dtype=np.int64),
    )
    order = np.lexsort((stack.instance_numbers, stack.positions @ stack.normal))
    stack.pixels, stack.positions = stack.pixels[order], stack.positions[order]
    stack.instance_numbers = stack.instance_numbers[order]
    return stack


def _id_from_name(name: str) -> int:
    return int(name) if name.isdigit() else 0


def read_series(series_dir, study_id: int | None = None, series_id: int | None = None,
                description: str = "") -> Series:
    """Read `series_dir/*.dcm` into a Series of stacks (see the module docstring).

    study_id / series_id default to the parent / directory names when numeric (else 0);
    description defaults to the files' SeriesDescription.
    """
    series_dir = Path(series_dir)
    paths = sorted(series_dir.glob("*.dcm"))
    slices, failures = [], []
    for path in paths:
        try:
            slices.append(_read_slice(path))
        except Exception as exc:  # noqa: BLE001 - any unusable file is skipped and named
            failures.append(f"{path}: {type(exc).__name__}: {exc}")
            warnings.warn(f"skipping unreadable DICOM file {failures[-1]}", stacklevel=2)
    if not slices:
        reason = failures[0] if failures else "no *.dcm files"
        raise DicomReadError(f"{series_dir}: no readable DICOM slice ({reason})")
    return Series(
        study_id=_id_from_name(series_dir.parent.name) if study_id is None else int(study_id),
        series_id=_id_from_name(series_dir.name) if series_id is None else int(series_id),
        description=description or slices[0].description,
        stacks=[_build_stack(g) for g in _group_by_orientation(slices)],
    )


def read_study(images_dir, study_id: int, descriptions: dict[int, str]) -> Study:
    """Read every series directory of `images_dir/{study_id}` (each file once).

    descriptions: series_id -> description (e.g. `competition.series_by_study(df)[study]`);
    a series not in it keeps its DICOM SeriesDescription. A series without any readable
    slice is skipped with a warning; a missing study directory raises FileNotFoundError.
    """
    study_dir = Path(images_dir) / str(int(study_id))
    if not study_dir.is_dir():
        raise FileNotFoundError(f"study directory not found: {study_dir}")
    study = Study(study_id=int(study_id))
    series_dirs = {int(p.name): p for p in study_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    for series_id, series_dir in sorted(series_dirs.items()):
        try:
            study.series[series_id] = read_series(
                series_dir, study_id, series_id, descriptions.get(series_id, ""))
        except DicomReadError as exc:
            warnings.warn(f"skipping series: {exc}", stacklevel=2)
    return study
