"""`kubelora`: submit a trainer config as a LoRAFineTune, follow it, read its logs, fetch its adapter.

Bad input (a config that cannot become a resource, a missing resource, a sha256 mismatch): one line
on stderr and exit 2. The work is done by `submit.resource_from_config` and `client.KubeloraClient`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .submit import SubmitError, default_name, resource_from_config

EXIT_BAD_INPUT = 2


def progress_line(obj: dict[str, Any]) -> str:
    """One line: phase, step/total (percent), losses, tokens/s, ETA, workers."""
    st = obj.get("status") or {}
    p = st.get("progress") or {}
    parts = [f"{obj['metadata']['name']}: {st.get('phase') or 'Pending'}"]
    if p.get("totalSteps"):
        parts.append(f"step {p.get('step') or 0}/{p['totalSteps']} ({p.get('percent') or 0}%)")
    if p.get("trainLoss") is not None:
        parts.append(f"loss {p['trainLoss']:.4f}")
    if p.get("evalLoss") is not None:
        parts.append(f"eval {p['evalLoss']:.4f}")
    if p.get("tokensPerSecond"):
        parts.append(f"{p['tokensPerSecond']:,.0f} tok/s")
    if p.get("etaSeconds") is not None:
        parts.append(f"eta {p['etaSeconds']}s")
    w = st.get("workers") or {}
    if w.get("total"):
        parts.append(f"workers {w.get('ready', 0)}/{w['total']}")
    return "  ".join(parts)


def describe(obj: dict[str, Any]) -> str:
    st = obj.get("status") or {}
    lines = [progress_line(obj)]
    for c in st.get("conditions") or []:
        lines.append(f"  {c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')}".rstrip(": "))
    if st.get("artifact"):
        a = st["artifact"]
        lines.append(f"  artifact {a.get('uri')} sha256 {a.get('sha256')} ({a.get('sizeBytes')} bytes)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kubelora", description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--namespace", help="namespace (default: the config's cluster.namespace, the context's)")
    ap.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    ap.add_argument("--context", help="kubeconfig context")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="create a LoRAFineTune from a trainer config with a cluster: section")
    s.add_argument("config")
    s.add_argument("--name", help="resource name (default: cluster.name, else the file's name)")
    s.add_argument("--dry-run", action="store_true", help="print the resource, create nothing")
    for cmd, text in (("status", "conditions and progress"), ("watch", "a live progress line until it ends"),
                      ("delete", "delete the resource (pods and run-dir claim follow the operator's rules)")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("name")
    w = sub.choices["watch"]
    w.add_argument("--timeout", type=float, help="give up after this many seconds")
    lg = sub.add_parser("logs", help="the trainer log of a worker (rank 0 by default)")
    lg.add_argument("name")
    lg.add_argument("--worker", type=int, default=0)
    lg.add_argument("--tail", type=int)
    f = sub.add_parser("fetch", help="download the delivered adapter and check its sha256")
    f.add_argument("name")
    f.add_argument("dir")
    f.add_argument("--merged", action="store_true", help="also download merged/ when delivered")
    return ap


def _load(path: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise SubmitError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SubmitError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise SubmitError(f"{path} must hold a mapping at the top level")
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .client import ClientError, KubeloraClient

    try:
        if args.cmd == "submit":
            raw = _load(args.config)
            name = args.name or (raw.get("cluster") or {}).get("name") or default_name(Path(args.config).stem)
            resource = resource_from_config(raw, name=name, namespace=args.namespace)
            if args.dry_run:
                print(yaml.safe_dump(resource, sort_keys=False), end="")
                return 0
            ns = resource["metadata"].get("namespace")
            created = KubeloraClient(ns, args.kubeconfig, args.context).submit(resource)
            meta = created["metadata"]
            print(f"lorafinetune {meta.get('namespace')}/{meta['name']} created")
            return 0
        client = KubeloraClient(args.namespace, args.kubeconfig, args.context)
        if args.cmd == "status":
            print(describe(client.get(args.name)))
        elif args.cmd == "watch":
            obj: dict[str, Any] = {}
            for obj in client.watch(args.name, timeout=args.timeout):
                print(progress_line(obj), flush=True)
            return 0 if (obj.get("status") or {}).get("phase") == "Succeeded" else 1
        elif args.cmd == "logs":
            sys.stdout.write(client.logs(args.name, args.worker, args.tail))
        elif args.cmd == "fetch":
            out = client.fetch(args.name, args.dir, include_merged=args.merged)
            print(f"adapter in {out / 'adapter'} (sha256 checked)")
        elif args.cmd == "delete":
            client.delete(args.name)
            print(f"lorafinetune {client.namespace}/{args.name} deleted")
    except (SubmitError, ClientError) as err:
        print(f"kubelora: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
