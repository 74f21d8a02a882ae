"""How results show themselves: a text table for `repr`, HTML for notebooks, dicts, DataFrames.

Every result class mixes in `Shown` and says what it holds through `_records()` (a list of
flat dicts: the rows of its table) and `_title()`; `_figure()` may add an image (a PIL
image of the inputs, when they are known). pandas is an optional extra: `to_pandas()`
imports it only when called.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

__all__ = ["Shown", "require_pandas"]

_MAX_ROWS = 20  # rows shown by repr and _repr_html_; to_dict/to_pandas hold them all


def require_pandas():
    """pandas, or an ImportError in one line that names the extra to install."""
    try:
        import pandas
    except ImportError as e:
        raise ImportError("to_pandas() needs pandas: pip install 'ensemble-kernel[pandas]' "
                          "(or pip install pandas)") from e
    return pandas


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def text_table(records: list[dict], max_rows: int = _MAX_ROWS) -> str:
    """The records as aligned text columns (the first `max_rows`, then a count)."""
    if not records:
        return "(empty)"
    keys = list(records[0])
    shown = records[:max_rows]
    rows = [[_cell(r.get(k)) for k in keys] for r in shown]
    widths = [max(len(k), *(len(row[i]) for row in rows)) for i, k in enumerate(keys)]
    # Numbers to the right, text to the left (a column is numeric if all its values are).
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in shown)
               for k in keys]
    align = lambda text, w, right: text.rjust(w) if right else text.ljust(w)  # noqa: E731
    lines = ["  ".join(align(k, w, n) for k, w, n in zip(keys, widths, numeric)).rstrip()]
    lines += ["  ".join(align(c, w, n) for c, w, n in zip(row, widths, numeric)).rstrip()
              for row in rows]
    if len(records) > max_rows:
        lines.append(f"... {len(records) - max_rows} more rows (to_pandas() or to_dict())")
    return "\n".join(lines)


def html_table(records: list[dict], max_rows: int = _MAX_ROWS) -> str:
    """The records as an HTML table; every cell is escaped."""
    if not records:
        return "<p>(empty)</p>"
    keys = list(records[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k in keys)
                   + "</tr>" for r in records[:max_rows])
    more = (f"<p>... {len(records) - max_rows} more rows (to_pandas() or to_dict())</p>"
            if len(records) > max_rows else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def png_data_uri(image) -> str:
    """A PIL image as an inline `data:image/png;base64,...` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Shown:
    """Mixin: `__repr__`, `_repr_html_`, `to_dict()` and `to_pandas()` from `_records()`."""

    def _title(self) -> str:
        return type(self).__name__

    def _records(self) -> list[dict]:
        raise NotImplementedError

    def _figure(self):
        """A PIL image to show above the table in a notebook, or None."""
        return None

    def to_dict(self) -> dict:
        """The result as plain Python: {'title': str, 'rows': list of dicts}.

        Returns
        -------
        dict
            JSON-serialisable: numbers, strings, None.
        """
        return {"title": self._title(), "rows": self._records()}

    def to_pandas(self):
        """The rows as a `pandas.DataFrame` (one row per record; needs the `pandas` extra).

        Returns
        -------
        pandas.DataFrame
            Of shape (n_rows, n_columns), the columns of `to_dict()['rows']`.
        """
        return require_pandas().DataFrame.from_records(self._records())

    def __repr__(self) -> str:
        return f"{self._title()}\n{text_table(self._records())}"

    def _repr_html_(self) -> str:
        figure = self._figure()
        image = (f'<img src="{png_data_uri(figure)}" alt="{html.escape(self._title())}">'
                 if figure is not None else "")
        return f"<div><strong>{html.escape(self._title())}</strong>{image}" \
               f"{html_table(self._records())}</div>"
