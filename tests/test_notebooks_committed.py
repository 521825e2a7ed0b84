"""Every committed training notebook is exactly what the notebook writer makes from its
spec (one `parameters` cell, then a call into kernel_src), and every notebook has a spec.
Regenerate with `python -m kernel_src.training.notebooks`."""

from pathlib import Path

import nbformat
import pytest

from kernel_src.training import notebooks

ROOT = Path(__file__).resolve().parents[1]
SPECS = {s.filename: s for s in notebooks.all_specs()}
# Written by its own builder (kernel_src.report, tested in tests/test_report.py).
OTHER_BUILDERS = {"post_deadline_scoring.ipynb"}


def test_every_committed_notebook_has_a_spec():
    on_disk = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert on_disk - OTHER_BUILDERS == set(SPECS)


@pytest.mark.parametrize("filename", sorted(SPECS))
def test_committed_notebook_matches_its_spec(filename):
    committed = (ROOT / "notebooks" / filename).read_text()
    assert committed == nbformat.writes(notebooks.build_notebook(SPECS[filename])) + "\n", \
        f"notebooks/{filename} is stale: python -m kernel_src.training.notebooks --only {filename}"
    nb = nbformat.reads(committed, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
