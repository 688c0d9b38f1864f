"""The documentation site's sources agree with the package and the docs folder.

``mkdocs build --strict`` (run by ``.ci/run``) renders every docstring and fails on a broken
reference; these quick checks say earlier, and more plainly, what a rename or a new module
needs: every module of the API reference exists, every top-level module is in it, and every
guide in ``docs/`` is in the site's navigation.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "evidencemap"
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.MULTILINE)

# Top-level modules the API reference leaves out, each with its reason.
NOT_IN_API_REFERENCE = {
    "evidencemap.__main__": "`python -m evidencemap`, the command line",
}


def rendered() -> dict[str, str]:
    """``::: path`` of the API reference -> the page it is on."""
    found = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for path in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            found[path] = page.relative_to(ROOT).as_posix()
    return found


def module_exists(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def top_level_modules() -> list[str]:
    names = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    names += [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    return sorted(f"evidencemap.{n}" for n in names)


def nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:", 1)[1]
    nav = re.split(r"\n\S", nav, maxsplit=1)[0]  # up to the next top-level key
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, re.MULTILINE))


def test_every_module_of_the_api_reference_exists():
    missing = [
        f"{page}: ::: {path}" for path, page in rendered().items() if not module_exists(path)
    ]
    assert not missing, "the API reference names modules that do not exist:\n" + "\n".join(missing)


def test_every_top_level_module_is_in_the_api_reference():
    shown = set(rendered())
    missing = [m for m in top_level_modules() if m not in shown and m not in NOT_IN_API_REFERENCE]
    assert not missing, (
        "add a `::: module` block to a page of docs/api/ (and the page to mkdocs.yml's nav), "
        f"or list the module in NOT_IN_API_REFERENCE with its reason: {missing}"
    )


def test_every_guide_and_api_page_is_in_the_navigation():
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(pages - nav_pages())
    assert not missing, f"pages of docs/ missing from mkdocs.yml's nav: {missing}"
    stale = sorted(nav_pages() - pages)
    assert not stale, f"mkdocs.yml's nav lists pages that do not exist: {stale}"


def load_docs_module(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sphinx_roles_become_checked_cross_references_or_code():
    griffe = pytest.importorskip("griffe")  # the [docs] extra
    roles = load_docs_module("sphinx_roles")
    files = {
        "__init__.py": "from pkg.mod import f\n",
        "mod.py": (
            "def f(a, **kw):\n"
            '    """See :func:`g`, :class:`~pkg.mod.C`, :meth:`C.run`, :exc:`ValueError`,\n'
            "    :func:`nope`, :data:`_hidden` and :func:`pkg.cli.main`::\n\n"
            "        f(1)\n\n"
            "    Args:\n"
            "        a / b: two names.\n"
            '    """\n'
            "def g(): ...\n"
            "class C:\n"
            "    def run(self): ...\n"
            "_hidden = 1\n"
        ),
        "cli.py": "def main(): ...\n",
    }
    with griffe.temporary_visited_package("pkg", files) as package:
        extension = roles.SphinxRoles()
        extension.rendered, extension.rendered_trees = {"pkg.mod"}, set()
        extension.on_package(pkg=package, loader=None)
        assert package["mod.f"].docstring.value == (
            "See [`g`][pkg.mod.g], [`C`][pkg.mod.C], [`C.run`][pkg.mod.C.run], `ValueError`,\n"
            "[`nope`][nope], `_hidden` and `pkg.cli.main`:\n\n"
            "    f(1)\n\n"
            "Args:\n"
            "    a: two names.\n"
            "    b: two names."
        )
        # the re-export of f is documented where f is defined, not again in the package
        assert package.members["f"].public is False


def test_links_leaving_the_docs_folder_point_at_the_published_copies():
    pytest.importorskip("mkdocs")  # the [docs] extra
    hooks = load_docs_module("hooks")
    rewrite = hooks._rewrite
    # a guide (docs/ct.md) and the home page (the README included in docs/index.md)
    assert rewrite("../benchmarks/results/ct.md#a", "docs/ct.md", "ct.md", "docs") == (
        "benchmarks/results/ct.md#a"
    )
    assert rewrite("core.md", "docs/index.md", "index.md", "docs") == "core.md"
    assert rewrite("../benchmarks/results/evaluation/", "docs/x.md", "x.md", "docs") == (
        "benchmarks/results/evaluation/README.md"
    )
    assert rewrite("../../README.md", "docs/api/a.md", "api/a.md", "docs") == "../index.md"
    assert rewrite("https://example.org/a.md", "docs/x.md", "x.md", "docs") == (
        "https://example.org/a.md"
    )
    # not published: left as written, and MkDocs reports it
    assert rewrite("../src/evidencemap/io.py", "docs/x.md", "x.md", "docs") == (
        "../src/evidencemap/io.py"
    )
