"""Bar charts drawn as inline SVG on the server, so pages need no script or library.

Colours come from classes in style.css (``bar-0`` to ``bar-2``, ``pareto-line``).
Each chart has a title and a description for screen readers, and pages show
the same numbers in a table next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

from markupsafe import Markup, escape

_ids = count(1)

WIDTH = 620
HEIGHT = 280
MARGIN_LEFT = 56
MARGIN_RIGHT = 48
MARGIN_TOP = 30
MARGIN_BOTTOM = 64


@dataclass(frozen=True, slots=True)
class Series:
    """One set of bars: a name for the legend and one value per category."""

    name: str
    values: Sequence[float]


def _nice_ceiling(value: float) -> float:
    """Return a round number (1, 2 or 5 times a power of ten) at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _label(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def bar_chart(title: str, categories: Sequence[str], series: Sequence[Series], *,
              unit: str = "", log_scale: bool = False,
              cumulative_percent: Sequence[float] | None = None) -> Markup:
    """Return an SVG bar chart: one group of bars per category, one bar per series.

    With ``log_scale`` the y axis is logarithmic (for latencies spanning
    seconds to days); values at or below zero are drawn as empty. With
    ``cumulative_percent`` a line on a 0-100 % right axis is drawn over the
    bars, which makes a Pareto chart.
    """
    chart_id = f"chart-{next(_ids)}"
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    values = [v for s in series for v in s.values]
    top = max(values, default=0.0)
    if log_scale:
        positive = [v for v in values if v > 0]
        low = 10 ** math.floor(math.log10(min(positive))) if positive else 0.1
        high = 10 ** math.ceil(math.log10(max(positive))) if positive else 1.0
        high = max(high, low * 10)

        def y_of(value: float) -> float:
            if value <= 0:
                return float(plot_h)
            share = (math.log10(value) - math.log10(low)) / (
                math.log10(high) - math.log10(low))
            return plot_h * (1 - max(0.0, min(1.0, share)))

        ticks = [low * 10 ** k for k in range(round(math.log10(high / low)) + 1)]
    else:
        high = _nice_ceiling(top)

        def y_of(value: float) -> float:
            return plot_h * (1 - max(0.0, value) / high)

        ticks = [high * k / 4 for k in range(5)]
    parts = [
        (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
         f'aria-labelledby="{chart_id}-title {chart_id}-desc" '
         f'xmlns="http://www.w3.org/2000/svg">'),
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(_describe(categories, series, unit))}</desc>',
        f'<g transform="translate({MARGIN_LEFT},{MARGIN_TOP})">',
    ]
    for tick in ticks:
        y = y_of(tick)
        parts.append(f'<line class="grid" x1="0" x2="{plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="-6" y="{y + 4:.1f}" text-anchor="end">'
                     f'{escape(_label(tick))}</text>')
    if unit:
        parts.append(f'<text class="tick" x="{-MARGIN_LEFT + 4}" y="-16">'
                     f'{escape(unit)}</text>')
    slots = max(1, len(categories))
    slot_w = plot_w / slots
    bar_w = max(1.0, slot_w * 0.8 / max(1, len(series)))
    for index, category in enumerate(categories):
        x0 = index * slot_w + slot_w * 0.1
        for number, item in enumerate(series):
            value = item.values[index] if index < len(item.values) else 0.0
            y = y_of(value)
            parts.append(
                f'<rect class="bar-{number % 3}" x="{x0 + number * bar_w:.1f}" '
                f'y="{y:.1f}" width="{bar_w - 1:.1f}" height="{plot_h - y:.1f}">'
                f'<title>{escape(category)}, {escape(item.name)}: '
                f'{escape(_label(value))} {escape(unit)}</title></rect>')
        if slots <= 16 or index % math.ceil(slots / 16) == 0:
            cx = index * slot_w + slot_w / 2
            parts.append(
                f'<text class="category" x="{cx:.1f}" y="{plot_h + 14}" '
                f'text-anchor="end" transform="rotate(-30 {cx:.1f} {plot_h + 14})">'
                f'{escape(category[:24])}</text>')
    if cumulative_percent:
        points = " ".join(
            f"{i * slot_w + slot_w / 2:.1f},{plot_h * (1 - p / 100):.1f}"
            for i, p in enumerate(cumulative_percent))
        parts.append(f'<polyline class="pareto-line" points="{points}"/>')
        for k in range(5):
            y = plot_h * (1 - k / 4)
            parts.append(f'<text class="tick" x="{plot_w + 6}" y="{y + 4:.1f}">'
                         f'{k * 25}%</text>')
    parts.append(f'<line class="axis" x1="0" x2="{plot_w}" y1="{plot_h}" y2="{plot_h}"/>')
    if len(series) > 1:
        for number, item in enumerate(series):
            x = plot_w - (len(series) - number) * 120
            parts.append(f'<rect class="bar-{number % 3}" x="{x}" y="-26" '
                         f'width="12" height="12"/>')
            parts.append(f'<text class="legend" x="{x + 16}" y="-16">'
                         f'{escape(item.name)}</text>')
    parts.append("</g></svg>")
    return Markup("".join(parts))


def _describe(categories: Sequence[str], series: Sequence[Series], unit: str) -> str:
    if not categories:
        return "No data."
    shown = []
    for index, category in enumerate(categories[:12]):
        values = ", ".join(f"{s.name} {_label(s.values[index])}" for s in series
                           if index < len(s.values))
        shown.append(f"{category}: {values}")
    more = f"; and {len(categories) - 12} more" if len(categories) > 12 else ""
    return f"Values in {unit or 'count'}. " + "; ".join(shown) + more
