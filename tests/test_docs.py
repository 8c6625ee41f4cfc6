"""The docs cannot rot unnoticed: the site builds strictly, every link of the README lands on a page or a
heading of it, the settings table names each variable the settings read once, and the changelog keeps
its format.

The site is built in this process with MkDocs' own build (the same configuration CI builds with
`mkdocs build --strict`), so anchors are the ones MkDocs makes, not a guess at its slugs.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import Abort

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# Where the settings and the process definitions read the environment.
ENV_READ = re.compile(
    r"(?:env_(?:str|bool|list|int|float)|dev_secret|os\.environ\.get|os\.getenv)\(\s*[\"']([A-Z][A-Z0-9_]+)[\"']"
)


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)


def build_site(site_dir: Path) -> Path:
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site_dir))
    build(config)
    return site_dir


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_site(tmp_path_factory.mktemp("site"))


def anchors(site: Path, page: str) -> set[str]:
    """The ids in the HTML MkDocs made of docs/<page> (``settings.md`` → ``settings/index.html``)."""
    stem = page.removesuffix(".md")
    html = site / ("index.html" if stem == "index" else f"{stem}/index.html")
    parser = _Ids()
    parser.feed(html.read_text(encoding="utf-8"))
    return parser.ids


def readme_links() -> list[str]:
    return LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_site_builds_strictly(site: Path) -> None:
    """Strict mode: a broken link or anchor, a page left out of nav, a missing snippet abort the build."""
    config = load_config(str(ROOT / "mkdocs.yml"))
    assert config["strict"] is True
    assert config["validation"]["links"]["anchors"] == 30, "anchor validation must warn (so strict fails)"
    assert (site / "index.html").is_file()
    # The README's "Trying it" is included, not copied: the page shows what the README says.
    assert "bin/manage bitrix24_standin" in (site / "trying-it" / "index.html").read_text(encoding="utf-8")


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    """The guarantee behind the test above: MkDocs as configured here refuses a link to a missing heading."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [settings](other.md#no-such-heading).\n", encoding="utf-8")
    (docs / "other.md").write_text("# Other\n\n## A heading\n", encoding="utf-8")
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^nav:.*", "", text).replace("docs_dir: docs", f"docs_dir: {docs}")
    (tmp_path / "mkdocs.yml").write_text(text, encoding="utf-8")
    config = load_config(str(tmp_path / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    with pytest.raises(Abort):
        build(config)


def test_every_link_in_the_readme_resolves(site: Path) -> None:
    links = readme_links()
    assert any(link.startswith("docs/") for link in links), "the README links into the docs"
    broken = []
    for link in links:
        parts = urlsplit(link)
        if parts.scheme in {"http", "https", "mailto"}:
            continue
        path, fragment = unquote(parts.path), unquote(parts.fragment)
        if not path:
            broken.append(f"{link}: the README has no headings to link to; link into docs/")
            continue
        target = ROOT / path
        if not target.is_file():
            broken.append(f"{link}: no file {path}")
            continue
        if path.startswith("docs/") and path.endswith(".md"):
            if fragment and fragment not in anchors(site, path.removeprefix("docs/")):
                broken.append(f"{link}: docs/{path.removeprefix('docs/')} has no heading #{fragment}")
        elif fragment:
            broken.append(f"{link}: anchors are checked in docs/ pages only")
    assert not broken, "README links that lead nowhere:\n" + "\n".join(broken)


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines()[0].startswith("bin/run ")
    assert first_block.splitlines()[1].startswith("bin/test ")
    assert "bin/test --all" in text


def settings_table() -> list[str]:
    names = []
    for line in (ROOT / "docs" / "settings.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])
    return names


def read_by(*paths: str) -> set[str]:
    names: set[str] = set()
    for path in paths:
        text = (ROOT / path).read_text(encoding="utf-8")
        names |= set(ENV_READ.findall(text))
        names |= set(re.findall(r"%\(ENV_([A-Z0-9_]+)\)s", text))  # supervisord
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-", text))  # shell defaults
    return names


def test_the_settings_table_names_each_setting_once() -> None:
    names = settings_table()
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, f"listed more than once in docs/settings.md: {twice}"
    from_settings = read_by("config/settings.py")
    assert from_settings, "the pattern no longer finds how config/settings.py reads the environment"
    missing = sorted(from_settings - set(names))
    assert not missing, f"config/settings.py reads these, docs/settings.md does not list them: {missing}"
    processes = read_by("config/gunicorn.py", "config/supervisord.conf", "config/development.sh", "bin/run")
    unknown = sorted(set(names) - from_settings - processes)
    assert not unknown, f"docs/settings.md lists variables nothing reads: {unknown}"


def test_the_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog\n")
    assert "## [Unreleased]" in text
    sections = re.findall(r"(?m)^### (\w+)$", text)
    assert sections and set(sections) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert "## Changelog" not in (ROOT / "README.md").read_text(encoding="utf-8")
