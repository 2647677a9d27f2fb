"""``captchatask tasks`` and ``captchatask providers status``: read-only views for users.

``kubectl get captchatasks`` already shows the printer columns; these commands add what a person
asks next: which provider a task went to and how it was delivered, and for a provider whether
it is Ready, why not, and how much it has in flight. They take the same kubectl flags as
``dlq`` anywhere on the line (:mod:`captchatask.cliopts`) and never write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

import aiohttp

from captchatask import cliopts, dlq, kube, model
from captchatask.model import Phase, TaskView


def _age(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return "-"
    seconds = max(int((now - when).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _namespaced(rows: list[list[str]], bodies: Sequence[Mapping[str, Any]]) -> None:
    for row, body in zip(rows, bodies, strict=True):
        row.insert(0, str((body.get("metadata") or {}).get("namespace", "")))


def task_table(
    bodies: Sequence[Mapping[str, Any]], now: dt.datetime, *, all_namespaces: bool, wide: bool
) -> str:
    """The ``tasks list`` table (pure, for tests)."""
    headers = ["NAME", "PHASE", "TYPE", "PROVIDER", "PROVIDER-TASK", "DELIVERED-BY", "AGE"]
    if wide:
        headers += ["FAILURE", "POLLS", "DEADLINE"]
    rows = []
    for body in bodies:
        task = TaskView.from_body(body)
        failure: Mapping[str, Any] = task.status.get("failure") or {}
        row = [
            task.ref.name,
            str(task.phase or "-"),
            task.task_type or "-",
            task.provider,
            task.known_provider_task_id or "-",
            str(task.delivered_by or "-"),
            _age(task.created_at, now),
        ]
        if wide:
            row += [str(failure.get("code") or "-"), str(task.polls), _deadline(task, now)]
        rows.append(row)
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
        _namespaced(rows, bodies)
    return cliopts.table(headers, rows)


def _deadline(task: TaskView, now: dt.datetime) -> str:
    deadline = task.deadline
    if deadline is None or (task.phase is not None and task.phase.terminal):
        return "-"
    return "passed" if deadline <= now else f"in {_age(now, deadline)}"


def _ready(body: Mapping[str, Any]) -> Mapping[str, Any]:
    for condition in (body.get("status") or {}).get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            return condition
    return {}


def provider_table(
    bodies: Sequence[Mapping[str, Any]], now: dt.datetime, *, all_namespaces: bool, wide: bool
) -> str:
    """The ``providers status`` table (pure, for tests)."""
    headers = ["NAME", "READY", "REASON", "IN-FLIGHT", "THREADS", "BALANCE", "CHECKED", "AGE"]
    if wide:
        headers += ["DIALECT", "PINGBACK-URL", "MESSAGE"]
    rows = []
    for body in bodies:
        meta: Mapping[str, Any] = body.get("metadata") or {}
        spec: Mapping[str, Any] = body.get("spec") or {}
        status: Mapping[str, Any] = body.get("status") or {}
        ready = _ready(body)
        checked = model.parse_time(status.get("checkedAt"))
        row = [
            str(meta.get("name", "")),
            str(ready.get("status", "Unknown")),
            str(ready.get("reason", "-")),
            str(status.get("inFlight", "-")),
            str(status.get("threads", "-")),
            str(status.get("balance", "-")),
            f"{_age(checked, now)} ago" if checked else "never",
            _age(model.parse_time(meta.get("creationTimestamp")), now),
        ]
        if wide:
            row += [
                str(spec.get("dialect", "-")),
                str((spec.get("pingback") or {}).get("publicURL") or "-"),
                str(ready.get("message") or "")[:60],
            ]
        rows.append(row)
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
        _namespaced(rows, bodies)
    return cliopts.table(headers, rows)


def build_tasks_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="List and show CaptchaTasks.")
    cliopts.add_global_flags(parser, nested=False)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")
    listing = sub.add_parser("list", help="list tasks with phase, provider and delivery path")
    listing.add_argument("-l", "--selector", help="label selector")
    listing.add_argument("--phase", choices=[str(p) for p in Phase])
    show = sub.add_parser("show", help="show one task (-o yaml for the whole object)")
    show.add_argument("name")
    for verb_parser in (listing, show):
        cliopts.add_global_flags(verb_parser, nested=True)
    return parser


def build_providers_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The health of CaptchaProviders.")
    cliopts.add_global_flags(parser, nested=False)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")
    status = sub.add_parser("status", help="Ready, reason, in-flight tasks, threads, balance")
    status.add_argument("names", nargs="*", help="provider names (default: all)")
    cliopts.add_global_flags(status, nested=True)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    named = getattr(args, "name", None) or getattr(args, "names", None)
    if args.all_namespaces and named:
        parser.error("an object cannot be named across all namespaces; use -n instead of -A")
    if args.output == "wide" and getattr(args, "name", None):
        parser.error("-o wide is a listing format; use it with list")
    return args


def parse_tasks(argv: Sequence[str], *, prog: str = "captchatask tasks") -> argparse.Namespace:
    """Parse a ``tasks`` command line."""
    parser = build_tasks_parser(prog)
    return _check(parser, parser.parse_args(list(argv)))


def parse_providers(
    argv: Sequence[str], *, prog: str = "captchatask providers"
) -> argparse.Namespace:
    """Parse a ``providers`` command line."""
    parser = build_providers_parser(prog)
    return _check(parser, parser.parse_args(list(argv)))


async def _tasks(args: argparse.Namespace, out: TextIO) -> int:
    config = kube.load_config(args.kubeconfig, context=args.context)
    namespace = cliopts.target_namespace(args, config)
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session)
        if args.verb == "show":
            body = await client.get(kube.TASKS, namespace, args.name)
            cliopts.dump(
                cliopts.with_kind([body], model.TASK_KIND), args.output or "yaml", out, single=True
            )
            return 0
        raw = await client.list(kube.TASKS, namespace, label_selector=args.selector)
    items = [
        item
        for item in raw.get("items", [])
        if not args.phase or (item.get("status") or {}).get("phase") == args.phase
    ]
    items.sort(key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"]["name"]))
    if args.output in ("json", "yaml", "name"):
        cliopts.dump(cliopts.with_kind(items, model.TASK_KIND), args.output, out, single=False)
    elif not items:
        where = "" if namespace is None else f" in namespace {namespace}"
        out.write(f"No tasks{where}.\n")
    else:
        now = dt.datetime.now(dt.UTC)
        table = task_table(items, now, all_namespaces=namespace is None, wide=args.output == "wide")
        out.write(table + "\n")
    return 0


async def _providers(args: argparse.Namespace, out: TextIO) -> int:
    config = kube.load_config(args.kubeconfig, context=args.context)
    namespace = cliopts.target_namespace(args, config)
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session)
        if args.names:
            items = [await client.get(kube.PROVIDERS, namespace, name) for name in args.names]
        else:
            raw = await client.list(kube.PROVIDERS, namespace)
            items = sorted(
                raw.get("items", []),
                key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"]["name"]),
            )
    if args.output in ("json", "yaml", "name"):
        cliopts.dump(
            cliopts.with_kind(items, model.PROVIDER_KIND), args.output, out, single=bool(args.names)
        )
    elif not items:
        where = "" if namespace is None else f" in namespace {namespace}"
        out.write(f"No providers{where}.\n")
    else:
        now = dt.datetime.now(dt.UTC)
        wide = args.output == "wide"
        out.write(provider_table(items, now, all_namespaces=namespace is None, wide=wide) + "\n")
    return 0


def tasks_main(argv: Sequence[str], *, prog: str = "captchatask tasks") -> int:
    """Entry point of ``captchatask tasks``."""
    args = parse_tasks(argv, prog=prog)
    return dlq.run_async(lambda: _tasks(args, sys.stdout))


def providers_main(argv: Sequence[str], *, prog: str = "captchatask providers") -> int:
    """Entry point of ``captchatask providers``."""
    args = parse_providers(argv, prog=prog)
    return dlq.run_async(lambda: _providers(args, sys.stdout))


async def run_for_test(command: str, argv: Sequence[str], out: TextIO) -> int:
    """Run ``tasks`` or ``providers`` in-process with captured output."""
    if command == "tasks":
        return await _tasks(parse_tasks(argv), out)
    return await _providers(parse_providers(argv), out)


__all__: Final[list[str]] = [
    "parse_providers",
    "parse_tasks",
    "provider_table",
    "providers_main",
    "task_table",
    "tasks_main",
]
