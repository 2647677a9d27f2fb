"""``captchatask dlq`` (also ``kubectl captchatask dlq``): see, redrive and purge dead letters.

The operator requeues dead letters on its own; this command is for the person on call: list
what is stuck and why, look at one, put letters back in the queue on purpose (rate-limited, so a
redrive of thousands does not hammer the API server), or delete them once understood. The
kubectl flags (``-n``, ``-A``, ``--context``, ``--kubeconfig``, ``-o json|yaml|name|wide``) work
before or after the verb (:mod:`captchatask.cliopts`); ``redrive`` and ``purge`` take
``--dry-run=client|server`` like ``kubectl delete``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, TextIO, TypeVar

import aiohttp

from captchatask import cliopts, kube, model
from captchatask.deadletters import LetterView, redrive_status
from captchatask.model import DeadLetterPhase

#: Default redrive rate (letters per second): gentle on the API server and the operator.
DEFAULT_RATE: Final = 5.0
#: How much of an answer token `show` prints unless asked for everything.
TOKEN_PREVIEW: Final = 16
#: ``--dry-run`` values, as kubectl spells them; a bare ``--dry-run`` means ``client``.
DRY_RUN_MODES: Final = ("none", "client", "server")
#: What ``-o json|yaml`` items and ``-o name`` are called.
KIND: Final = model.DEAD_LETTER_KIND

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


def _age(created: dt.datetime | None, now: dt.datetime) -> str:
    if created is None:
        return "?"
    seconds = int((now - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def render_table(
    letters: Sequence[LetterView], now: dt.datetime, *, all_namespaces: bool, wide: bool = False
) -> str:
    """Render the human table of ``dlq list`` (pure, for tests); ``wide`` adds three columns."""
    headers = ["NAME", "PHASE", "REASON", "TASK", "PROVIDER-TASK", "ATTEMPTS", "AGE", "MESSAGE"]
    if wide:
        headers += ["TASK-UID", "NEXT-ATTEMPT", "REDRIVEN"]
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
        if wide:
            row += [
                letter.task_uid or "-",
                _until(letter.next_attempt_at, now),
                f"{_age(letter.redriven_at, now)} ago" if letter.redriven_at else "-",
            ]
        if all_namespaces:
            row.insert(0, letter.namespace)
        rows.append(row)
    return cliopts.table(headers, rows)


def _until(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return "-"
    return "now" if when <= now else f"in {_age(now, when)}"


async def rate_limited(
    items: Sequence[T],
    action: Callable[[T], Awaitable[None]],
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
    """The verbs, over one API session.

    Parameters
    ----------
    client
        The API client (session owned by the caller).
    out
        Where results go.
    output
        ``-o``: ``None`` for the human form, else one of :data:`cliopts.OUTPUTS`.
    dry_run
        ``none``, ``client`` (resolve and report, write nothing) or ``server`` (the API server
        checks every write, RBAC and preconditions included, and persists nothing).
    """

    def __init__(
        self,
        client: kube.KubeClient,
        out: TextIO,
        *,
        output: str | None = None,
        dry_run: str = "none",
    ) -> None:
        self.client = client
        self.out = out
        self.output = output
        self.dry_run = dry_run

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

    def _report(self, letter: LetterView, verb: str, body: dict[str, object] | None) -> None:
        """One line per letter, as kubectl prints them (``-o name``/json/yaml respected)."""
        suffix = {"client": " (dry run)", "server": " (server dry run)"}.get(self.dry_run, "")
        if self.output in ("json", "yaml") and body is not None:
            cliopts.dump(cliopts.with_kind([body], KIND), self.output, self.out, single=True)
        elif self.output == "name":
            self.out.write(f"{self._qualified(letter)}\n")
        else:
            self.out.write(f"{self._qualified(letter)} {verb}{suffix}\n")

    @staticmethod
    def _qualified(letter: LetterView) -> str:
        return f"{KIND.lower()}.{model.GROUP}/{letter.name}"

    async def redrive(self, letters: Sequence[LetterView], *, rate: float, sleep: Sleep) -> int:
        """Put letters back to ``Pending`` for an immediate retry, at ``rate`` per second."""
        unique = list({letter.key: letter for letter in letters}.values())

        async def one(letter: LetterView) -> None:
            if self.dry_run == "client":
                self._report(letter, "redriven", None)
                return
            now = dt.datetime.now(dt.UTC)
            body = await self.client.patch(
                kube.DEAD_LETTERS,
                letter.namespace,
                letter.name,
                {"status": {**redrive_status(now), "redrivenAt": model.format_time(now)}},
                subresource="status",
                dry_run=self.dry_run == "server",
            )
            self._report(letter, "redriven", body)

        # A client-side dry run writes nothing, so it need not be paced.
        pace = rate if self.dry_run != "client" else float("inf")
        await rate_limited(unique, one, rate=pace, sleep=sleep)
        return len(unique)

    async def purge(self, letters: Sequence[LetterView]) -> int:
        """Delete letters (each only if it is still the instance that was listed)."""
        for letter in letters:
            body = None
            if self.dry_run != "client":
                try:
                    body = await self.client.delete(
                        kube.DEAD_LETTERS,
                        letter.namespace,
                        letter.name,
                        uid=letter.uid or None,
                        dry_run=self.dry_run == "server",
                    )
                except kube.ApiError as exc:
                    if not exc.not_found:
                        raise
            self._report(letter, "deleted", body)
        return len(letters)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="List, show, redrive and purge CaptchaDeadLetters.",
    )
    cliopts.add_global_flags(parser, nested=False)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="<verb>")
    listing = sub.add_parser("list", help="list dead letters with reason, age and attempts")
    listing.add_argument("-l", "--selector", help="label selector")
    listing.add_argument("--phase", choices=[str(p) for p in DeadLetterPhase])
    show = sub.add_parser("show", help="show one dead letter")
    show.add_argument("name")
    for verb, text in (
        ("redrive", "put letters back in the requeue loop, rate-limited"),
        ("purge", "delete letters (asks for confirmation)"),
    ):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("names", nargs="*", help="letter names")
        cmd.add_argument("-l", "--selector", help="label selector")
        cmd.add_argument("--all-expired", action="store_true", help="every Expired letter")
        cmd.add_argument(
            "--dry-run",
            choices=DRY_RUN_MODES,
            default="none",
            help="client: only print what would change; server: let the API server check "
            "every write and persist nothing (a bare --dry-run means client)",
        )
        if verb == "redrive":
            cmd.add_argument(
                "--rate",
                type=float,
                default=DEFAULT_RATE,
                help=f"letters per second (default {DEFAULT_RATE})",
            )
        else:
            cmd.add_argument("-y", "--yes", action="store_true", help="do not ask")
    for verb_parser in (listing, show, *(sub.choices[v] for v in ("redrive", "purge"))):
        cliopts.add_global_flags(verb_parser, nested=True)
    return parser


def parse(argv: Sequence[str], *, prog: str = "captchatask dlq") -> argparse.Namespace:
    """Parse a dlq command line; a bare ``--dry-run`` means ``--dry-run=client``, as in kubectl."""
    words = ["--dry-run=client" if word == "--dry-run" else word for word in argv]
    parser = build_parser(prog)
    args = parser.parse_args(words)
    if args.all_namespaces and (args.verb == "show" or getattr(args, "names", None)):
        parser.error("a dead letter cannot be named across all namespaces; use -n instead of -A")
    if args.verb != "list" and args.output == "wide":
        parser.error("-o wide is a listing format; use it with list")
    return args


async def _list(dlq: Dlq, args: argparse.Namespace, now: dt.datetime) -> int:
    letters = await dlq.letters(args.namespace, args.selector, args.phase)
    if args.output in ("json", "yaml", "name"):
        raw = await dlq.client.list(kube.DEAD_LETTERS, args.namespace, label_selector=args.selector)
        keys = {letter.key for letter in letters}
        items = [
            item
            for item in raw["items"]
            if (item["metadata"].get("namespace", ""), item["metadata"]["name"]) in keys
        ]
        cliopts.dump(cliopts.with_kind(items, KIND), args.output, dlq.out, single=False)
    elif not letters:
        where = "" if args.namespace is None else f" in namespace {args.namespace}"
        dlq.out.write(f"No dead letters{where}.\n")
    else:
        table = render_table(
            letters, now, all_namespaces=args.namespace is None, wide=args.output == "wide"
        )
        dlq.out.write(table + "\n")
    return 0


async def _show(dlq: Dlq, args: argparse.Namespace, now: dt.datetime) -> int:
    body = await dlq.client.get(kube.DEAD_LETTERS, args.namespace, args.name)
    if args.output:
        cliopts.dump(cliopts.with_kind([body], KIND), args.output, dlq.out, single=True)
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
    quiet = args.output is not None
    dry = "" if args.dry_run == "none" else " (dry run)"
    if args.verb == "redrive":
        count = await dlq.redrive(letters, rate=args.rate, sleep=asyncio.sleep)
        if not quiet:
            dlq.out.write(f"{count} dead letter(s) redriven{dry}\n")
        return 0
    if (
        args.dry_run == "none"
        and not args.yes
        and not confirm(f"Delete {len(letters)} dead letter(s)? [y/N] ")
    ):
        dlq.out.write("Aborted; nothing deleted.\n")
        return 1
    count = await dlq.purge(letters)
    if not quiet:
        dlq.out.write(f"{count} dead letter(s) deleted{dry}\n")
    return 0


async def _run(args: argparse.Namespace, out: TextIO, confirm: Callable[[str], bool]) -> int:
    config = kube.load_config(args.kubeconfig, context=args.context)
    args.namespace = cliopts.target_namespace(args, config)
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        dlq = Dlq(
            kube.KubeClient(config, session),
            out,
            output=args.output,
            dry_run=getattr(args, "dry_run", "none"),
        )
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


def run_async(run: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's coroutine and turn API and kubeconfig failures into exit status 1."""
    try:
        return asyncio.run(run())
    except kube.ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
    except kube.ApiError as exc:
        sys.stderr.write(f"error: {exc.message or exc}\n")
    except kube.TooManyRequests as exc:
        sys.stderr.write(f"error: {exc}\n")
    except kube.KubeUnavailable as exc:
        sys.stderr.write(f"error: the API server is unreachable: {exc}\n")
    return 1


def main(argv: Sequence[str], *, prog: str = "captchatask dlq") -> int:
    """Entry point of ``captchatask dlq`` (``prog`` names it in help and errors)."""
    args = parse(argv, prog=prog)
    return run_async(lambda: _run(args, sys.stdout, _ask))


def run_for_test(argv: Sequence[str], *, out: TextIO, answer: bool = False) -> int:
    """Run a dlq command in-process with captured output and a scripted confirmation."""
    args = parse(argv)
    return asyncio.run(_run(args, out, lambda _prompt: answer))


__all__: Final[list[str]] = ["Dlq", "main", "parse", "rate_limited", "render_table", "run_async"]
