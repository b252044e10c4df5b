"""Every relative link in README.md, docs/*.md and transfer/README.md points at a file that exists, and every
#anchor at a heading of that file (GitHub's slugs). External links (http, mailto) are not fetched."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "transfer" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images excluded


def prose(text):
    """The lines outside fenced code blocks (a link in a code block is not a link)."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def slug(heading):
    """GitHub's anchor for a heading: markdown marks dropped, lower case, punctuation removed, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    """Every anchor of `page`: repeated headings get -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for line in prose(page.read_text()):
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            out.add(f"{s}-{seen[s]}" if s in seen else s)
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(page):
    """'target (why)' for each relative link of `page` that does not resolve."""
    bad = []
    for line in prose(page.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # nor is one in inline code
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                bad.append(f"{target} (no heading with this anchor in {file.name})")
    return bad


def test_slugs_follow_github():
    assert slug("Linear probe (paper Table 1) — `linear_probe.py`") == "linear-probe-paper-table-1--linear_probepy"
    assert slug("Reproducing the paper's Tables 4a, 4b and Appendix C.1") == \
        "reproducing-the-papers-tables-4a-4b-and-appendix-c1"


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](other.md#a-section) [ok](other.md#a-section-1) [ok](#title) "
                    "[ok](https://example.com/x) `[code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n"
                    "[bad](missing.md) [bad](other.md#no-such-section) [bad](#nope)\n")
    assert broken_links(page) == ["missing.md (no such file)",
                                  "other.md#no-such-section (no heading with this anchor in other.md)",
                                  "#nope (no heading with this anchor in page.md)"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert broken_links(page) == []
