"""Griffe extension of the docs build: read gcrf's Google-style docstrings as Napoleon does.

Two habits of the docstrings that griffe's Google parser does not know:

- the singular heading ``Example:`` (griffe knows only ``Examples:`` and would render the doctest
  lines as Markdown text);
- one ``Args`` entry for several parameters, ``mask_src, mask_dst: the gates.`` (griffe would warn
  that no parameter has that name). The entry is repeated for each name.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_PARAMETER_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Params|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$"
)
_JOINED_NAMES = re.compile(r"^(\s*)(\w+(?:\s*,\s*\w+)+)\s*:(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_joined_parameters(text: str) -> str:
    """Repeat an ``a, b: description`` entry of a parameter section once per name."""
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        heading = _PARAMETER_SECTION.match(line)
        if heading:
            section_indent = len(heading.group(1))
            out.append(line)
            index += 1
            continue
        if section_indent is not None and line.strip() and _indent(line) <= section_indent:
            section_indent = None
        joined = _JOINED_NAMES.match(line) if section_indent is not None else None
        if joined is None:
            out.append(line)
            index += 1
            continue
        item_indent = len(joined.group(1))
        continuation = []
        index += 1
        while index < len(lines) and lines[index].strip() and _indent(lines[index]) > item_indent:
            continuation.append(lines[index])
            index += 1
        for name in re.split(r"\s*,\s*", joined.group(2)):
            out.append(f"{joined.group(1)}{name}:{joined.group(3)}")
            out.extend(continuation)
    return "\n".join(out)


class GoogleDocstrings(griffe.Extension):
    """Rewrite ``Example:`` to ``Examples:`` and split joined parameter entries before parsing."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = split_joined_parameters(text)
