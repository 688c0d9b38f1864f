"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks: [docs/hooks.py]``).

The guides in ``docs/`` and the README (the home page, included by ``docs/index.md``) link to
the committed benchmark results in ``benchmarks/results/``, outside the docs folder. These
hooks publish those files at ``benchmarks/results/`` in the site and point the links there, so
that every link resolves and ``mkdocs build --strict`` still fails on a link to a file that does
not exist.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
# Folders of the repository published as they are, under the same path in the site.
PUBLISHED = ("benchmarks/results",)
# Repository files shown as a page of the site: repository path -> site path.
PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
# ](target) of a Markdown link or image; the target has no space and no scheme.
LINK = re.compile(r"(\]\()([^()\s]+)(\))")
FENCE = re.compile(r"^(\s*)(```|~~~)")


def on_files(files: Files, config: Any) -> Files:
    """Add every file of :data:`PUBLISHED` to the site."""
    for folder in PUBLISHED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file():
                src_uri = path.relative_to(ROOT).as_posix()
                files.append(
                    File(src_uri, str(ROOT), config["site_dir"], config["use_directory_urls"])
                )
    return files


def _repository_path(src_uri: str, docs_dir: Path) -> str:
    """Where a page of the site lives in the repository."""
    if src_uri.startswith(tuple(f"{folder}/" for folder in PUBLISHED)):
        return src_uri
    return (docs_dir.relative_to(ROOT) / src_uri).as_posix()


def _site_path(repository_path: str, docs_dir: str) -> str | None:
    """Where a repository file is in the site (``None``: not published)."""
    if repository_path in PAGES:
        return PAGES[repository_path]
    if repository_path.startswith(f"{docs_dir}/"):
        return repository_path[len(docs_dir) + 1 :]
    if repository_path.startswith(tuple(f"{folder}/" for folder in PUBLISHED)):
        target = ROOT / repository_path
        if target.is_dir():
            index = next(
                (n for n in ("index.md", "README.md") if (target / n).is_file()),
                None,
            )
            return f"{repository_path.rstrip('/')}/{index}" if index else None
        return repository_path
    return None


def _rewrite(target: str, page_repo: str, page_site: str, docs_dir: str) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target):
        return target  # a URL, an anchor on the page, or a site-absolute path
    path, hash_, anchor = target.partition("#")
    repository_path = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo), path))
    site = _site_path(repository_path, docs_dir)
    if site is None:
        return target  # not published: MkDocs reports it (an error in strict mode)
    relative = posixpath.relpath(site, posixpath.dirname(page_site) or ".")
    return relative + hash_ + anchor


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point each relative link at the published copy of its target.

    Runs after the ``include-markdown`` plugin, which has already made the README's links
    relative to ``docs/index.md``.
    """
    docs_dir = Path(config["docs_dir"]).resolve()
    page_site = page.file.src_uri
    page_repo = _repository_path(page_site, docs_dir)
    docs_rel = docs_dir.relative_to(ROOT).as_posix()
    lines = []
    fenced = False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            fenced = not fenced
        if not fenced:
            line = LINK.sub(
                lambda m: m[1] + _rewrite(m[2], page_repo, page_site, docs_rel) + m[3], line
            )
        lines.append(line)
    return "".join(lines)
