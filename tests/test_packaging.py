"""What a checkout and an install see: the shipped package only, with every subpackage listed for the wheel."""

import importlib.util
import re
from pathlib import Path

import pytest

import lightning_mp

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_does_not_reach_into_the_repository():
    assert importlib.util.find_spec("lightning_mp.tests") is None
    assert importlib.util.find_spec("lightning_mp.benchmarks") is None
    assert lightning_mp.__path__ == [str(ROOT / "lightning_mp")]


def test_code_imports_recipes_through_the_package_only():
    """``recipes`` is importable from a checkout's root too, as a second copy of the same files: nothing may
    use that name, or two Classifier classes would exist side by side."""
    pattern = re.compile(r"^\s*(from|import) (recipes|conf)\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("lightning_mp", "recipes", "tests", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def test_every_package_folder_is_listed_for_the_wheel():
    """A folder missing from [tool.setuptools] packages installs fine editable and is absent from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    assert set(setuptools["packages"]) == set(listed)
    roots = {
        "lightning_mp": ROOT / "lightning_mp",
        "lightning_mp.conf": ROOT / "conf",
        "lightning_mp.recipes": ROOT / "recipes",
    }
    found = set()
    for name, root in roots.items():
        for init in (ROOT / root).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / root).parts
            found.add(".".join([name, *parts]))
    assert found - set(listed) == set(), "add these to [tool.setuptools] packages and package-dir"
