"""CLI: `python -m kernel_src.synthetic --out DIR --train-studies N --test-studies M --seed S
[--size PX]` writes a phantom competition (see `competition`) and prints the time taken."""

from __future__ import annotations

import argparse
import time

from kernel_src.synthetic.competition import generate_competition


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernel_src.synthetic",
                                     description="Write a phantom lumbar-spine competition.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train-studies", type=int, default=20)
    parser.add_argument("--test-studies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (~)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = generate_competition(args.out, args.train_studies, args.test_studies,
                               seed=args.seed, size=args.size)
    n = args.train_studies + args.test_studies
    print(f"wrote {n} phantom studies to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
