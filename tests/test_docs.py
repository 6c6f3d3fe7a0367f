"""The user documentation: a short README, pages under docs/ that it links, every link and anchor alive, no
tracker numbers."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MAX_README_LINES = 350


def prose(text: str) -> str:
    """The text without its fenced code blocks (a `#` there is a shell comment, not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.*)$", prose(path.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def broken_links(path: Path) -> list[str]:
    """The relative links of a page whose file or anchor does not exist."""
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists() or (anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved))):
            broken.append(target)
    return broken


def test_every_link_between_the_pages_resolves():
    assert {page.name for page in PAGES} >= {"README.md", "CHANGELOG.md", "settings.md", "checkpoints.md"}
    broken = {str(page.relative_to(REPO)): links for page in PAGES if (links := broken_links(page))}
    assert not broken, broken


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n[ok](b.md#a-heading) [file](c.md) [anchor](b.md#nope) [self](#a-page)"
                                   "\n```bash\n# a comment, not a heading\n```\n")
    (tmp_path / "b.md").write_text("## A heading\n")
    assert broken_links(tmp_path / "a.md") == ["c.md", "b.md#nope"]


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    linked = set(LINK.findall(readme))
    assert {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")} <= linked


def test_user_documentation_names_no_tracker_issue():
    numbered = {str(page.relative_to(REPO)): found for page in PAGES
                if (found := re.findall(r"\bissues? #?\d+|(?<![\w&/])#\d+\b", page.read_text(), flags=re.I))}
    assert not numbered, numbered
