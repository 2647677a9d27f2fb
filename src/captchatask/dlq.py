"""``captchatask dlq`` (also ``kubectl captchatask dlq``): see, redrive and purge dead letters.

The operator requeues dead letters on its own; this command is for the person on call: list
what is stuck and why, look at one, put letters back in the queue on purpose (rate-limited, so a
redrive of thousands does not hammer the API server), or delete them once understood. Output
is a human table by default and ``-o json|yaml`` like kubectl.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TextIO

import aiohttp
import yaml

from captchatask import kube, model
from captchatask.deadletters import LetterView, redrive_status
from captchatask.model import DeadLetterPhase

#: Default redrive rate (letters per second): gentle on the API server and the operator.
DEFAULT_RATE: Final = 5.0
#: How much of an answer token `show` prints unless asked for everything.
TOKEN_PREVIEW: Final = 16

Sleep = Callable[[float], Awaitable[None]]


def _age(created: dt.datetime | None, now: dt.datetime) -> str:
    if created is None:
        return "?"
    seconds = int((now - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def render_table(letters: Sequence[LetterView], now: dt.datetime, *, all_namespaces: bool) -> str:
    """Render the human table of ``dlq list`` (pure, for tests)."""
    headers = ["NAME", "PHASE", "REASON", "TASK", "PROVIDER-TASK", "ATTEMPTS", "AGE", "MESSAGE"]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    rows = []
    for letter in letters:
        row = [
            letter.name,
            str(letter.phase),
            letter.reason,
            letter.task_name or "-",
            letter.provider_task_id or "-",
            str(letter.attempts),
            _age(letter.received_at or letter.created_at, now),
            str(letter.status.get("message") or letter.message or "")[:60],
        ]
        if all_namespaces:
            row.insert(0, letter.namespace)
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines)


def _dump(objects: object, output: str, out: TextIO) -> None:
    if output == "json":
        json.dump(objects, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        yaml.safe_dump(objects, out, sort_keys=False)


async def rate_limited(
    items: Sequence[str],
    action: Callable[[str], Awaitable[None]],
    *,
    rate: float,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Run ``action`` on each item, at most ``rate`` per second (the first one at once)."""
    interval = 1.0 / rate
    for index, item in enumerate(items):
        if index:
            await sleep(interval)
        await action(item)


class Dlq:
    """The verbs, over one API session."""

    def __init__(self, client: kube.KubeClient, out: TextIO) -> None:
        self.client = client
        self.out = out

    async def letters(
        self, namespace: str | None, selector: str | None, phase: str | None
    ) -> list[LetterView]:
        """List letters (optionally of one phase), oldest first."""
        body = await self.client.list(kube.DEAD_LETTERS, namespace, label_selector=selector)
        letters = [LetterView.from_body(item) for item in body.get("items", [])]
        if phase:
            letters = [letter for letter in letters if letter.phase == phase]
        floor = dt.datetime.min.replace(tzinfo=dt.UTC)
        return sorted(letters, key=lambda x: (x.received_at or x.created_at or floor, x.name))

    async def resolve(self, args: argparse.Namespace) -> list[LetterView]:
        """The letters a redrive/purge targets: names, a selector, or every expired one."""
        if args.names:
            return [
                LetterView.from_body(await self.client.get(kube.DEAD_LETTERS, args.namespace, name))
                for name in args.names
            ]
        phase = str(DeadLetterPhase.EXPIRED) if args.all_expired else None
        return await self.letters(args.namespace, args.selector, phase)

    async def redrive(self, letters: Sequence[LetterView], *, rate: float, sleep: Sleep) -> int:
        """Put letters back to ``Pending`` for an immediate retry, at ``rate`` per second."""
        by_name = {letter.name: letter for letter in letters}

        async def one(name: str) -> None:
            letter = by_name[name]
            now = dt.datetime.now(dt.UTC)
            await self.client.patch(
                kube.DEAD_LETTERS,
                letter.namespace,
                letter.name,
                {"status": {**redrive_status(now), "redrivenAt": model.format_time(now)}},
                subresource="status",
            )
            self.out.write(f"captchadeadletter/{letter.name} redriven\n")

        await rate_limited(list(by_name), one, rate=rate, sleep=sleep)
        return len(by_name)

    async def purge(self, letters: Sequence[LetterView]) -> int:
        """Delete letters (each only if it is still the instance that was listed)."""
        for letter in letters:
            try:
                await self.client.delete(
                    kube.DEAD_LETTERS, letter.namespace, letter.name, uid=letter.uid or None
                )
            except kube.ApiError as exc:
                if not exc.not_found:
                    raise
            self.out.write(f"captchadeadletter/{letter.name} deleted\n")
        return len(letters)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captchatask dlq",
        description="List, show, redrive and purge CaptchaDeadLetters.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, in-cluster)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    sub = parser.add_subparsers(dest="verb", required=True)
    listing = sub.add_parser("list", help="list dead letters with reason, age and attempts")
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    listing.add_argument("-l", "--selector", help="label selector")
    listing.add_argument("--phase", choices=[str(p) for p in DeadLetterPhase])
    listing.add_argument("-o", "--output", choices=["json", "yaml"])
    show = sub.add_parser("show", help="show one dead letter")
    show.add_argument("name")
    show.add_argument("-o", "--output", choices=["json", "yaml"])
    for verb, text in (
        ("redrive", "put letters back in the requeue loop, rate-limited"),
        ("purge", "delete letters (asks for confirmation)"),
    ):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("names", nargs="*", help="letter names")
        cmd.add_argument("-l", "--selector", help="label selector")
        cmd.add_argument("--all-expired", action="store_true", help="every Expired letter")
        if verb == "redrive":
            cmd.add_argument(
                "--rate",
                type=float,
                default=DEFAULT_RATE,
                help=f"letters per second (default {DEFAULT_RATE})",
            )
        else:
            cmd.add_argument("-y", "--yes", action="store_true", help="do not ask")
    return parser


async def _list(dlq: Dlq, args: argparse.Namespace, now: dt.datetime) -> int:
    letters = await dlq.letters(args.namespace, args.selector, args.phase)
    if args.output:
        raw = await dlq.client.list(kube.DEAD_LETTERS, args.namespace, label_selector=args.selector)
        names = {letter.name for letter in letters}
        _dump([i for i in raw["items"] if i["metadata"]["name"] in names], args.output, dlq.out)
    elif not letters:
        dlq.out.write("No dead letters.\n")
    else:
        dlq.out.write(render_table(letters, now, all_namespaces=args.namespace is None) + "\n")
    return 0


async def _show(dlq: Dlq, args: argparse.Namespace, now: dt.datetime) -> int:
    body = await dlq.client.get(kube.DEAD_LETTERS, args.namespace, args.name)
    if args.output:
        _dump(body, args.output, dlq.out)
        return 0
    letter = LetterView.from_body(body)
    code = letter.code
    preview = code if len(code) <= TOKEN_PREVIEW else code[:TOKEN_PREVIEW] + "..."
    for key, value in (
        ("Name", letter.name),
        ("Namespace", letter.namespace),
        ("Phase", letter.phase),
        ("Reason", f"{letter.reason}: {letter.message}"),
        ("Task", f"{letter.task_name or '-'} (uid {letter.task_uid or '-'})"),
        ("Provider task", letter.provider_task_id or "-"),
        ("Payload", f"{preview} ({len(code)} chars; -o yaml shows it whole)"),
        ("Received", f"{_age(letter.received_at, now)} ago"),
        ("Attempts", letter.attempts),
        ("Last outcome", letter.status.get("message", "-")),
    ):
        dlq.out.write(f"{key + ':':15} {value}\n")
    return 0


async def _change(dlq: Dlq, args: argparse.Namespace, confirm: Callable[[str], bool]) -> int:
    if not (args.names or args.selector or args.all_expired):
        dlq.out.write("name one or more letters, or use -l SELECTOR or --all-expired\n")
        return 2
    if args.verb == "redrive" and args.rate <= 0:
        dlq.out.write("--rate must be positive\n")
        return 2
    letters = await dlq.resolve(args)
    if not letters:
        dlq.out.write("No matching dead letters.\n")
        return 0
    if args.verb == "redrive":
        count = await dlq.redrive(letters, rate=args.rate, sleep=asyncio.sleep)
        dlq.out.write(f"{count} dead letter(s) redriven\n")
        return 0
    if not args.yes and not confirm(f"Delete {len(letters)} dead letter(s)? [y/N] "):
        dlq.out.write("Aborted; nothing deleted.\n")
        return 1
    count = await dlq.purge(letters)
    dlq.out.write(f"{count} dead letter(s) deleted\n")
    return 0


async def _run(args: argparse.Namespace, out: TextIO, confirm: Callable[[str], bool]) -> int:
    config = kube.load_config(args.kubeconfig, context=args.context)
    if getattr(args, "all_namespaces", False):
        args.namespace = None
    elif args.namespace is None:
        args.namespace = config.namespace
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        dlq = Dlq(kube.KubeClient(config, session), out)
        now = dt.datetime.now(dt.UTC)
        if args.verb == "list":
            return await _list(dlq, args, now)
        if args.verb == "show":
            return await _show(dlq, args, now)
        return await _change(dlq, args, confirm)


def _ask(prompt: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(prompt).strip().lower() in ("y", "yes")


def main(argv: Sequence[str]) -> int:
    """Entry point of ``captchatask dlq``."""
    args = _parser().parse_args(list(argv))
    try:
        return asyncio.run(_run(args, sys.stdout, _ask))
    except kube.ApiError as exc:
        sys.stderr.write(f"error: {exc.message or exc}\n")
        return 1
    except kube.TooManyRequests as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except kube.KubeUnavailable as exc:
        sys.stderr.write(f"error: the API server is unreachable: {exc}\n")
        return 1


def run_for_test(argv: Sequence[str], *, out: TextIO, answer: bool = False) -> int:
    """Run a dlq command in-process with captured output and a scripted confirmation."""
    args = _parser().parse_args(list(argv))
    return asyncio.run(_run(args, out, lambda _prompt: answer))


__all__: Final[list[str]] = ["Dlq", "main", "rate_limited", "render_table"]
