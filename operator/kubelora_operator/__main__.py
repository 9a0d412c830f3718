"""Command line of the operator: `python -m kubelora_operator SUBCOMMAND`.

Subcommands: `crd` prints the CustomResourceDefinition YAML (the committed
`crds/lorafinetunes.kubelora.dev.yaml` is its output); `run` runs the kopf operator
(operator_main.py); `rbac` prints the ClusterRoles and bindings it needs (rbac.py). argparse subcommands keep each entry point independent.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _cmd_rbac(args: argparse.Namespace) -> int:
    import yaml

    from .rbac import manifests

    docs = manifests(args.service_account, args.sa_namespace, args.namespace, peering=args.peering)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .operator_main import run_operator
    from .settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"kubelora-operator: {err}", file=sys.stderr)
        return 2
    return run_operator(
        args.namespace,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
        verbose=args.verbose,
        settings=settings,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands register a `func(args) -> exit code`."""
    parser = argparse.ArgumentParser(prog="kubelora-operator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crd = sub.add_parser("crd", help="print the LoRAFineTune CustomResourceDefinition (YAML)")
    crd.set_defaults(func=_cmd_crd)
    run = sub.add_parser(
        "run", help="run the operator (kopf); settings from $KUBELORA_SETTINGS_FILE and KUBELORA_* env"
    )
    run.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable); none: cluster-wide"
    )
    run.add_argument("--standalone", action="store_true", help="no peering, even when a peering name is configured")
    run.add_argument("--peering", metavar="NAME", help="kopf peering name (several replicas, one active)")
    run.add_argument("--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_cmd_run)
    rbac = sub.add_parser("rbac", help="print the RBAC objects the operator needs (YAML)")
    rbac.add_argument("-n", "--namespace", action="append", default=[], help="watched namespace; none: cluster-wide")
    rbac.add_argument("--service-account", default="kubelora-operator", help="the operator's ServiceAccount")
    rbac.add_argument("--sa-namespace", default="kubelora-system", help="namespace of that ServiceAccount")
    rbac.add_argument("--peering", action="store_true", help="include kopf's peering objects")
    rbac.set_defaults(func=_cmd_rbac)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kubelora-operator` and `python -m kubelora_operator`."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
