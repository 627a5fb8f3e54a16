"""Every relative link of the user docs ([text](path#anchor)) names a file that exists and,
for a Markdown page, a heading it has (GitHub's anchors): merges and renamed headings broke
links that no reader reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def doc_pages(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md")),
            repo / "examples" / "README.md", repo / "SECURITY.md"]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped (an underscore kept), lower case,
    punctuation but hyphens dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    """The page's heading anchors (a repeated one numbered -1, -2 as GitHub does) and its
    explicit <a name=...>/<a id=...> ones."""
    text = FENCED.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(text):
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        found.add(anchor if count == 0 else f"{anchor}-{count}")
        seen[anchor] = count + 1
    found.update(re.findall(r'<a (?:name|id)="([^"]+)"', text))
    return found


def broken_links(page: Path) -> list[str]:
    """`page`'s relative links whose file or heading is missing (code is not read)."""
    text = re.sub(r"`[^`\n]*`", "", FENCED.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"\w+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors_of(destination):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The `--flag` part\n\n## Twice\n"
                                       "\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the---flag-part) [ok](other.md#twice-1) [ok](#here)\n"
                    "# Here\n[gone](missing.md) [bad](other.md#nowhere) `[code](no.md)`\n"
                    "```\n[fenced](no.md)\n```\n[web](https://example.com/x)\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#nowhere (no such heading)"]
