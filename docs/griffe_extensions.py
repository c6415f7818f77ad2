"""Griffe extension of the docs build: ``Example:`` sections read as ``Examples:``.

gcrf's docstrings follow the Google style with a singular ``Example:`` heading (Napoleon accepts
both spellings); griffe only knows the plural and would render the doctest lines as Markdown text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename a docstring's ``Example:`` heading to ``Examples:`` before griffe parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
