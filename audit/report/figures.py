"""Plotly figure specs for the HTML audit report: plain {"data", "layout"} dicts.

The sections decide what to show; this module decides how a chart looks: the
colour-blind-safe palette, bar patterns and line dashes (so series differ in more
than colour), the shared layout and axes, and one builder per chart (per-class bars,
target-flow heatmap, before/after bars, training curves, per-class trajectories).
Every label that came from the results passes through `plotly_text` first. The specs
are drawn as static SVG at render time by svg.py; nothing here imports plotly.
"""

from __future__ import annotations

import html

from robaudit.audit.report.formatting import ci, finite, plotly_text, rounded
from robaudit.audit.report.records import CLEAN_KEY, ENSEMBLE_KEY

# Okabe & Ito (2008): distinguishable with the common colour-vision deficiencies.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000"]
CLEAN_COLOUR = "#999999"
ENSEMBLE_COLOUR = "#000000"
# Bar fill patterns and line dashes, so series differ in more than colour.
BAR_PATTERNS = ["/", "\\", "x", "-", "|", "+", "."]
LINE_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
LINE_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon"]

# Above this class count the heatmap cells lose their printed counts (hover still has them).
MAX_CELL_LABEL_CLASSES = 20

PLOTLY_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "showLink": False,
    "modeBarButtonsToRemove": ["sendDataToCloud", "select2d", "lasso2d"],
}
CHART_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


# --------------------------------------------------------------------------- building blocks


def bar_trace(name: str, x: list, entries: list[dict], colour: str, pattern: str, legend_rank: int) -> dict:
    """One bar series with asymmetric 95% CI error bars; hover shows value and CI."""
    values, upper, lower, custom = [], [], [], []
    for entry in entries:
        accuracy = finite(entry["accuracy"])
        low, high = ci(entry)
        values.append(rounded(accuracy))
        upper.append(rounded(high - accuracy) if None not in (high, accuracy) else None)
        lower.append(rounded(accuracy - low) if None not in (low, accuracy) else None)
        custom.append([rounded(low), rounded(high), entry.get("correct"), entry.get("n")])
    return {
        "type": "bar", "name": plotly_text(name), "x": x, "y": values,
        "legendrank": legend_rank,
        "marker": {"color": colour, "line": {"color": "#333333", "width": 0.5},
                   # overlay: the series colour stays the fill and the pattern is drawn on top.
                   "pattern": {"shape": pattern, "fillmode": "overlay", "fgcolor": "#333333", "solidity": 0.3}},
        "error_y": {"type": "data", "symmetric": False, "array": upper, "arrayminus": lower,
                    "color": "#333333", "thickness": 1, "width": 2},
        "customdata": custom,
        "hovertemplate": ("%{x}: %{y:.1%} (%{customdata[2]} of %{customdata[3]})"
                          "<br>95% CI %{customdata[0]:.1%} to %{customdata[1]:.1%}<extra>%{fullData.name}</extra>"),
    }


def category_axis(labels: list[str], worst_position: int | None, title: str) -> dict:
    # Angle the labels when they would collide (long class names or many classes).
    angle = -35 if labels_crowd([html.unescape(label) for label in labels], 1100) else 0
    ticktext = [f"<b>{label}</b><br>▲ worst" if i == worst_position else label for i, label in enumerate(labels)]
    return {"type": "category", "categoryorder": "array", "categoryarray": labels,
            "tickmode": "array", "tickvals": labels, "ticktext": ticktext,
            "tickangle": angle, "title": {"text": title}, "automargin": True}


def labels_crowd(labels: list[str], width_px: int) -> bool:
    """Would these tick labels overlap side by side (about 7 px per character)?"""
    return max(len(label) for label in labels) * 7 + 12 > width_px / max(1, len(labels))


def worst_band(position: int | None) -> list[dict]:
    if position is None:
        return []
    return [{"type": "rect", "xref": "x", "yref": "paper", "x0": position - 0.5, "x1": position + 0.5,
             "y0": 0, "y1": 1, "fillcolor": "rgba(0,0,0,0.07)", "line": {"width": 0}, "layer": "below"}]


def base_layout(height: int) -> dict:
    return {"font": {"family": CHART_FONT, "size": 13, "color": "#1a1a1a"},
            "height": height, "autosize": True,
            "margin": {"l": 64, "r": 24, "t": 48, "b": 64},
            "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
            "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
            "hoverlabel": {"namelength": -1}}


def accuracy_axis() -> dict:
    return {"title": {"text": "accuracy (error bars: 95% CI)"}, "tickformat": ".0%", "range": [0, 1.05],
            "gridcolor": "#dddddd", "zeroline": True, "zerolinecolor": "#888888"}


def series_style(key: str, attack_position: int) -> tuple[str, str]:
    if key == CLEAN_KEY:
        return CLEAN_COLOUR, ""
    if key == ENSEMBLE_KEY:
        return ENSEMBLE_COLOUR, ""
    return OKABE_ITO[attack_position % len(OKABE_ITO)], BAR_PATTERNS[attack_position % len(BAR_PATTERNS)]


# --------------------------------------------------------------------------- charts


def per_class_figure(records: dict, classes: list[str], order: list[int], worst_name: str | None) -> dict:
    """Grouped bars: one series per attack, classes least robust first, worst class banded."""
    labels = [plotly_text(classes[i]) for i in order]
    worst_position = next((p for p, i in enumerate(order) if classes[i] == worst_name), None)
    traces = []
    attack_position = 0
    for rank, (name, record) in enumerate(records.items()):
        colour, pattern = series_style(name, attack_position)
        if name not in (CLEAN_KEY, ENSEMBLE_KEY):
            attack_position += 1
        traces.append(bar_trace(name if name != ENSEMBLE_KEY else "ensemble", labels,
                                [record["per_class"][i] for i in order], colour, pattern, rank))
    layout = base_layout(440)
    layout.update({"barmode": "group", "bargap": 0.25, "bargroupgap": 0.05,
                   "xaxis": category_axis(labels, worst_position, "class (least robust first)"),
                   "yaxis": accuracy_axis(), "shapes": worst_band(worst_position)})
    return {"data": traces, "layout": layout}


def flow_heatmap(classes: list[str], matrix: list[list[int]], fooled: list[int]) -> dict:
    """True class x predicted class after the attack; hover adds each cell's share of
    its row's fooled images (`fooled`: the off-diagonal row sums)."""
    num_classes = len(classes)
    labels = [plotly_text(c) for c in classes]
    shares = [[rounded(count / row_total if row_total else 0.0, 4) for count in row]
              for row, row_total in zip(matrix, fooled)]
    trace = {"type": "heatmap", "z": matrix, "x": labels, "y": labels, "customdata": shares,
             "colorscale": "Viridis", "zmin": 0, "xgap": 1, "ygap": 1,
             "colorbar": {"title": {"text": "images"}, "thickness": 14},
             "hovertemplate": ("true %{y} → predicted %{x}: %{z} images"
                               "<br>(%{customdata:.0%} of this class's fooled images)<extra></extra>")}
    if num_classes <= MAX_CELL_LABEL_CLASSES:
        trace["texttemplate"] = "%{z}"
    rotated = labels_crowd(classes, 520)
    # Angled tick labels need room below the cells, about 5 px per character.
    side = 300 + 28 * num_classes + (5 * max(len(c) for c in classes) if rotated else 0)
    layout = base_layout(min(side, 1000))
    layout.update({
        "margin": {"l": 110, "r": 24, "t": 24, "b": 110},
        "xaxis": {"type": "category", "title": {"text": "predicted class (after attack)"},
                  "tickangle": -45 if rotated else 0, "automargin": True},
        "yaxis": {"type": "category", "title": {"text": "true class"}, "autorange": "reversed",
                  "automargin": True},
    })
    return {"data": [trace], "layout": layout}


def comparison_figure(classes: list[str], order: list[int], before_record: dict, after_record: dict,
                      worst_after: str | None) -> dict:
    """Before/after bars per class under the compared attack, least robust (after) first."""
    labels = [plotly_text(classes[i]) for i in order]
    worst_position = next((p for p, i in enumerate(order) if classes[i] == worst_after), None)
    traces = [
        bar_trace("before", labels, [before_record["per_class"][i] for i in order], CLEAN_COLOUR, "/", 0),
        bar_trace("after", labels, [after_record["per_class"][i] for i in order], OKABE_ITO[3], "", 1),
    ]
    layout = base_layout(420)
    layout.update({"barmode": "group", "bargap": 0.3,
                   "xaxis": category_axis(labels, worst_position, "class (least robust after first)"),
                   "yaxis": accuracy_axis(), "shapes": worst_band(worst_position)})
    return {"data": traces, "layout": layout}


def training_curves_figure(columns: list[dict], epochs: list, curves_rows: list[dict]) -> dict:
    """One line per recorded curve: accuracies on the left axis, losses on the right."""
    traces = []
    for position, column in enumerate(columns):
        on_loss_axis = not column["is_fraction"]
        traces.append({
            "type": "scatter", "mode": "lines+markers", "name": plotly_text(column["label"]),
            "x": epochs, "y": [rounded(curve.get(column["key"])) for curve in curves_rows],
            "yaxis": "y2" if on_loss_axis else "y",
            "line": {"color": OKABE_ITO[position % len(OKABE_ITO)],
                     "dash": LINE_DASHES[position % len(LINE_DASHES)], "width": 2},
            "marker": {"symbol": LINE_SYMBOLS[position % len(LINE_SYMBOLS)], "size": 7},
            "hovertemplate": ("epoch %{x}: %{y:.4f}" if on_loss_axis else "epoch %{x}: %{y:.1%}")
            + "<extra>%{fullData.name}</extra>",
        })
    layout = base_layout(400)
    layout.update({
        "xaxis": {"title": {"text": "epoch"}, "dtick": 1 if len(epochs) <= 20 else None, "gridcolor": "#eeeeee"},
        "yaxis": {"title": {"text": "validation accuracy"}, "tickformat": ".0%", "gridcolor": "#dddddd"},
        "yaxis2": {"title": {"text": "loss"}, "overlaying": "y", "side": "right", "showgrid": False,
                   "tickformat": ".3~g"},
        "margin": {"l": 64, "r": 64, "t": 80, "b": 56},
    })
    if layout["xaxis"]["dtick"] is None:
        del layout["xaxis"]["dtick"]
    return {"data": traces, "layout": layout}


def trajectory_figure(classes: list[str], key: str, per_epoch: list[list], bounds: list | None = None) -> dict:
    """One line per class: a per-class training quantity (`key`) over the epochs; `bounds`
    (a control's [low, high], e.g. ABSLD's temperature bounds) set the axis and are drawn."""
    epochs = list(range(1, len(per_epoch) + 1))
    traces = []
    for index, name in enumerate(classes):
        traces.append({
            "type": "scatter", "mode": "lines+markers", "name": plotly_text(name),
            "x": epochs, "y": [rounded(row[index]) for row in per_epoch],
            "line": {"color": OKABE_ITO[index % len(OKABE_ITO)],
                     "dash": LINE_DASHES[(index // len(OKABE_ITO)) % len(LINE_DASHES)], "width": 1.5},
            "marker": {"symbol": LINE_SYMBOLS[index % len(LINE_SYMBOLS)], "size": 5},
            "hovertemplate": "epoch %{x}: %{y:.4f}<extra>%{fullData.name}</extra>",
        })
    layout = base_layout(380)
    layout.update({"xaxis": {"title": {"text": "epoch"}, "gridcolor": "#eeeeee", "tickformat": "d",
                             **({"dtick": 1} if len(epochs) <= 20 else {})},
                   "yaxis": {"title": {"text": key}, "gridcolor": "#dddddd"},
                   "legend": {"orientation": "v", "x": 1.02, "y": 1},
                   "margin": {"l": 64, "r": 24, "t": 24, "b": 56},
                   # More than a few overlapping lines are unreadable: one small panel per class.
                   "small_multiples": len(classes) > 4})
    if bounds is not None:
        layout["yaxis"]["range"] = [bounds[0], bounds[1]]
        layout["bounds"] = [bounds[0], bounds[1]]
    return {"data": traces, "layout": layout}


def _sorted_accuracy_traces(entries: list[dict], classes: list[str], order: list[int], label: str,
                            colour: str, band_rgba: str, dash: str = "solid") -> list[dict]:
    """A sorted accuracy line (x = rank in `order`) with its 95% Wilson CI as a band."""
    ranks = list(range(1, len(order) + 1))
    values, lower, upper, names = [], [], [], []
    for index in order:
        low, high = ci(entries[index])
        values.append(rounded(finite(entries[index]["accuracy"])))
        lower.append(rounded(low))
        upper.append(rounded(high))
        names.append([plotly_text(classes[index]), entries[index].get("correct"), entries[index].get("n")])
    name = plotly_text(label)
    return [
        {"type": "scatter", "mode": "lines", "name": f"{name}: 95% CI (upper)", "x": ranks, "y": upper,
         "line": {"width": 0, "color": colour}, "hoverinfo": "skip", "showlegend": False},
        {"type": "scatter", "mode": "lines", "name": f"{name}: 95% CI", "x": ranks, "y": lower,
         "line": {"width": 0, "color": colour}, "fill": "tonexty", "fillcolor": band_rgba,
         "hoverinfo": "skip"},
        {"type": "scatter", "mode": "lines", "name": name, "x": ranks, "y": values,
         "line": {"color": colour, "width": 2, "dash": dash}, "customdata": names,
         "hovertemplate": ("rank %{x}: %{customdata[0]} %{y:.1%} (%{customdata[1]} of %{customdata[2]})"
                           "<extra>%{fullData.name}</extra>")},
    ]


def _rank_layout(count: int, worst_k: int) -> dict:
    layout = base_layout(440)
    layout.update({
        "xaxis": {"title": {"text": "class rank (least robust first)"}, "range": [0.5, count + 0.5],
                  "gridcolor": "#eeeeee", "zeroline": False},
        "yaxis": {**accuracy_axis(), "title": {"text": "accuracy (band: 95% CI)"}},
        "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": worst_k + 0.5, "x1": worst_k + 0.5,
                    "y0": 0, "y1": 1, "line": {"color": "#333333", "width": 1, "dash": "dash"}}],
        "annotations": [{"xref": "x", "yref": "paper", "x": worst_k + 0.5, "y": 1, "xanchor": "left",
                         "yanchor": "bottom", "showarrow": False, "text": f"worst {worst_k} (10%)"}],
    })
    return layout


def accuracy_curve_figure(entries: list[dict], classes: list[str], order: list[int], worst_k: int,
                          label: str) -> dict:
    """Many classes: accuracy per class sorted low to high (x = rank), the 95% Wilson CI as
    a shaded band, and a marker line after the worst `worst_k` classes (the worst 10%)."""
    traces = _sorted_accuracy_traces(entries, classes, order, label, OKABE_ITO[3], "rgba(0,114,178,0.2)")
    return {"data": traces, "layout": _rank_layout(len(order), worst_k)}


def comparison_curve_figure(classes: list[str], before_record: dict, after_record: dict, worst_k: int) -> dict:
    """Many classes, before vs after: each audit's class accuracies sorted low to high on
    its own (the two distributions; a class's rank can differ between them), with bands."""
    def own_order(record: dict) -> list[int]:
        accuracy = [finite(e["accuracy"]) for e in record["per_class"]]
        return sorted((i for i in range(len(classes)) if accuracy[i] is not None), key=lambda i: accuracy[i])

    traces = (_sorted_accuracy_traces(before_record["per_class"], classes, own_order(before_record), "before",
                                      CLEAN_COLOUR, "rgba(153,153,153,0.25)", dash="dash")
              + _sorted_accuracy_traces(after_record["per_class"], classes, own_order(after_record), "after",
                                        OKABE_ITO[3], "rgba(0,114,178,0.2)"))
    return {"data": traces, "layout": _rank_layout(len(classes), worst_k)}
