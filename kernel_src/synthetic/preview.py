"""A PNG of one phantom study for eyeballing: mid-sagittal T2, parasagittal T1, axial T2,
with the labelled points drawn (read back from the written DICOM with pydicom only).

`python -m kernel_src.synthetic.preview --data DIR --out PNG [--study ID]`
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from kernel_src import schema


def read_slice(data: Path, study_id: int, series_id: int, instance: int) -> np.ndarray:
    """(H, W) float32 physical image (rescale applied, MONOCHROME1 inverted)."""
    ds = pydicom.dcmread(data / "train_images" / str(study_id) / str(series_id)
                         / f"{instance}.dcm")
    img = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = 65535.0 - img
    return img * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))


def save_preview(data, out, study_id: int | None = None) -> Path:
    """Draw the spinal (T2), left foraminal (T1) and L4/L5 subarticular (axial) points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, out = Path(data), Path(out)
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    study_id = int(coords.study_id.iloc[0]) if study_id is None else study_id
    coords = coords[coords.study_id == study_id]
    picks = [("Spinal Canal Stenosis", None), ("Left Neural Foraminal Narrowing", None),
             ("Left Subarticular Stenosis", "L4/L5")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for ax, (condition, level) in zip(axes, picks, strict=True):
        rows = coords[coords.condition == condition]
        if level is not None:
            rows = rows[rows.level == level]
        if rows.empty:
            ax.set_title(f"{condition}: no coordinates")
            continue
        first = rows.iloc[len(rows) // 2]
        img = read_slice(data, study_id, int(first.series_id), int(first.instance_number))
        ax.imshow(img, cmap="gray")
        same = coords[(coords.series_id == first.series_id)
                      & (coords.instance_number == first.instance_number)]
        ax.scatter(same.x, same.y, s=30, facecolors="none", edgecolors="r")
        for r in same.itertuples():
            ax.annotate(schema.TITLE_TO_LEVEL[r.level], (r.x, r.y), color="y", fontsize=7)
        ax.set_title(f"{condition} / series {first.series_id} / inst {first.instance_number}",
                     fontsize=8)
    fig.suptitle(f"study {study_id}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--study", type=int, default=None)
    args = parser.parse_args()
    print(save_preview(args.data, args.out, args.study))
