"""The kubectl-style flags and output formats shared by every user command.

kubectl accepts ``-n``, ``--context``, ``-o`` anywhere on the line, so people type
``dlq list -n demo`` as readily as ``-n demo dlq list``. argparse binds an option to the parser
it was declared on, so each flag is declared on the command's parser *and* on every verb's
subparser; the subparser copies default to ``SUPPRESS`` so that a flag given before the verb is
not overwritten by the verb's unset default. :func:`hoist` does the same one level up, for flags
given before the command name (``captchatask -n demo dlq list``).

Output follows ``kubectl get``: a table by default, ``-o wide`` adds columns, ``-o name`` prints
``<kind>.<group>/<name>``, and ``-o json|yaml`` prints a ``List`` of the objects as the API server
returned them (so ``jq '.items[]'`` works the same as on kubectl's output).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

import yaml

from captchatask import kube, model

OUTPUTS: Final = ("json", "yaml", "name", "wide")
#: (flags, takes a value): the kubectl flags every user command accepts anywhere.
GLOBAL_FLAGS: Final[tuple[tuple[tuple[str, ...], bool], ...]] = (
    (("-n", "--namespace"), True),
    (("-A", "--all-namespaces"), False),
    (("--context",), True),
    (("--kubeconfig",), True),
    (("-o", "--output"), True),
)


def add_global_flags(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    """Declare the kubectl flags on ``parser`` (``nested``: a verb's subparser, see module doc)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if nested else value

    group = parser.add_argument_group("kubectl options (before or after the verb)")
    group.add_argument(
        "-n", "--namespace", default=default(None), help="namespace (default: the context's)"
    )
    group.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=default(False),
        help="every namespace (lists only)",
    )
    group.add_argument("--context", default=default(None), help="kubeconfig context to use")
    group.add_argument(
        "--kubeconfig",
        default=default(None),
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)",
    )
    group.add_argument(
        "-o", "--output", choices=OUTPUTS, default=default(None), help="output format"
    )


def hoist(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into the global flags before the first word and the rest.

    ``["-n", "x", "dlq", "list"]`` gives ``(["-n", "x"], ["dlq", "list"])``; an unknown flag
    stops the scan (the caller's parser reports it).
    """
    takes_value = {flag: value for flags, value in GLOBAL_FLAGS for flag in flags}
    index = 0
    while index < len(argv):
        word = argv[index]
        name = word.split("=", 1)[0]
        if name not in takes_value:
            break
        index += 2 if takes_value[name] and "=" not in word else 1
    return list(argv[:index]), list(argv[index:])


def target_namespace(args: argparse.Namespace, config: kube.KubeConfig) -> str | None:
    """The namespace a command works in: ``None`` for ``-A``, else ``-n`` or the context's."""
    if args.all_namespaces:
        return None
    return str(args.namespace) if args.namespace else config.namespace


def qualified_name(body: Mapping[str, Any]) -> str:
    """``kind.group/name`` as ``kubectl get -o name`` prints it."""
    api_version = str(body.get("apiVersion", ""))
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    kind = str(body.get("kind", "")).lower()
    name = str((body.get("metadata") or {}).get("name", ""))
    return f"{kind}.{group}/{name}" if group else f"{kind}/{name}"


def with_kind(items: Sequence[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Items of a LIST carry no apiVersion/kind; put them back, as kubectl does."""
    return [{"apiVersion": model.API_VERSION, "kind": kind, **item} for item in items]


def dump(objects: Sequence[Mapping[str, Any]], output: str, out: TextIO, *, single: bool) -> None:
    """Print objects as ``-o json|yaml|name``: one object bare, several as a ``List``."""
    if output == "name":
        for obj in objects:
            out.write(qualified_name(obj) + "\n")
        return
    document: object
    if single and len(objects) == 1:
        document = dict(objects[0])
    else:
        document = {"apiVersion": "v1", "kind": "List", "items": [dict(o) for o in objects]}
    if output == "json":
        json.dump(document, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        yaml.safe_dump(document, out, sort_keys=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by three spaces, like kubectl's printer."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    )


__all__: Final[list[str]] = [
    "GLOBAL_FLAGS",
    "OUTPUTS",
    "add_global_flags",
    "dump",
    "hoist",
    "qualified_name",
    "table",
    "target_namespace",
    "with_kind",
]
