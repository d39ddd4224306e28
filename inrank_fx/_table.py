"""Plain-text tables: the one formatter behind `summary`, `bench` and the demo's report."""
from __future__ import annotations

from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1,
                 total: Sequence[str] | None = None) -> str:
    """Columns padded to their widest cell: the first `left` columns (names) left-aligned, the
    rest (numbers) right-aligned; a rule under the header, and above the `total` row if any."""
    every = [header, *rows, *([total] if total is not None else [])]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * len("  ".join(" " * w for w in widths))
    lines = [line(header), rule, *map(line, rows)]
    if total is not None:
        lines += [rule, line(total)]
    return "\n".join(lines)
