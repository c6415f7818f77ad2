"""The explicit package list of pyproject.toml names every package of the tree.

The list is explicit because ``gcrf.kernels`` and ``gcrf.datasets`` live outside ``gcrf/``
(``package-dir``); a subpackage missing from it is left out of a wheel (``pip install .``) while an
editable install still finds it, so only this test notices.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def _packages_under(folder: Path, name: str) -> set[str]:
    return {
        ".".join((name, *init.parent.relative_to(folder).parts))
        for init in folder.rglob("__init__.py")
    }


def test_every_package_is_listed():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11; the project supports 3.10 too
    config = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = _packages_under(REPOSITORY / "gcrf", "gcrf")
    for name, folder in config["package-dir"].items():
        found |= _packages_under(REPOSITORY / folder, name)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"

    def folder_of(package: str) -> Path:  # data-only folders (gcrf.datasets.voc_clicks) count too
        for name, folder in config["package-dir"].items():
            if package == name or package.startswith(f"{name}."):
                return (
                    REPOSITORY
                    / folder
                    / Path(*package[len(name) + 1 :].split(".") if package != name else ())
                )
        return REPOSITORY / Path(*package.split("."))

    missing = [package for package in listed if not folder_of(package).is_dir()]
    assert not missing, f"listed packages without a folder: {missing}"
