"""The chart's copies of operator facts, generated from the one place each fact lives.

Why: the settings (settings.py) and the RBAC rules (rbac.py) each live in one place, and a copy kept
by hand drifts. The chart's `values.schema.json` settings subtree and `rbac-rules.yaml` (read by the
RBAC templates with `.Files.Get`) are written from the models by `python -m kubelora_operator.chart_sync`;
`--check` (run by the tests) fails when a committed file differs from what the code would write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from . import rbac
from .settings import OperatorSettings

#: The chart passes `--peering` from its own `peering` values instead of this setting.
CHART_MANAGED_SETTINGS = frozenset({"peeringName"})
RBAC_RULES_FILE = "rbac-rules.yaml"
_HEADER = (
    "# Generated from operator/kubelora_operator/rbac.py by `python -m kubelora_operator.chart_sync`: edit\n"
    "# the rules (and their reasons) there. Read by templates/rbac.yaml.\n"
)


def _drop_titles(node: Any) -> Any:
    """pydantic's `title` keys repeat each field name in another spelling: noise in a values schema."""
    if isinstance(node, dict):
        return {k: _drop_titles(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_drop_titles(v) for v in node]
    return node


def settings_schema() -> dict[str, Any]:
    """JSON schema of the chart's `settings` value: every OperatorSettings field by its camelCase name."""
    schema = _drop_titles(OperatorSettings.model_json_schema(by_alias=True, mode="validation"))
    for key in CHART_MANAGED_SETTINGS:
        schema["properties"].pop(key, None)
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Operator settings (camelCase keys of kubelora_operator.settings.OperatorSettings).",
        "properties": schema["properties"],
    }


def rbac_rules() -> dict[str, list[dict[str, Any]]]:
    """The rule sets that templates/rbac.yaml combines by mode (cluster-wide or watched namespaces)."""
    return {
        "cluster": rbac.CLUSTER_RULES,
        "namespaceObserver": rbac.NAMESPACE_OBSERVER_RULES,
        "namespaced": rbac.NAMESPACED_RULES,
        "peeringCluster": rbac.PEERING_CLUSTER_RULES,
        "peeringNamespaced": rbac.PEERING_NAMESPACED_RULES,
    }


def rendered(chart: Path) -> dict[Path, str]:
    """Every generated chart file, by path, as it should read."""
    values_schema = json.loads((chart / "values.schema.json").read_text())
    values_schema["properties"]["settings"] = settings_schema()
    return {
        chart / "values.schema.json": json.dumps(values_schema, indent=2) + "\n",
        chart / RBAC_RULES_FILE: _HEADER + yaml.safe_dump(rbac_rules(), sort_keys=False, width=120),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=Path(__file__).resolve().parents[2] / "charts" / "kubelora")
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = [path for path, text in rendered(args.chart).items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python -m kubelora_operator.chart_sync", file=sys.stderr)
        return 1 if stale else 0
    for path, text in rendered(args.chart).items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
