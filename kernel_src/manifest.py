"""`weights_manifest.json`: which models, folds and weights the kernel runs.

Schema (version 1), one JSON object:
```
{
  "schema_version": 1,
  "weights_dataset": "USER/rsna-lumbar-weights",   # Kaggle dataset slug holding the files
  "wheels_dataset": "USER/rsna-lumbar-wheels",     # Kaggle dataset slug of bundled wheels
  "class_priors": "class_priors.json",             # file in the weights dataset
                                                   # (submission.save_priors format)
  "models": [                                      # stage 1 and stage 2 entries
    {"name": "v2_convnext_nano",                   # unique; used in logs and ablations
     "stage": 2,                                   # 1 keypoints, 2 grading
     "family": "v2",                               # models.registry family name
     "config": {...},                              # family Config fields given to infer()
     "folds": [{"fold": 0, "file": "v2/convnext_nano/fold0.pt",   # relative to the
                "sha256": "<64 hex>"}],                            # weights dir
     "weight": 1.0}                                # stage 2: ensemble weight within its family;
                                                   # stage 1: point-merge weight (confidence x
                                                   # weight wins; fit: 1 / held-out median mm)
  ],
  "blends": {"spinal": {"v2": 0.59, "v20": 0.41}, ...}  # per condition group
}                                                       # (schema.GROUPS): family -> weight
```
Files are paths relative to the weights directory (the mounted weights dataset). The
model of each fold is rebuilt from its checkpoint (`models.registry.load_checkpoint`);
`config` is what the family's `infer` receives. A group absent from `blends` weights
every family present equally. `load_manifest` checks the structure (errors name the
field); `validate_manifest` checks the files, their sha256 and the families, and the
kernel calls it before any work. `refresh_hashes` rewrites the sha256 fields from the
files (`python build_kernel.py weights` uses it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import GROUPS

SCHEMA_VERSION = 1
MANIFEST_NAME = "weights_manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SLUG = re.compile(r"^[A-Za-z0-9_-]+/[A-Za-z0-9_-]+$")


class ManifestError(ValueError):
    """The manifest is malformed or does not match the weights directory."""


@dataclass(frozen=True)
class FoldFile:
    fold: int
    file: str
    sha256: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    stage: int
    family: str
    config: dict[str, Any]
    folds: tuple[FoldFile, ...]
    weight: float


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    weights_dataset: str
    wheels_dataset: str
    class_priors: str
    models: tuple[ModelEntry, ...] = ()
    blends: dict[str, dict[str, float]] = field(default_factory=dict)

    def stage(self, stage: int) -> list[ModelEntry]:
        """The entries of one stage, in manifest order."""
        return [m for m in self.models if m.stage == stage]


def _need(obj: dict, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _parse_fold(obj: dict, where: str) -> FoldFile:
    sha = _need(obj, "sha256", str, where).lower()
    if not _SHA256.match(sha):
        raise ManifestError(f"{where}.sha256: expected 64 hex digits, got {sha!r}")
    file = _need(obj, "file", str, where)
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise ManifestError(f"{where}.file: must be relative to the weights dir: {file!r}")
    return FoldFile(_need(obj, "fold", int, where), file, sha)


def _parse_model(obj: dict, where: str) -> ModelEntry:
    stage = _need(obj, "stage", int, where)
    if stage not in (1, 2):
        raise ManifestError(f"{where}.stage: expected 1 or 2, got {stage}")
    folds = _need(obj, "folds", list, where)
    if not folds:
        raise ManifestError(f"{where}.folds: empty")
    weight = _need(obj, "weight", float, where)
    if weight < 0:
        raise ManifestError(f"{where}.weight: negative ({weight})")
    return ModelEntry(
        name=_need(obj, "name", str, where), stage=stage,
        family=_need(obj, "family", str, where), config=_need(obj, "config", dict, where),
        folds=tuple(_parse_fold(f, f"{where}.folds[{i}]") for i, f in enumerate(folds)),
        weight=weight)


def _parse_blends(obj: dict, where: str) -> dict[str, dict[str, float]]:
    blends = {}
    for group, table in obj.items():
        if group not in GROUPS:
            raise ManifestError(f"{where}: unknown group {group!r} (known: {GROUPS})")
        if not isinstance(table, dict):
            raise ManifestError(f"{where}.{group}: expected an object family -> weight")
        blends[group] = {fam: _need(table, fam, float, f"{where}.{group}") for fam in table}
        if any(w < 0 for w in blends[group].values()):
            raise ManifestError(f"{where}.{group}: negative weight")
    return blends


def manifest_from_dict(obj: dict, source: str = "manifest") -> Manifest:
    """Parse and check the structure; errors name `source` and the field."""
    version = _need(obj, "schema_version", int, source)
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{source}: schema_version {version} (this kit reads "
                            f"{SCHEMA_VERSION})")
    slugs = {k: _need(obj, k, str, source) for k in ("weights_dataset", "wheels_dataset")}
    for key, slug in slugs.items():
        if not _SLUG.match(slug):
            raise ManifestError(f"{source}.{key}: expected 'owner/slug', got {slug!r}")
    models = tuple(_parse_model(m, f"{source}.models[{i}]")
                   for i, m in enumerate(_need(obj, "models", list, source)))
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"{source}.models: duplicate name(s) {dupes}")
    blends = _parse_blends(obj.get("blends", {}), f"{source}.blends")
    stage2 = {m.family for m in models if m.stage == 2}
    for group, table in blends.items():
        unknown = sorted(set(table) - stage2)
        if unknown:
            raise ManifestError(f"{source}.blends.{group}: {unknown} not a stage-2 family "
                                f"of the models")
    return Manifest(version, slugs["weights_dataset"], slugs["wheels_dataset"],
                    _need(obj, "class_priors", str, source), models, blends)


def manifest_to_dict(manifest: Manifest) -> dict:
    """The JSON form (lists, not tuples) of a manifest."""
    return json.loads(json.dumps(dataclasses.asdict(manifest)))


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    return manifest_from_dict(obj, source=str(path))


def save_manifest(path: str | Path, manifest: Manifest) -> Path:
    """Write the manifest as stable, indented JSON (field order as in the schema)."""
    path = Path(path)
    path.write_text(json.dumps(manifest_to_dict(manifest), indent=2) + "\n")
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _known_families() -> None:
    from .models import zoo  # noqa: F401  (registers every family)


def validate_manifest(manifest: Manifest, weights_dir: str | Path) -> None:
    """Check every file exists with its sha256 and every family is known, with its stage
    and config; raise ManifestError naming the first problem."""
    from .models.registry import config_from_dict, get_family

    _known_families()
    weights_dir = Path(weights_dir)
    priors = weights_dir / manifest.class_priors
    if not priors.is_file():
        raise ManifestError(f"class_priors file not found: {priors}")
    for entry in manifest.models:
        where = f"model {entry.name!r}"
        try:
            family = get_family(entry.family)
            config_from_dict(entry.family, entry.config)
        except (KeyError, ValueError, TypeError) as err:
            raise ManifestError(f"{where}: {err}") from err
        if family.stage != entry.stage:
            raise ManifestError(f"{where}: family {entry.family!r} is stage {family.stage}, "
                                f"manifest says stage {entry.stage}")
        for fold in entry.folds:
            path = weights_dir / fold.file
            if not path.is_file():
                raise ManifestError(f"{where} fold {fold.fold}: file not found: {path}")
            actual = sha256_file(path)
            if actual != fold.sha256:
                raise ManifestError(f"{where} fold {fold.fold}: sha256 mismatch for {path}: "
                                    f"file {actual}, manifest {fold.sha256}")


def refresh_hashes(manifest: Manifest, weights_dir: str | Path) -> Manifest:
    """A copy of the manifest whose sha256 fields are those of the files in weights_dir."""
    weights_dir = Path(weights_dir)

    def fresh(entry: ModelEntry) -> ModelEntry:
        folds = []
        for f in entry.folds:
            path = weights_dir / f.file
            if not path.is_file():
                raise ManifestError(f"model {entry.name!r} fold {f.fold}: file not found: "
                                    f"{path}")
            folds.append(dataclasses.replace(f, sha256=sha256_file(path)))
        return dataclasses.replace(entry, folds=tuple(folds))

    return dataclasses.replace(manifest, models=tuple(fresh(m) for m in manifest.models))


def files_of(manifest: Manifest) -> list[str]:
    """Every file the manifest refers to (class priors first), relative to the weights dir."""
    return [manifest.class_priors] + [f.file for m in manifest.models for f in m.folds]
