"""The kernel entry: every study through stage 1, stage 2 and the ensemble, within a budget.

`run(KernelParams(...)) -> DataFrame` is what the built notebook calls (and the CLI
`python -m kernel_src.kernel --input DIR --weights DIR --out FILE`). Steps:
1. check the manifest (files, sha256, families) before any work: a problem stops the run;
2. list the studies of `{split}_series_descriptions.csv`; a DataLoader with workers reads
   each study once (`dicom.read_study` + `preprocess.normalize_study`) ahead of the models;
3. per study: each stage-1 entry's Keypoints, merged (per point the highest confidence x
   manifest weight: `keypoints.merge_weighted`); each stage-2 entry's (25, 3) logits
   given those points; `ensemble.combine_manifest`;
4. `submission.write_submission` (priors for any missing row) and `validate_submission`;
   in `validate` mode the submission is scored against `labels_path` (train.csv format).
After the manifest check nothing aborts the run: a study that fails anywhere keeps what
survived (other models), else the priors, with one log line naming it and why. The
`TimeGuard` forecasts the total after the first studies and drops models (lowest weight
first) or, last, gives the priors to the studies left, so the run ends inside the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from . import competition, dicom, ensemble, metric, preprocess, submission
from .keypoints import Keypoints, merge_weighted
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ModelEntry,
    load_manifest,
    sha256_file,
    validate_manifest,
)
from .models import zoo  # noqa: F401  (registers every model family)
from .models.registry import config_from_dict, get_family, inference_config, load_checkpoint
from .schema import COMPETITION_SLUG, LABEL_COLUMNS, N_LABELS

LOG = logging.getLogger("kernel_src.kernel")
# The kernel's timer (timings, time guard); tests swap in a virtual clock.
clock = time.perf_counter
DEFAULT_INPUT = f"/kaggle/input/{COMPETITION_SLUG}"


@dataclass
class KernelParams:
    """Everything a kernel run needs; paths are directories unless named `_path`."""

    input_dir: str = DEFAULT_INPUT
    weights_dir: str = "/kaggle/input/rsna-lumbar-weights"
    wheels_dir: str = "/kaggle/input/rsna-lumbar-wheels"
    output_path: str = "/kaggle/working/submission.csv"
    device: str = "auto"               # "auto" = cuda when available, else cpu
    time_budget_s: float = 8 * 3600.0  # of Kaggle's 9 h limit
    max_studies: int | None = None     # first N studies only (debugging)
    mode: str = "submit"               # "submit" or "validate"
    labels_path: str | None = None     # validate mode: train.csv-format labels; only the
                                       # labelled studies run (e.g. one fold of train.csv)
    split: str = "test"                # reads {split}_series_descriptions.csv, {split}_images
    num_workers: int = 2               # DataLoader workers reading studies ahead
    manifest_path: str | None = None   # default: weights_dir / weights_manifest.json
    manifest_sha256: str | None = None  # the notebook pins the manifest it was built with
    warmup_studies: int = 3            # studies timed before the first forecast
    debug_dir: str | None = None       # when set: keypoints.csv, logits.csv, timings.csv


@dataclass
class LoadedModel:
    entry: ModelEntry
    family: type
    config: object
    folds: list


@dataclass
class StudyItem:
    study_id: int
    study: object | None
    error: str | None
    read_s: float


class StudyReader(Dataset):
    """Reads and normalises one study per item; an error is returned, never raised."""

    def __init__(self, images_dir: Path, study_ids: list[int],
                 descriptions: dict[int, dict[int, str]]):
        self.images_dir, self.study_ids, self.descriptions = images_dir, study_ids, descriptions

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, index: int) -> StudyItem:
        sid = self.study_ids[index]
        start = clock()
        try:
            study = dicom.read_study(self.images_dir, sid, self.descriptions[sid])
            study = preprocess.normalize_study(study)
            return StudyItem(sid, study, None, clock() - start)
        except Exception as err:  # noqa: BLE001  (any failure -> fallback for this study)
            return StudyItem(sid, None, f"read failed: {_describe(err)}",
                             clock() - start)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:300]


def _identity(item):
    return item


class DebugRecords:
    """Per-study records for scoring reports and pictures (`KernelParams.debug_dir`):
    keypoints.csv (`Keypoints.to_rows` of the merged stage-1 points), logits.csv
    (study_id, model, label, logit_0, logit_1, logit_2 per stage-2 model) and timings.csv
    (study_id, step, stage, seconds; step "read" (stage 0) or a model name)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.keypoints: list[dict] = []
        self.logits: list[dict] = []
        self.timings: list[dict] = []

    def add(self, study_id: int, read_s: float, record: dict, model_s: dict[str, float],
            stages: dict[str, int]) -> None:
        self.timings.append({"study_id": study_id, "step": "read", "stage": 0,
                             "seconds": read_s})
        self.timings += [{"study_id": study_id, "step": name, "stage": stages[name],
                          "seconds": sec} for name, sec in model_s.items()]
        if "keypoints" in record:
            self.keypoints += record["keypoints"].to_rows(study_id)
        for name, logits in record.get("logits", {}).items():
            self.logits += [{"study_id": study_id, "model": name, "label": col,
                             "logit_0": row[0], "logit_1": row[1], "logit_2": row[2]}
                            for col, row in zip(LABEL_COLUMNS, logits, strict=True)]

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        columns = {"keypoints": ["study_id", "label", "x", "y", "z", "confidence", "source",
                                 "nx", "ny", "nz"],
                   "logits": ["study_id", "model", "label", "logit_0", "logit_1", "logit_2"],
                   "timings": ["study_id", "step", "stage", "seconds"]}
        for name, cols in columns.items():
            pd.DataFrame(getattr(self, name), columns=cols).to_csv(
                self.out_dir / f"{name}.csv", index=False)


def _steady_mean(seconds: list[float]) -> float:
    """Mean without the first value when there are more (0 for none)."""
    values = seconds[1:] if len(seconds) > 1 else seconds
    return float(np.mean(values)) if values else 0.0


class TimeGuard:
    """Forecasts the run's end from per-study timings and chooses what to drop.

    The forecast is elapsed + studies left x (mean overhead + mean time of each active
    model); the first study's times are left out of the means once there are others (they
    hold one-off start-up costs: CUDA context, kernel autotuning). Models are dropped lowest manifest weight first, stage 2 before stage 1; the
    stage-1 point producers go only with the last stage-2 model. `reserve_s` is kept for
    writing (and scoring) the submission.
    """

    def __init__(self, budget_s: float, start: float, warmup: int = 3):
        self.start, self.warmup = start, max(1, int(warmup))
        self.reserve_s = min(0.05 * budget_s, 300.0)
        self.end = start + budget_s - self.reserve_s
        self.model_s: dict[str, list[float]] = {}
        self.overhead_s: list[float] = []

    def observe(self, overhead_s: float, model_s: dict[str, float]) -> None:
        self.overhead_s.append(overhead_s)
        for name, seconds in model_s.items():
            self.model_s.setdefault(name, []).append(seconds)

    def per_study(self, active: list[LoadedModel]) -> float:
        """Expected seconds for one more study with these models (0 with none)."""
        if not active:
            return 0.0
        return _steady_mean(self.overhead_s) + sum(
            _steady_mean(self.model_s.get(m.entry.name, [])) for m in active)

    def forecast(self, now: float, n_left: int, active: list[LoadedModel]) -> float:
        return now + n_left * self.per_study(active)

    @staticmethod
    def drop_order(active: list[LoadedModel]) -> list[list[LoadedModel]]:
        """Groups dropped together, in order: each stage-2 model by weight (lowest first,
        later manifest entry first on ties), the last one with all stage-1 models."""
        stage2 = [m for m in active if m.entry.stage == 2]
        stage2 = sorted(reversed(stage2), key=lambda m: m.entry.weight)
        stage1 = [m for m in active if m.entry.stage == 1]
        if not stage2:
            return [stage1] if stage1 else []
        return [[m] for m in stage2[:-1]] + [[stage2[-1], *stage1]]

    def plan(self, now: float, n_done: int, n_left: int,
             active: list[LoadedModel]) -> list[LoadedModel]:
        """The models to drop now so that the forecast fits (none during warm-up)."""
        if n_done < self.warmup or n_left == 0:
            return []
        dropped: list[LoadedModel] = []
        for group in self.drop_order(active):
            keep = [m for m in active if m not in dropped]
            if self.forecast(now, n_left, keep) <= self.end:
                break
            dropped.extend(group)
        return dropped

    def must_stop(self, now: float, active: list[LoadedModel]) -> bool:
        """True when even one more study would end past the budget."""
        return now + self.per_study(active) > self.end


def _resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; asking for cuda without one is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here")
    return resolved


def _inference(device: torch.device) -> contextlib.ExitStack:
    """torch.inference_mode, plus float16 autocast on CUDA."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if device.type == "cuda":
        stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
    return stack


def check_manifest(params: KernelParams) -> tuple[Manifest, Path]:
    """Load and validate the manifest (and its pinned sha256); raise before any work."""
    weights_dir = Path(params.weights_dir)
    path = Path(params.manifest_path) if params.manifest_path else weights_dir / MANIFEST_NAME
    manifest = load_manifest(path)
    if params.manifest_sha256 and sha256_file(path) != params.manifest_sha256:
        raise ManifestError(f"{path}: sha256 {sha256_file(path)} differs from the "
                            f"{params.manifest_sha256} this notebook was built with; attach "
                            "the matching weights dataset version or rebuild the kernel")
    validate_manifest(manifest, weights_dir)
    return manifest, weights_dir


def load_models(manifest: Manifest, weights_dir: Path, device: torch.device) -> list:
    """Every manifest entry with its fold models, each loaded once; an entry that fails to
    load is logged and left out."""
    loaded = []
    for entry in manifest.models:
        try:
            folds = []
            for fold in entry.folds:
                model, _, payload = load_checkpoint(weights_dir / fold.file, device)
                if payload["family"] != entry.family:
                    raise ValueError(f"{fold.file} holds family {payload['family']!r}")
                folds.append(model)
            config = inference_config(config_from_dict(entry.family, entry.config))
            loaded.append(LoadedModel(entry, get_family(entry.family), config, folds))
        except Exception as err:  # noqa: BLE001
            LOG.warning("model %s not loaded, left out: %s", entry.name, _describe(err))
    return loaded


def _run_model(model: LoadedModel, study, keypoints, device, failures: list[str]):
    """One entry on one study: Keypoints (stage 1) or (25, 3) float64 logits (stage 2);
    None (and a failure note) when it raises or returns something malformed."""
    try:
        with _inference(device):
            if model.entry.stage == 1:
                out = model.family.infer(model.folds, model.config, study, device)
                if not isinstance(out, Keypoints):
                    raise TypeError(f"returned {type(out).__name__}, not Keypoints")
                return out
            out = model.family.infer(model.folds, model.config, study, keypoints, device)
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float64)
        if out.shape != (N_LABELS, 3):
            raise ValueError(f"logits of shape {out.shape}, expected ({N_LABELS}, 3)")
        return out
    except Exception as err:  # noqa: BLE001
        failures.append(f"model {model.entry.name} failed ({_describe(err)})")
        return None


def predict_study(study, active: list[LoadedModel], manifest: Manifest, device,
                  timings: dict[str, float], record: dict | None = None
                  ) -> tuple[np.ndarray, dict, list[str]]:
    """(25, 3) probabilities (NaN rows: nothing), per-model seconds, failure notes.
    `record`, when given, receives the merged "keypoints" and the per-model "logits"."""
    failures: list[str] = []
    model_s: dict[str, float] = {}
    keypoints = Keypoints()
    for stage, key in ((1, "keypoints"), (2, "stage2")):
        logits, points = {}, []
        for model in (m for m in active if m.entry.stage == stage):
            start = clock()
            out = _run_model(model, study, keypoints, device, failures)
            model_s[model.entry.name] = clock() - start
            timings[key] += model_s[model.entry.name]
            if out is not None and stage == 1:
                points.append((out, model.entry.weight))
            elif out is not None:
                logits[model.entry.name] = out
        if stage == 1:
            keypoints = merge_weighted(points)
    start = clock()
    probs = ensemble.combine_manifest(logits, manifest)
    timings["ensemble"] += clock() - start
    if record is not None:
        record.update(keypoints=keypoints, logits=logits)
    return probs, model_s, failures


def _study_table(params: KernelParams, labelled: set[int] | None = None
                 ) -> tuple[list[int], dict[int, dict[int, str]]]:
    """Sorted study ids of `{split}_series_descriptions.csv` (only the labelled ones when
    `labelled` is given; ValueError if none), first `max_studies`; and their series."""
    path = Path(params.input_dir) / f"{params.split}_series_descriptions.csv"
    descriptions = competition.series_by_study(competition.load_series_descriptions(path))
    study_ids = sorted(descriptions)
    if labelled is not None:
        study_ids = [sid for sid in study_ids if sid in labelled]
        if not study_ids:
            raise ValueError(f"{params.labels_path}: labels none of the studies of {path}")
    if params.max_studies is not None:
        study_ids = study_ids[: int(params.max_studies)]
    return study_ids, descriptions


def read_studies(params: KernelParams, study_ids, descriptions):
    """Yield a StudyItem per study, in order, read ahead by DataLoader workers; if the
    workers break (a killed process), the rest is read in this process."""
    reader = StudyReader(Path(params.input_dir) / f"{params.split}_images", study_ids,
                         descriptions)
    extra = {}
    if params.num_workers > 0:
        # fork: the workers inherit the notebook's inlined modules
        extra = {"multiprocessing_context": "fork", "prefetch_factor": 2}
    loader = DataLoader(reader, batch_size=None, shuffle=False, collate_fn=_identity,
                        num_workers=params.num_workers, **extra)
    done = 0
    try:
        for item in loader:
            done += 1
            yield item
    except Exception as err:  # noqa: BLE001
        LOG.warning("reader workers failed after %d studies (%s); reading the rest in the "
                    "main process", done, _describe(err))
        for index in range(done, len(reader)):
            yield reader[index]


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="studies", unit="study", file=sys.stderr, mininterval=5.0)


def _process(params, manifest, models, device, study_ids, descriptions, probs, guard,
             timings, debug: DebugRecords | None = None) -> dict:
    """The per-study loop; fills `probs` (N, 25, 3). Returns counts for the summary."""
    active, counts = list(models), {"fallback": 0, "partial": 0, "guard_priors": 0}
    n = len(study_ids)
    with _progress(n) as bar:
        wait = clock()
        for index, item in enumerate(read_studies(params, study_ids, descriptions)):
            now = clock()
            timings["read"] += now - wait
            timings["read_worker"] += item.read_s
            active = _apply_guard(guard, now, index, n, active)
            if guard.must_stop(now, active) or (bool(models) and not active):
                counts["guard_priors"] = n - index
                LOG.warning("time guard: priors for the last %d studies (from study %d)",
                            n - index, item.study_id)
                break
            notes = [item.error] if item.error else []
            model_s: dict[str, float] = {}
            record: dict = {}
            if item.study is not None:
                try:
                    probs[index], model_s, failures = predict_study(
                        item.study, active, manifest, device, timings, record)
                    notes += failures
                except Exception as err:  # noqa: BLE001
                    notes.append(f"failed ({_describe(err)})")
            if debug is not None:
                debug.add(item.study_id, item.read_s, record, model_s,
                          {m.entry.name: m.entry.stage for m in models})
            _log_study(item.study_id, probs[index], notes, counts)
            guard.observe(clock() - wait - sum(model_s.values()), model_s)
            bar.update(1)
            wait = clock()
    counts["dropped"] = [m.entry.name for m in models if m not in active]
    return counts


def _apply_guard(guard: TimeGuard, now: float, n_done: int, n_total: int, active):
    drops = guard.plan(now, n_done, n_total - n_done, active)
    if drops:
        LOG.warning("time guard: forecast %.0f s > budget %.0f s after %d studies; dropping "
                    "%s", guard.forecast(now, n_total - n_done, active) - guard.start,
                    guard.end - guard.start, n_done,
                    ", ".join(f"{m.entry.name} (stage {m.entry.stage}, weight "
                              f"{m.entry.weight:g})" for m in drops))
    return [m for m in active if m not in drops]


def _log_study(study_id: int, probs: np.ndarray, notes: list[str], counts: dict) -> None:
    if not notes:
        return
    kept = int(np.isfinite(probs).all(axis=-1).sum())
    if kept == 0:
        counts["fallback"] += 1
        LOG.warning("study %d: class priors: %s", study_id, "; ".join(notes))
    else:
        counts["partial"] += 1
        LOG.warning("study %d: kept %d/%d rows from the surviving models: %s", study_id,
                    kept, N_LABELS, "; ".join(notes))


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(message)s")
    LOG.setLevel(logging.INFO)


def run(params: KernelParams) -> pd.DataFrame:
    """Run the kernel; returns the written submission (with `attrs["score"]` in validate
    mode). Raises only for a bad manifest or bad parameters, before any work."""
    _setup_logging()
    start = clock()
    if params.mode not in ("submit", "validate"):
        raise ValueError(f"mode must be 'submit' or 'validate', got {params.mode!r}")
    if params.mode == "validate" and not params.labels_path:
        raise ValueError("validate mode needs labels_path (train.csv format)")
    device = _resolve_device(params.device)
    manifest, weights_dir = check_manifest(params)
    guard = TimeGuard(params.time_budget_s, start, params.warmup_studies)
    priors = submission.load_priors(weights_dir / manifest.class_priors)
    labels = competition.load_train(params.labels_path) if params.mode == "validate" else None
    study_ids, descriptions = _study_table(
        params, None if labels is None else set(labels["study_id"].tolist()))
    LOG.info("%d studies, %d models in the manifest, device %s", len(study_ids),
             len(manifest.models), device)
    timings = dict.fromkeys(("load", "read", "read_worker", "keypoints", "stage2",
                             "ensemble"), 0.0)
    models = load_models(manifest, weights_dir, device)
    timings["load"] = clock() - start
    probs = np.full((len(study_ids), N_LABELS, 3), np.nan)
    debug = DebugRecords(params.debug_dir) if params.debug_dir else None
    counts = _process(params, manifest, models, device, study_ids, descriptions, probs,
                      guard, timings, debug)
    if debug is not None:
        try:
            debug.write()
        except OSError as err:  # debugging output never costs the submission
            LOG.warning("debug records not written: %s", _describe(err))
    out = submission.write_submission(params.output_path, study_ids, probs, priors)
    submission.validate_submission(out, study_ids)
    timings["total"] = clock() - start
    _log_summary(len(study_ids), timings, counts, params.output_path)
    if params.mode == "validate":
        out.attrs["score"] = score_submission(out, labels, study_ids)
    return out


def _log_summary(n: int, timings: dict, counts: dict, output_path: str) -> None:
    per = ", ".join(f"{k} {v:.2f} s ({v / max(n, 1):.3f} s/study)" for k, v in timings.items())
    LOG.info("wrote %s: %d studies; timings: %s", output_path, n, per)
    LOG.info("fallbacks: %d studies on priors, %d partial, %d on priors by the time guard; "
             "dropped models: %s", counts["fallback"], counts["partial"],
             counts["guard_priors"], ", ".join(counts["dropped"]) or "none")


def score_submission(sub: pd.DataFrame, labels: pd.DataFrame, study_ids: list[int]) -> dict:
    """The official metric of `sub` against labels (`competition.load_train` form) of
    these studies; prints and returns it."""
    labels = labels[labels["study_id"].isin(study_ids)].reset_index(drop=True)
    scores = metric.score(labels, sub)
    LOG.info("validation score on %d studies: %s", len(labels),
             ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print("score:", " ".join(f"{k}={v:.6f}" for k, v in scores.items()))
    return scores


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """CLI mirror of KernelParams, for running from source."""
    defaults = KernelParams()
    parser = argparse.ArgumentParser(prog="python -m kernel_src.kernel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", dest="input_dir", default=defaults.input_dir)
    parser.add_argument("--weights", dest="weights_dir", default=defaults.weights_dir)
    parser.add_argument("--wheels", dest="wheels_dir", default=defaults.wheels_dir)
    parser.add_argument("--out", dest="output_path", default="submission.csv")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--time-budget", dest="time_budget_s", type=float,
                        default=defaults.time_budget_s, help="seconds")
    parser.add_argument("--max-studies", type=int, default=None)
    parser.add_argument("--mode", choices=("submit", "validate"), default="submit")
    parser.add_argument("--labels", dest="labels_path", default=None)
    parser.add_argument("--split", default=defaults.split)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--manifest", dest="manifest_path", default=None)
    parser.add_argument("--debug-dir", dest="debug_dir", default=None,
                        help="write keypoints.csv, logits.csv, timings.csv here")
    args = parser.parse_args(argv)
    return run(KernelParams(**vars(args)))


if __name__ == "__main__":
    main()
