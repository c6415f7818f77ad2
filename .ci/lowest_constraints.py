"""Print a pip constraints file that pins every declared floor of pyproject.toml (``>=X`` → ``==X``).

CI installs the project once with these constraints and runs the fast suite on them, so the floors
that ``pyproject.toml`` declares are the versions that were tested, not guesses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement


def floors(pyproject: Path) -> list[str]:
    """``name==floor[; marker]`` for every requirement with a ``>=`` bound, sorted by name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins: dict[str, str] = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == project["name"]:
            continue  # the project's own extras, e.g. gcrf[train,medical]
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if not lower:
            continue
        pin = f"{requirement.name}=={lower[0]}"
        if requirement.marker is not None:
            pin += f"; {requirement.marker}"
        pins[requirement.name] = pin
    return [pins[name] for name in sorted(pins)]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    print("\n".join(floors(root / "pyproject.toml")))
