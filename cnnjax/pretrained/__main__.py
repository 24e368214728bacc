"""Command line: `convert MODEL FILE OUT` writes an init_from checkpoint; `verify MODEL...` checks logit parity.

    python -m cnnjax.pretrained convert resnet50 resnet50.safetensors runs/pretrained/resnet50
    python -m cnnjax.pretrained verify resnet18 mobilenet_v2 --source torchvision   # needs torch
"""

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
    verify = commands.add_parser("verify", help="logits against real torchvision/timm (needs torch)")
    verify.add_argument("models", nargs="+", help=f"registry names: {', '.join(FAMILIES)}")
    verify.add_argument("--source", default="torchvision", choices=FORMATS)
    verify.add_argument("--image-size", type=int, default=64)
    verify.add_argument("--file-format", default="safetensors", choices=("safetensors", "pth"))
    return parser


def _verify(args: argparse.Namespace) -> int:
    from cnnjax.pretrained.verify import TOLERANCE, verify

    failed = 0
    print(f"{'model':<18}{'source':<13}{'size':>5}{'max |diff|':>13}{'max |logit|':>13}{'rel. error':>12}")
    for name in args.models:
        r = verify(name, source=args.source, image_size=args.image_size, file_format=args.file_format)
        failed += not r["ok"]
        print(f"{name:<18}{args.source:<13}{args.image_size:>5}{r['max_abs_diff']:>13.3g}"
              f"{r['logit_scale']:>13.3g}{r['relative_error']:>12.2g}  {'ok' if r['ok'] else 'FAIL'}")
    print(f"tolerance {TOLERANCE:g} (relative to the largest logit)")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        return _verify(args)
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
