"""Writes the thin papermill training notebooks from specs, so they all look alike.

A notebook = a title cell, a path cell (puts the repository root on `sys.path`), ONE cell
tagged `parameters` (papermill injects overrides after it), and one cell that calls a
`kernel_src` function with every parameter by name. No other logic lives in a notebook.

Training modules declare `NOTEBOOKS: list[NotebookSpec]`; list the module in
`SPEC_MODULES` and run `python -m kernel_src.training.notebooks --out notebooks` to
(re)write every notebook. Running a notebook:
`papermill notebooks/train_keypoint_sag2d.ipynb out.ipynb -p fold 1 -p epochs 30`.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

# Modules that define NOTEBOOKS; add yours here (one line).
SPEC_MODULES: tuple[str, ...] = (
    "kernel_src.training.train_keypoint",
    "kernel_src.training.train_axial",
    "kernel_src.training.train_stage2",
    "kernel_src.training.fit_ensemble",
)

_PATH_CELL = """\
import sys
from pathlib import Path

_here = Path.cwd().resolve()
_root = next((p for p in (_here, *_here.parents) if (p / "kernel_src").is_dir()), _here)
sys.path.insert(0, str(_root))"""


@dataclass(frozen=True)
class NotebookSpec:
    """One notebook: `<filename>` calls `<module>.<function>(dict(<parameters>))`.

    parameters: name -> default value (must be valid Python literals via repr) and an
    optional comment per name in `comments`.
    """

    filename: str
    title: str
    description: str
    module: str
    function: str
    parameters: dict[str, Any]
    comments: dict[str, str] = field(default_factory=dict)
    result_name: str = "metrics"


def parameters_source(spec: NotebookSpec) -> str:
    lines = []
    for name, value in spec.parameters.items():
        if not name.isidentifier():
            raise ValueError(f"notebook {spec.filename}: parameter {name!r} is not a name")
        comment = spec.comments.get(name)
        lines.append(f"{name} = {value!r}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines)


def call_source(spec: NotebookSpec) -> str:
    args = "".join(f"    {name}={name},\n" for name in spec.parameters)
    short = spec.module.rsplit(".", 1)
    return (f"from {short[0]} import {short[1]}\n\n"
            f"{spec.result_name} = {short[1]}.{spec.function}(dict(\n{args}))")


def build_notebook(spec: NotebookSpec) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(parameters_source(spec))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {spec.title}\n\n{spec.description}"),
        nbformat.v4.new_code_cell(_PATH_CELL),
        params,
        nbformat.v4.new_code_cell(call_source(spec)),
    ]
    for i, cell in enumerate(nb.cells):  # stable ids: rewriting gives identical files
        cell["id"] = f"cell-{i}"
    return nb


def write_notebook(spec: NotebookSpec, out_dir: str | Path) -> Path:
    path = Path(out_dir) / spec.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = build_notebook(spec)
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return path


def all_specs() -> list[NotebookSpec]:
    specs = []
    for name in SPEC_MODULES:
        specs.extend(importlib.import_module(name).NOTEBOOKS)
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="notebooks", help="directory for the .ipynb files")
    parser.add_argument("--only", nargs="*", default=None,
                        help="write only these notebook file names")
    args = parser.parse_args(argv)
    for spec in all_specs():
        if args.only is None or spec.filename in args.only:
            print(write_notebook(spec, args.out))


if __name__ == "__main__":
    main()
