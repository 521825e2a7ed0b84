"""Pictures of what the models see: keypoint overlays and stage-2 crop montages per study.

Training side only (never inlined into the kernel). For one study:
- the keypoint figure: the mid sagittal T2 slice with the spinal points, the Sagittal T1
  slices through the left and the right foramina with the foraminal points, and per level
  the axial T2 slice the predicted subarticular points fall on, with both sides' points;
- the crop montage: per condition (rows) and level (columns) a crop of the condition's
  series centred on the predicted point, with the predicted grade probabilities (bars)
  and the true grade.
Markers: truth = hollow ring, prediction = filled disc with a black rim, joined by a line;
the colour says the level (`LEVEL_COLOURS`) and the text beside the prediction gives the
level and the 3D error in mm (and "off N mm" when the point lies N mm off the slice shown).
Images are (H, W, 3) uint8 RGB arrays; `save_png` writes them. Pixels of a slice map to
the canvas with pixel centres aligned (`geometry.resized_pixel`).

CLI: `python -m kernel_src.viz --data DIR --split test --keypoints KP.csv --out DIR
[--study ID ...] [--max-studies N] [--probs submission.csv] [--labels CSV]
[--landmarks CSV | --coords CSV]`.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from . import competition, crops, dicom, geometry, preprocess
from .keypoints import Keypoints
from .schema import (
    AXIAL_T2,
    CONDITION_SERIES,
    CONDITIONS,
    GRADES,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    N_LEVELS,
    SAG_T1,
    SAG_T2,
    SUBMISSION_COLUMNS,
    TITLE_TO_CONDITION,
    TITLE_TO_LEVEL,
    label_index,
)
from .study import Stack, Study

# RGB, saturated (never grey, so never an MR pixel): L1/L2 .. L5/S1
LEVEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40), (255, 150, 0), (255, 255, 0), (0, 230, 255), (255, 0, 255))
TRUTH_RADIUS, PRED_RADIUS = 8, 4  # canvas pixels
TITLE_H = 22                      # title bar above every panel, canvas pixels
FONT = cv2.FONT_HERSHEY_SIMPLEX
GOOD, BAD, UNKNOWN = (0, 200, 0), (230, 0, 0), (128, 128, 128)
CONDITION_SHORT = ("spinal", "L foramen", "R foramen", "L subartic", "R subartic")


@dataclass
class StudyView:
    """What is drawn for one study. probs (25, 3) and labels (25,) int codes (-1 = none)
    follow `LABEL_COLUMNS`; any of predicted / truth / probs / labels may be None."""

    study: Study
    predicted: Keypoints | None = None
    truth: Keypoints | None = None
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class PanelPoint:
    """One marker: world (3,) mm, level index (colour), kind "truth" or "pred", text;
    a truth and a pred marker with the same `key` (label index) are joined by a line."""

    world: np.ndarray
    level: int
    kind: str
    text: str = ""
    key: int = -1


# ----------------------------------------------------------------------------- inputs
def load_study(data_dir, study_id: int, split: str = "test") -> Study:
    """Read and normalise (uint8, native size) one study of a Kaggle-layout directory."""
    data_dir = Path(data_dir)
    table = competition.series_by_study(competition.load_series_descriptions(
        data_dir / f"{split}_series_descriptions.csv"))
    if int(study_id) not in table:
        raise KeyError(f"{data_dir}/{split}_series_descriptions.csv: no study {study_id}")
    study = dicom.read_study(data_dir / f"{split}_images", int(study_id), table[int(study_id)])
    return preprocess.normalize_study(study)


def keypoints_from_rows(rows: pd.DataFrame, study_id: int) -> Keypoints | None:
    """Keypoints of one study from `Keypoints.to_rows`-format rows (label, x, y, z mm,
    confidence, source); None when the study has no row. Unknown labels raise."""
    sub = rows[rows["study_id"] == int(study_id)]
    if sub.empty:
        return None
    kp = Keypoints()
    for row in sub.itertuples(index=False):
        if row.label not in LABEL_COLUMNS:
            raise ValueError(f"keypoint row of study {study_id}: unknown label {row.label!r}")
        conf = float(getattr(row, "confidence", 1.0))
        kp.set(LABEL_COLUMNS.index(row.label), (row.x, row.y, row.z), conf,
               str(getattr(row, "source", "")))
    return kp


def keypoints_from_landmarks(landmarks: pd.DataFrame, study_id: int) -> Keypoints | None:
    """Truth Keypoints from `truth/landmarks.csv` rows (condition, level in Title Case or
    snake_case, x, y, z world mm); None when the study has none."""
    sub = landmarks[landmarks["study_id"] == int(study_id)]
    if sub.empty:
        return None
    kp = Keypoints()
    for row in sub.itertuples(index=False):
        cond = TITLE_TO_CONDITION.get(row.condition, row.condition)
        level = TITLE_TO_LEVEL.get(row.level, row.level)
        kp.set(label_index(cond, level), (row.x, row.y, row.z), 1.0, "truth")
    return kp


def keypoints_from_coordinates(study: Study, coords: pd.DataFrame) -> Keypoints | None:
    """Truth Keypoints from `competition.load_label_coordinates` rows of this study,
    mapped to world mm with `geometry.label_points_world` (mean of repeated labels)."""
    sub = coords[coords["study_id"] == study.study_id].reset_index(drop=True)
    if sub.empty:
        return None
    world = geometry.label_points_world(study, sub)
    kp = Keypoints()
    for label, idx in sub.groupby("label").groups.items():
        pts = world[np.asarray(idx)]
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts):
            kp.set(LABEL_COLUMNS.index(label), pts.mean(axis=0), 1.0, "truth")
    return kp


def probs_from_submission(sub: pd.DataFrame, study_id: int) -> np.ndarray | None:
    """(25, 3) probabilities of one study from a submission frame; None if absent."""
    rows = sub.set_index("row_id").reindex([f"{int(study_id)}_{c}" for c in LABEL_COLUMNS])
    probs = rows[list(SUBMISSION_COLUMNS)].to_numpy(dtype=np.float64)
    return None if np.isnan(probs).all() else probs


def labels_of(labels: pd.DataFrame, study_id: int) -> np.ndarray | None:
    """(25,) int grade codes of one study from `competition.load_train` output."""
    sub = labels[labels["study_id"] == int(study_id)]
    return None if sub.empty else sub[list(LABEL_COLUMNS)].to_numpy(dtype=np.int64)[0]


# ----------------------------------------------------------------------------- drawing
def _text(canvas: np.ndarray, text: str, org: tuple[int, int], colour, scale: float = 0.42
          ) -> None:
    """Text with a black outline (readable on any background); org = bottom-left."""
    cv2.putText(canvas, text, org, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, org, FONT, scale, tuple(int(c) for c in colour), 1, cv2.LINE_AA)


def to_canvas(image: np.ndarray, height: int) -> np.ndarray:
    """(H, W) uint8 slice -> (height, round(W * height / H), 3) uint8 RGB, linear resize."""
    h, w = image.shape
    width = max(1, int(round(w * height / h)))
    resized = cv2.resize(np.ascontiguousarray(image, dtype=np.uint8), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    return np.repeat(resized[..., None], 3, axis=2)


def with_title(canvas: np.ndarray, title: str) -> np.ndarray:
    """Prepend a dark title bar of TITLE_H rows."""
    bar = np.full((TITLE_H, canvas.shape[1], 3), 30, np.uint8)
    _text(bar, title, (4, TITLE_H - 7), (255, 255, 255), 0.45)
    return np.concatenate([bar, canvas])


def draw_marker(canvas: np.ndarray, xy: Sequence[float], level: int, kind: str) -> None:
    """Truth: hollow ring of TRUTH_RADIUS; pred: disc of PRED_RADIUS with a black rim.
    Exact (non anti-aliased) level colour, centred on round(xy)."""
    centre = (int(round(xy[0])), int(round(xy[1])))
    colour = LEVEL_COLOURS[level]
    if kind == "truth":
        cv2.circle(canvas, centre, TRUTH_RADIUS, (0, 0, 0), 4, cv2.LINE_8)
        cv2.circle(canvas, centre, TRUTH_RADIUS, colour, 2, cv2.LINE_8)
    elif kind == "pred":
        cv2.circle(canvas, centre, PRED_RADIUS + 1, (0, 0, 0), -1, cv2.LINE_8)
        cv2.circle(canvas, centre, PRED_RADIUS, colour, -1, cv2.LINE_8)
    else:
        raise ValueError(f"marker kind must be 'truth' or 'pred', got {kind!r}")


def zoom_window(stack: Stack, xy: np.ndarray, window_mm: float | None
                ) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) integer pixel box of about window_mm x window_mm centred on the
    mean of the finite pixel points xy (n, 2), inside the image; the whole image when
    window_mm is None or no point is finite."""
    _, height, width = stack.shape
    finite = xy[np.isfinite(xy).all(axis=1)] if len(xy) else xy
    if window_mm is None or not len(finite):
        return 0, 0, width, height
    half = np.array([window_mm / stack.pixel_spacing[1], window_mm / stack.pixel_spacing[0]]) / 2
    size = np.minimum(np.round(2 * half).astype(int), [width, height])
    lo = np.clip(np.round(finite.mean(axis=0) - half).astype(int), 0, [width, height] - size)
    return int(lo[0]), int(lo[1]), int(lo[0] + size[0]), int(lo[1] + size[1])


def _label_at(canvas: np.ndarray, text: str, xy: tuple[float, float], colour, left: bool,
              taken: list[tuple[int, int, int, int]]) -> None:
    """Text beside a marker: right of it, or left when `left` or when it would overflow;
    moved down (then up) in steps of one line until it overlaps no box in `taken`, to
    which its box (x0, y0, x1, y1) is added."""
    (w, h), _ = cv2.getTextSize(text, FONT, 0.42, 3)
    x = round(xy[0]) + TRUTH_RADIUS + 5
    if left or x + w > canvas.shape[1]:
        x = max(0, round(xy[0]) - TRUTH_RADIUS - 5 - w)
    base = round(xy[1]) + 4
    for shift in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5):
        y = base + shift * (h + 4)
        box = (x, y - h - 2, x + w, y + 2)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                   for b in taken):
            break
    taken.append(box)
    _text(canvas, text, (x, y), colour)


def slice_panel(stack: Stack, slice_index: int, points: Sequence[PanelPoint], title: str,
                height: int = 320, window_mm: float | None = None, outward: bool = False
                ) -> np.ndarray:
    """One slice of a uint8 stack with markers: (TITLE_H + height, W', 3) uint8.

    window_mm: show only a box of that size around the points (`zoom_window`). Each point
    is projected with `geometry.project_to_stack`; its text is drawn right of it (with
    `outward`, on the outer side of the panel's points), with " off N mm" appended when
    it lies over 1.5 slice gaps off this slice.
    """
    world = np.array([p.world for p in points], dtype=np.float64).reshape(-1, 3)
    _, x, y, _ = geometry.project_to_stack(stack, world)
    xy = np.stack([x, y], axis=1) if len(points) else np.zeros((0, 2))
    x0, y0, x1, y1 = zoom_window(stack, xy, window_mm)
    image = stack.pixels[int(slice_index), y0:y1, x0:x1]
    canvas = to_canvas(image, height)
    cx, cy = geometry.resized_pixel(xy[:, 0] - x0, xy[:, 1] - y0, image.shape,
                                    canvas.shape[:2])
    off = np.abs((world - stack.positions[int(slice_index)]) @ stack.normal)
    gaps = np.abs(np.diff(stack.positions @ stack.normal))
    gap = float(np.median(gaps)) if len(gaps) else 3.0
    for i, j in itertools.combinations(range(len(points)), 2):
        if points[i].key == points[j].key >= 0 and points[i].kind != points[j].kind:
            cv2.line(canvas, (round(cx[i]), round(cy[i])), (round(cx[j]), round(cy[j])),
                     LEVEL_COLOURS[points[i].level], 1, cv2.LINE_AA)
    for i in sorted(range(len(points)), key=lambda k: points[k].kind != "truth"):
        draw_marker(canvas, (cx[i], cy[i]), points[i].level, points[i].kind)
    middle = float(np.median(cx)) if len(points) else 0.0
    taken: list[tuple[int, int, int, int]] = []
    for i, p in enumerate(points):
        text = p.text + (f" off {off[i]:.0f}mm" if p.text and off[i] > 1.5 * gap else "")
        if text:
            _label_at(canvas, text, (cx[i], cy[i]), LEVEL_COLOURS[p.level],
                      left=outward and cx[i] < middle - TRUTH_RADIUS, taken=taken)
    return with_title(canvas, title)


def blank_panel(width: int, height: int, title: str, message: str) -> np.ndarray:
    """A grey panel saying why there is no image."""
    canvas = np.full((height, width, 3), 60, np.uint8)
    _text(canvas, message, (6, height // 2), (255, 255, 255), 0.45)
    return with_title(canvas, title)


def hstack_panels(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Panels side by side (bottom-padded to the tallest), `gap` dark columns between."""
    height = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(np.full((height, gap, 3), 20, np.uint8))
        parts.append(np.concatenate(
            [p, np.full((height - p.shape[0], p.shape[1], 3), 20, np.uint8)]))
    return np.concatenate(parts, axis=1)


def vstack_panels(rows: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Rows one under another (right-padded to the widest), `gap` dark rows between:
    `hstack_panels` of the transposed images."""
    stacked = hstack_panels([r.transpose(1, 0, 2) for r in rows], gap)
    return np.ascontiguousarray(stacked.transpose(1, 0, 2))


# ----------------------------------------------------------------------------- figures
def _point(kp: Keypoints | None, index: int) -> np.ndarray | None:
    return kp.world[index] if kp is not None and kp.known[index] else None


def level_name(condition: str, lv: int) -> str:
    """Marker text on sagittal panels: the level, e.g. "L4/L5"."""
    return LEVEL_TITLES[LEVELS[lv]]


def side_name(condition: str, lv: int) -> str:
    """Marker text on axial panels: the side, "L" or "R" (patient left / right)."""
    return "L" if condition.startswith("left") else "R"


def condition_points(view: StudyView, condition: str, levels: Sequence[int],
                     name=level_name) -> list[PanelPoint]:
    """Truth and predicted markers of `condition` at these level indices; the text (on the
    prediction, or on the truth when there is no prediction) is name(condition, level)
    plus the 3D error in mm."""
    out = []
    for lv in levels:
        i = label_index(condition, LEVELS[lv])
        truth, pred = _point(view.truth, i), _point(view.predicted, i)
        if pred is not None:
            err = "" if truth is None else f" {np.linalg.norm(pred - truth):.1f}mm"
            out.append(PanelPoint(pred, lv, "pred", name(condition, lv) + err, i))
        if truth is not None:
            out.append(PanelPoint(truth, lv, "truth", "" if pred is not None
                                  else name(condition, lv) + " no pred", i))
    return out


def locate_slice(study: Study, description: str, worlds: np.ndarray
                 ) -> tuple[Stack, int] | None:
    """(stack, slice index) of the series `description` nearest the median of the finite
    `worlds` (n, 3) mm; the middle slice of its first stack when none is finite; None
    without such a series."""
    stacks = crops.series_stacks(study, description)
    if not stacks:
        return None
    worlds = np.asarray(worlds, dtype=np.float64).reshape(-1, 3)
    finite = worlds[np.isfinite(worlds).all(axis=1)]
    if not len(finite):
        return stacks[0], stacks[0].shape[0] // 2
    point = crops.locate_point(stacks, np.median(finite, axis=0))
    return point.stack, point.nearest_slice


def _reference(view: StudyView, indices: Sequence[int], prefer: str) -> np.ndarray:
    """(n, 3) world points used to choose a slice: the `prefer`red source when it has any
    of `indices`, else the other one (NaN when neither)."""
    sources = (view.truth, view.predicted) if prefer == "truth" else (view.predicted, view.truth)
    for kp in sources:
        if kp is not None and kp.known[list(indices)].any():
            return kp.world[list(indices)]
    return np.full((len(indices), 3), np.nan)


def series_panel(view: StudyView, description: str, conditions: Sequence[str],
                 levels: Sequence[int], title: str, height: int, prefer: str = "truth",
                 name=level_name, window_mm: float | None = None) -> np.ndarray:
    """The slice of `description` through the points of `conditions` x `levels` (chosen
    from the `prefer`red source), with their truth and predicted markers."""
    indices = [label_index(c, LEVELS[lv]) for c in conditions for lv in levels]
    where = locate_slice(view.study, description, _reference(view, indices, prefer))
    if where is None:
        return blank_panel(int(height * 0.8), height, title, f"no {description}")
    stack, k = where
    points = [p for c in conditions for p in condition_points(view, c, levels, name)]
    return slice_panel(stack, k, points, f"{title}  slice {k + 1}/{stack.shape[0]}", height,
                       window_mm, outward=window_mm is not None)


def keypoint_figure(view: StudyView, height: int = 320, axial_height: int = 200,
                    axial_window_mm: float | None = 90.0) -> np.ndarray:
    """(H, W, 3) uint8: sagittal T2 (spinal), T1 left and right foramina, then one axial
    T2 panel per level (the slice of the predicted subarticular points, zoomed to
    axial_window_mm around them)."""
    all_levels = range(N_LEVELS)
    sag = [series_panel(view, SAG_T2, [CONDITIONS[0]], all_levels, "Sag T2 spinal", height),
           series_panel(view, SAG_T1, [CONDITIONS[1]], all_levels, "Sag T1 left foramen",
                        height),
           series_panel(view, SAG_T1, [CONDITIONS[2]], all_levels, "Sag T1 right foramen",
                        height)]
    axial = [series_panel(view, AXIAL_T2, CONDITIONS[3:], [lv], f"Ax {LEVEL_TITLES[LEVELS[lv]]}",
                          axial_height, prefer="pred", name=side_name,
                          window_mm=axial_window_mm)
             for lv in all_levels]
    return vstack_panels([_legend(view.study.study_id), hstack_panels(sag),
                          hstack_panels(axial)])


def _legend(study_id: int) -> np.ndarray:
    bar = np.full((26, 820, 3), 20, np.uint8)
    _text(bar, f"study {study_id}", (6, 18), (255, 255, 255), 0.5)
    x = 20 + cv2.getTextSize(f"study {study_id}", FONT, 0.5, 3)[0][0]
    cv2.circle(bar, (x + TRUTH_RADIUS, 13), TRUTH_RADIUS, (255, 255, 255), 2, cv2.LINE_8)
    _text(bar, "truth", (x + 22, 18), (255, 255, 255))
    cv2.circle(bar, (x + 80, 13), PRED_RADIUS, (255, 255, 255), -1, cv2.LINE_8)
    _text(bar, "prediction (3D error mm)", (x + 90, 18), (255, 255, 255))
    for lv, colour in enumerate(LEVEL_COLOURS):
        _text(bar, LEVEL_TITLES[LEVELS[lv]], (x + 300 + 58 * lv, 18), colour, 0.45)
    return bar


# ----------------------------------------------------------------------------- crops
TEXT_H = 58  # rows under each crop tile: three probability bars and the true grade


def _crop_image(view: StudyView, index: int, tile: int, window_mm: float):
    """(tile, tile) float [0, 1] crop of the condition's series around the predicted point
    (else the truth), on its nearest slice, and the truth's (u, v) inside it (or None);
    (None, None) when there is no point or series, or the point is outside the image."""
    condition = CONDITIONS[index // N_LEVELS]
    stacks = crops.series_stacks(view.study, CONDITION_SERIES[condition])
    centre = _point(view.predicted, index)
    centre = _point(view.truth, index) if centre is None else centre
    point = None if centre is None else crops.locate_point(stacks, centre)
    crop = crops.crop_at(point, 1, (window_mm, window_mm), (tile, tile), unit="mm",
                         pick=lambda p: [p.nearest_slice])
    if not crop.valid:
        return None, None
    truth = _point(view.truth, index)
    if truth is None:
        return crop.pixels[0], None
    _, x, y = geometry.world_to_pixel(point.stack, truth)
    window = crops.window_pixels(point.stack, (window_mm, window_mm), "mm")
    inverse = cv2.invertAffineTransform(crops.crop_matrix((point.x, point.y), window,
                                                          (tile, tile)))
    u, v = inverse @ np.array([float(x), float(y), 1.0])
    return crop.pixels[0], (u, v)


def _mark_crop(canvas: np.ndarray, view: StudyView, index: int, truth_uv) -> None:
    """The truth ring where it falls, the prediction disc at the centre (or "no pred":
    the crop is then centred on the truth) and the 3D error in mm at the top left."""
    lv = index % N_LEVELS
    if truth_uv is not None:
        draw_marker(canvas, truth_uv, lv, "truth")
    pred, truth = _point(view.predicted, index), _point(view.truth, index)
    if pred is None:
        _text(canvas, "no pred", (3, 13), LEVEL_COLOURS[lv])
        return
    centre = (canvas.shape[1] - 1) / 2
    draw_marker(canvas, (centre, centre), lv, "pred")
    if truth is not None:
        _text(canvas, f"{np.linalg.norm(pred - truth):.1f}mm", (3, 13), LEVEL_COLOURS[lv])


def crop_tile(view: StudyView, index: int, tile: int = 112, window_mm: float = 40.0
              ) -> np.ndarray:
    """(tile + TEXT_H + 4, tile + 4, 3) uint8: the crop of label `index` with the
    predicted point (centre), the truth and the error in mm, then N/M/S probability bars (the true grade's
    letter in green) and "true: grade"; the frame is green when the most probable grade
    is the true one, red when not, grey without a label or probabilities."""
    image, truth_uv = _crop_image(view, index, tile, window_mm)
    if image is None:
        canvas = np.full((tile, tile, 3), 60, np.uint8)
        _text(canvas, "no crop", (8, tile // 2), (255, 255, 255))
    else:
        canvas = np.repeat(np.clip(image * 255.0, 0, 255).astype(np.uint8)[..., None], 3, 2)
        _mark_crop(canvas, view, index, truth_uv)
    probs = None if view.probs is None else view.probs[index]
    label = -1 if view.labels is None else int(view.labels[index])
    text = np.full((TEXT_H, tile, 3), 20, np.uint8)
    for g in range(3):
        y0 = 4 + 14 * g
        letter_colour = GOOD if g == label else (255, 255, 255)
        _text(text, "NMS"[g], (2, y0 + 10), letter_colour)
        if probs is not None and np.isfinite(probs[g]):
            cv2.rectangle(text, (16, y0 + 1), (16 + int(round(probs[g] * (tile - 50))),
                                               y0 + 10), (90, 160, 255), -1)
            _text(text, f"{probs[g]:.2f}", (tile - 32, y0 + 10), (255, 255, 255), 0.38)
    _text(text, "true: " + (GRADES[label] if label >= 0 else "?"), (2, TEXT_H - 5),
          (255, 255, 255), 0.38)
    frame = UNKNOWN
    if probs is not None and label >= 0 and np.isfinite(probs).all():
        frame = GOOD if int(np.argmax(probs)) == label else BAD
    return cv2.copyMakeBorder(np.concatenate([canvas, text]), 2, 2, 2, 2,
                              cv2.BORDER_CONSTANT, value=frame)


def crop_montage(view: StudyView, tile: int = 112, window_mm: float = 40.0) -> np.ndarray:
    """(H, W, 3) uint8 grid: rows = conditions, columns = levels, one `crop_tile` each,
    with condition names on the left and level names on top."""
    label_w = 86
    rows = [hstack_panels([_row_label(view.study.study_id, label_w, 20)]
                          + [_cell_label(LEVEL_TITLES[lv], tile + 4, 20) for lv in LEVELS])]
    for c, short in enumerate(CONDITION_SHORT):
        tiles = [crop_tile(view, c * N_LEVELS + lv, tile, window_mm) for lv in range(N_LEVELS)]
        rows.append(hstack_panels([_row_label(short, label_w, tiles[0].shape[0])] + tiles))
    return vstack_panels(rows)


def _cell_label(text: str, width: int, height: int) -> np.ndarray:
    cell = np.full((height, width, 3), 20, np.uint8)
    _text(cell, text, (4, height - 6), (255, 255, 255), 0.45)
    return cell


def _row_label(text, width: int, height: int) -> np.ndarray:
    cell = np.full((height, width, 3), 20, np.uint8)
    _text(cell, str(text), (4, min(height - 6, height // 2 + 5)), (255, 255, 255), 0.45)
    return cell


# ----------------------------------------------------------------------------- output
def save_png(path, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB image as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def render_study(view: StudyView, out_dir) -> dict[str, Path]:
    """Write {study}_keypoints.png and {study}_crops.png into out_dir; returns the paths."""
    sid = view.study.study_id
    return {"keypoints": save_png(Path(out_dir) / f"{sid}_keypoints.png", keypoint_figure(view)),
            "crops": save_png(Path(out_dir) / f"{sid}_crops.png", crop_montage(view))}


@dataclass
class Sources:
    """Where the pictures' inputs come from (any may be None, except data_dir)."""

    data_dir: Path
    split: str = "test"
    keypoints: pd.DataFrame | None = None     # Keypoints.to_rows rows (several studies)
    landmarks: pd.DataFrame | None = None     # truth/landmarks.csv
    coordinates: pd.DataFrame | None = None   # competition.load_label_coordinates
    submission: pd.DataFrame | None = None    # submission.csv
    labels: pd.DataFrame | None = None        # competition.load_train

    @classmethod
    def from_paths(cls, data_dir, split="test", keypoints=None, landmarks=None,
                   coordinates=None, submission=None, labels=None) -> Sources:
        """Read the given CSV paths; the phantom's truth files are used when present."""
        data_dir = Path(data_dir)
        truth = data_dir / "truth"
        if landmarks is None and (truth / "landmarks.csv").exists():
            landmarks = truth / "landmarks.csv"
        if labels is None:
            default = truth / "test_labels.csv" if split == "test" else data_dir / "train.csv"
            labels = default if default.exists() else None

        def read(path, reader=pd.read_csv):
            return None if path is None else reader(path)

        return cls(data_dir, split, read(keypoints), read(landmarks),
                   read(coordinates, competition.load_label_coordinates), read(submission),
                   read(labels, competition.load_train))

    def view(self, study_id: int) -> StudyView:
        """Read the study and gather its points, probabilities and labels."""
        study = load_study(self.data_dir, study_id, self.split)

        def pick(frame, extract):
            return None if frame is None else extract(frame, study_id)

        truth = pick(self.landmarks, keypoints_from_landmarks)
        if truth is None and self.coordinates is not None:
            truth = keypoints_from_coordinates(study, self.coordinates)
        return StudyView(study, pick(self.keypoints, keypoints_from_rows), truth,
                         pick(self.submission, probs_from_submission),
                         pick(self.labels, labels_of))


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m kernel_src.viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Kaggle-layout directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--study", type=int, nargs="*", default=None,
                        help="study ids (default: every study of the split)")
    parser.add_argument("--max-studies", type=int, default=None)
    parser.add_argument("--keypoints", help="predicted keypoints CSV (Keypoints.to_rows)")
    parser.add_argument("--landmarks", help="truth landmarks CSV (default DATA/truth/...)")
    parser.add_argument("--coords", help="label coordinates CSV (truth when no landmarks)")
    parser.add_argument("--probs", help="submission CSV with the predicted probabilities")
    parser.add_argument("--labels", help="train.csv-format labels")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sources = Sources.from_paths(args.data, args.split, args.keypoints, args.landmarks,
                                 args.coords, args.probs, args.labels)
    ids = args.study or sorted(competition.series_by_study(competition.load_series_descriptions(
        Path(args.data) / f"{args.split}_series_descriptions.csv")))
    written = []
    for sid in ids[: args.max_studies]:
        paths = render_study(sources.view(sid), args.out)
        written += paths.values()
        print(" ".join(str(p) for p in paths.values()))
    return written


if __name__ == "__main__":
    main()
