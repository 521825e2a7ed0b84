"""weights_manifest.json: structure checks, file/sha256/family validation, hash refresh."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kernel_src import manifest as mf
from kernel_src.models import registry

REPO = Path(__file__).resolve().parents[1]


@registry.register_family
class _ManifestTestFamily:
    """A tiny stage-2 family only for these tests."""

    name, stage = "test_manifest_fam", 2

    @dataclasses.dataclass(frozen=True)
    class Config:
        width: int = 2

    @staticmethod
    def build(config):
        return nn.Linear(config.width, 3)


def _write_weights(tmp_path: Path) -> dict:
    fam = _ManifestTestFamily
    files = []
    for fold in (0, 1):
        torch.manual_seed(fold)
        path = registry.save_checkpoint(tmp_path / f"fam/fold{fold}.pt", fam.name,
                                        fam.Config(), fam.build(fam.Config()))
        files.append({"fold": fold, "file": f"fam/fold{fold}.pt",
                      "sha256": mf.sha256_file(path)})
    (tmp_path / "priors.json").write_text("{}")
    return {"schema_version": 1, "weights_dataset": "me/w-set", "wheels_dataset": "me/wh-set",
            "class_priors": "priors.json",
            "models": [{"name": "m", "stage": 2, "family": fam.name, "config": {"width": 2},
                        "folds": files, "weight": 1.0}],
            "blends": {"spinal": {fam.name: 1.0}}}


def test_valid_manifest_round_trips_and_validates(tmp_path):
    obj = _write_weights(tmp_path)
    m = mf.manifest_from_dict(obj)
    assert [e.name for e in m.stage(2)] == ["m"] and m.stage(1) == []
    mf.validate_manifest(m, tmp_path)
    path = mf.save_manifest(tmp_path / "weights_manifest.json", m)
    assert mf.load_manifest(path) == m
    assert mf.files_of(m) == ["priors.json", "fam/fold0.pt", "fam/fold1.pt"]


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.pop("weights_dataset"), "missing field 'weights_dataset'"),
    (lambda o: o.update(schema_version=9), "schema_version 9"),
    (lambda o: o.update(wheels_dataset="no-owner"), "wheels_dataset"),
    (lambda o: o["models"][0].update(stage=3), r"models\[0\].stage"),
    (lambda o: o["models"][0].update(weight="x"), r"models\[0\].weight"),
    (lambda o: o["models"][0]["folds"][1].update(sha256="abc"), r"folds\[1\].sha256"),
    (lambda o: o["models"][0]["folds"][0].update(file="../x.pt"), r"folds\[0\].file"),
    (lambda o: o["models"].append(copy.deepcopy(o["models"][0])), "duplicate name"),
    (lambda o: o["blends"].update(lumbar={}), "unknown group 'lumbar'"),
    (lambda o: o["blends"]["spinal"].update(v99=1.0), r"\['v99'\] not a stage-2 family"),
])
def test_structure_errors_name_the_field(tmp_path, mutate, message):
    obj = _write_weights(tmp_path)
    mutate(obj)
    with pytest.raises(mf.ManifestError, match=message):
        mf.manifest_from_dict(obj, source="weights_manifest.json")


def test_validate_names_missing_file_wrong_hash_unknown_family(tmp_path):
    obj = _write_weights(tmp_path)
    (tmp_path / "fam/fold1.pt").unlink()
    with pytest.raises(mf.ManifestError, match=r"fold 1: file not found: .*fold1\.pt"):
        mf.validate_manifest(mf.manifest_from_dict(obj), tmp_path)

    obj = _write_weights(tmp_path)
    obj["models"][0]["folds"][0]["sha256"] = "0" * 64
    with pytest.raises(mf.ManifestError, match=r"fold 0: sha256 mismatch .*fold0\.pt"):
        mf.validate_manifest(mf.manifest_from_dict(obj), tmp_path)

    obj = _write_weights(tmp_path)
    obj["models"][0]["family"] = "no_such_family"
    obj["blends"] = {}
    with pytest.raises(mf.ManifestError, match="unknown model family 'no_such_family'"):
        mf.validate_manifest(mf.manifest_from_dict(obj), tmp_path)


def test_validate_checks_stage_config_and_priors(tmp_path):
    obj = _write_weights(tmp_path)
    obj["models"][0]["stage"] = 1
    obj["blends"] = {}
    with pytest.raises(mf.ManifestError, match="is stage 2, manifest says stage 1"):
        mf.validate_manifest(mf.manifest_from_dict(obj), tmp_path)
    obj = _write_weights(tmp_path)
    obj["models"][0]["config"] = {"depth": 3}
    with pytest.raises(mf.ManifestError, match=r"unknown config field\(s\) \['depth'\]"):
        mf.validate_manifest(mf.manifest_from_dict(obj), tmp_path)
    obj = _write_weights(tmp_path)
    (tmp_path / "priors.json").unlink()
    with pytest.raises(mf.ManifestError, match="class_priors file not found"):
        mf.validate_manifest(mf.manifest_from_dict(obj), tmp_path)


def test_refresh_hashes_rewrites_sha256_from_files(tmp_path):
    obj = _write_weights(tmp_path)
    good = [f["sha256"] for f in obj["models"][0]["folds"]]
    for f in obj["models"][0]["folds"]:
        f["sha256"] = "f" * 64
    fresh = mf.refresh_hashes(mf.manifest_from_dict(obj), tmp_path)
    assert [f.sha256 for f in fresh.models[0].folds] == good
    mf.validate_manifest(fresh, tmp_path)


def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(mf.ManifestError, match="manifest not found"):
        mf.load_manifest(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(mf.ManifestError, match="bad.json: not valid JSON"):
        mf.load_manifest(bad)


def test_committed_manifest_is_a_valid_example():
    m = mf.load_manifest(REPO / "weights_manifest.json")
    assert m.schema_version == mf.SCHEMA_VERSION
    assert m.stage(1) and m.stage(2), "the example lists both stages"
    assert set(m.blends) == {"spinal", "foraminal", "subarticular"}
    raw = json.loads((REPO / "weights_manifest.json").read_text())
    assert raw == mf.manifest_to_dict(m), "the file is in the canonical saved form"
