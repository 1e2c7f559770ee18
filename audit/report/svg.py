"""Static SVG for the report's figures, drawn in Python at render time.

figures.py (and curves.py) build each chart as a plain {"data", "layout"} spec in the
plotly vocabulary; this module draws that spec as one inline <svg> element. Why SVG and
not plotly.js (docs/report.md): the page must work with JavaScript off, print to A4 as
vector graphics, stay small (the full plotly.js bundle alone was 4.8 MB, a partial one
still ~1 MB) and hold no external URL anywhere (plotly.js carries map-tile hosts).

Only the subset of the vocabulary the report's specs use is drawn: grouped "bar" traces
with error bars and fill patterns, "heatmap" with cell counts, "scatter" lines (dashes,
markers, "hv" steps, "tonexty" bands, a second y axis), "rect"/"line" shapes with
`xref: x, yref: paper`, annotations at the top of the plot, and a legend. Hover text
becomes <title> tooltips (no JavaScript needed). The output is a pure function of the
spec: the same spec gives the same bytes. The <svg> carries no xmlns attribute: the HTML
parser places inline <svg> in the SVG namespace by itself, and without it the page holds
no URL at all (tests grep the whole file for one).

Escaping: spec labels were HTML-escaped for plotly (formatting.plotly_text); here each
is unescaped back to the literal text and escaped again for XML, so a class name is
displayed literally and injects nothing.
"""

from __future__ import annotations

import html
import math
import re

from markupsafe import Markup, escape

WIDTH = 960                    # viewBox width; the SVG scales to its container (screen or paper)
CHAR_W = 6.6                   # approximate width of one 12 px character
TICK_FONT = 12
DASHES = {"solid": "", "dash": "6 4", "dot": "2 3", "dashdot": "6 3 2 3", "longdash": "10 4",
          "longdashdot": "10 4 2 4"}
# Viridis (matplotlib), 9 stops: light cells mean many images, dark cells few.
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
PATTERN_PATHS = {"/": "M0,6 L6,0", "\\": "M0,0 L6,6", "x": "M0,6 L6,0 M0,0 L6,6", "-": "M0,3 L6,3",
                 "|": "M3,0 L3,6", "+": "M0,3 L6,3 M3,0 L3,6", ".": "M2.5,3 L3.5,3"}
MIN_BAR_PX = 3                 # a 0% bar still shows as a visible stub on the axis


def text(value) -> str:
    """A spec label as escaped XML text: plotly markup removed, entities decoded, re-escaped."""
    plain = html.unescape(re.sub(r"<[^>]+>", "", str(value).replace("<br>", " ")))
    return str(escape(plain))


def num(value: float) -> str:
    """Coordinates with one decimal and no trailing zeros: small, stable output."""
    out = f"{value:.1f}"
    return out[:-2] if out.endswith(".0") else out


def fmt_tick(value: float, tickformat: str | None) -> str:
    if tickformat and tickformat.endswith("%"):
        return f"{value * 100:.0f}%"
    if tickformat == "d" or (float(value).is_integer() and abs(value) < 1e6):
        return f"{value:.0f}"        # 1000, not 1e+03
    return f"{value:.3g}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps 1, 2, 2.5 or 5 times a power of ten)."""
    if not high > low:
        high = low + 1
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 12) for k in range(first, int(math.floor(high / step + 1e-9)) + 1)]


class Frame:
    """The plot area of one chart and its value -> pixel maps."""

    def __init__(self, left: float, top: float, width: float, height: float, x_range, y_range,
                 y_reversed: bool = False):
        self.left, self.top, self.width, self.height = left, top, width, height
        self.x_range, self.y_range, self.y_reversed = x_range, y_range, y_reversed

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1) * self.width

    def y(self, value: float, y_range=None) -> float:
        low, high = y_range or self.y_range
        share = (value - low) / ((high - low) or 1)
        share = min(max(share, -0.02), 1.02)
        return self.top + (share if self.y_reversed else 1 - share) * self.height


# --------------------------------------------------------------------------- data ranges


def is_category(spec: dict) -> bool:
    axis = spec["layout"].get("xaxis") or {}
    return axis.get("type") == "category" or any(t["type"] in ("bar", "heatmap") for t in spec["data"])


def categories(spec: dict) -> list[str]:
    axis = spec["layout"].get("xaxis") or {}
    if axis.get("categoryarray"):
        return list(axis["categoryarray"])
    return list(spec["data"][0]["x"])


def numeric(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def value_range(spec: dict, axis_name: str, traces: list[dict], key: str) -> tuple[float, float]:
    """The axis range: the spec's own, else from zero (a loss or count axis starts at 0, so noise
    does not fill the plot) to the largest value with a little headroom."""
    axis = spec["layout"].get(axis_name) or {}
    if axis.get("range"):
        return float(axis["range"][0]), float(axis["range"][1])
    values = [v for t in traces for v in numeric(t.get(key) or [])]
    for trace in traces:
        error = trace.get("error_y") or {}
        values += [a + b for a, b in zip(numeric(trace.get(key) or []), numeric(error.get("array") or []))]
    if not values:
        return 0.0, 1.0
    low, high = min(0.0, min(values)), max(values)
    return low, (high * 1.08 if high > 0 else 1.0)


# --------------------------------------------------------------------------- legend


def legend_entries(spec: dict) -> list[dict]:
    entries = []
    for trace in spec["data"]:
        if trace.get("showlegend") is False or trace["type"] == "heatmap" or not trace.get("name"):
            continue
        if (trace.get("line") or {}).get("width") == 0 and "fill" not in trace:
            continue
        entries.append(trace)
    return entries


def legend_rows(entries: list[dict], width: float) -> list[list[tuple[dict, float]]]:
    """Legend items flowed into rows across the chart's width: [(trace, item width)]."""
    rows, row, used = [], [], 0.0
    for trace in entries:
        item = 28 + len(text(trace["name"])) * CHAR_W + 18
        if row and used + item > width:
            rows.append(row)
            row, used = [], 0.0
        row.append((trace, item))
        used += item
    if row:
        rows.append(row)
    return rows


def swatch(trace: dict, x: float, y: float, pattern_ids: dict) -> str:
    if trace["type"] == "bar":
        fill = trace["marker"]["color"]
        out = f'<rect x="{num(x)}" y="{num(y - 6)}" width="20" height="12" fill="{fill}" stroke="#333"/>'
        if id(trace) in pattern_ids:
            out += f'<rect x="{num(x)}" y="{num(y - 6)}" width="20" height="12" fill="url(#{pattern_ids[id(trace)]})"/>'
        return out
    if "fill" in trace:
        return f'<rect x="{num(x)}" y="{num(y - 6)}" width="20" height="12" fill="{trace["fillcolor"]}"/>'
    line = trace.get("line") or {}
    dash = DASHES.get(line.get("dash", "solid"), "")
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{num(x)}" y1="{num(y)}" x2="{num(x + 20)}" y2="{num(y)}" stroke="{line.get("color", "#333")}"'
            f' stroke-width="{min(line.get("width", 2), 3)}"{dash_attr}/>')


def draw_legend(rows, left: float, top: float, pattern_ids: dict) -> list[str]:
    parts = []
    for r, row in enumerate(rows):
        x, y = left, top + 10 + r * 20
        for trace, item in row:
            parts.append(swatch(trace, x, y, pattern_ids))
            parts.append(f'<text x="{num(x + 26)}" y="{num(y + 4)}">{text(trace["name"])}</text>')
            x += item
    return parts


# --------------------------------------------------------------------------- axes


def tick_label_lines(label: str) -> tuple[list[str], bool]:
    """A category tick's lines (plotly <br> breaks) and whether it is bold (<b>)."""
    return [text(part) for part in str(label).split("<br>")], "<b>" in str(label)


def category_ticks(frame: Frame, spec: dict, cats: list[str], angle: float) -> list[str]:
    axis = spec["layout"].get("xaxis") or {}
    ticktext = axis.get("ticktext") or cats
    parts = []
    for position, label in enumerate(ticktext):
        lines, bold = tick_label_lines(label)
        x, y = frame.x(position), frame.top + frame.height + 16
        weight = ' font-weight="700"' if bold else ""
        if angle:
            parts.append(f'<text x="{num(x)}" y="{num(y)}" text-anchor="end" transform="rotate({angle:g} '
                         f'{num(x)} {num(y)})"{weight}>{" ".join(lines)}</text>')
        else:
            spans = "".join(f'<tspan x="{num(x)}" dy="{0 if i == 0 else 14}">{line}</tspan>'
                            for i, line in enumerate(lines))
            parts.append(f'<text x="{num(x)}" y="{num(y)}" text-anchor="middle"{weight}>{spans}</text>')
    return parts


def numeric_x_ticks(frame: Frame, axis: dict) -> list[str]:
    if axis.get("tickvals"):
        ticks = list(zip(axis["tickvals"], axis.get("ticktext") or axis["tickvals"]))
    else:
        values = nice_ticks(*frame.x_range, count=8)
        if axis.get("dtick") == 1 or axis.get("tickformat") == "d":
            values = [v for v in values if float(v).is_integer()]
        ticks = [(v, fmt_tick(v, axis.get("tickformat"))) for v in values]
    parts = []
    for value, label in ticks:
        if not frame.x_range[0] - 1e-9 <= value <= frame.x_range[1] + 1e-9:
            continue
        x = frame.x(value)
        parts.append(f'<line x1="{num(x)}" y1="{num(frame.top)}" x2="{num(x)}" y2="{num(frame.top + frame.height)}"'
                     f' stroke="#eee"/>')
        parts.append(f'<text x="{num(x)}" y="{num(frame.top + frame.height + 16)}" text-anchor="middle">'
                     f'{text(label)}</text>')
    return parts


def y_ticks(frame: Frame, axis: dict, y_range, right: bool = False) -> list[str]:
    parts = []
    for value in nice_ticks(*y_range, count=5):
        y = frame.y(value, y_range)
        if not right:
            parts.append(f'<line x1="{num(frame.left)}" y1="{num(y)}" x2="{num(frame.left + frame.width)}" '
                         f'y2="{num(y)}" stroke="#ddd"/>')
        x = frame.left + frame.width + 6 if right else frame.left - 6
        anchor = "start" if right else "end"
        parts.append(f'<text x="{num(x)}" y="{num(y + 4)}" text-anchor="{anchor}">'
                     f'{fmt_tick(value, axis.get("tickformat"))}</text>')
    return parts


def axis_title(axis: dict) -> str:
    return text(((axis or {}).get("title") or {}).get("text", ""))


# --------------------------------------------------------------------------- traces


def pattern_defs(figure_id: str, traces: list[dict]) -> tuple[list[str], dict]:
    """<pattern> elements for bar fill patterns, so series differ in more than colour."""
    defs, ids = [], {}
    for position, trace in enumerate(traces):
        shape = ((trace.get("marker") or {}).get("pattern") or {}).get("shape")
        if trace["type"] != "bar" or not shape or shape not in PATTERN_PATHS:
            continue
        pattern_id = f"{figure_id}-p{position}"
        ids[id(trace)] = pattern_id
        defs.append(f'<pattern id="{pattern_id}" width="6" height="6" patternUnits="userSpaceOnUse">'
                    f'<path d="{PATTERN_PATHS[shape]}" stroke="#333" stroke-width="0.8" fill="none"/></pattern>')
    return defs, ids


def bar_titles(trace: dict, position: int, value: float) -> str:
    custom = (trace.get("customdata") or [None] * (position + 1))[position]
    detail = ""
    if isinstance(custom, list) and len(custom) >= 4 and None not in custom[:2]:
        detail = f" ({custom[2]} of {custom[3]}); 95% CI {custom[0] * 100:.1f}–{custom[1] * 100:.1f}%"
    return f"<title>{text(trace['name'])}, {text(trace['x'][position])}: {value * 100:.1f}%{detail}</title>"


def draw_bars(frame: Frame, traces: list[dict], spec: dict, pattern_ids: dict) -> list[str]:
    bars = [t for t in traces if t["type"] == "bar"]
    if not bars:
        return []
    layout = spec["layout"]
    band = frame.width / max(1, frame.x_range[1] - frame.x_range[0])
    group = band * (1 - layout.get("bargap", 0.2))
    bar_w = group / len(bars)
    zero = frame.y(0)
    parts = []
    for s, trace in enumerate(bars):
        colour = trace["marker"]["color"]
        error = trace.get("error_y") or {}
        for position, value in enumerate(trace["y"]):
            if value is None:
                continue
            x = frame.x(position) - group / 2 + s * bar_w
            top = frame.y(value)
            height = max(zero - top, MIN_BAR_PX)
            top = zero - height
            title = bar_titles(trace, position, value)
            parts.append(f'<g><rect x="{num(x)}" y="{num(top)}" width="{num(bar_w)}" height="{num(height)}" '
                         f'fill="{colour}" stroke="#333" stroke-width="0.5"/>')
            if id(trace) in pattern_ids:
                parts.append(f'<rect x="{num(x)}" y="{num(top)}" width="{num(bar_w)}" height="{num(height)}" '
                             f'fill="url(#{pattern_ids[id(trace)]})"/>')
            parts.append(title + "</g>")
            up = (error.get("array") or [None] * len(trace["y"]))[position]
            down = (error.get("arrayminus") or [None] * len(trace["y"]))[position]
            if up is not None and down is not None:
                centre = x + bar_w / 2
                y_hi, y_lo = frame.y(value + up), frame.y(value - down)
                parts.append(f'<path d="M{num(centre)},{num(y_hi)}V{num(y_lo)}M{num(centre - 2)},{num(y_hi)}'
                             f'H{num(centre + 2)}M{num(centre - 2)},{num(y_lo)}H{num(centre + 2)}" stroke="#333"/>')
    return parts


def segments(xs: list, ys: list) -> list[list[tuple[float, float]]]:
    """The (x, y) runs of a line, broken where a value is missing."""
    runs, run = [], []
    for x, y in zip(xs, ys):
        if x is None or y is None:
            if run:
                runs.append(run)
            run = []
        else:
            run.append((x, y))
    if run:
        runs.append(run)
    return runs


def line_path(frame: Frame, run, step: bool, y_range) -> str:
    points = [(frame.x(x), frame.y(y, y_range)) for x, y in run]
    out = f"M{num(points[0][0])},{num(points[0][1])}"
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        out += f"H{num(x1)}V{num(y1)}" if step else f"L{num(x1)},{num(y1)}"
    return out


def band_path(frame: Frame, upper: dict, lower: dict, step: bool, y_range) -> str:
    top = [(x, y) for x, y in zip(upper["x"], upper["y"]) if x is not None and y is not None]
    bottom = [(x, y) for x, y in zip(lower["x"], lower["y"]) if x is not None and y is not None]
    if not top or not bottom:
        return ""
    forward = line_path(frame, top, step, y_range)
    back = line_path(frame, list(reversed(bottom)), False, y_range)
    return forward + "L" + back[1:] + "Z"


def marker(symbol: str, x: float, y: float, colour: str) -> str:
    if symbol == "square":
        return f'<rect x="{num(x - 3)}" y="{num(y - 3)}" width="6" height="6" fill="{colour}"/>'
    if symbol == "diamond":
        return f'<path d="M{num(x)},{num(y - 4)}L{num(x + 4)},{num(y)}L{num(x)},{num(y + 4)}L{num(x - 4)},{num(y)}Z" fill="{colour}"/>'
    if symbol == "triangle-up":
        return f'<path d="M{num(x)},{num(y - 4)}L{num(x + 4)},{num(y + 3)}L{num(x - 4)},{num(y + 3)}Z" fill="{colour}"/>'
    return f'<circle cx="{num(x)}" cy="{num(y)}" r="3" fill="{colour}"/>'


def draw_lines(frame: Frame, traces: list[dict], ranges: dict) -> list[str]:
    parts, previous = [], None
    for trace in traces:
        if trace["type"] != "scatter":
            continue
        y_range = ranges[trace.get("yaxis", "y")]
        line = trace.get("line") or {}
        step = line.get("shape") == "hv"
        if trace.get("fill") == "tonexty" and previous is not None:
            path = band_path(frame, previous, trace, step, y_range)
            if path:
                parts.append(f'<path d="{path}" fill="{trace.get("fillcolor", "rgba(0,0,0,0.1)")}" stroke="none"/>')
        previous = trace
        if line.get("width", 2) == 0:
            continue
        dash = DASHES.get(line.get("dash", "solid"), "")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        for run in segments(trace["x"], trace["y"]):
            parts.append(f'<path d="{line_path(frame, run, step, y_range)}" fill="none" stroke="{line.get("color", "#333")}"'
                         f' stroke-width="{line.get("width", 2)}"{dash_attr}><title>{text(trace.get("name", ""))}</title></path>')
            if "markers" in trace.get("mode", ""):
                symbol = (trace.get("marker") or {}).get("symbol", "circle")
                parts.extend(marker(symbol, frame.x(x), frame.y(y, y_range), line.get("color", "#333"))
                             for x, y in run)
    return parts


def draw_shapes(frame: Frame, spec: dict) -> list[str]:
    parts = []
    for shape in spec["layout"].get("shapes") or []:
        x0, x1 = frame.x(shape["x0"]), frame.x(shape["x1"])
        y_top, y_bottom = frame.top, frame.top + frame.height
        if shape["type"] == "rect":
            parts.append(f'<rect x="{num(x0)}" y="{num(y_top)}" width="{num(x1 - x0)}" height="{num(y_bottom - y_top)}"'
                         f' fill="{shape.get("fillcolor", "rgba(0,0,0,0.07)")}"/>')
        elif shape["type"] == "line":
            line = shape.get("line") or {}
            dash = DASHES.get(line.get("dash", "solid"), "")
            parts.append(f'<line x1="{num(x0)}" y1="{num(y_top)}" x2="{num(x1)}" y2="{num(y_bottom)}" '
                         f'stroke="{line.get("color", "#333")}"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
    for note in spec["layout"].get("annotations") or []:
        x = frame.x(note["x"])
        parts.append(f'<text x="{num(x + 4)}" y="{num(frame.top - 4)}">{text(note["text"])}</text>')
    return parts


# --------------------------------------------------------------------------- the chart


def x_label_room(spec: dict, cats: list[str] | None, plot_width: float) -> tuple[float, float]:
    """(tick angle, pixels below the plot for the tick labels): angled when the spec asks, or
    when the longest label is wider than its slot (neighbours such as "diagonal" and
    "anti-diagonal" would otherwise collide)."""
    if cats is None:
        return 0.0, 20.0
    axis = spec["layout"].get("xaxis") or {}
    longest = max((len(text(c)) for c in cats), default=1)
    slot = plot_width / max(1, len(cats))
    angle = float(axis.get("tickangle") or 0) or (-35.0 if longest * CHAR_W + 8 > slot else 0.0)
    if angle:
        return angle, 24 + longest * CHAR_W * abs(math.sin(math.radians(angle)))
    lines = max((len(str(t).split("<br>")) for t in axis.get("ticktext") or cats), default=1)
    return 0.0, 16 + 14 * lines


def frame_for(spec: dict, legend_height: float, cats: list[str] | None, heatmap: dict | None):
    """The plot area, and the chart's total height, from the spec's margins and labels."""
    layout = spec["layout"]
    margin = layout.get("margin") or {}
    left, right = max(margin.get("l", 64), 64), max(margin.get("r", 24), 24)
    if "yaxis2" in layout:
        right = max(right, 70)
    top = 16 + legend_height + (18 if layout.get("annotations") else 0)
    if heatmap is not None:
        left = 40 + max(len(text(c)) for c in heatmap["y"]) * CHAR_W
        right = 90                                    # the colour bar
    ticks = cats if cats is not None else (list(heatmap["x"]) if heatmap is not None else None)
    angle, below = x_label_room(spec, ticks, WIDTH - left - right)
    below += 28                                       # the axis title
    plot_h = max(layout.get("height", 400) - 64 - 48, 160)
    if heatmap is not None:
        plot_h = min(max(28 * len(heatmap["y"]), 160), 640)
    frame = Frame(left, top, WIDTH - left - right, plot_h, (0.0, 1.0), (0.0, 1.0))
    return frame, angle, top + plot_h + below


def axis_titles(frame: Frame, spec: dict, bottom: float) -> list[str]:
    layout = spec["layout"]
    middle_y = frame.top + frame.height / 2
    parts = [f'<text x="{num(frame.left + frame.width / 2)}" y="{num(bottom - 8)}" text-anchor="middle" '
             f'class="axis-title">{axis_title(layout.get("xaxis"))}</text>',
             f'<text x="16" y="{num(middle_y)}" text-anchor="middle" transform="rotate(-90 16 {num(middle_y)})" '
             f'class="axis-title">{axis_title(layout.get("yaxis"))}</text>']
    if "yaxis2" in layout:
        x = WIDTH - 12
        parts.append(f'<text x="{num(x)}" y="{num(middle_y)}" text-anchor="middle" '
                     f'transform="rotate(90 {num(x)} {num(middle_y)})" class="axis-title">'
                     f'{axis_title(layout["yaxis2"])}</text>')
    return parts


def plot_body(figure_id: str, spec: dict, frame: Frame, angle: float, cats, heatmap, pattern_ids) -> list[str]:
    from robaudit.audit.report.svg_panels import colour_bar, draw_heatmap, heatmap_axes

    layout, traces = spec["layout"], spec["data"]
    if heatmap is not None:
        return draw_heatmap(frame, heatmap) + heatmap_axes(frame, heatmap, angle) + colour_bar(frame, figure_id, heatmap)
    ranges = {"y": value_range(spec, "yaxis", [t for t in traces if t.get("yaxis", "y") == "y"], "y"),
              "y2": value_range(spec, "yaxis2", [t for t in traces if t.get("yaxis") == "y2"], "y")}
    frame.y_range = ranges["y"]
    parts = y_ticks(frame, layout.get("yaxis") or {}, ranges["y"])
    if "yaxis2" in layout:
        parts += y_ticks(frame, layout["yaxis2"], ranges["y2"], right=True)
    if cats is not None:
        frame.x_range = (-0.5, len(cats) - 0.5)
        parts = draw_shapes(frame, spec) + parts + category_ticks(frame, spec, cats, angle)
    else:
        axis = layout.get("xaxis") or {}
        xs = [v for t in traces for v in numeric(t.get("x") or [])]
        frame.x_range = tuple(axis["range"]) if axis.get("range") else (min(xs, default=0), max(xs, default=1))
        if frame.x_range[0] == frame.x_range[1]:
            frame.x_range = (frame.x_range[0] - 0.5, frame.x_range[1] + 0.5)
        parts = parts + numeric_x_ticks(frame, axis) + draw_shapes(frame, spec)
    parts += draw_bars(frame, traces, spec, pattern_ids) + draw_lines(frame, traces, ranges)
    parts.append(f'<path d="M{num(frame.left)},{num(frame.top)}V{num(frame.top + frame.height)}'
                 f'H{num(frame.left + frame.width)}" fill="none" stroke="#888"/>')
    return parts


def render_svg(figure_id: str, spec: dict, label: str) -> Markup:
    """One figure spec as an inline, self-contained <svg> (escaped; no script, no URL)."""
    if spec["layout"].get("small_multiples"):
        from robaudit.audit.report.svg_panels import render_small_multiples

        return render_small_multiples(figure_id, spec, label)
    heatmap = next((t for t in spec["data"] if t["type"] == "heatmap"), None)
    cats = categories(spec) if is_category(spec) and heatmap is None else None
    defs, pattern_ids = pattern_defs(figure_id, spec["data"])
    rows = legend_rows(legend_entries(spec), WIDTH - 80)
    frame, angle, height = frame_for(spec, 20 * len(rows), cats, heatmap)
    parts = [f'<svg viewBox="0 0 {WIDTH} {num(height)}" role="img" '
             f'aria-label="{escape(label)}" class="figure-svg" font-size="{TICK_FONT}" '
             f'font-family="system-ui, sans-serif" fill="#1a1a1a">']
    if defs:
        parts.append("<defs>" + "".join(defs) + "</defs>")
    parts += plot_body(figure_id, spec, frame, angle, cats, heatmap, pattern_ids)
    parts += draw_legend(rows, frame.left, 8, pattern_ids)
    parts += axis_titles(frame, spec, height)
    parts.append("</svg>")
    return Markup("\n".join(parts))
