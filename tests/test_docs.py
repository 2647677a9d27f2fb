"""The documentation is product: the site builds strictly, and every link we hand out lands.

Alerts carry a ``runbook_url``, the dashboard links to the runbooks, and the README links into
the site; each of those must be a page of the site as built from this checkout (its canonical
URL, which Sphinx derives from ``html_baseurl``), not merely a well-formed address. The README
must also only tell people to run commands that exist.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
