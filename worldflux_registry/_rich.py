"""Rich tables that fit the terminal without splitting a word (base layer)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["fit_words"]

_WORD = re.compile(r"\S+")
_MARKUP = re.compile(r"\[/?[a-z #0-9,.]*\]")


def fit_words(table: Any, width: int | None = None, *, cap: int = 40) -> Any:
    """Give each column of a filled `rich.table.Table` the width of its longest word.

    Rich wraps cells at spaces and folds a word longer than its column mid-word
    (``worldflux-drea|merv3``); with the longest word as the column's minimum, the narrow
    columns keep their names whole and only the prose columns wrap. When those minimums do not
    fit ``width`` (the console's), the widest columns give way first, so the table still fits.
    Returns the table.
    """
    mins = []
    for column in table.columns:
        cells = [str(column.header), *(str(c) for c in column._cells)]
        longest = max(
            (len(w) for cell in cells for w in _WORD.findall(_MARKUP.sub("", cell))), default=0
        )
        mins.append(max(column.min_width or 0, min(longest, cap)))
    if width is not None:
        padding = 2 if table.padding is None else 2 * 1
        chrome = (len(mins) + 1 if table.box is not None and table.show_edge else len(mins)) + (
            padding * len(mins)
        )
        while mins and sum(mins) + chrome > width and max(mins) > 6:
            mins[mins.index(max(mins))] -= 1
        natural = [
            max(
                (
                    len(_MARKUP.sub("", line))
                    for c in [column.header, *column._cells]
                    for line in str(c).splitlines()
                ),
                default=0,
            )
            for column in table.columns
        ]
        if sum(natural) + chrome > width and sum(mins) + chrome + len(mins) > width:
            # Rich's own shrinking rounds and can end one column over the width when the
            # minimums leave no slack: then the widths are set here, the rest to the widest.
            spare = width - chrome - sum(mins)
            widest = natural.index(max(natural))
            for i, column in enumerate(table.columns):
                column.width = mins[i] + (spare if i == widest else 0)
    for column, minimum in zip(table.columns, mins, strict=True):
        column.min_width = minimum
    return table
