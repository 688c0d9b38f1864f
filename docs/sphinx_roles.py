"""Griffe extension: the docstrings' Sphinx roles become mkdocstrings cross-references.

The docstrings are written with Sphinx roles (``:func:`explain```, ``:class:`~a.B```,
``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:``, ``:obj:``) and Google-style sections.
MkDocs renders Markdown, so once the package is loaded each role is rewritten:

* a name of the package that the API reference renders (resolved like Python does, from the
  object's scope outwards: its members, its module's imports, then a unique suffix match
  anywhere in the package) becomes a cross-reference ``[`name`][full.path]``, checked by
  ``mkdocs-autorefs``: a reference that does not resolve fails ``mkdocs build --strict``;
* a name that exists but is not rendered (private, or in a module the reference leaves out,
  such as the command line's) and a name outside the package (``torch.Tensor``, ``int``)
  become a code span;
* anything else (a misspelt name) stays a cross-reference, and so fails the strict build.

RST's ``::`` before an indented literal block becomes ``:`` (the block stays a code block).
Parameters documented together (``blur_sigma / blur_radius: ...`` or ``a, b: ...`` in an
``Args:`` section) become one entry each, with the shared description, so that Griffe can check
every name against the signature. A function that takes ``**kwargs`` (a method forwarding
options to its base class) may document keywords its own signature does not name.

Configured in ``mkdocs.yml`` as ``extensions: [docs/sphinx_roles.py:SphinxRoles]``.
"""

from __future__ import annotations

import builtins
import importlib.util
import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj|const):`([^`]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Other Parameters|Attributes):\s*$")
GROUP = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*[/,]\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(\s.*|)$")
API_PAGES = Path(__file__).resolve().parent / "api"
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)((?:\n[ \t]+\S.*)*)", re.MULTILINE)


def rendered_modules() -> tuple[set[str], set[str]]:
    """The modules the API reference renders with ``::: path`` blocks: those rendered alone,
    and those rendered with their submodules (``show_submodules: true``)."""
    alone: set[str] = set()
    with_submodules: set[str] = set()
    for page in API_PAGES.glob("*.md"):
        for path, options in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            tree = re.search(r"show_submodules:\s*true", options)
            (with_submodules if tree else alone).add(path)
    return alone, with_submodules


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.endswith("__") for part in path.split("."))


def _external(name: str) -> bool:
    """A built-in or an importable top-level module outside the package."""
    first = name.split(".", 1)[0]
    if first in dir(builtins):
        return True
    try:
        return importlib.util.find_spec(first) is not None
    except (ImportError, ValueError):
        return False


def split_groups(text: str) -> str:
    """``a / b: text`` entries of the parameter sections as one entry per name."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        header = SECTION.match(line)
        if header:
            section_indent = len(header[1])
        elif line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        group = GROUP.match(line) if section_indent is not None else None
        if group is None:
            out.append(line)
            i += 1
            continue
        body = [group[4].strip()]
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            i -= 1
            body.pop()
        names = re.split(r"\s*[/,]\s*", group[2])
        for name in names:
            out.append(f"{group[1]}{name}{group[3] or ''}: {body[0]}".rstrip())
            out.extend(body[1:])
    return "\n".join(out)


def _takes_var_keywords(obj: griffe.Object) -> bool:
    try:
        parameters = obj.parameters  # type: ignore[attr-defined]
    except (AttributeError, griffe.AliasResolutionError):
        return False
    return any(p.kind is griffe.ParameterKind.var_keyword for p in parameters)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package once it is loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.rendered, self.rendered_trees = rendered_modules()
        self.package: griffe.Module | None = None
        self.paths: dict[str, list[str]] = {}

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **_: Any) -> None:
        self.package = pkg
        objects = list(self._walk(pkg))
        for obj in objects:
            self.paths.setdefault(obj.name, []).append(obj.path)
        for obj in objects:
            if obj.is_module:
                self._hide_reexports(obj)  # type: ignore[arg-type]
            if obj.docstring is not None:
                obj.docstring.value = self.convert(obj.docstring.value, obj)
                if _takes_var_keywords(obj):
                    obj.docstring.parser_options = {
                        **(obj.docstring.parser_options or {}),
                        "warn_unknown_params": False,
                        "warn_missing_types": False,
                    }

    def _hide_reexports(self, module: griffe.Module) -> None:
        """Render each object once, where it is defined: a module's imported names whose own
        module the reference renders are not rendered again (``evidencemap.GradCAM`` is
        documented as ``evidencemap.methods.cam.GradCAM``)."""
        for member in module.members.values():
            if not member.is_alias:
                continue
            try:
                target = member.final_target.path  # type: ignore[union-attr]
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue  # outside the package
            if target != member.path and self._is_rendered(target):
                member.public = False

    def _walk(self, obj: griffe.Object) -> Any:
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from self._walk(member)  # type: ignore[arg-type]

    def convert(self, text: str, scope: griffe.Object) -> str:
        """``text`` with its roles rewritten, seen from ``scope``."""
        text = ROLE.sub(lambda m: self._role(m[2], scope), text)
        return split_groups(LITERAL_BLOCK.sub(":", text))

    def _role(self, target: str, scope: griffe.Object) -> str:
        short = target.startswith("~")
        name = target.lstrip("~!").lstrip(".")
        shown = name.rsplit(".", 1)[-1] if short else name
        code = f"`{shown}`"
        path = self._resolve(name, scope)
        if path is None:
            if _external(name):
                return code
            return f"[{code}][{name}]"  # unknown: fails the strict build
        obj = self._lookup(path)
        if obj is None:
            return f"[{code}][{path}]"  # resolved scope but missing member: fails too
        for candidate in self._paths_of(obj, path):
            if self._is_rendered(candidate):
                return f"[{code}][{candidate}]"
        return code

    def _resolve(self, name: str, scope: griffe.Object) -> str | None:
        """The full path ``name`` means in ``scope`` (``None``: not in the package)."""
        assert self.package is not None
        root = self.package.name
        if name == root or name.startswith(root + "."):
            return name
        first, _, rest = name.partition(".")
        try:
            resolved = scope.resolve(first)
        except griffe.NameResolutionError:
            return self._search(name, scope)
        full = f"{resolved}.{rest}" if rest else resolved
        return full if full == root or full.startswith(root + ".") else None

    def _search(self, name: str, scope: griffe.Object) -> str | None:
        """A unique object whose path ends with ``name``: in ``scope``'s module, else anywhere."""
        matches = {p for p in self.paths.get(name.rsplit(".", 1)[-1], []) if p.endswith("." + name)}
        module = scope.module.path
        local = {p for p in matches if p.startswith(module + ".")}
        for found in (local, matches):
            if len(found) == 1:
                return found.pop()
        return None

    def _lookup(self, path: str) -> griffe.Object | griffe.Alias | None:
        assert self.package is not None
        parts = path.split(".")[1:]
        obj: Any = self.package
        for part in parts:
            try:
                obj = obj.members[part]
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        return obj

    def _paths_of(self, obj: griffe.Object | griffe.Alias, path: str) -> list[str]:
        """The object's own (canonical) path, then the path as written."""
        if obj.is_alias:
            try:
                return [obj.final_target.path, path]  # type: ignore[union-attr]
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                pass
        return [path]

    def _is_rendered(self, path: str) -> bool:
        """A public object of a module (or the module itself) the API reference renders."""
        if _is_private(path):
            return False
        if any(path == t or path.startswith(t + ".") for t in self.rendered_trees):
            return True
        parts = path.split(".")
        for end in range(len(parts), 0, -1):
            head = ".".join(parts[:end])
            if head in self.rendered:
                return True
            obj = self._lookup(head)
            if obj is not None and (obj.is_module if not obj.is_alias else False):
                return False  # the innermost module is not rendered
        return False
