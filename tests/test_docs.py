"""The README is a front door, and what it and docs/ point at exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:[a-z_]+/)+[a-z_0-9.]*)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 180, f"README.md has {len(lines)} lines; move detail to docs/"
    headings = [line for line in lines if line.startswith("## ")]
    for wanted in ("## Two commands", "## Processes", "## Where things live", "## Documentation"):
        assert wanted in headings


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_link_and_code_path_resolves(document):
    text = document.read_text()
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            anchors = {slug(line.lstrip("#")) for line in file.read_text().splitlines() if line.startswith("#")}
            if anchor not in anchors:
                broken.append(target)
    for path in CODE_PATH.findall(text):
        if "{" in path or "*" in path or "<" in path or path.count("/") == 1 and path.endswith("/"):
            continue  # patterns, and a folder's name inside something else (a model's `adapter/`)
        if not (ROOT / path.rstrip("/")).exists() and not path.startswith(("var/", "out/")):
            broken.append(path)
    assert not broken, f"{document.name} points at what does not exist: {broken}"
