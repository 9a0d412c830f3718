"""Command line of the operator: `python -m kubelora_operator SUBCOMMAND`.

Subcommands: `crd` prints the CustomResourceDefinition YAML (the committed
`crds/lorafinetunes.kubelora.dev.yaml` is its output). `run` (the kopf operator) is added with the
handlers; argparse subcommands keep each entry point independent.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands register a `func(args) -> exit code`."""
    parser = argparse.ArgumentParser(prog="kubelora-operator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crd = sub.add_parser("crd", help="print the LoRAFineTune CustomResourceDefinition (YAML)")
    crd.set_defaults(func=_cmd_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kubelora-operator` and `python -m kubelora_operator`."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
