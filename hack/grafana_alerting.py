"""Convert the canonical Prometheus alerts into Grafana-managed alert rules (provisioning format).

``charts/captchatask/files/prometheus-rules.yaml`` is the one source of the alerts; teams that
alert from Grafana instead of Alertmanager get the *same* alerts from
``charts/captchatask/files/grafana-alerting.yaml``, which this script writes (``make manifests``
runs it; ``tests/monitoring/test_grafana_alerting.py`` fails when the committed file is stale).

Each alert becomes one Grafana rule with two steps: query ``A`` is the alert's PromQL, unchanged
except that recording rules are inlined (Grafana may query a Prometheus that does not load them),
and math expression ``B`` (``$A == $A``) is 1 for every series ``A`` returns, so a rule fires for
exactly the series the Prometheus alert would. ``for``, labels and annotations are copied;
``$value`` in annotations becomes ``$values.A.Value`` (Grafana's spelling).

Usage: ``python hack/grafana_alerting.py [RULES_FILE] [OUTPUT_FILE]``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
RULES_FILE: Final = ROOT / "charts/captchatask/files/prometheus-rules.yaml"
OUTPUT_FILE: Final = ROOT / "charts/captchatask/files/grafana-alerting.yaml"

#: The datasource UID placeholder; the chart replaces it with metrics.grafanaAlerting.datasourceUid.
DATASOURCE_UID: Final = "prometheus"
#: Grafana evaluates the group this often (the Prometheus rules use the global interval, 1m).
EVALUATION_INTERVAL: Final = "1m"
#: Look-back of the instant query; range selectors in the PromQL carry their own windows.
QUERY_RANGE_SECONDS: Final = 600
#: Grafana limits rule UIDs to 40 characters.
UID_MAX_LENGTH: Final = 40

HEADER: Final = """\
# GENERATED from charts/captchatask/files/prometheus-rules.yaml by `make manifests`
# (hack/grafana_alerting.py); do not edit. Grafana-managed alert rules, provisioning format:
# copy into Grafana's provisioning/alerting/ directory, or let the chart ship it as a ConfigMap
# for Grafana's alerts sidecar (metrics.grafanaAlerting.enabled). Replace the datasourceUid
# "prometheus" with the UID of your Prometheus datasource (the chart does this for you).
"""


class ConversionError(ValueError):
    """The rules file uses a construct the conversion cannot carry over faithfully."""


def _recording_rules(groups: list[dict[str, Any]]) -> dict[str, str]:
    return {
        rule["record"]: " ".join(str(rule["expr"]).split())
        for group in groups
        for rule in group["rules"]
        if "record" in rule
    }


def inline_recording_rules(expr: str, recorded: dict[str, str]) -> str:
    """Replace each recording-rule name in ``expr`` with its parenthesised expression.

    Only a bare reference can be inlined: ``name{...}`` or ``name[...]`` would become invalid
    PromQL, so they are refused rather than converted wrongly.
    """
    for name in sorted(recorded, key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\s*[\[{{])?")
        for match in pattern.finditer(expr):
            if match.group(1):
                raise ConversionError(
                    f"recording rule {name} is used with a selector or range; inline it by hand"
                )
        expr = pattern.sub(f"({recorded[name]})", expr)
    return expr


def _uid(alert: str) -> str:
    suffix = alert.removeprefix("Captchatask").lower()
    return f"captchatask-{suffix}"[:UID_MAX_LENGTH]


def _annotation(text: str) -> str:
    return re.sub(r"\$value\b", "$values.A.Value", " ".join(str(text).split()))


def convert(rules_document: dict[str, Any]) -> dict[str, Any]:
    """Build the Grafana provisioning document for every alert of ``rules_document``."""
    groups: list[dict[str, Any]] = rules_document["groups"]
    recorded = _recording_rules(groups)
    grafana_rules: list[dict[str, Any]] = []
    for group in groups:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            expr = inline_recording_rules(" ".join(str(rule["expr"]).split()), recorded)
            grafana_rules.append(
                {
                    "uid": _uid(rule["alert"]),
                    "title": rule["alert"],
                    "condition": "B",
                    "data": [
                        {
                            "refId": "A",
                            "relativeTimeRange": {"from": QUERY_RANGE_SECONDS, "to": 0},
                            "datasourceUid": DATASOURCE_UID,
                            "model": {"refId": "A", "expr": expr, "instant": True, "range": False},
                        },
                        {
                            "refId": "B",
                            "relativeTimeRange": {"from": 0, "to": 0},
                            "datasourceUid": "__expr__",
                            "model": {"refId": "B", "type": "math", "expression": "$A == $A"},
                        },
                    ],
                    # An alert expression returns nothing while all is well.
                    "noDataState": "OK",
                    "execErrState": "Error",
                    "for": rule["for"],
                    "labels": dict(rule.get("labels", {})),
                    "annotations": {
                        key: _annotation(value) for key, value in rule["annotations"].items()
                    },
                    "isPaused": False,
                }
            )
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "captchatask",
                "folder": "captchatask",
                "interval": EVALUATION_INTERVAL,
                "rules": grafana_rules,
            }
        ],
    }


def render(rules_text: str) -> str:
    """Return the generated file's text for the given rules file text."""
    document = yaml.safe_load(rules_text)
    body = yaml.safe_dump(convert(document), sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    """Write the Grafana alerting file; paths default to the chart's."""
    source = Path(argv[0]) if argv else RULES_FILE
    target = Path(argv[1]) if len(argv) > 1 else OUTPUT_FILE
    target.write_text(render(source.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
