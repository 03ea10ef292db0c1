"""The ``alignlab`` command line."""
from __future__ import annotations

import argparse
import sys


def _synth(args: argparse.Namespace) -> None:
    from alignlab.platform.synth import SynthConfig, generate

    summary = generate(args.out, SynthConfig(n_train_images=args.train_images, n_test_images=args.test_images,
                                             image_size=args.image_size, seed=args.seed,
                                             rows_per_file=args.rows_per_file))
    print(summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, generate and inspect image-text shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate the embedded synthetic multi-level set")
    synth.add_argument("--out", required=True, help="output directory or URI")
    synth.add_argument("--train-images", type=int, default=2000)
    synth.add_argument("--test-images", type=int, default=200)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--rows-per-file", type=int, default=2000)
    synth.set_defaults(func=_synth)
    from alignlab.platform.databuild.cli import add_subcommands
    add_subcommands(data_sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
