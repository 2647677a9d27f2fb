"""The documentation is product: the site builds strictly, and every link we hand out lands.

Alerts carry a ``runbook_url``, the dashboard links to the runbooks, and the README links into
the site; each of those must be a page of the site as built from this checkout (its canonical
URL, which Sphinx derives from ``html_baseurl``), not merely a well-formed address. The README
must also only tell people to run commands that exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from captchatask.commands import SUBCOMMANDS, USER_COMMANDS

#: Every verb of `captchatask`, as its own help lists them.
ALL_VERBS = {*SUBCOMMANDS, *USER_COMMANDS, "completion"}

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "charts" / "captchatask" / "files"


def _load_generator() -> ModuleType:
    """docs/_ext/captchatask_docs.py, loaded from its path (docs/ is not a package)."""
    path = REPO / "docs" / "_ext" / "captchatask_docs.py"
    spec = importlib.util.spec_from_file_location("captchatask_docs", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


DOCS = _load_generator()
SITE_URL: str = DOCS.SITE_URL


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built the way `make docs` builds it: warnings (and broken links) are errors."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-n",
            "-q",
            "-b",
            "dirhtml",
            "-d",
            str(out / ".doctrees"),
            str(REPO / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _page(site: Path, url: str) -> Path:
    """The built file that serves ``url`` (a page of dirhtml output is ``<path>/index.html``)."""
    assert url.startswith(SITE_URL), url
    path = url.removeprefix(SITE_URL).split("#", 1)[0]
    assert not path or path.endswith("/"), f"{url}: site URLs end in '/'"
    page = site / path / "index.html"
    if not path:
        page = site / "index.html"
    assert page.is_file(), f"{url}: no page {page.relative_to(site)} in the built site"
    return page


def _canonical(page: Path) -> str:
    found = re.search(r'<link rel="canonical" href="([^"]+)"', page.read_text(encoding="utf-8"))
    assert found, f"{page}: no canonical link"
    return found.group(1)


def _alerts(path: Path) -> list[tuple[str, str]]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        (rule.get("alert") or rule["title"], rule["annotations"]["runbook_url"])
        for group in document["groups"]
        for rule in group["rules"]
        if "annotations" in rule and "runbook_url" in rule["annotations"]
    ]


@pytest.mark.parametrize("rules", ["prometheus-rules.yaml", "grafana-alerting.yaml"])
def test_every_runbook_url_is_a_page_of_the_built_site(site: Path, rules: str) -> None:
    alerts = _alerts(FILES / rules)
    assert len(alerts) >= 8
    for name, url in alerts:
        assert url == DOCS.runbook_url(name), name
        assert _canonical(_page(site, url)) == url, name


def test_every_runbook_page_belongs_to_an_alert() -> None:
    names = {name.lower() for name, _url in _alerts(FILES / "prometheus-rules.yaml")}
    pages = {p.stem for p in (REPO / "docs" / "runbooks").glob("*.md")} - {"index"}
    assert pages == names


def test_the_dashboard_links_land_on_the_site(site: Path) -> None:
    for board in (FILES / "dashboards").glob("*.json"):
        links = [link["url"] for link in json.loads(board.read_text(encoding="utf-8"))["links"]]
        for url in (u for u in links if u.startswith(SITE_URL)):
            _page(site, url)


def test_the_generated_references_cover_every_crd_field_and_command(site: Path) -> None:
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for kind in ("CaptchaTask", "CaptchaProvider", "CaptchaDeadLetter"):
        assert f"{kind} fields" in api
    assert "spec.polling.callbackTimeoutSeconds" in api
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for name in ALL_VERBS:
        assert f"captchatask {name}" in cli
    assert "--dead-letter-max-attempts" in cli


# --- README -----------------------------------------------------------------------------------


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short_and_starts_with_the_install() -> None:
    readme = _readme()
    assert len(readme.encode()) <= 16_000
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "helm install" in first_screen
    assert "```mermaid" not in readme, "PyPI renders the README: no Mermaid-only content"


def test_the_readme_gives_the_two_quickstart_commands() -> None:
    readme = _readme()
    quickstart = readme[readme.index("## Quickstart") :].split("\n## ", 1)[0]
    assert "make demo" in quickstart
    assert "make test" in quickstart


def test_every_site_link_in_the_readme_lands_on_a_built_page(site: Path) -> None:
    links = re.findall(re.escape(SITE_URL) + r"[^\s)>\]\"']*", _readme())
    assert len(links) >= 5
    for url in links:
        page = _page(site, url)
        if "#" in url:
            anchor = url.split("#", 1)[1]
            assert f'id="{anchor}"' in page.read_text(encoding="utf-8"), url


def test_every_command_the_readme_names_exists() -> None:
    readme = _readme()
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, flags=re.M))
    for target in re.findall(r"(?:^|\$ |`|sudo )make ([a-z][a-z0-9-]*)", readme, flags=re.M):
        assert target in targets, f"README names `make {target}`, which the Makefile lacks"
    # A command starts a line (or follows a prompt, a backtick or `kubectl ` as a plugin); this
    # skips `-n captchatask get ...`, where captchatask is a namespace.
    verbs = re.findall(r"(?:^|\$ |`|kubectl )captchatask ([a-z]+)", readme, flags=re.M)
    assert verbs
    for verb in verbs:
        assert verb in ALL_VERBS, f"README names `captchatask {verb}`, which does not exist"


def test_the_readme_benchmark_table_is_generated_from_bench_results() -> None:
    results_file = REPO / "bench" / "results" / "full.json"
    block = DOCS.readme_benchmarks(results_file)
    assert block in _readme(), "regenerate: python -m bench.report --readme bench/results/full.json"
    # Every target the results carry is a row, whoever added it (the docs module put the
    # checkout on sys.path: bench/ is a directory of it, not an installed package).
    from bench import report  # noqa: PLC0415

    results = json.loads(results_file.read_text(encoding="utf-8"))
    assert all(f"| {item.target} |" in block for item in report.verdicts(results))


def test_the_readme_quotes_the_latest_chaos_figures() -> None:
    summary = DOCS.chaos_summary(REPO / "bench" / "results" / "chaos-full.json")
    assert summary in _readme(), f"update the README's guarantees paragraph to: {summary}"


def test_the_report_command_explains_itself_and_refuses_a_missing_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is a directory of the checkout
    from bench import report  # noqa: PLC0415

    with pytest.raises(SystemExit) as helped:
        report.main(["--help"])
    assert helped.value.code == 0
    assert "--readme" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        report.main([str(tmp_path / "missing.json")])
    assert refused.value.code == 2
    assert "cannot read" in capsys.readouterr().err


# --- What the pages tell people to run ----------------------------------------------------------
#
# House rule: every command the README, the docs or the chart's README shows runs as printed.
# Commands that need a cluster are run by hand against the test bed; what can be checked here,
# cheaply and for every page, is that each `captchatask ...` line parses with the real argparse,
# each metric, label and grep pattern names a series the components export, each PromQL
# expression parses with promtool, and each kubectl column, CRD field and chart value a page
# names exists.

#: Placeholders people replace (`<ns>`, `<letter>`), kept as the word inside.
PLACEHOLDER = re.compile(r"<([A-Za-z][\w.-]*)>")
#: Shell punctuation that ends one simple command.
SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", "(", ")", "<(", "<", ">", ">>", "2>&1"})
#: A metric named in prose or PromQL, with an optional `{...}` right after it.
METRIC_MENTION = re.compile(r"\b(captchatask_[a-z0-9_]+)(\{[^}]*\})?")
#: Python packages of this repository whose names look like metrics.
MODULE_NAMES = frozenset({"captchatask_operator", "captchatask_sidecar", "captchatask_docs"})
#: Shells people paste code blocks into (a console block's commands follow a `$ ` prompt).
SHELL_BLOCKS = frozenset({"", "sh", "bash", "shell", "console"})


def _doc_pages() -> list[Path]:
    """The README, every source page of the site, and the chart's README."""
    pages = [REPO / "README.md", REPO / "charts" / "captchatask" / "README.md"]
    skip = {"_build", "_generated"}
    pages += sorted(p for p in (REPO / "docs").rglob("*.md") if not skip & set(p.parts))
    return pages


def _snippets(text: str) -> tuple[list[str], list[str]]:
    """(shell command lines of the code blocks, inline code spans) of one Markdown page."""
    lines: list[str] = []
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w{}-]*)", raw)
        if fence and blocks and blocks[-1][0] != "closed":
            blocks.append(("closed", []))
        elif fence:
            blocks.append((fence.group(2).lower(), []))
        elif blocks and blocks[-1][0] != "closed":
            blocks[-1][1].append(raw.strip())
        else:
            prose.append(raw)
    for language, body in blocks:
        if language not in SHELL_BLOCKS:
            continue
        prompted = any(line.startswith("$ ") for line in body)
        pending = ""
        for line in body:
            if language == "console" and prompted and not pending:
                if not line.startswith("$ "):
                    continue  # output
                line = line.removeprefix("$ ")  # noqa: PLW2901
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
    # An inline span may wrap onto the next line, never across a paragraph.
    spans = re.findall(r"(?<!`)`([^`]+?)`(?!`)", "\n".join(prose))
    return lines, [span.replace("\n", " ") for span in spans if "\n\n" not in span]


def _simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, `$(...)` substitutions included."""
    lexer = shlex.shlex(PLACEHOLDER.sub(r"\1", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return []  # unbalanced quotes: prose that happens to be in backticks
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token.startswith("$(") and token.endswith(")"):
            commands += _simple_commands(token[2:-1])
        elif token in SHELL_OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _captchatask_words(words: list[str]) -> tuple[list[str], bool] | None:
    """(argv after the program, kubectl plugin?) of a `captchatask` command, else None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*|sudo|eval|source|exec", words[0]):
        words = words[1:]
    if words[:1] == ["captchatask"]:
        return words[1:], False
    if words[:2] == ["kubectl", "captchatask"]:
        return words[2:], True
    return None


class _Parsed(Exception):
    """Raised where a command would start running: its command line parsed."""


def _parse(argv: list[str], *, plugin: bool) -> None:
    """Parse `argv` as `captchatask` (or `kubectl captchatask`) would, running nothing.

    The user commands and the operator have parse functions that also apply their checks
    across flags; the other commands are stopped right after their parser accepted the line.
    Raises ``SystemExit`` (argparse's way) for a line the command refuses.
    """
    from captchatask import cli, cliopts, dlq, listing  # noqa: PLC0415
    from captchatask_operator import settings  # noqa: PLC0415 - imports kopf

    leading, rest = cliopts.hoist(argv)
    name = rest[0] if rest else None
    parsers: dict[str | None, Callable[[list[str]], object]] = {
        "dlq": dlq.parse,
        "tasks": listing.parse_tasks,
        "providers": listing.parse_providers,
    }
    if not plugin and not leading:
        parsers["operator"] = lambda words: settings.parse(words, {})
    if name in parsers:
        parsers[name]([*leading, *rest[1:]])
        return
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[assignment,method-assign]
    try:
        cli.dispatch(argv, prog="captchatask", user_only=plugin)
    except _Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise SystemExit(2)  # dispatch returned without parsing: no command was named


def _refusal(argv: list[str], *, plugin: bool, reference: bool) -> str | None:
    """Why `argv` does not run as printed, or None when it parses.

    An inline mention may name a command without its arguments (`captchatask dlq show`): it
    is a reference when asking that command for `--help` works. An ellipsis after an option is
    its value; anywhere else it stands for "more words".
    """
    words = [
        "x" if word in ("...", "…") and index and argv[index - 1].startswith("-") else word
        for index, word in enumerate(argv)
    ]
    words = [word for word in words if word not in ("...", "…")]
    attempts = [words, [*words, "--help"]] if reference else [words]
    errors = io.StringIO()
    for attempt in attempts:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            try:
                _parse(attempt, plugin=plugin)
            except SystemExit as exit_:
                if exit_.code in (0, None) and "--help" in attempt:
                    return None
                continue
        return None
    return errors.getvalue().strip().splitlines()[-1] if errors.getvalue() else "refused"


def test_every_captchatask_command_the_pages_show_parses_with_the_real_cli() -> None:
    checked = 0
    failures = []
    for page in _doc_pages():
        lines, spans = _snippets(page.read_text(encoding="utf-8"))
        for text, reference in [*((line, False) for line in lines), *((s, True) for s in spans)]:
            # `captchatask <command> --help` holds for every command.
            sources = (
                [text.replace("<command>", v) for v in ALL_VERBS] if "<command>" in text else [text]
            )
            for source, words in ((s, w) for s in sources for w in _simple_commands(s)):
                found = _captchatask_words(words)
                if found is None:
                    continue
                argv, plugin = found
                checked += 1
                refusal = _refusal(argv, plugin=plugin, reference=reference)
                if refusal is not None:
                    failures.append(f"{page.relative_to(REPO)}: `{source}`: {refusal}")
    assert checked >= 30
    assert not failures, "\n".join(failures)


#: Labels Prometheus adds to every series of a target.
TARGET_LABELS = frozenset({"job", "instance"})
#: The series each metric type exposes, by suffix, and the labels a suffix adds.
SERIES_SUFFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "counter": {"": (), "_total": (), "_created": ()},
    "gauge": {"": ()},
    "histogram": {"": (), "_bucket": ("le",), "_count": (), "_sum": (), "_created": ()},
}


def _exported_series() -> dict[str, frozenset[str]]:
    """Every series name the operator and the receiver export, with its label names."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415
    from prometheus_client.metrics import MetricWrapperBase  # noqa: PLC0415

    from captchatask_operator import metrics as operator_metrics  # noqa: PLC0415
    from captchatask_sidecar import metrics as sidecar_metrics  # noqa: PLC0415

    series: dict[str, frozenset[str]] = {}
    for module in (operator_metrics, sidecar_metrics):
        bundle = module.Metrics(CollectorRegistry())
        for metric in vars(bundle).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            # Label names of a labelled metric are known before any child exists only here.
            labels = frozenset(metric._labelnames)
            for suffix, extra in SERIES_SUFFIXES[str(metric._type)].items():
                series[metric._name + suffix] = labels | set(extra)
    return series


def _mentions() -> list[tuple[str, str]]:
    """(page, text) of every code line and inline span of the pages."""
    found = []
    for page in _doc_pages():
        lines, spans = _snippets(page.read_text(encoding="utf-8"))
        found += [(str(page.relative_to(REPO)), text) for text in [*lines, *spans]]
    return found


def _label_names(braces: str) -> set[str]:
    """Label names of `{a="x", b=~"y"}` (a selector) or `{a,b}` (the docs' way to name them)."""
    inner = braces.strip("{}")
    if "=" in inner:
        return set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", inner))
    return {word.strip() for word in inner.split(",") if word.strip()}


def test_every_metric_and_label_the_pages_name_is_exported() -> None:
    series = _exported_series()
    assert "captchatask_pingbacks_total" in series
    failures = []
    checked = 0
    for page, text in _mentions():
        for name, braces in METRIC_MENTION.findall(text):
            if name in MODULE_NAMES:
                continue
            checked += 1
            if name not in series:
                failures.append(f"{page}: `{text}`: no series {name}")
            elif braces and not _label_names(braces) <= series[name] | TARGET_LABELS:
                unknown = _label_names(braces) - series[name]
                failures.append(f"{page}: `{text}`: {name} has no label {sorted(unknown)}")
    assert checked >= 30
    assert not failures, "\n".join(failures)


def test_every_grep_over_a_metrics_endpoint_matches_an_exported_series() -> None:
    names = list(_exported_series())
    failures = []
    for page, text in _mentions():
        commands = _simple_commands(text)
        for scrape, grep in itertools.pairwise(commands):
            if not (scrape[0] == "curl" and any("/metrics" in w for w in scrape)):
                continue
            if grep[0] != "grep":
                continue
            pattern = next(w for w in grep[1:] if not w.startswith("-"))
            failures += [
                f"{page}: `{text}`: {alternative!r} matches no series"
                for alternative in pattern.split("|")
                if not any(re.search(alternative, name) for name in names)
            ]
    assert not failures, "\n".join(failures)


def _promql(text: str) -> bool:
    """A PromQL expression (a function or aggregation over one of our series), not a name."""
    names = {name for name, _ in METRIC_MENTION.findall(text)} - MODULE_NAMES
    return bool(names) and "(" in text and "$" not in text


def test_every_promql_expression_the_pages_show_parses_and_groups_by_real_labels() -> None:
    from captchatask import testbed  # noqa: PLC0415

    promtool = testbed.find_tool("promtool")
    if promtool is None:
        pytest.fail(f"promtool is missing: build it with `{testbed.TEST_TOOLS_HINT}`")
    series = _exported_series()
    expressions = [(page, text) for page, text in _mentions() if _promql(text)]
    assert len(expressions) >= 2
    failures = []
    for page, text in expressions:
        result = subprocess.run(
            [str(promtool), "--experimental", "promql", "format", text],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            failures.append(f"{page}: `{text}`: {result.stderr.strip()}")
            continue
        used = {name for name, _ in METRIC_MENTION.findall(text) if name in series}
        labels = set().union(*(series[name] for name in used)) | TARGET_LABELS
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
            unknown = _label_names(grouping) - labels
            if unknown:
                failures.append(f"{page}: `{text}`: groups by unknown labels {sorted(unknown)}")
    assert not failures, "\n".join(failures)


def _printer_columns() -> dict[str, set[str]]:
    """Every name `kubectl get` knows our kinds by, with the column headers it prints."""
    columns: dict[str, set[str]] = {}
    for crd in yaml.safe_load_all((REPO / "deploy" / "crds.yaml").read_text(encoding="utf-8")):
        if not crd:
            continue
        names = crd["spec"]["names"]
        headers = {"NAME", "AGE", "NAMESPACE"}
        for version in crd["spec"]["versions"]:
            for column in version.get("additionalPrinterColumns", []):
                headers.add(column["name"].upper().replace(" ", "-"))
        group = crd["spec"]["group"]
        aliases = [names["plural"], names["singular"], names["kind"].lower(), *names["shortNames"]]
        for alias in aliases:
            columns[alias] = columns[f"{alias}.{group}"] = headers
    return columns


def test_every_column_the_pages_point_at_is_a_printer_column_of_that_kind() -> None:
    """`kubectl get cprov` (IN-FLIGHT), `# READY True`: the header is one kubectl prints."""
    columns = _printer_columns()
    pointers = []
    for page in _doc_pages():
        text = page.read_text(encoding="utf-8")
        # A code line with a comment, or an inline span followed by a parenthesis.
        pointers += [
            (page, get, note)
            for get, note in re.findall(r"(kubectl [^`#\n]*)#([^\n]*)", text)
            + re.findall(r"`(kubectl [^`]*)` \(([^)]*)\)", text)
        ]
    failures = []
    checked = 0
    for page, get, note in pointers:
        words = get.split()
        if "get" not in words or words.index("get") + 1 >= len(words):
            continue
        resource = words[words.index("get") + 1]
        if resource not in columns:
            continue
        for header in re.findall(r"\b[A-Z][A-Z-]{2,}\b", note):
            checked += 1
            if header not in columns[resource]:
                failures.append(f"{page.relative_to(REPO)}: `{get}` prints no {header} column")
    assert checked >= 4
    assert not failures, "\n".join(failures)


def _crd_field_paths() -> set[str]:
    """Every `spec.…` and `status.…` path of our CRDs' schemas (list items under their list)."""
    paths: set[str] = set()

    def walk(schema: dict[str, Any], prefix: str) -> None:
        paths.add(prefix)
        for name, child in (schema.get("properties") or {}).items():
            walk(child, f"{prefix}.{name}")
        if "items" in schema:
            walk(schema["items"], prefix)

    for crd in yaml.safe_load_all((REPO / "deploy" / "crds.yaml").read_text(encoding="utf-8")):
        for version in crd["spec"]["versions"] if crd else []:
            properties = version["schema"]["openAPIV3Schema"]["properties"]
            for top in ("spec", "status"):
                if top in properties:
                    walk(properties[top], top)
    return paths


def test_every_field_path_the_pages_name_is_in_a_crd() -> None:
    fields = _crd_field_paths()
    named = re.compile(r"\b((?:spec|status)\.[a-zA-Z][a-zA-Z0-9.]*[a-zA-Z0-9])")
    failures = [
        f"{page.relative_to(REPO)}: {path}"
        for page in _doc_pages()
        for path in named.findall(page.read_text(encoding="utf-8"))
        if path not in fields
    ]
    assert len(fields) > 50
    assert not failures, "\n".join(failures)


def _is_chart_value(path: str, schema: dict[str, Any]) -> bool:
    """Whether `a.b[0].c` is a value `values.schema.json` knows (any key of a free-form map)."""
    node: dict[str, Any] = schema
    for part in path.split("."):
        if "properties" not in node and isinstance(node.get("additionalProperties"), dict):
            return True  # a map such as `labels`: every key is a value
        node = node.get("items", node) if part.endswith("]") else node
        found = (node.get("properties") or {}).get(re.sub(r"\[\d+\]$", "", part))
        if found is None:
            return False
        node = found.get("items", found) if part.endswith("]") else found
    return True


def test_every_chart_value_the_pages_name_is_in_the_values_schema() -> None:
    """`--set operator.ha.enabled=true`, `receiver.spool.maxBytes`: values the chart takes."""
    chart = REPO / "charts" / "captchatask"
    schema = json.loads((chart / "values.schema.json").read_text(encoding="utf-8"))
    tops = set(schema["properties"])
    named = re.compile(r"(?:`|--set(?:-string)? '?)([a-z]\w*(?:\[\d+\])?(?:\.\w+(?:\[\d+\])?)+)")
    failures = []
    checked = 0
    for page in _doc_pages():
        for path in named.findall(page.read_text(encoding="utf-8")):
            if path.split(".")[0].split("[")[0] not in tops or re.search(r"\.(ya?ml|json)$", path):
                continue
            checked += 1
            if not _is_chart_value(path, schema):
                failures.append(f"{page.relative_to(REPO)}: {path}")
    assert checked >= 40
    assert not failures, "\n".join(failures)
