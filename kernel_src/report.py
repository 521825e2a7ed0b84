"""Post-deadline scoring: run the kernel on labelled studies and report what it did.

Training side only. `build_report(...)` executes `notebooks/post_deadline_scoring.ipynb`
with papermill and renders it to a self-contained HTML file (figures embedded as base64
PNG). The notebook is thin: it calls the functions here, which
- run the kernel (`run_kernel`: from source with `kernel.run`, or the built notebook with
  papermill) in validate mode with `debug_dir`, so the run leaves submission.csv plus
  debug/keypoints.csv, debug/logits.csv and debug/timings.csv;
- load it (`load_run`) and compute: the metric per condition group next to the class-prior
  baseline (`scores_table`), the score without each stage-2 model from the cached logits
  (`ablation_table`; a stage-1 model changes the keypoints, so it needs a kernel rerun on a
  manifest copy: `rerun_without`), time per study and per stage (`timing_table`), a
  confusion matrix per condition group, a calibration table, the keypoint errors in mm
  against the truth (`keypoint_errors`), the worst studies (`per_study_loss`) and their
  overlays (`worst_overlays`, via `viz`);
- print the late-submission commands (`submission_commands`).
Arrays: codes (N, 25) int grade codes (-1 = unlabelled), probs (N, 25, 3), in
`schema.LABEL_COLUMNS` order, rows in `study_ids` order.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import competition, ensemble, metric, submission
from . import manifest as manifest_lib
from .schema import (
    CLASS_WEIGHTS,
    COMPETITION_SLUG,
    CONDITIONS,
    GRADES,
    GROUPS,
    LABEL_COLUMNS,
    N_LABELS,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "post_deadline_scoring.ipynb"
DEBUG = "debug"


@dataclass
class ScoringRun:
    """A kernel run on labelled studies, loaded back (debug frames None when absent)."""

    run_dir: Path
    study_ids: np.ndarray                 # (N,) int64
    codes: np.ndarray                     # (N, 25) int64
    probs: np.ndarray                     # (N, 25, 3) float64
    priors: np.ndarray | None             # (25, 3) class priors of the weights
    manifest: manifest_lib.Manifest | None
    keypoints: pd.DataFrame | None        # Keypoints.to_rows rows
    logits: pd.DataFrame | None           # study_id, model, label, logit_0..2
    timings: pd.DataFrame | None          # study_id, step, stage, seconds


def default_labels(data_dir, split: str) -> Path:
    """The phantom's truth/test_labels.csv for split "test", else DATA/train.csv."""
    data_dir = Path(data_dir)
    return data_dir / "truth" / "test_labels.csv" if split == "test" else data_dir / "train.csv"


def run_kernel(data_dir, weights_dir, out_dir, *, split: str = "test", labels_path=None,
               kernel_notebook=None, max_studies: int | None = None, device: str = "auto",
               num_workers: int = 0, manifest_path=None) -> Path:
    """Run the kernel in validate mode into out_dir (submission.csv, debug/); returns it.

    kernel_notebook: the built notebook (dist/kernel/notebook.ipynb), run with papermill;
    None runs `kernel_src.kernel.run` from source. manifest_path overrides the manifest
    (source mode only; used by `rerun_without`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(input_dir=str(data_dir), weights_dir=str(weights_dir),
                  output_path=str(out_dir / "submission.csv"), device=device,
                  max_studies=max_studies, mode="validate", split=split,
                  labels_path=str(labels_path or default_labels(data_dir, split)),
                  num_workers=num_workers, debug_dir=str(out_dir / DEBUG))
    if kernel_notebook:
        import papermill

        papermill.execute_notebook(str(kernel_notebook), str(out_dir / "kernel_run.ipynb"),
                                   parameters=params, cwd=str(out_dir), progress_bar=False)
    else:
        from . import kernel

        kernel.run(kernel.KernelParams(wheels_dir="", manifest_path=manifest_path and
                                       str(manifest_path), **params))
    return out_dir


def _read_optional(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def load_run(run_dir, labels_path, weights_dir=None) -> ScoringRun:
    """Read run_dir/submission.csv (+ debug/ when present) and the labels of its studies;
    the manifest and priors from weights_dir when given."""
    run_dir = Path(run_dir)
    sub = pd.read_csv(run_dir / "submission.csv")
    ids = sorted({int(r.split("_", 1)[0]) for r in sub["row_id"]})
    labels = competition.load_train(labels_path)
    labels = labels.set_index("study_id").reindex(ids)
    if labels.isna().any(axis=None):
        missing = labels.index[labels.isna().any(axis=1)].tolist()
        raise ValueError(f"{labels_path}: no labels for studies {missing[:5]} of {run_dir}")
    codes = labels[list(LABEL_COLUMNS)].to_numpy(dtype=np.int64)
    probs = metric.submission_to_array(sub, ids)
    manifest = priors = None
    if weights_dir is not None:
        manifest = manifest_lib.load_manifest(Path(weights_dir) / manifest_lib.MANIFEST_NAME)
        priors = submission.load_priors(Path(weights_dir) / manifest.class_priors)
    debug = run_dir / DEBUG
    return ScoringRun(run_dir, np.asarray(ids, dtype=np.int64), codes, probs, priors, manifest,
                      _read_optional(debug / "keypoints.csv"), _read_optional(debug / "logits.csv"),
                      _read_optional(debug / "timings.csv"))


# ----------------------------------------------------------------------------- scores
def scores_table(run: ScoringRun) -> pd.DataFrame:
    """The metric (total, per group, any_severe_spinal) of the run and, when the priors
    are known, of the class-prior baseline."""
    rows = {"kernel": metric.score_arrays(run.codes, run.probs)}
    if run.priors is not None:
        rows["class priors"] = metric.score_arrays(
            run.codes, np.broadcast_to(run.priors, run.probs.shape).copy())
    return pd.DataFrame(rows).T


def model_logits(run: ScoringRun) -> dict[str, np.ndarray]:
    """Stage-2 model name -> (N, 25, 3) logits (NaN where the model gave none)."""
    if run.logits is None:
        return {}
    out = {}
    pos = {int(s): i for i, s in enumerate(run.study_ids)}
    col = {c: j for j, c in enumerate(LABEL_COLUMNS)}
    for name, frame in run.logits.groupby("model"):
        arr = np.full((len(run.study_ids), N_LABELS, 3), np.nan)
        i = frame["study_id"].map(pos).to_numpy()
        j = frame["label"].map(col).to_numpy()
        arr[i, j] = frame[["logit_0", "logit_1", "logit_2"]].to_numpy(dtype=np.float64)
        out[str(name)] = arr
    return out


def combined_probs(run: ScoringRun, logits: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 25, 3) ensemble probabilities of these models, priors where none gave a row."""
    probs = ensemble.combine_manifest(logits, run.manifest) if logits else \
        np.full(run.probs.shape, np.nan)
    return np.where(np.isfinite(probs), probs, run.priors[None])


def ablation_table(run: ScoringRun) -> pd.DataFrame:
    """The score with every stage-2 model, then without each one, recombined from the
    cached per-model logits with the manifest's weights and blends (no kernel rerun).
    `delta_total` > 0: the ensemble is worse without that model (it helps)."""
    if run.manifest is None or run.priors is None:
        raise ValueError("ablation needs the weights dir (manifest and class priors)")
    logits = model_logits(run)
    if not logits:
        raise ValueError(f"{run.run_dir / DEBUG}/logits.csv: no per-model logits (run the "
                         "kernel with debug_dir)")
    entries = {m.name: m for m in run.manifest.models}
    rows = [{"model": "(all)", "family": "", "weight": np.nan,
             **metric.score_arrays(run.codes, combined_probs(run, logits))}]
    for name in logits:
        rest = {k: v for k, v in logits.items() if k != name}
        rows.append({"model": f"without {name}", "family": entries[name].family,
                     "weight": entries[name].weight,
                     **metric.score_arrays(run.codes, combined_probs(run, rest))})
    table = pd.DataFrame(rows).set_index("model")
    table["delta_total"] = table["total"] - table.loc["(all)", "total"]
    return table


def rerun_without(model: str, data_dir, weights_dir, out_dir, **kernel_kwargs) -> Path:
    """Rerun the kernel (source mode) on a manifest copy without `model` (a stage-1 model:
    the keypoints change, so cached logits cannot tell); returns the run dir."""
    manifest = manifest_lib.load_manifest(Path(weights_dir) / manifest_lib.MANIFEST_NAME)
    kept = tuple(m for m in manifest.models if m.name != model)
    if len(kept) == len(manifest.models):
        raise KeyError(f"{weights_dir}: no model {model!r} in the manifest")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = manifest_lib.save_manifest(out_dir / manifest_lib.MANIFEST_NAME,
                                      dataclasses.replace(manifest, models=kept))
    return run_kernel(Path(data_dir), weights_dir, out_dir, manifest_path=path, **kernel_kwargs)


def stage1_ablation(run: ScoringRun, data_dir, weights_dir, out_dir, labels_path,
                    **kernel_kwargs) -> pd.DataFrame:
    """The score without each stage-1 model, by a source-mode kernel rerun per model on a
    manifest copy (`rerun_without`, into out_dir/without_<name>); costs one kernel run
    per stage-1 model. Same columns as `ablation_table`."""
    base = metric.score_arrays(run.codes, run.probs)
    rows = [{"model": "(all)", "family": "", "weight": np.nan, **base}]
    for entry in run.manifest.stage(1):
        rerun_dir = rerun_without(entry.name, data_dir, weights_dir,
                                  Path(out_dir) / f"without_{entry.name}",
                                  labels_path=labels_path, **kernel_kwargs)
        rerun = load_run(rerun_dir, labels_path)
        rows.append({"model": f"without {entry.name}", "family": entry.family,
                     "weight": entry.weight, **metric.score_arrays(rerun.codes, rerun.probs)})
    table = pd.DataFrame(rows).set_index("model")
    table["delta_total"] = table["total"] - base["total"]
    return table


def per_study_loss(codes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(N,) weighted log loss of each study over its labelled rows (all groups together,
    metric weights 1/2/4 and clipping); NaN for a study with no labelled row."""
    out = np.full(len(codes), np.nan)
    for i, (c, p) in enumerate(zip(codes, probs, strict=True)):
        keep = c >= 0
        if keep.any():
            out[i] = metric.weighted_log_loss(c[keep], p[keep], np.asarray(CLASS_WEIGHTS)[c[keep]])
    return out


# ----------------------------------------------------------------------------- tables
def timing_table(timings: pd.DataFrame, stages=("read", "keypoints", "stage2")) -> pd.DataFrame:
    """Seconds per study by stage (read = stage 0, keypoints = 1, stage2 = 2) and by model:
    rows = the stage names then "  stage: model", columns total_s, per_study_s (mean over
    the studies), max_study_s."""
    n = timings["study_id"].nunique()
    per_study_stage = timings.pivot_table(index="study_id", columns="stage",
                                          values="seconds", aggfunc="sum").fillna(0.0)
    rows = {}
    for k, name in enumerate(stages):
        col = per_study_stage[k] if k in per_study_stage else pd.Series(0.0, index=[0])
        rows[name] = (col.sum(), col.sum() / n, col.max())
    models = timings[timings["stage"] > 0].sort_values(["stage", "step"], kind="stable")
    for (stage, model), frame in models.groupby(["stage", "step"], sort=False):
        rows[f"  {stages[stage]}: {model}"] = (frame["seconds"].sum(),
                                               frame["seconds"].sum() / n,
                                               frame["seconds"].max())
    table = pd.DataFrame(rows, index=["total_s", "per_study_s", "max_study_s"]).T
    return table


_LOGGED = re.compile(r"(\w+) ([0-9.]+) s \(([0-9.]+) s/study\)")


def logged_timings(text: str) -> pd.DataFrame | None:
    """Per-stage seconds from the kernel's summary log line ("timings: load 9.16 s (4.579
    s/study), read ...") in `text` (e.g. a built notebook's executed JSON): rows = stage,
    columns total_s, per_study_s; None when the line is absent. The fallback when a run
    left no debug/timings.csv."""
    found = []
    for piece in reversed(text.split("; timings: ")[1:]):  # the last logged line first
        found = _LOGGED.findall(piece.split("\\n")[0].split("\n")[0])
        if found:
            break
    if not found:
        return None
    return pd.DataFrame([(k, float(t), float(p)) for k, t, p in found],
                        columns=["stage", "total_s", "per_study_s"]).set_index("stage")


def confusion_matrices(codes: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per condition group: (3, 3) counts, rows = true grade, columns = most probable."""
    group_of = np.array([GROUPS.index(g) for g in ensemble.ROW_GROUPS])
    pred = probs.argmax(axis=-1)
    out = {}
    for g, group in enumerate(GROUPS):
        mask = (codes >= 0) & (group_of == g)[None]
        out[group] = np.zeros((3, 3), np.int64)
        np.add.at(out[group], (codes[mask], pred[mask]), 1)
    return out


def calibration_table(codes: np.ndarray, probs: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Reliability per grade over labelled rows: predicted P(grade) binned in [0, 1];
    columns grade, bin_mid, mean_pred, observed (fraction of rows of that grade), count."""
    keep = codes >= 0
    y, p = codes[keep], probs[keep]
    rows = []
    for g, grade in enumerate(GRADES):
        idx = np.clip((p[:, g] * bins).astype(int), 0, bins - 1)
        for b in np.unique(idx):
            sel = idx == b
            rows.append({"grade": grade, "bin_mid": (b + 0.5) / bins,
                         "mean_pred": p[sel, g].mean(), "observed": (y[sel] == g).mean(),
                         "count": int(sel.sum())})
    return pd.DataFrame(rows)


def keypoint_errors(keypoints: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Predicted vs true points, both `Keypoints.to_rows`-like (study_id, label, x, y, z
    mm): study_id, label, condition, level, error_mm (3D), for rows known in both."""
    merged = keypoints.merge(truth, on=["study_id", "label"], suffixes=("", "_true"))
    diff = merged[["x", "y", "z"]].to_numpy() - merged[["x_true", "y_true", "z_true"]].to_numpy()
    merged["error_mm"] = np.linalg.norm(diff, axis=1)
    merged = merged[np.isfinite(merged["error_mm"])]
    merged["condition"] = [c for lab in merged["label"] for c in CONDITIONS if lab.startswith(c)]
    merged["level"] = merged["label"].str[-5:]
    return merged[["study_id", "label", "condition", "level", "error_mm"]].reset_index(drop=True)


def truth_rows(data_dir, split: str, study_ids) -> pd.DataFrame | None:
    """True points as rows (study_id, label, x, y, z mm): the phantom's truth/landmarks.csv,
    else the label coordinates mapped through each study's geometry (reads the studies);
    None when neither exists."""
    from . import viz

    data_dir = Path(data_dir)
    if (data_dir / "truth" / "landmarks.csv").exists():
        lm = pd.read_csv(data_dir / "truth" / "landmarks.csv")
        kps = {s: viz.keypoints_from_landmarks(lm, s) for s in study_ids}
    else:
        path = data_dir / ("train_label_coordinates.csv" if split == "train"
                           else "truth/test_label_coordinates.csv")
        if not path.exists():
            return None
        coords = competition.load_label_coordinates(path)
        kps = {s: viz.keypoints_from_coordinates(viz.load_study(data_dir, s, split), coords)
               for s in study_ids if (coords["study_id"] == s).any()}
    rows = [r for s, kp in kps.items() if kp is not None for r in kp.to_rows(s)]
    return pd.DataFrame(rows) if rows else None


# ----------------------------------------------------------------------------- figures
def plot_confusions(confusions: dict[str, np.ndarray]):
    """One heat map per condition group (counts; rows true, columns predicted)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(confusions), figsize=(4.2 * len(confusions), 3.8))
    short = ["N/M", "Mod", "Sev"]
    for ax, (group, m) in zip(np.atleast_1d(axes), confusions.items(), strict=True):
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > m.max() / 2 else "black")
        ax.set(title=group, xlabel="predicted (argmax)", ylabel="true", xticks=range(3),
               yticks=range(3), xticklabels=short, yticklabels=short)
    fig.tight_layout()
    return fig


def plot_calibration(table: pd.DataFrame):
    """Reliability diagram: observed frequency vs mean predicted probability per grade,
    marker area ~ number of rows."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
    for grade, frame in table.groupby("grade", sort=False):
        ax.plot(frame["mean_pred"], frame["observed"], marker="o", label=grade)
        ax.scatter(frame["mean_pred"], frame["observed"], s=10 + 200 * frame["count"]
                   / max(table["count"].max(), 1), alpha=0.3)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency",
           xlim=(0, 1), ylim=(0, 1), title="calibration (labelled rows)")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_keypoint_errors(errors: pd.DataFrame, max_mm: float = 40.0):
    """Histogram of the 3D keypoint error (mm) per condition, errors over max_mm in the
    last bin."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max_mm, 41)
    for condition, frame in errors.groupby("condition"):
        ax.hist(np.clip(frame["error_mm"], 0, max_mm), bins=bins, histtype="step", lw=1.5,
                label=f"{condition} (median {frame['error_mm'].median():.1f} mm)")
    ax.set(xlabel=f"keypoint error, mm (3D; the last bin holds >= {max_mm:g} mm)",
           ylabel="points", title="keypoint error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def worst_overlays(run: ScoringRun, data_dir, split: str, out_dir, n: int = 3
                   ) -> list[tuple[int, float, dict[str, Path]]]:
    """The n studies with the highest `per_study_loss`: (study_id, loss, viz PNG paths)
    with predicted keypoints (debug), truth (`truth_rows`), probabilities and labels."""
    from . import viz

    loss = per_study_loss(run.codes, run.probs)
    order = [i for i in np.argsort(-np.nan_to_num(loss, nan=-1.0))][:n]
    ids = [int(run.study_ids[i]) for i in order]
    sub = pd.read_csv(run.run_dir / "submission.csv")
    labels = pd.DataFrame(run.codes, columns=list(LABEL_COLUMNS))
    labels.insert(0, "study_id", run.study_ids)
    truth = truth_rows(data_dir, split, ids)
    sources = viz.Sources(Path(data_dir), split, keypoints=run.keypoints, submission=sub,
                          labels=labels)
    out = []
    for i, sid in zip(order, ids, strict=True):
        view = sources.view(sid)
        if truth is not None:
            view.truth = viz.keypoints_from_rows(truth, sid)
        out.append((sid, float(loss[i]), viz.render_study(view, out_dir)))
    return out


def submission_commands(user: str, kernel_slug: str, version: int | str,
                        message: str = "late submission", kernel_dir: str = "dist/kernel"
                        ) -> str:
    """The Kaggle CLI commands of a late submission of the built kernel (a code
    competition: the kernel's version is submitted; -f names its output file)."""
    return "\n".join([
        f"kaggle kernels push -p {kernel_dir}",
        f"kaggle kernels status {user}/{kernel_slug}   # wait for 'complete'",
        f"kaggle competitions submit {COMPETITION_SLUG} -k {user}/{kernel_slug} "
        f"-v {version} -f submission.csv -m {json.dumps(message)}",
        f"kaggle competitions submissions {COMPETITION_SLUG}   # the late score"])


# ----------------------------------------------------------------------------- notebook
PARAMETERS = '''# Parameters (papermill overrides them). Relative paths are from the repository root.
data_dir = "data/demo/phantom"  # Kaggle layout of labelled studies
split = "test"  # "test" (phantom: truth/test_labels.csv) or "train" (train.csv)
labels_path = None  # default: DATA/truth/test_labels.csv (test) or DATA/train.csv (train)
kernel_notebook = None  # built kernel, e.g. "dist/kernel/notebook.ipynb"; None: from source
weights_dir = "dist/weights"  # weights dir with weights_manifest.json and the class priors
output_dir = "runs/scoring"  # the run, the overlays and this report go here
max_studies = None  # int: only the first N studies
precomputed_dir = None  # an earlier run dir (submission.csv, debug/): no kernel run
device = "auto"
num_workers = 0
n_worst = 3  # overlays of the worst studies
kaggle_user = "USER"
kernel_slug = "rsna-lumbar-offline-kernel"
kernel_version = 1
rerun_stage1 = False  # True: one kernel rerun (source mode) per stage-1 model for its ablation
'''

CELLS = [
    ("markdown", "# Post-deadline scoring\nThe kernel on labelled studies: the official "
     "metric per condition group, a per-model ablation, time per study and stage, confusion "
     "matrices, calibration, keypoint errors, the worst studies' overlays, and the "
     "late-submission commands. Built by `kernel_src.report.build_report`."),
    ("code", "import sys\nfrom pathlib import Path\n\n_here = Path.cwd().resolve()\n"
     "_root = next((p for p in (_here, *_here.parents) if (p / 'kernel_src').is_dir()), _here)\n"
     "sys.path.insert(0, str(_root))"),
    ("parameters", PARAMETERS),
    ("code", "import time\n\nimport matplotlib.pyplot as plt\nimport pandas as pd\n"
     "from IPython.display import Image, Markdown, display\n\nfrom kernel_src import report\n\n"
     "pd.set_option('display.precision', 4)\n"
     "labels_path = labels_path or str(report.default_labels(data_dir, split))\n"
     "output_dir = Path(output_dir)\nstart = time.perf_counter()\n"
     "run_dir = Path(precomputed_dir) if precomputed_dir else report.run_kernel(\n"
     "    data_dir, weights_dir, output_dir / 'run', split=split, labels_path=labels_path,\n"
     "    kernel_notebook=kernel_notebook, max_studies=max_studies, device=device,\n"
     "    num_workers=num_workers)\n"
     "run = report.load_run(run_dir, labels_path, weights_dir)\n"
     "print(f'{len(run.study_ids)} studies scored from {run_dir} '\n"
     "      f'(kernel wall time {time.perf_counter() - start:.1f} s)')"),
    ("markdown", "## Metric per condition group\nWeighted log loss (lower is better), next to "
     "the class-prior baseline."),
    ("code", "report.scores_table(run)"),
    ("markdown", "## Ablation: the score without each stage-2 model\nRecombined from the "
     "cached per-model logits with the manifest's weights and blends. `delta_total` > 0: "
     "the model helps. A stage-1 model changes the keypoints: `report.rerun_without(...)` "
     "reruns the kernel on a manifest copy without it."),
    ("code", "try:\n    display(report.ablation_table(run))\nexcept (ValueError, KeyError) as err:\n"
     "    print('no ablation:', err)\nif rerun_stage1:\n"
     "    display(report.stage1_ablation(run, data_dir, weights_dir, output_dir / 'ablation',\n"
     "                                   labels_path, max_studies=max_studies, device=device,\n"
     "                                   num_workers=num_workers))"),
    ("markdown", "## Time per study and per stage\nSeconds, from the kernel's `debug/timings.csv` "
     "(read = DICOM read + normalisation in the loader)."),
    ("code", "logged = run_dir / 'kernel_run.ipynb'\nif run.timings is not None:\n"
     "    display(report.timing_table(run.timings))\n"
     "elif logged.exists() and report.logged_timings(logged.read_text()) is not None:\n"
     "    print('no debug/timings.csv; the stage totals from the kernel log:')\n"
     "    display(report.logged_timings(logged.read_text()))\nelse:\n"
     "    print('no debug/timings.csv: the kernel did not write debug outputs')"),
    ("markdown", "## Confusion matrix per condition group"),
    ("code", "report.plot_confusions(report.confusion_matrices(run.codes, run.probs))\nplt.show()"),
    ("markdown", "## Calibration"),
    ("code", "report.plot_calibration(report.calibration_table(run.codes, run.probs))\nplt.show()"),
    ("markdown", "## Keypoint error (mm)\nPredicted (merged stage-1) points against the truth "
     "(phantom landmarks, or label coordinates mapped to world mm)."),
    ("code", "truth = report.truth_rows(data_dir, split, run.study_ids.tolist())\n"
     "if run.keypoints is None or truth is None:\n"
     "    print('no keypoint error: predicted keypoints or truth missing')\nelse:\n"
     "    errors = report.keypoint_errors(run.keypoints, truth)\n"
     "    report.plot_keypoint_errors(errors)\n    plt.show()\n"
     "    display(errors.pivot_table(index='condition', columns='level', values='error_mm',\n"
     "                               aggfunc='median'))"),
    ("markdown", "## Worst studies\nHighest per-study weighted log loss. Rings: truth; discs: "
     "prediction (colour = level, text = 3D error). Crops: green frame = most probable grade "
     "is the true one."),
    ("code", "for sid, loss, paths in report.worst_overlays(run, data_dir, split,\n"
     "                                             output_dir / 'overlays', n_worst):\n"
     "    display(Markdown(f'### study {sid}: loss {loss:.3f}'))\n"
     "    display(Image(filename=str(paths['keypoints'])))\n"
     "    display(Image(filename=str(paths['crops'])))"),
    ("markdown", "## Late submission\nPush the built kernel, wait for its run, then submit "
     "that version (a code competition: `-f` names the kernel's output file)."),
    ("code", "print(report.submission_commands(kaggle_user, kernel_slug, kernel_version))"),
]


def write_notebook(path=NOTEBOOK) -> Path:
    """(Re)write the scoring notebook from CELLS (fixed cell ids: same bytes each time)."""
    import nbformat

    cells = []
    for i, (kind, source) in enumerate(CELLS):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell["id"] = f"cell-{i}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "display_name": "Python 3", "language": "python", "name": "python3"}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).resolve())


def build_report(data_dir, output_dir, weights_dir, *, kernel_notebook=None,
                 split: str = "test", labels_path=None, max_studies: int | None = None,
                 precomputed_dir=None, n_worst: int = 3, device: str = "auto",
                 num_workers: int = 0, kaggle_user: str = "USER",
                 kernel_slug: str = "rsna-lumbar-offline-kernel", kernel_version: int = 1,
                 rerun_stage1: bool = False, timeout_s: int = 3600) -> Path:
    """Execute the scoring notebook with these parameters into output_dir and render it
    to output_dir/post_deadline_scoring.html (self-contained); returns the HTML path."""
    import nbconvert
    import papermill

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    params = dict(data_dir=_absolute(data_dir), split=split, labels_path=_absolute(labels_path),
                  kernel_notebook=_absolute(kernel_notebook), weights_dir=_absolute(weights_dir),
                  output_dir=str(output_dir), max_studies=max_studies,
                  precomputed_dir=_absolute(precomputed_dir), device=device,
                  num_workers=num_workers, n_worst=n_worst, kaggle_user=kaggle_user,
                  kernel_slug=kernel_slug, kernel_version=kernel_version,
                  rerun_stage1=rerun_stage1)
    executed = output_dir / NOTEBOOK.name
    papermill.execute_notebook(str(NOTEBOOK), str(executed), parameters=params,
                               cwd=str(REPO), progress_bar=False, execution_timeout=timeout_s)
    body, _ = nbconvert.HTMLExporter().from_filename(str(executed))
    html = executed.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def main(argv: list[str] | None = None) -> Path:
    """CLI: `python -m kernel_src.report --data DIR --weights DIR --out DIR [...]`;
    `--write-notebook` only rewrites notebooks/post_deadline_scoring.ipynb."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kernel_src.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-notebook", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--weights")
    parser.add_argument("--out", default="runs/scoring")
    parser.add_argument("--kernel-notebook", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--max-studies", type=int, default=None)
    parser.add_argument("--precomputed", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rerun-stage1", action="store_true",
                        help="ablate each stage-1 model by a kernel rerun")
    args = parser.parse_args(argv)
    if args.write_notebook:
        path = write_notebook()
    else:
        if not (args.data and args.weights):
            parser.error("--data and --weights are required")
        path = build_report(args.data, args.out, args.weights,
                            kernel_notebook=args.kernel_notebook, split=args.split,
                            labels_path=args.labels, max_studies=args.max_studies,
                            precomputed_dir=args.precomputed, device=args.device,
                            rerun_stage1=args.rerun_stage1)
    print(path)
    return path


if __name__ == "__main__":
    main()
