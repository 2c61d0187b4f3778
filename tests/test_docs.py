"""The docs cannot rot silently: every relative link in README.md, docs/ and benchmarks/README.md resolves
(file and #anchor), every `python -m mechreward.<cmd>` they name is a module that runs, every
`--config-name` is a config in conf/, and the README stays a front page (≤ 12,000 characters)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in out:
            slug, n = f"{base}-{n}", n + 1
        out.add(slug)
    return out


def _links(page: Path):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        yield target


def test_the_pages_exist_and_the_docs_folder_is_linked_from_the_readme():
    assert len(PAGES) > 5 and all(p.is_file() for p in PAGES)
    readme_links = {t.split("#")[0] for t in _links(REPO / "README.md")}
    for doc in (REPO / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in readme_links, f"README.md does not link docs/{doc.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def _commands(text: str) -> set[str]:
    return set(re.findall(r"python -m (mechreward(?:\.\w+)*)", text))


def test_every_command_the_docs_name_exists():
    missing = []
    for page in PAGES:
        for mod in _commands(page.read_text(encoding="utf-8")):
            spec = importlib.util.find_spec(mod)
            runnable = spec is not None and (spec.submodule_search_locations is None
                                            or importlib.util.find_spec(mod + ".__main__") is not None)
            if not runnable:
                missing.append(f"{page.relative_to(REPO)}: python -m {mod}")
        for name in re.findall(r"--config-name[ =](\w+)", page.read_text(encoding="utf-8")):
            if not (REPO / "conf" / f"{name}.yaml").is_file():
                missing.append(f"{page.relative_to(REPO)}: --config-name {name} (no conf/{name}.yaml)")
    assert not missing, missing


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A broken link, a missing anchor and a command that does not exist are each reported."""
    (tmp_path / "a.md").write_text("# Title\n## Some `code` section\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#some-code-section) [bad](a.md#nope) [gone](c.md) [web](https://x.org)\n"
                    "```\n[not a link](in/a/fence.md)\n```\n", encoding="utf-8")
    assert list(_links(page)) == ["a.md#some-code-section", "a.md#nope", "c.md"]
    assert _anchors(tmp_path / "a.md") == {"title", "some-code-section"}
    assert _commands("python -m mechreward.g1 and python -m mechreward.organism.train") == {
        "mechreward.g1", "mechreward.organism.train"}
    assert importlib.util.find_spec("mechreward.no_such_command") is None


def test_the_readme_is_a_front_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 12_000, f"README.md has {len(text)} characters; move reference material into docs/"
    assert "bash .ci/test" in text and "python -m mechreward.demo" in text
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash .ci/test" in ci  # CI runs the README's test command, so the two cannot drift
