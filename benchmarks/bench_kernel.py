#!/usr/bin/env python
"""Benchmark the kernel: per-stage time per study for a whole ensemble (not a test).

  python benchmarks/bench_kernel.py --preset tiny --device cpu            # CPU, demo-sized
  python benchmarks/bench_kernel.py --preset full --device cuda --size 512  # full backbones, AMP

Writes a phantom test set (`--studies`, `--size` px), random-init checkpoints of every
family (`--preset full`: each family's default Config = the original's full-size
backbones and input sizes; `tiny`: the small configs of the tests), runs `kernel.run`
(AMP + inference_mode on CUDA) with debug records, and prints seconds per study for the
read step and for each model (the first study, which pays CUDA start-up, left out), the
peak GPU memory, and a forecast for a hidden test set of `--forecast-studies` studies with
`--folds` folds per model. Weights are random: only time and memory mean anything here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_src import kernel, submission  # noqa: E402
from kernel_src.manifest import FoldFile, Manifest, ModelEntry, save_manifest, sha256_file  # noqa: E402
from kernel_src.models import registry, zoo  # noqa: E402
from kernel_src.schema import N_LABELS  # noqa: E402

TINY = zoo.TINY_CONFIGS
# Families whose model variants are config values rather than `variants()`.
EXTRA_VARIANTS = {"v20": {"spinal": {"target": "spinal"}, "foraminal": {"target": "foraminal"}}}
BLENDS = zoo.ORIGINAL_BLENDS


def family_configs(name: str, preset: str) -> dict[str, object]:
    """Variant tag -> Config of a family for the preset (variants: e.g. T1 and T2)."""
    fam = registry.get_family(name)
    if hasattr(fam, "variants"):
        base = fam.variants()
    elif name in EXTRA_VARIANTS:
        base = {t: fam.Config(**v) for t, v in EXTRA_VARIANTS[name].items()}
    else:
        base = {"": fam.Config()}
    if preset == "tiny":
        base = {t: dataclasses.replace(c, **TINY[name]) for t, c in base.items()}
    return base


def write_weights(weights_dir: Path, preset: str, folds: int) -> Manifest:
    entries = []
    for name in TINY:
        fam = registry.get_family(name)
        for tag, config in family_configs(name, preset).items():
            model_name = f"{name}_{tag}" if tag else name
            files = []
            for k in range(folds):
                rel = f"{model_name}/fold{k}.pt"
                path = registry.save_checkpoint(weights_dir / rel, name, config,
                                                fam.build(config))
                files.append(FoldFile(k, rel, sha256_file(path)))
            entries.append(ModelEntry(model_name, fam.stage, name,
                                      registry.config_to_dict(config), tuple(files), 1.0))
    submission.save_priors(weights_dir / "class_priors.json",
                           np.tile([0.7, 0.2, 0.1], (N_LABELS, 1)))
    manifest = Manifest(1, "bench/weights", "bench/wheels", "class_priors.json",
                        tuple(entries), BLENDS)
    save_manifest(weights_dir / "weights_manifest.json", manifest)
    return manifest


def report(debug_dir: Path, manifest: Manifest, args) -> None:
    t = pd.read_csv(debug_dir / "timings.csv")
    first = t["study_id"].iloc[0]
    steady = t[t["study_id"] != first] if t["study_id"].nunique() > 1 else t
    per = steady.groupby(["stage", "step"])["seconds"].mean().reset_index()
    per["x_folds"] = np.where(per["stage"] > 0, per["seconds"] * args.folds_forecast,
                              per["seconds"])
    print(per.round(4).to_string(index=False))
    per_study = per["x_folds"].sum()
    print(f"per study: {per['seconds'].sum():.3f} s with {args.folds} fold(s); "
          f"{per_study:.3f} s with {args.folds_forecast} folds per model")
    hours = per_study * args.forecast_studies / 3600
    print(f"forecast for {args.forecast_studies} studies: {hours:.2f} h "
          f"(Kaggle limit 9 h; P100/T4 are several times slower than this device)")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"models: {len(manifest.models)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="phantom image size (px)")
    p.add_argument("--folds", type=int, default=1, help="fold checkpoints per model run")
    p.add_argument("--folds-forecast", type=int, default=5)
    p.add_argument("--forecast-studies", type=int, default=800)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    from kernel_src.synthetic import generate_competition

    start = time.time()
    data = generate_competition(args.out / f"phantom{args.size}", 0, args.studies, seed=7,
                                size=args.size)
    print(f"phantom: {args.studies} studies at {args.size} px in {time.time() - start:.0f} s")
    weights = args.out / f"weights_{args.preset}"
    manifest = write_weights(weights, args.preset, args.folds)
    debug = args.out / f"debug_{args.preset}_{args.device}"
    start = time.time()
    kernel.run(kernel.KernelParams(input_dir=str(data), weights_dir=str(weights),
                                   wheels_dir="", output_path=str(debug / "submission.csv"),
                                   device=args.device, num_workers=args.workers,
                                   debug_dir=str(debug)))
    print(f"kernel.run: {time.time() - start:.1f} s for {args.studies} studies "
          f"(preset {args.preset}, device {args.device})")
    report(debug, manifest, args)


if __name__ == "__main__":
    main()
