#!/usr/bin/env python
"""Build the offline Kaggle notebook from `kernel_src`, and the weights and wheels datasets.

  python build_kernel.py [--out dist/kernel] [--manifest weights_manifest.json]
                         [--kernel-id USER/SLUG] [--title TITLE] [--push]
      One notebook (dist/kernel/notebook.ipynb) + kernel-metadata.json. The notebook holds
      the source of every module in the import closure of `kernel_src.kernel` (found with
      `ast`; the build fails if it reaches training, synthetic, viz or demo code), loaded by
      an importlib finder under its own name and file name, so tracebacks name the module
      and line. Same sources, same bytes. `--push` runs `kaggle kernels push -p OUT`.
  python build_kernel.py weights --source RUNS_DIR [--manifest ...] [--out dist/weights]
      Refresh the manifest's sha256 from the files under RUNS_DIR (in place), copy the
      files, the class priors and the manifest into OUT with a dataset-metadata.json.
  python build_kernel.py wheels [--out dist/wheels] [--package REQ ...] [--find-links DIR]
      `pip download --no-deps` the wheels Kaggle's image lacks (default: the pinned timm-3d)
      into OUT with a dataset-metadata.json.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from kernel_src.manifest import ManifestError

REPO = Path(__file__).resolve().parent
ENTRY = "kernel_src.kernel"
PACKAGE = "kernel_src"
NEVER_INLINED = ("kernel_src.training", "kernel_src.synthetic", "kernel_src.viz",
                 "kernel_src.report",
                 "kernel_src.demo")
# Packages the kernel imports that Kaggle's image lacks: import name -> PyPI name.
KAGGLE_LACKS = {"timm_3d": "timm-3d"}
NOTEBOOK_NAME = "notebook.ipynb"
KERNEL_SLUG = "rsna-lumbar-offline-kernel"
COMPETITION_SLUG = "rsna-2024-lumbar-spine-degenerative-classification"
LICENSE = "CC0-1.0"


class BuildError(RuntimeError):
    """The kernel cannot be built as asked (the message says why)."""


# ---------------------------------------------------------------- import closure
def module_file(name: str, root: Path = REPO) -> tuple[Path, bool] | None:
    """(source path, is_package) of a `kernel_src` module under root, or None."""
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    if node.level - 1 > len(parts) - 1:
        raise BuildError(f"{name}: relative import beyond the top package (line {node.lineno})")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str, root: Path = REPO) -> list[str]:
    """The `kernel_src` modules that module `name` imports (absolute or relative, anywhere
    in the file), plus their parent packages; sorted."""
    found = module_file(name, root)
    if found is None:
        raise BuildError(f"module {name} not found under {root}")
    path, is_package = found
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names
                           if module_file(f"{base}.{alias.name}", root))
    out = set()
    for target in targets:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(m for m in out if module_file(m, root) or _forbidden(m))


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in NEVER_INLINED)


def import_closure(entry: str = ENTRY, root: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """module name -> (path, is_package) for every `kernel_src` module `entry` needs,
    sorted by name. BuildError naming the import chain if it reaches a never-inlined one."""
    parents: dict[str, str | None] = {entry: None}
    queue = [entry]
    parts = entry.split(".")
    for i in range(1, len(parts)):
        parents.setdefault(".".join(parts[:i]), entry)
        queue.append(".".join(parts[:i]))
    while queue:
        name = queue.pop()
        if _forbidden(name):
            chain = [name]
            while parents[chain[-1]] is not None:
                chain.append(parents[chain[-1]])
            raise BuildError("the kernel must not import training-side code: "
                             + " -> ".join(reversed(chain)))
        for dep in imported_modules(name, root):
            if dep not in parents:
                parents[dep] = name
                queue.append(dep)
    return {name: module_file(name, root) for name in sorted(parents)}


def third_party_imports(closure: dict[str, tuple[Path, bool]]) -> list[str]:
    """Top-level names of the non-stdlib, non-kernel_src modules the closure imports."""
    names = set()
    for path, _ in closure.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if n != PACKAGE and n not in sys.stdlib_module_names
                  and n != "__future__")


# ---------------------------------------------------------------- notebook
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pins(root: Path = REPO) -> dict[str, str]:
    """PyPI name (lower case) -> 'name==version' from requirements.txt."""
    pins = {}
    for line in (root / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#;]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
    return pins


def source_commit(root: Path = REPO, files: list[Path] = ()) -> str:
    """HEAD of the repository, noting uncommitted changes to `files`; 'unknown' without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *map(str, files)],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes to inlined files" if dirty.strip() else "")


def _header(modules: dict[str, tuple[str, str]], manifest_sha: str, manifest: dict,
            commit: str) -> str:
    rows = "\n".join(f"| `{name}` | `{filename}` | `{sha256_bytes(src.encode())}` |"
                     for name, (filename, src) in modules.items())
    return f"""# RSNA 2024 Lumbar Spine: offline two-stage kernel

Built by `build_kernel.py` from the tested `kernel_src` sources: do not edit by hand, rebuild.
Runs with internet off: bundled wheels are installed from the wheels dataset only.

- source commit: `{commit}`
- manifest: `weights_manifest.json` sha256 `{manifest_sha}`
- weights dataset: `{manifest['weights_dataset']}`; wheels dataset: `{manifest['wheels_dataset']}`
- {len(modules)} inlined modules:

| module | file | sha256 |
|---|---|---|
{rows}
"""


def _parameters(manifest: dict) -> str:
    weights = manifest["weights_dataset"].split("/")[1]
    wheels = manifest["wheels_dataset"].split("/")[1]
    return f"""# Parameters (papermill overrides them; on Kaggle the defaults apply).
input_dir = "/kaggle/input/{COMPETITION_SLUG}"
weights_dir = "/kaggle/input/{weights}"
wheels_dir = "/kaggle/input/{wheels}"
output_path = "/kaggle/working/submission.csv"
device = "auto"  # "auto", "cuda" or "cpu"
time_budget_s = 8 * 3600.0  # of Kaggle's 9 h
max_studies = None  # int: only the first N studies
mode = "submit"  # "submit" or "validate" (scores against labels_path)
labels_path = None  # train.csv-format labels for validate mode
num_workers = 2  # DataLoader workers reading the next studies
split = "test"  # reads {{split}}_series_descriptions.csv and {{split}}_images/
debug_dir = None  # str: also write keypoints.csv, logits.csv, timings.csv there (scoring)
"""


def _wheels_cell(bundled: dict[str, str], wheels_dataset: str) -> str:
    return f"""# Offline install of the bundled wheels (never the network): only what is missing.
import importlib
import importlib.util
import os
import subprocess
import sys

BUNDLED_WHEELS = {bundled!r}  # import name -> pinned requirement
_missing = [req for mod, req in BUNDLED_WHEELS.items() if importlib.util.find_spec(mod) is None]
if not _missing:
    print("bundled wheels: all importable, nothing to install")
elif not os.path.isdir(wheels_dir):
    print(f"WARNING: {{_missing}} missing and wheels dir {{wheels_dir}} not found: attach "
          "the wheels dataset {wheels_dataset}; models that need them will be left out")
else:
    _done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                            "--find-links", wheels_dir, *_missing])
    importlib.invalidate_caches()
    print(f"bundled wheels: pip install {{_missing}} -> exit code {{_done.returncode}}")
"""


_FINDER = '''

class _InlinedSources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports kernel_src modules from the sources above, under their own names and file
    names (tracebacks show the original module and line); the repository is not needed."""

    def __init__(self, sources):
        self.sources = sources

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.sources:
            return None
        filename, is_package, _ = self.sources[fullname]
        spec = importlib.util.spec_from_loader(fullname, self, origin=filename,
                                               is_package=is_package)
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename, _, source = self.sources[module.__spec__.name]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)

    def get_source(self, fullname):
        return self.sources[fullname][2]


for _name in [n for n in sys.modules if n == "kernel_src" or n.startswith("kernel_src.")]:
    del sys.modules[_name]
sys.meta_path.insert(0, _InlinedSources(KERNEL_SOURCES))
print(f"{len(KERNEL_SOURCES)} kernel_src modules inlined")
'''


def _registry_cell(closure: dict[str, tuple[Path, bool]], root: Path) -> str:
    lines = ["# The kernel_src modules (import closure of kernel_src.kernel), loaded by an",
             "# importlib finder.", "import importlib.abc", "import importlib.util",
             "import linecache", "import sys", "", "KERNEL_SOURCES = {"]
    for name, (path, is_package) in closure.items():
        rel = path.relative_to(root).as_posix()
        lines.append(f"    {name!r}: ({rel!r}, {is_package!r}, {path.read_text()!r}),")
    return "\n".join(lines) + "\n}" + _FINDER


_RUN = """from kernel_src.kernel import KernelParams, run

MANIFEST_SHA256 = {sha!r}  # the weights dataset must hold exactly this manifest
submission = run(KernelParams(
    input_dir=input_dir, weights_dir=weights_dir, wheels_dir=wheels_dir,
    output_path=output_path, device=device, time_budget_s=time_budget_s,
    max_studies=max_studies, mode=mode, labels_path=labels_path, num_workers=num_workers,
    split=split, manifest_sha256=MANIFEST_SHA256, debug_dir=debug_dir))
submission.head()
"""


def build_notebook(manifest_path: Path, root: Path = REPO, commit: str | None = None):
    """The notebook node and a summary dict (modules, manifest sha256)."""
    closure = import_closure(ENTRY, root)
    manifest_bytes = manifest_path.read_bytes()
    manifest = json.loads(manifest_bytes)
    manifest_sha = sha256_bytes(manifest_bytes)
    modules = {n: (p.relative_to(root).as_posix(), p.read_text()) for n, (p, _) in closure.items()}
    if commit is None:
        commit = source_commit(root, [p for p, _ in closure.values()])
    pins = _pins(root)
    bundled = {mod: pins.get(pypi, pypi) for mod, pypi in sorted(KAGGLE_LACKS.items())
               if mod in third_party_imports(closure)}
    cells = [
        nbformat.v4.new_markdown_cell(_header(modules, manifest_sha, manifest, commit)),
        nbformat.v4.new_code_cell(_parameters(manifest), metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(_wheels_cell(bundled, manifest["wheels_dataset"])),
        nbformat.v4.new_code_cell(_registry_cell(closure, root)),
        nbformat.v4.new_code_cell(_RUN.format(sha=manifest_sha)),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"  # fixed ids: byte-identical rebuilds
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nb, {"modules": list(closure), "manifest_sha256": manifest_sha,
                "bundled_wheels": bundled, "manifest": manifest}


def kernel_metadata(kernel_id: str, title: str, manifest: dict) -> dict:
    return {
        "id": kernel_id, "title": title, "code_file": NOTEBOOK_NAME, "language": "python",
        "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        "enable_tpu": False, "enable_internet": False,
        "dataset_sources": [manifest["weights_dataset"], manifest["wheels_dataset"]],
        "competition_sources": [COMPETITION_SLUG], "kernel_sources": [], "model_sources": []}


def _title_of(slug: str) -> str:
    return slug.split("/")[-1].replace("-", " ").title()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def build(out: Path, manifest_path: Path, kernel_id: str | None = None,
          title: str | None = None, commit: str | None = None, root: Path = REPO) -> dict:
    """Write OUT/notebook.ipynb and OUT/kernel-metadata.json; returns a summary."""
    start = time.perf_counter()
    nb, info = build_notebook(manifest_path, root, commit)
    owner = info["manifest"]["weights_dataset"].split("/")[0]
    kernel_id = kernel_id or f"{owner}/{KERNEL_SLUG}"
    out.mkdir(parents=True, exist_ok=True)
    notebook = out / NOTEBOOK_NAME
    notebook.write_text(nbformat.writes(nb) + "\n")
    _write_json(out / "kernel-metadata.json",
                kernel_metadata(kernel_id, title or _title_of(kernel_id), info["manifest"]))
    info.update(notebook=notebook, bytes=notebook.stat().st_size,
                seconds=time.perf_counter() - start, kernel_id=kernel_id)
    return info


def push(out: Path) -> None:
    """`kaggle kernels push -p OUT` through the Kaggle CLI (needs its credentials)."""
    if shutil.which("kaggle") is None:
        raise BuildError("the `kaggle` CLI is not on PATH (pip install kaggle; set up "
                         "~/.kaggle/kaggle.json)")
    subprocess.run(["kaggle", "kernels", "push", "-p", str(out)], check=True)


# ---------------------------------------------------------------- datasets
def dataset_metadata(slug: str, title: str | None = None) -> dict:
    """A valid dataset-metadata.json: title and slug 6-50 characters, CC0 licence."""
    title = title or _title_of(slug)
    name = slug.split("/")[-1]
    if not 6 <= len(title) <= 50:
        raise BuildError(f"dataset title {title!r}: Kaggle needs 6 to 50 characters")
    if not 6 <= len(name) <= 50:
        raise BuildError(f"dataset slug {slug!r}: Kaggle needs 6 to 50 characters")
    return {"title": title, "id": slug, "licenses": [{"name": LICENSE}]}


def _fresh_dir(out: Path) -> None:
    """Empty `out` for a new dataset; refuses a non-empty folder this tool did not make."""
    if out.exists() and any(out.iterdir()) and not (out / "dataset-metadata.json").exists():
        raise BuildError(f"{out} is not empty and holds no dataset-metadata.json: not "
                         "overwriting it")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)


def gather_weights(manifest_path: Path, source: Path, out: Path,
                   title: str | None = None) -> dict:
    """Refresh the manifest's sha256 in place from SOURCE, then copy its files (class priors,
    checkpoints) and the manifest into OUT with dataset-metadata.json; validated at the end."""
    from kernel_src import manifest as mf

    fresh = mf.refresh_hashes(mf.load_manifest(manifest_path), source)
    if not (source / fresh.class_priors).is_file():
        raise BuildError(f"class priors not found: {source / fresh.class_priors}")
    mf.save_manifest(manifest_path, fresh)
    _fresh_dir(out)
    for rel in mf.files_of(fresh):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, out / rel)
    mf.save_manifest(out / mf.MANIFEST_NAME, fresh)
    _write_json(out / "dataset-metadata.json", dataset_metadata(fresh.weights_dataset, title))
    mf.validate_manifest(fresh, out)
    return {"files": len(mf.files_of(fresh)), "out": out}


def download_wheels(out: Path, manifest_path: Path, packages: list[str] | None = None,
                    find_links: str | None = None, title: str | None = None) -> list[Path]:
    """`pip download --no-deps` wheels of PACKAGES (default: the pinned KAGGLE_LACKS) into
    OUT with dataset-metadata.json; `find_links` downloads from a local folder only."""
    from kernel_src import manifest as mf

    manifest = mf.load_manifest(manifest_path)
    pins = _pins()
    packages = packages or [pins.get(p.lower(), p) for p in sorted(KAGGLE_LACKS.values())]
    _fresh_dir(out)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(out), *packages]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    subprocess.run(cmd, check=True)
    _write_json(out / "dataset-metadata.json", dataset_metadata(manifest.wheels_dataset, title))
    return sorted(out.glob("*.whl"))


# ---------------------------------------------------------------- CLI
def offline_command(cmd: list[str], scratch: Path) -> tuple[list[str], dict]:
    """Wrap `cmd` to run with no network, as on Kaggle: a new network namespace with only
    loopback (`unshare -n`) where this machine allows it, else a socket guard loaded at
    the IPython kernel's start-up (KIT_SOCKET_GUARD=1 forces the guard). Returns the
    command and its environment (PYTHONPATH removed, so the repository is not importable
    from another directory)."""
    import os
    import shlex

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if shutil.which("unshare") and not os.environ.get("KIT_SOCKET_GUARD"):
        probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                               capture_output=True)
        if probe.returncode == 0:
            inner = "ip link set lo up && exec " + " ".join(map(shlex.quote, cmd))
            return ["unshare", "-n", "sh", "-c", inner], env
    startup = Path(scratch) / "ipython/profile_default/startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-no-network.py").write_text(
        "import socket\n_connect = socket.socket.connect\n"
        "def _guard(self, address):\n"
        "    if self.family == socket.AF_UNIX or address[0] in ('127.0.0.1', '::1', "
        "'localhost'):\n        return _connect(self, address)\n"
        "    raise OSError(f'network disabled (offline run): {address}')\n"
        "socket.socket.connect = _guard\n")
    env["IPYTHONDIR"] = str(Path(scratch) / "ipython")
    return cmd, env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist/kernel")
    parser.add_argument("--manifest", type=Path, default=REPO / "weights_manifest.json")
    parser.add_argument("--kernel-id", default=None,
                        help=f"USER/SLUG (default: the weights dataset owner/{KERNEL_SLUG})")
    parser.add_argument("--title", default=None, help="kernel title (default: from the slug)")
    parser.add_argument("--source-commit", default=None,
                        help="commit recorded in the header (default: git HEAD)")
    parser.add_argument("--push", action="store_true", help="then kaggle kernels push")
    sub = parser.add_subparsers(dest="command")
    weights = sub.add_parser("weights", help="refresh sha256 and gather the weights dataset")
    weights.add_argument("--source", type=Path, required=True,
                         help="folder the manifest's file paths are relative to")
    weights.add_argument("--manifest", type=Path, default=REPO / "weights_manifest.json")
    weights.add_argument("--out", type=Path, default=REPO / "dist/weights")
    weights.add_argument("--title", default=None)
    wheels = sub.add_parser("wheels", help="download the wheels dataset")
    wheels.add_argument("--out", type=Path, default=REPO / "dist/wheels")
    wheels.add_argument("--manifest", type=Path, default=REPO / "weights_manifest.json")
    wheels.add_argument("--package", action="append", default=None,
                        help="requirement to download (repeatable; default: pinned timm-3d)")
    wheels.add_argument("--find-links", default=None, help="local folder instead of PyPI")
    wheels.add_argument("--title", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "weights":
            info = gather_weights(args.manifest, args.source, args.out, args.title)
            print(f"weights dataset: {info['files']} files in {args.out}; manifest "
                  f"{args.manifest} refreshed")
        elif args.command == "wheels":
            wheels = download_wheels(args.out, args.manifest, args.package, args.find_links,
                                     args.title)
            print(f"wheels dataset: {', '.join(w.name for w in wheels)} in {args.out}")
        else:
            info = build(args.out, args.manifest, args.kernel_id, args.title,
                         args.source_commit)
            print(f"wrote {info['notebook']} ({info['bytes'] / 1024:.0f} KiB, "
                  f"{len(info['modules'])} modules) and kernel-metadata.json in "
                  f"{info['seconds']:.2f} s")
            if args.push:
                push(args.out)
    except (BuildError, ManifestError) as err:
        print(f"build_kernel.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
