"""Sphinx configuration of the captchatask documentation site.

Built strictly by ``make docs`` (``sphinx-build -W --keep-going -n``: every warning, including
a broken internal link or reference, fails the build) and published by
``.github/workflows/docs.yml``. Reference pages are generated at build time by
``docs/_ext/captchatask_docs.py`` from the CRDs, the CLI parsers, the alert rules and the
benchmark results.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

from captchatask_docs import SITE_URL

from captchatask.version import __version__

project = "captchatask"
author = "captchatask maintainers"
copyright = "captchatask maintainers"
version = release = __version__

extensions = ["myst_parser", "sphinxcontrib.mermaid", "captchatask_docs"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "_ext", "Thumbs.db", ".DS_Store"]

# Markdown: heading anchors so that [text](page.md#a-heading) links are checked, too.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist"]
myst_fence_as_directive = ["mermaid"]
# Every cross-reference must resolve (-n); external links are not fetched during the build.
nitpicky = True
suppress_warnings: list[str] = []

html_theme = "furo"
html_title = f"captchatask {release}"
# The canonical URL of every page; alert runbook_urls point below it (tested).
html_baseurl = SITE_URL
html_static_path: list[str] = []
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
    "source_repository": "https://github.com/captchatask/captchatask/",
    "source_branch": "main",
    "source_directory": "docs/",
}
pygments_style = "sphinx"
