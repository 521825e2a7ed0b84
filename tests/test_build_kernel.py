"""build_kernel.py: import closure, deterministic notebook, the inlined-module loader, the
datasets, push, and the offline proof (papermill, no network, repo not importable)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

import build_kernel as bk
from kernel_src import kernel, submission
from kernel_src.manifest import load_manifest, sha256_file
from kernel_src.models import registry, zoo

sys.path.insert(0, str(Path(__file__).parent))
import test_kernel as tk  # noqa: E402  (shared tiny-input writers and fake families)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SLUG = "rsna-2024-lumbar-spine-degenerative-classification"
TINY_REAL, BLENDS = zoo.TINY_CONFIGS, zoo.ORIGINAL_BLENDS


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_closure_follows_absolute_and_relative_imports_only_of_kernel_src(tmp_path):
    root = _tree(tmp_path, {
        "kernel_src/__init__.py": "",
        "kernel_src/kernel.py": "import numpy\nfrom .models import zoo\n"
                                "def f():\n    import kernel_src.late\n",
        "kernel_src/late.py": "",
        "kernel_src/schema.py": "X = 1\n",
        "kernel_src/unused.py": "",
        "kernel_src/models/__init__.py": "",
        "kernel_src/models/zoo.py": "from . import registry\nfrom ..schema import X\n",
        "kernel_src/models/registry.py": "import torch\n",
    })
    closure = bk.import_closure("kernel_src.kernel", root)
    assert list(closure) == ["kernel_src", "kernel_src.kernel", "kernel_src.late",
                             "kernel_src.models", "kernel_src.models.registry",
                             "kernel_src.models.zoo", "kernel_src.schema"]
    assert closure["kernel_src.models"] == (root / "kernel_src/models/__init__.py", True)
    assert bk.third_party_imports(closure) == ["numpy", "torch"]


@pytest.mark.parametrize("bad", ["training", "synthetic", "viz", "demo"])
def test_closure_reaching_training_side_code_fails_naming_the_chain(tmp_path, bad):
    root = _tree(tmp_path, {
        "kernel_src/__init__.py": "",
        "kernel_src/kernel.py": "from .helpers import x\n",
        "kernel_src/helpers.py": f"x = 1\nimport kernel_src.{bad}.loop\n",
        f"kernel_src/{bad}/__init__.py": "",
        f"kernel_src/{bad}/loop.py": "",
    })
    with pytest.raises(bk.BuildError,
                       match=rf"kernel_src\.kernel -> kernel_src\.helpers -> kernel_src\.{bad}"):
        bk.import_closure("kernel_src.kernel", root)


def test_real_closure_is_the_inference_side():
    closure = bk.import_closure()
    for name in ("kernel_src.kernel", "kernel_src.manifest", "kernel_src.ensemble",
                 "kernel_src.models.zoo", "kernel_src.models.registry", "kernel_src.dicom",
                 "kernel_src.submission", "kernel_src.metric"):
        assert name in closure
    assert not [n for n in closure if bk._forbidden(n)]
    assert "timm_3d" in bk.third_party_imports(closure)


def test_build_is_deterministic_and_well_formed(tmp_path):
    a = bk.build(tmp_path / "a", REPO / "weights_manifest.json")
    bk.build(tmp_path / "b", REPO / "weights_manifest.json")
    for name in ("notebook.ipynb", "kernel-metadata.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    nb = nbformat.read(a["notebook"], as_version=4)
    nbformat.validate(nb)
    assert [c.cell_type for c in nb.cells] == ["markdown"] + ["code"] * 4
    assert nb.cells[1].metadata["tags"] == ["parameters"]
    params = nb.cells[1].source
    for name in ("input_dir", "weights_dir", "wheels_dir", "output_path", "device",
                 "time_budget_s", "max_studies", "mode", "labels_path", "num_workers",
                 "debug_dir"):
        assert f"\n{name} = " in params, name
    assert f'input_dir = "/kaggle/input/{SLUG}"' in params
    header = nb.cells[0].source
    for name in a["modules"]:
        path = REPO / (name.replace(".", "/") + ".py")
        path = path if path.exists() else REPO / name.replace(".", "/") / "__init__.py"
        assert sha256_file(path) in header, name
    assert sha256_file(REPO / "weights_manifest.json") in header
    assert "--no-index" in nb.cells[2].source and "--no-deps" in nb.cells[2].source
    assert "timm-3d==1.0.1" in nb.cells[2].source
    meta = json.loads((tmp_path / "a/kernel-metadata.json").read_text())
    manifest = load_manifest(REPO / "weights_manifest.json")
    assert meta["code_file"] == "notebook.ipynb" and meta["kernel_type"] == "notebook"
    assert (meta["is_private"], meta["enable_gpu"], meta["enable_internet"]) == (True, True, False)
    assert meta["competition_sources"] == [SLUG]
    assert meta["dataset_sources"] == [manifest.weights_dataset, manifest.wheels_dataset]
    assert meta["id"].split("/")[0] == manifest.weights_dataset.split("/")[0]


def _registry_script(tmp_path: Path) -> Path:
    """The notebook's module-registry cell as a script, run outside the repository."""
    bk.build(tmp_path / "k", REPO / "weights_manifest.json", commit="test")
    nb = nbformat.read(tmp_path / "k/notebook.ipynb", as_version=4)
    return nb.cells[3].source


def test_inlined_modules_load_by_name_and_tracebacks_name_file_and_line(tmp_path):
    probe = (
        "\nimport traceback\nimport kernel_src.kernel as k\n"
        "from kernel_src import manifest\n"
        "print('FILE', k.__file__, type(k.__loader__).__name__)\n"
        "try:\n    manifest.manifest_from_dict({})\n"
        "except manifest.ManifestError:\n    traceback.print_exc()\n")
    script = tmp_path / "run.py"
    script.write_text(_registry_script(tmp_path) + probe)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([PY, str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FILE kernel_src/kernel.py _InlinedSources" in out.stdout
    source = (REPO / "kernel_src/manifest.py").read_text().splitlines()
    line = next(i for i, t in enumerate(source, 1) if "raise ManifestError(f\"{where}: missing" in t)
    assert f'File "kernel_src/manifest.py", line {line}, in _need' in out.stderr
    assert source[line - 1].strip() in out.stderr  # the source line itself is shown


def _fake_wheel(folder: Path, name="timm_3d", dist="timm_3d", version="1.0.1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\n"
                                 f"Version: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
    return path


def test_wheels_dataset_downloads_pinned_wheels_with_metadata(tmp_path):
    _fake_wheel(tmp_path / "index")
    rc = bk.main(["wheels", "--out", str(tmp_path / "wheels"), "--find-links",
                  str(tmp_path / "index")])
    assert rc == 0
    assert [p.name for p in (tmp_path / "wheels").glob("*.whl")] == \
        ["timm_3d-1.0.1-py3-none-any.whl"]
    meta = json.loads((tmp_path / "wheels/dataset-metadata.json").read_text())
    assert meta["id"] == load_manifest(REPO / "weights_manifest.json").wheels_dataset
    assert 6 <= len(meta["title"]) <= 50 and meta["licenses"] == [{"name": "CC0-1.0"}]


def test_weights_dataset_refreshes_hashes_and_gathers_files(tmp_path):
    src = tmp_path / "runs"
    tk.write_weights(src, tk.STANDARD)
    path = src / "weights_manifest.json"
    stale = json.loads(path.read_text())
    for model in stale["models"]:
        for fold in model["folds"]:
            fold["sha256"] = "0" * 64
    path.write_text(json.dumps(stale))
    assert bk.main(["weights", "--source", str(src), "--manifest", str(path), "--out",
                    str(tmp_path / "ds")]) == 0
    fresh = load_manifest(path)
    assert all(f.sha256 == sha256_file(src / f.file) for m in fresh.models for f in m.folds)
    assert load_manifest(tmp_path / "ds/weights_manifest.json") == fresh
    copied = sorted(p.relative_to(tmp_path / "ds").as_posix()
                    for p in (tmp_path / "ds").rglob("*") if p.is_file())
    assert copied == sorted(["class_priors.json", "dataset-metadata.json",
                             "weights_manifest.json"] + [f.file for m in fresh.models
                                                          for f in m.folds])
    meta = json.loads((tmp_path / "ds/dataset-metadata.json").read_text())
    assert meta["id"] == fresh.weights_dataset and meta["licenses"][0]["name"] == "CC0-1.0"
    (src / "grade_t1/fold0.pt").unlink()
    assert bk.main(["weights", "--source", str(src), "--manifest", str(path), "--out",
                    str(tmp_path / "ds")]) == 2  # error naming the missing file, no traceback


def test_push_runs_the_kaggle_cli_and_never_imports_kaggle(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bk.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(bk.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    assert bk.main(["--out", str(tmp_path / "k"), "--push", "--source-commit", "x"]) == 0
    assert calls == [["kaggle", "kernels", "push", "-p", str(tmp_path / "k")]]
    tree = ast.parse((REPO / "build_kernel.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "kaggle" not in imported


def test_cli_help():
    out = subprocess.run([PY, str(REPO / "build_kernel.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "weights" in out.stdout and "--push" in out.stdout


# ---------------------------------------------------------------- the offline proof
@pytest.fixture(scope="module")
def kaggle_mounts(tmp_path_factory):
    """Phantom test studies, weights and wheels datasets laid out as Kaggle mounts them."""
    from kernel_src.synthetic import generate_competition

    root = tmp_path_factory.mktemp("offline")
    phantom = generate_competition(root / "phantom", 0, 3, seed=3, size=64)
    inputs = root / "kaggle/input"
    comp = inputs / SLUG
    comp.mkdir(parents=True)
    shutil.copytree(phantom / "test_images", comp / "test_images")
    for name in ("test_series_descriptions.csv", "sample_submission.csv"):
        shutil.copy(phantom / name, comp / name)
    runs = root / "runs"
    models = [(n, registry.get_family(n), c, w) for (n, c), w in
              zip(TINY_REAL.items(), (1, 1, 1, 1, 1.0, 0.7, 0.5), strict=True)]
    manifest = tk.write_weights(runs, models, n_folds=1, blends=BLENDS)
    weights = inputs / manifest.weights_dataset.split("/")[1]
    assert bk.main(["weights", "--source", str(runs), "--manifest",
                    str(runs / "weights_manifest.json"), "--out", str(weights)]) == 0
    wheels = inputs / manifest.wheels_dataset.split("/")[1]
    wheels.mkdir()
    (root / "kaggle/working").mkdir()
    return {"root": root, "comp": comp, "weights": weights, "wheels": wheels,
            "labels": phantom / "truth/test_labels.csv", "runs": runs}


@pytest.mark.slow
def test_built_notebook_runs_offline_and_matches_the_source(kaggle_mounts, tmp_path):
    m = kaggle_mounts
    built = bk.build(tmp_path / "kernel", m["runs"] / "weights_manifest.json")
    work = m["root"] / "kaggle/working"
    env_check = subprocess.run([PY, "-c", "import kernel_src"], cwd=work, capture_output=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert env_check.returncode != 0, "the repository must not be importable from there"
    out_nb = tmp_path / "executed.ipynb"
    params = {"input_dir": m["comp"], "weights_dir": m["weights"], "wheels_dir": m["wheels"],
              "output_path": work / "submission.csv", "device": "cpu", "num_workers": 0,
              "mode": "validate", "labels_path": m["labels"]}
    cmd = [PY, "-m", "papermill", str(built["notebook"]), str(out_nb), "--cwd", str(work)]
    for key, value in params.items():
        cmd += ["-p", key, str(value)] if key != "num_workers" else ["-p", key, "0"]
    cmd, env = bk.offline_command(cmd, tmp_path)
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    executed = nbformat.read(out_nb, as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert f"{len(built['modules'])} kernel_src modules inlined" in text
    assert "score: total=" in text and "7 models in the manifest" in text
    assert not [o for c in executed.cells if c.cell_type == "code"
                for o in c.get("outputs", []) if o.get("output_type") == "error"]

    from_notebook = pd.read_csv(work / "submission.csv")
    ids = sorted(int(d.name) for d in (m["comp"] / "test_images").iterdir())
    submission.validate_submission(from_notebook, ids)
    source = kernel.run(kernel.KernelParams(
        input_dir=str(m["comp"]), weights_dir=str(m["weights"]), wheels_dir=str(m["wheels"]),
        output_path=str(tmp_path / "source.csv"), device="cpu", num_workers=0))
    assert list(source["row_id"]) == list(from_notebook["row_id"])
    cols = ["normal_mild", "moderate", "severe"]
    np.testing.assert_allclose(from_notebook[cols].to_numpy(), source[cols].to_numpy(),
                               atol=1e-6)
    priors = submission.load_priors(m["weights"] / "class_priors.json")
    assert not np.allclose(source[cols].to_numpy().reshape(-1, 25, 3), priors), \
        "the models, not the priors, produced the submission"


def test_wheels_cell_installs_a_missing_module_offline_only_from_the_wheels_dir(tmp_path):
    """The notebook's install cell, in a throwaway venv with no network: a missing module
    is installed from the bundled wheel; one already importable is left alone."""
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, name="kit_fake_dep", dist="kit_fake_dep", version="0.1")
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", str(venv)], check=True, timeout=300)
    cell = bk._wheels_cell({"kit_fake_dep": "kit-fake-dep==0.1", "json": "json==0"}, "o/wheels")
    script = tmp_path / "cell.py"
    script.write_text(f"wheels_dir = {str(wheels)!r}\n" + cell +
                      "\nimport kit_fake_dep\nprint('IMPORTED', kit_fake_dep.__name__)\n")
    cmd, env = bk.offline_command([str(venv / "bin/python"), str(script)], tmp_path)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install ['kit-fake-dep==0.1'] -> exit code 0" in out.stdout
    assert "IMPORTED kit_fake_dep" in out.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "all importable, nothing to install" in again.stdout
