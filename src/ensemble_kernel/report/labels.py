"""The report's label-issues section: the test examples whose given label their kernel
neighbours most disagree with, beside those neighbours (issue 11).

Self-contained: `build_label_section` returns the data, `render_label_section` the HTML
block (one string, images embedded) that `render_report` places in the page.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Sequence

import jinja2
from PIL import Image

from ..analysis._label_issues import LabelIssues
from .grids import Cell, InputRenderer, _grid, _name, _GREEN, _RED

__all__ = ["LabelSection", "build_label_section", "render_label_section", "render_suspects"]


@dataclass(frozen=True)
class LabelSection:
    """The top suspects of one split: a table (header, rows) and, with inputs, an image."""

    split: str
    score: str
    n_examples: int
    n_flagged: int
    k: int
    power: int
    header: tuple[str, ...]
    rows: tuple[tuple, ...]
    image: Image.Image | None

    def to_csv(self) -> str:
        from .html import csv_text

        return csv_text(self.header, self.rows)


def render_suspects(issues: LabelIssues, renderer: InputRenderer, labels_train,
                    class_names: Sequence[str] | None = None, top: int = 8,
                    n_neighbors: int = 9) -> Image.Image:
    """One row per suspect: the example (given and voted label), then its nearest training
    examples (green: they carry the voted label; red: another)."""
    rows = []
    for i in issues.order[:top].tolist():
        given, voted = int(issues.given[i]), int(issues.voted[i])
        row = [Cell(i, issues.split, (f"{issues.split} {i} s={float(issues.scores[i]):.2f}",
                                      f"{_name(given, class_names)}->"
                                      f"{_name(voted, class_names)}"), (0, 0, 0))]
        for j, v in zip(issues.neighbors.indices[i, :n_neighbors].tolist(),
                        issues.neighbors.values[i, :n_neighbors].tolist()):
            label = int(labels_train[j])
            row.append(Cell(j, "train", (f"K={v:.3f} tr {j}", _name(label, class_names)),
                            _GREEN if label == voted else _RED))
        rows.append(row)
    return _grid(rows, renderer)


def build_label_section(issues: LabelIssues, renderer: InputRenderer, labels_train,
                        class_names: Sequence[str] | None = None, top: int = 8,
                        n_neighbors: int = 9) -> LabelSection:
    """The `top` most suspicious examples of `issues`, as a table and (with inputs) an image."""
    rows = []
    for rank, i in enumerate(issues.order[:top].tolist()):
        rows.append((rank, i, f"{float(issues.scores[i]):.4f}",
                     _name(int(issues.given[i]), class_names),
                     _name(int(issues.voted[i]), class_names),
                     "yes" if bool(issues.flagged[i]) else "no",
                     " ".join(f"{j}:{_name(int(labels_train[j]), class_names)}"
                              for j in issues.neighbors.indices[i, :n_neighbors].tolist())))
    image = (render_suspects(issues, renderer, labels_train, class_names, top, n_neighbors)
             if renderer.has_inputs and rows else None)
    return LabelSection(issues.split, issues.score, len(issues.order), issues.n_flagged, issues.k,
                        issues.power, ("rank", f"{issues.split} index", "score", "given label",
                                       "voted label", "flagged", "nearest (index:label)"),
                        tuple(rows), image)


_TEMPLATE = """
<h2>Label issues: {{ s.split }} examples the neighbours disagree with</h2>
<p class="note">Score: 1 minus {% if s.score == "combined" %}the mean of the share of
the given label in the weighted vote of the {{ s.k }} nearest training examples (weight
max(K, 0)**{{ s.power }}) and the ensemble's own probability of it{% else %}the share of
the given label in the weighted vote of the {{ s.k }} nearest training examples (weight
max(K, 0)**{{ s.power }}){% endif %}; higher is more suspicious. Flagged: the vote goes to another label with more than half of the weight
({{ s.n_flagged }} of {{ s.n_examples }}). Each row: the example (given label -> voted
label), then its nearest training examples (green: the voted label).
<code>ensemble-kernel label-issues SRC --split {{ s.split }}</code> lists them all.</p>
{% if png %}<img src="data:image/png;base64,{{ png }}" alt="label issues">{% endif %}
<table>
  <tr>{% for h in s.header %}<th class="l">{{ h }}</th>{% endfor %}</tr>
  {% for row in s.rows %}<tr>{% for v in row %}<td class="l">{{ v }}</td>{% endfor %}</tr>{% endfor %}
</table>
"""


def render_label_section(section: LabelSection) -> str:
    """The section as an HTML block (text escaped, the image embedded as base64)."""
    from .html import png_bytes

    png = (base64.b64encode(png_bytes(section.image)).decode("ascii")
           if section.image is not None else None)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_TEMPLATE).render(s=section, png=png)
