"""The heatmap and small-multiples drawings of svg.py (kept apart to keep modules small).

Same rules as svg.py: pure functions of the spec, every label through svg.text().
"""

from __future__ import annotations

import math

from markupsafe import Markup, escape

from robaudit.audit.report.svg import (
    TICK_FONT, VIRIDIS, WIDTH, Frame, axis_title, category_ticks, draw_lines, fmt_tick, num, numeric, text, y_ticks,
)


def viridis(share: float) -> str:
    share = min(max(share, 0.0), 1.0) * (len(VIRIDIS) - 1)
    low = int(math.floor(share))
    high = min(low + 1, len(VIRIDIS) - 1)
    mix = share - low
    a, b = VIRIDIS[low], VIRIDIS[high]
    channels = [round(int(a[i:i + 2], 16) * (1 - mix) + int(b[i:i + 2], 16) * mix) for i in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in channels)


def draw_heatmap(frame: Frame, trace: dict) -> list[str]:
    matrix = trace["z"]
    top = max((max(row) for row in matrix if row), default=0) or 1
    size_x = frame.width / max(1, len(trace["x"]))
    size_y = frame.height / max(1, len(trace["y"]))
    parts = []
    for r, row in enumerate(matrix):
        for c, count in enumerate(row):
            x, y = frame.left + c * size_x, frame.top + r * size_y
            colour = viridis(count / top)
            title = f"<title>true {text(trace['y'][r])} → predicted {text(trace['x'][c])}: {count} images</title>"
            parts.append(f'<rect x="{num(x + 0.5)}" y="{num(y + 0.5)}" width="{num(size_x - 1)}" '
                         f'height="{num(size_y - 1)}" fill="{colour}">{title}</rect>')
            if "texttemplate" in trace:
                ink = "#000" if count / top > 0.6 else "#fff"
                parts.append(f'<text x="{num(x + size_x / 2)}" y="{num(y + size_y / 2 + 4)}" text-anchor="middle"'
                             f' fill="{ink}">{count}</text>')
    return parts


def colour_bar(frame: Frame, figure_id: str, trace: dict) -> list[str]:
    top = max((max(row) for row in trace["z"] if row), default=0)
    x = frame.left + frame.width + 24
    stops = "".join(f'<stop offset="{i / (len(VIRIDIS) - 1):.3f}" stop-color="{c}"/>'
                    for i, c in enumerate(reversed(VIRIDIS)))
    return [f'<defs><linearGradient id="{figure_id}-cb" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>',
            f'<rect x="{num(x)}" y="{num(frame.top)}" width="14" height="{num(frame.height)}" fill="url(#{figure_id}-cb)"/>',
            f'<text x="{num(x + 18)}" y="{num(frame.top + 10)}">{top}</text>',
            f'<text x="{num(x + 18)}" y="{num(frame.top + frame.height)}">0</text>',
            f'<text x="{num(x)}" y="{num(frame.top - 6)}">images</text>']


def heatmap_axes(frame: Frame, trace: dict, angle: float) -> list[str]:
    frame.x_range = (-0.5, len(trace["x"]) - 0.5)   # one unit per cell, as for bars
    parts = []
    size_y = frame.height / max(1, len(trace["y"]))
    for r, label in enumerate(trace["y"]):
        parts.append(f'<text x="{num(frame.left - 6)}" y="{num(frame.top + (r + 0.5) * size_y + 4)}" '
                     f'text-anchor="end">{text(label)}</text>')
    spec_like = {"layout": {"xaxis": {"tickangle": angle}}}
    return parts + category_ticks(frame, spec_like, list(trace["x"]), angle)


def render_small_multiples(figure_id: str, spec: dict, label: str) -> Markup:
    """One small panel per line (the others faint grey behind it), so many per-class
    trajectories stay readable instead of overlapping in one plot; shared y range."""
    traces = [t for t in spec["data"] if t["type"] == "scatter"]
    columns = 5
    panel_w, panel_h, gap = (WIDTH - 60) / columns, 150, 34
    rows = math.ceil(len(traces) / columns)
    values = [v for t in traces for v in numeric(t["y"])]
    bounds = spec["layout"].get("bounds")
    if (spec["layout"].get("yaxis") or {}).get("range"):
        y_range = tuple(spec["layout"]["yaxis"]["range"])   # a control's bounds: where it can move
    else:                                                   # the data's own range, padded
        low, high = min(values, default=0.0), max(values, default=1.0)
        pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
        y_range = (low - pad, high + pad)
    xs = [v for t in traces for v in numeric(t["x"])]
    x_range = (min(xs, default=0), max(xs, default=1) or 1)
    height = rows * (panel_h + gap) + 30
    parts = [f'<svg viewBox="0 0 {WIDTH} {num(height)}" role="img" '
             f'aria-label="{escape(label)}" class="figure-svg" font-size="{TICK_FONT}" '
             f'font-family="system-ui, sans-serif" fill="#1a1a1a">']
    for k, trace in enumerate(traces):
        left = 50 + (k % columns) * panel_w
        top = 22 + (k // columns) * (panel_h + gap)
        frame = Frame(left, top, panel_w - 24, panel_h - 30, x_range, y_range)
        parts.append(f'<text x="{num(left)}" y="{num(top - 6)}" font-weight="700">{text(trace["name"])}</text>')
        if k % columns == 0:
            parts += [p for p in y_ticks(frame, {"tickformat": None}, y_range) if p.startswith("<text")]
        for bound in bounds or []:
            y = frame.y(bound)
            parts.append(f'<line x1="{num(frame.left)}" y1="{num(y)}" x2="{num(frame.left + frame.width)}" '
                         f'y2="{num(y)}" stroke="#D55E00" stroke-dasharray="4 3"><title>bound {bound:g}</title></line>')
        grey = [{**t, "mode": "lines", "line": {"color": "#d8d8d8", "width": 1}} for t in traces if t is not trace]
        own = {**trace, "line": {**trace.get("line", {}), "dash": "solid", "width": 2}}
        parts += draw_lines(frame, grey + [own], {"y": y_range})
        parts.append(f'<path d="M{num(frame.left)},{num(frame.top)}V{num(frame.top + frame.height)}'
                     f'H{num(frame.left + frame.width)}" fill="none" stroke="#888"/>')
        for value in (x_range[0], x_range[1]):
            parts.append(f'<text x="{num(frame.x(value))}" y="{num(frame.top + frame.height + 14)}" '
                         f'text-anchor="middle">{fmt_tick(value, "d")}</text>')
    note = "; dashed: the bounds" if bounds else ""
    parts.append(f'<text x="{WIDTH / 2:g}" y="{num(height - 6)}" text-anchor="middle" class="axis-title">'
                 f'{axis_title(spec["layout"].get("xaxis"))} (each panel: one class; grey: the others{note})</text>')
    parts.append("</svg>")
    return Markup("\n".join(parts))
