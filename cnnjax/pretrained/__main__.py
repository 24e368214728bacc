"""Command line: `python -m cnnjax.pretrained convert MODEL FILE OUT` writes an init_from checkpoint."""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence

from cnnjax.pretrained.checkpoint import save_variables
from cnnjax.pretrained.convert import convert_file
from cnnjax.pretrained.names import FAMILIES, FORMATS


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word such as act=silu


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnnjax.pretrained", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="torchvision/timm checkpoint -> orbax checkpoint")
    convert.add_argument("model", help=f"registry name: {', '.join(FAMILIES)}")
    convert.add_argument("file", help=".safetensors (numpy only) or .pth (needs torch)")
    convert.add_argument("out", help="new directory; give it to a run as config.init_from")
    convert.add_argument("--num-classes", type=int, default=None,
                         help="default: the checkpoint's classifier width")
    convert.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    convert.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                         help="model constructor override, e.g. --set aux_logits=False")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    variables, kwargs = convert_file(args.file, args.model, num_classes=args.num_classes,
                                     fmt=args.format, **dict(args.set))
    info = {"model": args.model, "model_kwargs": kwargs, "source": args.file}
    out = save_variables(args.out, variables, info)
    flags = " ".join(f"--config.model.kwargs.{k}={v!r}" for k, v in kwargs.items()
                     if k != "num_classes")
    print(f"wrote {out}\nstart a run from it with: --config.model.name={args.model} "
          f"--config.init_from={out} {flags}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
