"""Per-stack normalisation to uint8, exact-geometry in-plane resize, and the stack cache.

Normalisation: per-stack percentile (1, 99.5) clip, min-max to 0..255, uint8. Resize: every
slice to size x size with cv2 (INTER_AREA when no axis grows, else INTER_LINEAR), whose
pixel centres are aligned: new pixel x' covers old x = (x' + 0.5) * W / W' - 0.5. So the
column spacing becomes dc * W / W', the row spacing dr * H / H', and the position of pixel
(0, 0) moves to the old pixel ((0.5 * W / W' - 0.5), (0.5 * H / H' - 0.5)); world points
keep their pixels (see `geometry.resized_pixel`).

Cache CLI: `python -m kernel_src.preprocess --data DIR --out CACHE [--split train|test]
[--size PX] [--workers N]` writes CACHE/{split}/{study_id}/{series_id}_{stack}.npz (volume
uint8 (S, H, W), positions, orientation, pixel_spacing, instance_numbers, study_id,
series_id, description, source_shape (H0, W0)), a per-series manifest
{series_id}.json (written last: a series is cached iff it exists) and CACHE/{split}/index.csv.
Every file is written to a temporary file in the same directory, then `os.replace`d.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from .competition import load_series_descriptions, series_by_study
from .dicom import read_series
from .study import Series, Stack, Study

PERCENTILES = (1.0, 99.5)
INDEX_COLUMNS = ("study_id", "series_id", "stack", "description", "path", "n_slices",
                 "height", "width", "source_height", "source_width")
_MAX_PERCENTILE_VOXELS = 2_000_000  # subsample bigger volumes for the percentiles


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """(S, H, W) any dtype -> float32 in 0..255 after per-volume percentile clipping."""
    v = np.asarray(volume, dtype=np.float32)
    step = int(np.ceil(np.sqrt(v.size / _MAX_PERCENTILE_VOXELS))) if v.size else 1
    lo, hi = np.percentile(v[:, ::step, ::step], PERCENTILES)
    if not hi > lo:
        return np.zeros_like(v)
    return (np.clip(v, lo, hi) - lo) * np.float32(255.0 / (hi - lo))


def resize_volume(volume: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, H, W) float32 -> (S, H', W') with pixel-centre-aligned cv2 resizing."""
    h, w = volume.shape[1:]
    if (h, w) == tuple(shape):
        return volume
    shrink = shape[0] <= h and shape[1] <= w  # INTER_AREA only when no axis grows
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    size = (shape[1], shape[0])  # cv2 wants (width, height)
    # one slice at a time: cv2 rejects some interpolation modes for more than 4 channels
    return np.stack([cv2.resize(np.ascontiguousarray(image), size, interpolation=interp)
                     for image in volume]).astype(np.float32, copy=False)


def resized_geometry(stack: Stack, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(positions (S, 3), pixel_spacing (2,)) of `stack` resized in-plane to `shape`."""
    (h0, w0), (h1, w1) = stack.shape[1:], shape
    row_spacing, col_spacing = stack.pixel_spacing
    shift = ((0.5 * w0 / w1 - 0.5) * col_spacing * stack.row_cosine
             + (0.5 * h0 / h1 - 0.5) * row_spacing * stack.col_cosine)
    return stack.positions + shift, np.array([row_spacing * h0 / h1, col_spacing * w0 / w1])


def normalize_stack(stack: Stack, size: int | None = None) -> Stack:
    """uint8 copy of a stack, resized in-plane to size x size when given; geometry exact."""
    volume = to_uint8(stack.pixels)
    positions, spacing = stack.positions.copy(), stack.pixel_spacing.copy()
    if size is not None:
        volume = resize_volume(volume, (int(size), int(size)))
        positions, spacing = resized_geometry(stack, (int(size), int(size)))
    return Stack(
        pixels=np.clip(np.rint(volume), 0, 255).astype(np.uint8),
        positions=positions,
        orientation=stack.orientation.copy(),
        pixel_spacing=spacing,
        instance_numbers=stack.instance_numbers.copy(),
    )


def normalize_study(study: Study, size: int | None = None) -> Study:
    """A Study whose stacks are `normalize_stack`ed."""
    return Study(study.study_id, {
        sid: Series(s.study_id, s.series_id, s.description,
                    [normalize_stack(st, size) for st in s.stacks])
        for sid, s in study.series.items()
    })


@contextmanager
def atomic_path(path: Path):
    """Yield an open binary temp file in path's directory; `os.replace` it onto path on
    success, delete it on any error (so `path` is never partially written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_stack(path: Path, stack: Stack, meta: dict) -> None:
    with atomic_path(path) as f:
        np.savez_compressed(
            f, volume=stack.pixels, positions=stack.positions, orientation=stack.orientation,
            pixel_spacing=stack.pixel_spacing, instance_numbers=stack.instance_numbers,
            study_id=np.int64(meta["study_id"]), series_id=np.int64(meta["series_id"]),
            description=np.str_(meta["description"]),
            source_shape=np.asarray(meta["source_shape"], dtype=np.int64))


def _manifest_path(split_dir: Path, study_id: int, series_id: int) -> Path:
    return split_dir / str(study_id) / f"{series_id}.json"


def cache_series(series_dir: Path, split_dir: Path, study_id: int, series_id: int,
                 description: str, size: int | None) -> list[dict]:
    """Read, normalise and store one series (one .npz per stack, then its manifest);
    returns its index rows."""
    series = read_series(series_dir, study_id, series_id, description)
    rows = []
    for k, stack in enumerate(series.stacks):
        rel = f"{study_id}/{series_id}_{k}.npz"
        small = normalize_stack(stack, size)
        _save_stack(split_dir / rel, small, {
            "study_id": study_id, "series_id": series_id, "description": series.description,
            "source_shape": stack.shape[1:]})
        rows.append({"study_id": study_id, "series_id": series_id, "stack": k,
                     "description": series.description, "path": rel,
                     "n_slices": small.shape[0], "height": small.shape[1],
                     "width": small.shape[2], "source_height": stack.shape[1],
                     "source_width": stack.shape[2]})
    with atomic_path(_manifest_path(split_dir, study_id, series_id)) as f:
        f.write(json.dumps({"size": size, "rows": rows}).encode())
    return rows


def _cache_task(task: tuple) -> tuple[tuple, str | None, list[str]]:
    """Worker: cache one series; returns (task, error message or None, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cache_series(*task)
            error = None
        except Exception as exc:  # noqa: BLE001 - a bad series is reported and skipped
            error = f"{type(exc).__name__}: {exc}"
    return task, error, [str(w.message) for w in caught]


def _is_cached(split_dir: Path, study_id: int, series_id: int, size: int | None) -> bool:
    path = _manifest_path(split_dir, study_id, series_id)
    try:
        return json.loads(path.read_text())["size"] == size
    except (OSError, ValueError, KeyError):
        return False


def _series_on_disk(data: Path, split: str) -> list[tuple[Path, int, int, str]]:
    """(series_dir, study_id, series_id, description) of every series directory."""
    csv = data / f"{split}_series_descriptions.csv"
    names = series_by_study(load_series_descriptions(csv)) if csv.exists() else {}
    images = data / f"{split}_images"
    if not images.is_dir():
        raise FileNotFoundError(f"no image directory {images}")
    out = []
    for study_dir in sorted((p for p in images.iterdir() if p.name.isdigit()),
                            key=lambda p: int(p.name)):
        for series_dir in sorted((p for p in study_dir.iterdir() if p.name.isdigit()),
                                 key=lambda p: int(p.name)):
            study_id, series_id = int(study_dir.name), int(series_dir.name)
            out.append((series_dir, study_id, series_id,
                        names.get(study_id, {}).get(series_id, "")))
    return out


def write_index(split_dir: Path) -> pd.DataFrame:
    """Collect every series manifest of a split into index.csv (atomic); returns it."""
    rows = [r for m in sorted(split_dir.glob("*/*.json"))
            for r in json.loads(m.read_text())["rows"]]
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    index = index.sort_values(["study_id", "series_id", "stack"]).reset_index(drop=True)
    with atomic_path(split_dir / "index.csv") as f:
        f.write(index.to_csv(index=False).encode())
    return index


def build_cache(data, out, split: str = "train", size: int | None = None,
                workers: int = 1) -> dict:
    """Cache every not yet cached series of DATA/{split}_images under OUT/{split}.

    Returns counts: cached, already (skipped as cached), failed, and seconds. A failing
    series is reported on stderr in one line and skipped.
    """
    start, split_dir = time.perf_counter(), Path(out) / split
    todo, already = [], 0
    for series_dir, study_id, series_id, desc in _series_on_disk(Path(data), split):
        if _is_cached(split_dir, study_id, series_id, size):
            already += 1
        else:
            todo.append((series_dir, split_dir, study_id, series_id, desc, size))
    failed = 0
    bar = tqdm(total=len(todo), desc=f"cache {split}", unit="series", file=sys.stderr)
    for task, error, messages in _run(todo, workers):
        bar.update(1)
        for message in messages:
            bar.write(f"warning: {message}", file=sys.stderr)
        if error is not None:
            failed += 1
            bar.write(f"skipped bad series {task[0]}: {error}", file=sys.stderr)
    bar.close()
    split_dir.mkdir(parents=True, exist_ok=True)
    write_index(split_dir)
    return {"cached": len(todo) - failed, "already": already, "failed": failed,
            "seconds": time.perf_counter() - start}


def _run(tasks: list[tuple], workers: int):
    """Yield (task, error, warnings) per task: in-process for workers <= 1, else a process pool."""
    if workers <= 1:
        yield from map(_cache_task, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_cache_task, t) for t in tasks]
        for future in as_completed(futures):
            yield future.result()


def read_index(cache, split: str) -> pd.DataFrame:
    """CACHE/{split}/index.csv (columns INDEX_COLUMNS; path relative to CACHE/{split})."""
    path = Path(cache) / split / "index.csv"
    if not path.exists():
        raise FileNotFoundError(f"no cache index {path}: run python -m kernel_src.preprocess")
    return pd.read_csv(path, dtype={"description": str}, keep_default_na=False)


def load_stack(path) -> Stack:
    """One cached stack (uint8 volume and its geometry) from its .npz."""
    with np.load(path) as z:
        return Stack(pixels=z["volume"], positions=z["positions"],
                     orientation=z["orientation"], pixel_spacing=z["pixel_spacing"],
                     instance_numbers=z["instance_numbers"])


def load_cached_study(cache, split: str, study_id: int, index: pd.DataFrame | None = None
                      ) -> Study:
    """The cached uint8 Study (every series and stack in the index for study_id)."""
    index = read_index(cache, split) if index is None else index
    rows = index[index["study_id"] == int(study_id)].sort_values(["series_id", "stack"])
    if rows.empty:
        raise KeyError(f"study {study_id} not in the {split} cache {cache}")
    study = Study(int(study_id))
    for r in rows.itertuples(index=False):
        series = study.series.setdefault(
            int(r.series_id), Series(int(study_id), int(r.series_id), r.description))
        series.stacks.append(load_stack(Path(cache) / split / r.path))
    return study


def source_shapes(index: pd.DataFrame, study_id: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(series_id, stack) -> original (H, W) for `geometry.label_points_world`."""
    rows = index[index["study_id"] == int(study_id)]
    return {(int(r.series_id), int(r.stack)): (int(r.source_height), int(r.source_width))
            for r in rows.itertuples(index=False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel_src.preprocess",
                                     description="Cache normalised uint8 stacks as .npz.")
    parser.add_argument("--data", required=True, help="competition directory")
    parser.add_argument("--out", required=True, help="cache directory")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--size", type=int, default=None, help="in-plane size (pixels)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    summary = build_cache(args.data, args.out, args.split, args.size, args.workers)
    print(f"{args.split}: cached {summary['cached']} series, {summary['already']} already "
          f"cached, {summary['failed']} failed, {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
