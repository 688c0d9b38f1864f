"""The version is written once, in pyproject.toml, and read from the package metadata."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import evidencemap as em

ROOT = Path(__file__).resolve().parents[1]


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    assert match, "pyproject.toml has no [project] version"
    return match.group(1)


def test_version_is_the_installed_metadata_and_pyproject_version():
    assert em.__version__ == importlib.metadata.version("evidencemap")
    assert em.__version__ == pyproject_version()


def test_version_is_written_nowhere_else():
    version = re.escape(pyproject_version())
    assigned = re.compile(rf"""(__version__|version)\s*=\s*["']{version}["']""")
    for path in (ROOT / "src").rglob("*.py"):
        assert not assigned.search(path.read_text(encoding="utf-8")), path


def test_version_of_an_uninstalled_source_tree_says_so():
    code = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import evidencemap\n"
        "print(evidencemap.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "0+unknown"
