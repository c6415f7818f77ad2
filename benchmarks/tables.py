"""The benchmarks' tables: one value, printed with rich on the console and written as Markdown.

:class:`ResultTable` holds a title, the column names and rows of strings; :meth:`ResultTable.print`
shows it on the console (rich), :meth:`ResultTable.markdown` gives the block for
``benchmarks/RESULTS.md``, and :func:`update_results` replaces a marked block of that file (or
appends it under a new heading), so a benchmark rewrites its own table and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["RESULTS", "ResultTable", "machine_header", "update_results"]

#: The results file every benchmark writes its tables into.
RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class ResultTable:
    """A table of strings.

    Attributes:
        title: printed above the table on the console (not part of the Markdown block).
        columns: column names.
        rows: one list of strings per row, as long as ``columns``.
        left: how many leading columns are left-aligned (the rest are numbers, right-aligned).
        notes: lines printed and written below the table.
    """

    title: str
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    left: int = 1
    notes: list[str] = field(default_factory=list)

    def add_row(self, *cells: object) -> None:
        """Append a row (cells are turned into strings)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"a row needs {len(self.columns)} cells, got {len(cells)}: {cells}")
        self.rows.append([str(cell) for cell in cells])

    def print(self, console: Console | None = None) -> None:
        """Show the table (and its notes) on the console."""
        console = console or Console(width=160)
        table = Table(title=self.title)
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index < self.left else "right")
        for row in self.rows:
            table.add_row(*map(escape, row))  # cells are text: "[voc,8x512]" is no markup
        console.print(table)
        for note in self.notes:
            console.print(escape(note))

    def markdown(self) -> str:
        """The table as Markdown, its notes below it."""
        align = ["---" if i < self.left else "---:" for i in range(len(self.columns))]
        lines = [f"| {' | '.join(self.columns)} |", f"|{'|'.join(align)}|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)


def machine_header(device: str, threads: int, runs: str) -> str:
    """The line above a written table: where, with what, how it was timed, the load, the date."""
    return (
        f"{device.upper()}: {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s) "
        f"per process, {runs}, load average {os.getloadavg()[0]:.1f} when the table was written, "
        f"{date.today()}."
    )


def update_results(key: str, block: str, heading: str, path: Path = RESULTS) -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path``.

    Args:
        key: the marker name (e.g. ``"cpu-table"``).
        block: the new text between the markers.
        heading: the ``##`` heading written above the markers when the file has none yet.
        path: the results file.
    """
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    marked = f"{start}\n{block.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        text = text[: text.index(start)] + marked + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{marked}\n"
    path.write_text(text)
