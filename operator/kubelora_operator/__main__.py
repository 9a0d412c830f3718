"""The operator's entry point: `python -m kubelora_operator SUBCOMMAND` (also `kubelora-operator`).

Subcommands: `crd` prints the CustomResourceDefinition YAML (the chart's
`crds/lorafinetunes.kubelora.dev.yaml` is its output); `run` runs the kopf operator;
`rbac` prints the ClusterRoles and bindings it needs (rbac.py).

Running the operator (`run`):

* kopf logs in, runs the startup and cleanup handlers (which start and stop the operator's own
  watches of the LoRAFineTunes and its pods, controller/list_watch.py), peering and the liveness
  endpoint; it watches no resource of the operator's, so it keeps no per-object state and writes no
  annotation, finalizer or Event of its own. The `kubelora.dev/finalizer` of an earlier operator
  version (kopf timers) is removed by the resource watch (controller/lft_watch.py).
* kopf's "Handler ... succeeded." lines (startup, cleanup) are dropped unless --verbose
  (`QuietHandlerSuccess`).
* Scope: `--namespace NS` (repeatable) or cluster-wide when none is given. Peering (one active
  replica among several: the newest, controller/peering.py) only when a peering name is configured
  and `--standalone` is not given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import kopf

from .controller import API_THREADS, register
from .controller.cache import CachedKube
from .controller.list_watch import watch_scopes
from .controller.peering import Peer
from .kube import new_api_client
from .settings import OperatorSettings, load_settings

PREFIX = "kubelora.dev"
#: Threads for kopf's own sync activities (login, startup, cleanup); the reconciles run on the
#: controller's pools (controller/deferred.py).
KOPF_THREADS = 4


class QuietHandlerSuccess(logging.Filter):
    """Drops kopf's INFO line "Handler 'ID' succeeded." (logger `kopf.objects`) unless --verbose.

    Why: the line says nothing a user needs (when kopf still handled the resources' watch events it
    wrote it for each: 7,106 of the operator's 7,110 log lines during a ramp of 1,000 resources).
    kopf's failure lines (WARNING, ERROR) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        return not (message.startswith("Handler '") and message.endswith("' succeeded."))


def kopf_settings() -> kopf.OperatorSettings:
    """kopf settings: annotations storage with the operator's prefix, no handler-log Events."""
    ks = kopf.OperatorSettings()
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    ks.posting.enabled = False
    ks.execution.max_workers = KOPF_THREADS
    ks.watching.server_timeout = 300
    ks.watching.client_timeout = 330
    ks.watching.connect_timeout = 30
    ks.networking.request_timeout = 60
    return ks


def run_operator(
    namespaces: Sequence[str] = (),
    *,
    standalone: bool | None = None,
    peering_name: str | None = None,
    liveness_endpoint: str | None = None,
    verbose: bool = False,
    settings: OperatorSettings | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    settings = settings or load_settings()
    kopf.configure(verbose=verbose)
    logging.getLogger("kubelora_operator").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("kopf.objects").addFilter(QuietHandlerSuccess())
    registry = kopf.OperatorRegistry()
    peering = peering_name or settings.peering_name
    if standalone is None:
        standalone = peering is None
    me = None if standalone or peering is None else Peer.starting(peering)
    # One more connection per watch stream (controller/list_watch.py), each of which holds its own.
    connections = API_THREADS + (2 + (me is not None)) * len(watch_scopes(namespaces)[0])
    register(registry, settings, CachedKube(new_api_client(connections=connections)), namespaces, me)
    # A registry of our own gets none of kopf's default handlers: log in like kopf does by default.
    kopf.on.login(registry=registry, id="login")(kopf.login_via_client)
    kopf.run(
        registry=registry,
        settings=kopf_settings(),
        standalone=standalone,
        peering_name=None if standalone else peering,
        namespaces=list(namespaces),
        clusterwide=not namespaces,
        liveness_endpoint=liveness_endpoint,
        # kopf keeps this replica's peering entry under the identity and priority the operator's own
        # reading of the peering objects uses (controller/peering.py).
        identity=me.identity if me else None,  # type: ignore[arg-type]  # kopf's Identity: a NewType of str
        priority=me.priority if me else None,
    )
    return 0


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
    from .settings import SettingsError

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
