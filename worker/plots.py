"""The report's plots as standalone SVG documents: training curves, and the before/after of each figure.

Drawn here rather than with a plotting library: two simple chart types do not justify a dependency, and the
files stay small, text, and readable in any browser. ElementTree writes them, so every label is escaped.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any

from core.summary import FIGURE_NAMES, format_figure

SVG_NS = "http://www.w3.org/2000/svg"
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:12px"
INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
BEFORE_COLOR, AFTER_COLOR = "#94a3b8", "#2563eb"
CURVES = (("train_loss", "Training loss", "#dc2626"), ("val_accuracy", "Validation accuracy", "#2563eb"))
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 380, 260, 48
BAR_ROW, BAR_LABEL_WIDTH, BAR_WIDTH = 52, 170, 400


def curves_svg(history: list[dict[str, float]]) -> str:
    """Training loss and validation accuracy per epoch, side by side; one marked point per epoch."""
    svg = _svg(PANEL_WIDTH * len(CURVES), PANEL_HEIGHT, "Training curves")
    for index, (key, title, color) in enumerate(CURVES):
        points = [(entry["epoch"], entry[key]) for entry in history if entry.get(key) is not None]
        panel = ET.SubElement(svg, "g", transform=f"translate({index * PANEL_WIDTH},0)", id=f"panel-{key}")
        _line_panel(panel, points, title, color, key)
    return _serialize(svg)


def comparison_svg(summary: dict[str, Any]) -> str:
    """Each figure of the input and the result as a pair of bars, scaled to the larger of the two."""
    before, after = summary["before"], summary["after"]
    names = [name for name in FIGURE_NAMES if before.get(name) is not None and after.get(name) is not None]
    height = 40 + BAR_ROW * len(names) + 30
    svg = _svg(BAR_LABEL_WIDTH + BAR_WIDTH + 130, height, f"{before['label']} vs {after['label']}")
    _text(svg, 12, 22, f"{before['label']} vs {after['label']}", weight="600", size=14)
    for row, name in enumerate(names):
        _bar_pair(svg, 40 + row * BAR_ROW, name, before[name], after[name])
    legend_y = height - 14
    for offset, (label, color) in enumerate(((before["label"], BEFORE_COLOR), (after["label"], AFTER_COLOR))):
        x = BAR_LABEL_WIDTH + offset * 120
        ET.SubElement(svg, "rect", x=str(x), y=str(legend_y - 9), width="10", height="10", fill=color)
        _text(svg, x + 16, legend_y, label, color=MUTED)
    return _serialize(svg)


def _bar_pair(svg: ET.Element, top: float, name: str, before: float, after: float) -> None:
    _text(svg, 12, top + 18, FIGURE_NAMES[name])
    largest = max(before, after) or 1
    for offset, (value, color) in enumerate(((before, BEFORE_COLOR), (after, AFTER_COLOR))):
        y = top + offset * 18
        width = max(1.0, BAR_WIDTH * value / largest)
        ET.SubElement(svg, "rect", {"class": "bar", "data-figure": name}, x=str(BAR_LABEL_WIDTH), y=f"{y:.1f}",
                      width=f"{width:.1f}", height="14", rx="2", fill=color)
        _text(svg, BAR_LABEL_WIDTH + width + 6, y + 11, format_figure(name, value), color=MUTED)


def _line_panel(panel: ET.Element, points: list[tuple[float, float]], title: str, color: str, key: str) -> None:
    _text(panel, MARGIN, 20, title, weight="600", size=14)
    if not points:
        _text(panel, MARGIN, PANEL_HEIGHT / 2, "no training epochs", color=MUTED)
        return
    x_scale = _Scale(1, max(len(points), 2), MARGIN, PANEL_WIDTH - 16)
    low, high = min(y for _, y in points), max(y for _, y in points)
    y_scale = _Scale(*_padded(low, high), PANEL_HEIGHT - 36, 34)
    _axes(panel, x_scale, y_scale, points, key)
    path = " ".join(f"{x_scale(x):.1f},{y_scale(y):.1f}" for x, y in points)
    ET.SubElement(panel, "polyline", points=path, fill="none", stroke=color, **{"stroke-width": "2"})
    for x, y in points:
        point = ET.SubElement(panel, "circle", {"class": "point", "data-series": key, "data-epoch": str(int(x))},
                              cx=f"{x_scale(x):.1f}", cy=f"{y_scale(y):.1f}", r="3.5", fill=color)
        ET.SubElement(point, "title").text = f"epoch {int(x)}: {_tick_label(key, y)}"


def _axes(panel: ET.Element, x_scale: _Scale, y_scale: _Scale, points: list[tuple[float, float]], key: str) -> None:
    for tick in _ticks(y_scale.low, y_scale.high):
        y = y_scale(tick)
        ET.SubElement(panel, "line", x1=str(MARGIN), x2=str(PANEL_WIDTH - 16), y1=f"{y:.1f}", y2=f"{y:.1f}",
                      stroke=GRID)
        _text(panel, MARGIN - 6, y + 4, _tick_label(key, tick), color=MUTED, anchor="end", size=10)
    step = max(1, math.ceil(len(points) / 10))  # at most ten epoch labels, however long the run
    for epoch, _ in points[::step]:
        _text(panel, x_scale(epoch), PANEL_HEIGHT - 20, str(int(epoch)), color=MUTED, anchor="middle", size=10)
    _text(panel, (MARGIN + PANEL_WIDTH) / 2, PANEL_HEIGHT - 4, "epoch", color=MUTED, anchor="middle", size=10)


def _tick_label(key: str, value: float) -> str:
    return f"{value * 100:.1f}%" if key == "val_accuracy" else f"{value:.3g}"


class _Scale:
    """Maps a data interval linearly onto a pixel interval (which may run backwards, as y does)."""

    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)


def _padded(low: float, high: float) -> tuple[float, float]:
    """A non-empty interval around the data with a little air, so that a flat curve stays visible."""
    pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(count + 1) if first + i * step <= high]


def _svg(width: float, height: float, title: str) -> ET.Element:
    svg = ET.Element("svg", xmlns=SVG_NS, width=str(width), height=str(height), viewBox=f"0 0 {width} {height}",
                     style=FONT, role="img")
    ET.SubElement(svg, "title").text = title
    ET.SubElement(svg, "rect", width="100%", height="100%", fill="#ffffff")
    return svg


def _text(parent: ET.Element, x: float, y: float, content: str, color: str = INK, anchor: str = "start",
          size: int = 12, weight: str = "400") -> None:
    element = ET.SubElement(parent, "text", x=f"{x:.1f}", y=f"{y:.1f}", fill=color,
                            **{"text-anchor": anchor, "font-size": str(size), "font-weight": weight})
    element.text = content


def _serialize(svg: ET.Element) -> str:
    return ET.tostring(svg, encoding="unicode", xml_declaration=True) + "\n"
