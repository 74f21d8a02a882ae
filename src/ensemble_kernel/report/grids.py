"""Image grids of examples: pairs, failures and the kernel/feature comparison, as PIL images.

Inputs are drawn by kind: images (n, H, W) or (n, H, W, C) with C in {1, 3} are scaled to
the data's range and upscaled (nearest neighbour) so that 8x8 digits can be seen; 1-D
signals (n, L) are drawn as small line plots. Without inputs, cells show the index only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..analysis._explain import Comparison, Failure, Pair

__all__ = ["InputRenderer", "render_pairs", "render_failures", "render_comparison"]

_CELL = 96  # pixels per example
_CAPTION = 30  # pixels of caption under each cell
_GAP = 6
_RED, _GREEN, _GREY = (200, 30, 30), (20, 130, 40), (90, 90, 90)


@dataclass(frozen=True)
class Cell:
    index: int | None  # example index, or None for an empty cell
    split: str  # 'train' or 'test'
    lines: tuple[str, ...]  # caption, at most two lines
    color: tuple[int, int, int] = _GREY


class InputRenderer:
    """Draws one example's input (image or signal) in a square cell."""

    def __init__(self, inputs_train: np.ndarray | None, inputs_test: np.ndarray | None):
        self.inputs = {"train": inputs_train, "test": inputs_test}
        present = [a for a in self.inputs.values() if a is not None]
        self.low = min(float(a.min()) for a in present) if present else 0.0
        self.high = max(float(a.max()) for a in present) if present else 1.0

    @property
    def has_inputs(self) -> bool:
        return self.inputs["train"] is not None and self.inputs["test"] is not None

    def draw(self, split: str, index: int, size: int = _CELL) -> Image.Image:
        x = self.inputs[split]
        if x is None:
            img = Image.new("RGB", (size, size), (245, 245, 245))
            ImageDraw.Draw(img).text((6, size // 2 - 6), f"{split} {index}", fill=_GREY)
            return img
        x = np.asarray(x[index], dtype=np.float32)
        if x.ndim == 1:
            return self._signal(x, size)
        scaled = np.clip((x - self.low) / max(self.high - self.low, 1e-12), 0, 1)
        pixels = (scaled * 255).astype(np.uint8)
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[..., 0]
        img = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").convert("RGB")
        return img.resize((size, size), Image.NEAREST)

    def _signal(self, x: np.ndarray, size: int) -> Image.Image:
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        pad = 6
        span = max(self.high - self.low, 1e-12)
        points = [(pad + i * (size - 2 * pad) / max(len(x) - 1, 1),
                   size - pad - (v - self.low) / span * (size - 2 * pad)) for i, v in enumerate(x)]
        draw.rectangle([0, 0, size - 1, size - 1], outline=(220, 220, 220))
        draw.line(points, fill=(30, 80, 180), width=2)
        return img


def _grid(rows: Sequence[Sequence[Cell]], renderer: InputRenderer,
          row_titles: Sequence[str] | None = None) -> Image.Image:
    font = ImageFont.load_default()
    n_cols = max(len(r) for r in rows)
    title_w = 0 if not row_titles else 110
    width = title_w + n_cols * (_CELL + _GAP) + _GAP
    height = len(rows) * (_CELL + _CAPTION + _GAP) + _GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = _GAP + r * (_CELL + _CAPTION + _GAP)
        if row_titles:
            draw.text((6, y + _CELL // 2 - 6), row_titles[r], fill=(0, 0, 0), font=font)
        for c, cell in enumerate(row):
            if cell.index is None:
                continue
            x = title_w + _GAP + c * (_CELL + _GAP)
            canvas.paste(renderer.draw(cell.split, cell.index), (x, y))
            for i, line in enumerate(cell.lines[:2]):
                draw.text((x + 2, y + _CELL + 2 + 13 * i), line, fill=cell.color, font=font)
    return canvas


def _name(label: int | None, class_names: Sequence[str] | None) -> str:
    if label is None:
        return "?"
    return class_names[label] if class_names else str(label)


def render_pairs(pairs: Sequence[Pair], renderer: InputRenderer,
                 class_names: Sequence[str] | None = None, per_row: int = 6) -> Image.Image:
    """Each test example beside its most similar training example, with rank, K and labels."""
    rows = []
    for start in range(0, len(pairs), per_row):
        row = []
        for p in pairs[start:start + per_row]:
            color = _GREEN if p.test_label == p.train_label else _RED
            row.append(Cell(p.test_index, "test",
                            (f"#{p.rank} test {p.test_index}", f"{_name(p.test_label, class_names)}")))
            row.append(Cell(p.train_index, "train",
                            (f"K={p.value:.3f} tr {p.train_index}",
                             f"{_name(p.train_label, class_names)}"), color))
        rows.append(row)
    return _grid(rows, renderer)


def render_failures(found: Sequence[Failure], renderer: InputRenderer,
                    class_names: Sequence[str] | None = None) -> Image.Image:
    """Each failing test example, then its nearest training examples, with labels."""
    rows = []
    for f in found:
        row = [Cell(f.pair.test_index, "test",
                    (f"test {f.pair.test_index}", f"label {_name(f.pair.test_label, class_names)}"),
                    (0, 0, 0))]
        for i, v, lab in zip(f.neighbor_indices, f.neighbor_values, f.neighbor_labels):
            color = _GREEN if lab == f.pair.test_label else _RED
            row.append(Cell(i, "train", (f"K={v:.3f}", f"{_name(lab, class_names)}"), color))
        rows.append(row)
    return _grid(rows, renderer)


def render_comparison(comparisons: Sequence[Comparison], renderer: InputRenderer,
                      labels_train=None, class_names: Sequence[str] | None = None) -> Image.Image:
    """Columns: random test examples; rows: the test example, kernel and feature neighbours."""
    k = len(comparisons[0].kernel) if comparisons else 0
    rows = [[Cell(c.test_index, "test", (f"test {c.test_index}",
                                         _name(c.test_label, class_names)), (0, 0, 0))
             for c in comparisons]]
    titles = ["test example"]
    for source, key in (("kernel", "kernel"), ("features", "features")):
        for j in range(k):
            row = []
            for c in comparisons:
                idx, value = getattr(c, key)[j]
                lab = None if labels_train is None else int(labels_train[idx])
                color = _GREEN if lab is not None and lab == c.test_label else _RED
                row.append(Cell(idx, "train", (f"{value:.3f} tr {idx}", _name(lab, class_names)),
                                color))
            rows.append(row)
            titles.append(f"{source} #{j + 1}")
    return _grid(rows, renderer, titles)
