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


def test_public_names_load_on_first_use_and_checking_a_command_line_does_not_import_lightning():
    """``import lightning_mp`` and the CLI's argument checks stay fast (Lightning costs ~5 s to import on a small
    CPU): every public name is still there, loaded when first used."""
    import subprocess
    import sys

    import lightning_mp

    assert lightning_mp.__all__ == sorted(lightning_mp._EXPORTS)
    for name in lightning_mp.__all__:
        assert getattr(lightning_mp, name) is not None, name
    probe = (
        "import sys; from lightning_mp.cli import main; "
        "assert main(['train', 'seed=abc']) == 2; "
        "assert main(['train', 'reciep=nlp']) == 2; "
        "assert main(['train', 'data.batch_size=0']) == 2; "  # a recipe's knobs, by the recipe's declaration
        "assert main(['train', 'recipe=nlp', 'model.net.dim=30']) == 2; "
        "print('lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "a refused command line imported Lightning"
