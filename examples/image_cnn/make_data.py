"""Write the image example's data: 16x16 grey images of a line (horizontal, vertical,
diagonal or anti-diagonal, anywhere in the image) under Gaussian noise, as .npz files
(`images` uint8 [N, 16, 16], `labels` int64 [N]).

    python examples/image_cnn/make_data.py                   # into examples/image_cnn/data
    python examples/image_cnn/make_data.py --out /shared/lines --train 8000 --shards 8

Writes train-000.npz ... (the training set in shards: each worker reads its own) and
test.npz (held out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from orchestrator.validation import strict_int

HERE = Path(__file__).resolve().parent
SIZE = 16
CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")


def draw(kind: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    at = rng.integers(2, SIZE - 2)
    offset = rng.integers(-4, 5)
    if kind == 0:
        image[at, :] = 1.0
    elif kind == 1:
        image[:, at] = 1.0
    else:
        rows = np.arange(SIZE)
        cols = rows + offset if kind == 2 else SIZE - 1 - rows + offset
        keep = (cols >= 0) & (cols < SIZE)
        image[rows[keep], cols[keep]] = 1.0
    image += rng.normal(0.0, noise, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def make(count: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(CLASSES), count)
    return np.stack([draw(int(k), rng, noise) for k in labels]), labels.astype(np.int64)


def shard_names(shards: int) -> list[str]:
    """The names `write` gives `shards` training shards, in order."""
    return [f"train-{shard:03d}.npz" for shard in range(shards)]


def write(out: Path, train: int, test: int, shards: int, seed: int,
          noise: float = 0.35) -> list[Path]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    # `train` in all: the first train % shards hold one more
    for shard, name in enumerate(shard_names(shards)):
        images, labels = make(train // shards + (shard < train % shards), rng, noise)
        paths.append(out / name)
        np.savez_compressed(paths[-1], images=images, labels=labels)
    images, labels = make(test, rng, noise)
    paths.append(out / "test.npz")
    np.savez_compressed(paths[-1], images=images, labels=labels)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--train", type=strict_int, default=2048, help="training images in all")
    parser.add_argument("--test", type=strict_int, default=512)
    parser.add_argument("--shards", type=strict_int, default=4)
    parser.add_argument("--seed", type=strict_int, default=0)
    args = parser.parse_args(argv)
    for flag in ("train", "test", "shards"):  # before anything is written
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.seed < 0:  # numpy's default_rng takes no negative seed
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.shards > args.train:
        parser.error(f"--shards {args.shards} is more than --train {args.train}: every shard "
                     "needs an image")
    # train.py reads every train-*.npz of the folder: a shard this write does not replace
    # (more shards written there before) would be trained on beside the new ones.
    kept = sorted(p.name for p in args.out.glob("train-*.npz")
                  if p.name not in shard_names(args.shards))
    if kept:
        parser.error(f"--out {args.out} holds {', '.join(kept)}, which this write does not "
                     "replace and train.py would read beside the new shards: remove them, or "
                     "give another --out")
    paths = write(args.out, args.train, args.test, args.shards, args.seed)
    print(f"wrote {len(paths)} files ({args.train} training images in {args.shards} shards, "
          f"{args.test} held out) to {args.out}")


if __name__ == "__main__":
    main()
