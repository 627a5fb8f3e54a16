"""Write the regression example's data: CSV files of rows x0,x1,x2,x3,y with
y = sin(2*x0) + 0.5*x1^2 - x2 + 0.3*x3 + noise.

    python examples/regression/make_data.py                  # into examples/regression/data
    python examples/regression/make_data.py --out /shared/regression --rows 4096 --files 8

The files in examples/regression/data were written by the first command (512 rows, 4 files,
seed 0). Point the job file's `config.data_dir` at another folder to train on other data.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
from pathlib import Path

from orchestrator.validation import strict_int

HERE = Path(__file__).resolve().parent
FEATURES = 4


def target(x: list[float]) -> float:
    return math.sin(2 * x[0]) + 0.5 * x[1] ** 2 - x[2] + 0.3 * x[3]


def file_names(files: int) -> list[str]:
    """The names `write` gives `files` files, in order."""
    return [f"part-{f:03d}.csv" for f in range(files)]


def write(out: Path, rows: int, files: int, seed: int, noise: float = 0.05) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    # `rows` in all: the first rows % files hold one more
    for f, name in enumerate(file_names(files)):
        path = out / name
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([f"x{i}" for i in range(FEATURES)] + ["y"])
            for _ in range(rows // files + (f < rows % files)):
                x = [rng.uniform(-1.5, 1.5) for _ in range(FEATURES)]
                y = target(x) + rng.gauss(0.0, noise)
                writer.writerow([f"{v:.4f}" for v in x] + [f"{y:.4f}"])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--rows", type=strict_int, default=512)
    parser.add_argument("--files", type=strict_int, default=4)
    parser.add_argument("--seed", type=strict_int, default=0)
    args = parser.parse_args(argv)
    for flag in ("rows", "files"):  # before anything is written
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.seed < 0:  # random.Random(-1) seeds as Random(1): --seed 1's data
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.files > args.rows:
        parser.error(f"--files {args.files} is more than --rows {args.rows}: every file needs "
                     "a row")
    # train.py reads every CSV file of the folder: one this write does not replace (more
    # files written there before) would be trained on beside the new ones.
    kept = sorted(p.name for p in args.out.glob("*.csv")
                  if p.name not in file_names(args.files))
    if kept:
        parser.error(f"--out {args.out} holds {', '.join(kept)}, which this write does not "
                     "replace and train.py would read beside the new files: remove them, or "
                     "give another --out")
    paths = write(args.out, args.rows, args.files, args.seed)
    print(f"wrote {len(paths)} CSV files ({args.rows} rows in all) to {args.out}")


if __name__ == "__main__":
    main()
