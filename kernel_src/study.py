"""In-memory form of a study: series -> stacks -> pixels plus per-slice geometry.

Conventions (DICOM patient coordinates, LPS, millimetres):
- world +x = patient left, +y = posterior, +z = head;
- a pixel point is (x = column, y = row) on one slice of a stack;
- `orientation` is ImageOrientationPatient: row direction cosines (the direction of
  increasing column index x) then column direction cosines (increasing row index y);
- `pixel_spacing` is DICOM PixelSpacing order: (row spacing, column spacing) in mm, i.e.
  (size of one step in y, size of one step in x);
- slices are sorted along the stack normal n = row_cos x col_cos, with n's sign flipped so
  that its largest-magnitude component is positive: sagittal slices ascend in world x
  (index 0 = patient right), axial slices ascend in world z (index 0 = caudal).
  Instance numbers only map labels to slice indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Stack:
    """One set of parallel slices of a series.

    pixels: (S, H, W); float32 straight from DICOM (rescale applied, MONOCHROME1 inverted)
        or uint8 after `kernel_src.preprocess` normalisation and resizing.
    positions: (S, 3) float64 ImagePositionPatient of each slice (centre of pixel (0, 0)).
    orientation: (6,) float64 ImageOrientationPatient.
    pixel_spacing: (2,) float64 (row spacing, column spacing) mm.
    instance_numbers: (S,) int64, the DICOM InstanceNumber of each sorted slice.
    """

    pixels: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    instance_numbers: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def row_cosine(self) -> np.ndarray:
        return self.orientation[:3]

    @property
    def col_cosine(self) -> np.ndarray:
        return self.orientation[3:]

    @property
    def normal(self) -> np.ndarray:
        """Unit stack normal, sign-canonical (largest-magnitude component positive)."""
        n = np.cross(self.row_cosine, self.col_cosine)
        n = n / np.linalg.norm(n)
        return n if n[np.argmax(np.abs(n))] > 0 else -n


@dataclass
class Series:
    study_id: int
    series_id: int
    description: str
    stacks: list[Stack] = field(default_factory=list)


@dataclass
class Study:
    study_id: int
    series: dict[int, Series] = field(default_factory=dict)

    def by_description(self, description: str) -> list[Series]:
        """Series with this description, in series_id order (may be empty)."""
        return [s for _, s in sorted(self.series.items()) if s.description == description]
