"""Command line: `python -m cnnjax.data prepare NAME` (one-time TFDS download) and `... bench NAME` (throughput)."""

from __future__ import annotations

import argparse
import sys

from cnnjax.data.config import DataError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cnnjax.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare", help="download a TFDS dataset and convert it to ArrayRecord"
    )
    prepare.add_argument("name")
    prepare.add_argument(
        "--data-dir", default="", help="TFDS data dir (default ~/tensorflow_datasets)"
    )
    prepare.add_argument(
        "--manual-dir", default="", help="folder with manually downloaded files (imagenet2012)"
    )
    bench = commands.add_parser("bench", help="images/s of the host and device-resident pipelines")
    bench.add_argument("name")
    bench.add_argument("--path", default="")
    bench.add_argument("--tfds-dir", default="")
    bench.add_argument("--batch-size", type=int, default=128)
    bench.add_argument("--image-size", type=int, default=32)
    bench.add_argument("--channels", type=int, default=1, choices=(1, 3))
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument(
        "--workers", type=int, default=0, help="grain worker processes for the host path"
    )
    bench.add_argument("--augment", default="basic", help="none | basic (pad-crop + flip) | all")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "prepare":
            from cnnjax.data.tfds_source import prepare

            print(f"prepared {args.name} in {prepare(args.name, args.data_dir, args.manual_dir)}")
            return 0
        from cnnjax.data.bench import run_bench

        results = run_bench(
            args.name,
            path=args.path,
            batch_size=args.batch_size,
            image_size=args.image_size,
            channels=args.channels,
            steps=args.steps,
            workers=args.workers,
            augment=args.augment,
            tfds_dir=args.tfds_dir,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, rate in results.items():
        print(
            f"{args.name} {path:6s} {rate:10.0f} images/s  (batch {args.batch_size}, {args.image_size}px, "
            f"augment {args.augment}, workers {args.workers})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
