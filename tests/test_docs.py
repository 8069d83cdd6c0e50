"""README.md is the front door and docs/ the reference: the site builds strictly, every page is in
the nav, and every link of the README reaches a file (and, into a docs page, a heading that exists)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 300  # a newcomer's five minutes; the reference goes to docs/

# [text](target) and ![alt](target), with an optional "title"; code is taken out before matching.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def nav_pages(nav) -> list[str]:
    """Every page file the nav lists, in order, sections flattened."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for entry in nav for page in nav_pages(entry)]


def html_for(page: str, site: Path) -> Path:
    """Where MkDocs writes a page with directory URLs (the default): a.md -> a/index.html."""
    stem = page[:-len(".md")]
    return site / ("index.html" if stem == "index" else f"{stem}/index.html")


def relative_links(markdown: str) -> list[str]:
    """Link and image targets that are not URLs, outside code blocks and code spans."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_the_site_builds_strictly_with_a_page_for_every_nav_entry(site, config):
    pages = nav_pages(config["nav"])
    assert pages and pages[0] == "index.md"
    missing = [page for page in pages if not html_for(page, site).is_file()]
    assert not missing, f"nav pages the build did not write: {missing}"


def test_every_docs_page_is_in_the_nav(config):
    listed = set(nav_pages(config["nav"]))
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert not on_disk - listed, f"docs pages missing from mkdocs.yml's nav: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"nav entries with no file in docs/: {sorted(listed - on_disk)}"


def test_the_readme_is_a_front_door():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference text to docs/ (at most {README_MAX_LINES})"


def test_every_readme_link_reaches_a_file_and_an_existing_anchor(site):
    links = relative_links(README.read_text())
    assert any(link.startswith("docs/") for link in links), "README.md links to no docs page"
    broken = []
    for link in links:
        target, _, anchor = link.partition("#")
        path = (ROOT / target).resolve() if target else README
        if not path.exists() or ROOT not in path.parents:
            broken.append(f"{link}: no file {target} in the repository")
        elif anchor and not (path.suffix == ".md" and DOCS in path.parents):
            broken.append(f"{link}: anchors are checked only into docs/ pages; link the page instead")
        elif anchor:
            page = path.relative_to(DOCS).as_posix()
            ids = set(re.findall(r'\bid="([^"]+)"', html_for(page, site).read_text(encoding="utf-8")))
            if anchor not in ids:
                broken.append(f"{link}: {page} has no heading #{anchor}")
    assert not broken, "broken links in README.md:\n" + "\n".join(broken)


def test_the_readme_links_every_reference_page(config):
    linked = {link.partition("#")[0] for link in relative_links(README.read_text())}
    unlinked = [page for page in nav_pages(config["nav"]) if page != "index.md" and f"docs/{page}" not in linked]
    assert not unlinked, f"docs pages README.md's \"Read more\" does not link: {unlinked}"


def test_links_are_found_outside_code_and_urls_are_left_out():
    markdown = ("[a](docs/a.md#x) ![b](bench/b.png \"t\") [c](https://example.com) [`d`](docs/d.md)\n"
                "`[e](docs/e.md)`\n```\n[f](docs/f.md)\n```\n")
    assert relative_links(markdown) == ["docs/a.md#x", "bench/b.png", "docs/d.md"]
