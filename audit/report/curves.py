"""Per-class robustness curves in the report: robust accuracy as a function of eps (issue 18).

A minimal-norm attack (fmn) writes `results["curves"][attack]` (docs/results-schema.md,
"curves"): per class, robust accuracy at every eps of an ascending grid up to a cap,
with 95% Wilson intervals, and the median of the class's minimal perturbation norms.
This module turns that block into what the page shows, one section per attack:

- one step-shaped figure of every class's curve (`fig-curves-<attack>`), the worst
  classes by median minimal perturbation highlighted with CI bands, the overall curve
  with its band and a marker at the audited eps; above MAX_ALL_CURVES classes only the
  overall curve, the worst MANY_WORST and the best class are drawn (the table has all);
- a sortable per-class table (median minimal perturbation, never-fooled count, clean
  accuracy, accuracy at the audited eps) with two rank columns: by median minimal
  perturbation and at the audited eps under the fixed-eps headline, plus one sentence
  on how far the two rankings agree (Spearman's rho, "k of the worst 3");
- the reliability flags that concern curves, linked to the checks section.

The comparison report overlays before/after curves (`curves_comparison`,
`fig-curves-compare-<attack>`). Under L-inf the x axis is in units of 1/255 (ticks
"k/255"); under L2/L1 it is the plain radius. Malformed curves are refused by
`validate_curves` with one line, before anything is rendered.
"""

from __future__ import annotations

import json
import math
import re

from robaudit.audit.report.figures import OKABE_ITO, LINE_DASHES, base_layout, accuracy_axis
from robaudit.audit.report.formatting import (
    NORM_LABELS, eps_as_fraction_of_255, finite, pct, plotly_text, rounded,
)
from robaudit.audit.report.records import CLEAN_KEY, attack_label, headline_key, records, robustness_order
from robaudit.errors import UserError

# Up to this many classes every class's curve is drawn (the worst HIGHLIGHT highlighted);
# above it only the overall curve, the worst MANY_WORST and the most robust class.
MAX_ALL_CURVES = 20
HIGHLIGHT = 3
MANY_WORST = 5
# Above this many classes the table shows the worst RANKING_HEAD rows, the rest collapsed.
MAX_FULL_TABLE = 100
RANKING_HEAD = 10
CURVE_CHECK_IDS = ("curve_not_reaching_zero", "curve_below_fixed_eps", "curve_far_above_fixed_eps",
                   "pgd_loss_not_converged")
NORMS = ("linf", "l2", "l1")
OTHER_COLOUR = "#b8b8b8"
# The after model's worst classes in the before/after chart: vermillion, reddish purple, orange
# (blue is the overall "after" curve; yellow is too faint for a line on white).
COMPARE_COLOURS = [OKABE_ITO[4], OKABE_ITO[5], OKABE_ITO[0]]
OVERALL_COLOUR = "#000000"
# Values drawn in the charts: 4 decimals is 0.01 percentage points, far below what a chart shows.
CHART_DIGITS = 4


# --------------------------------------------------------------------------- validation


def _numbers(values, length: int, allow_null: bool) -> bool:
    return isinstance(values, list) and len(values) == length and all(
        (v is None and allow_null) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)


def _curve_problem(curve, length: int) -> str | None:
    if not isinstance(curve, dict):
        return " must be an object"
    for key in ("accuracy", "low", "high"):
        if not _numbers(curve.get(key), length, allow_null=True):
            return f".{key} must list {length} numbers or nulls (one per eps)"
    return None


def curves_problem(block, classes: list[str]) -> str | None:
    """What is wrong with one `curves.<attack>` block (a suffix for its name), or None."""
    if not isinstance(block, dict):
        return " must be an object"
    if block.get("norm") not in NORMS:
        return f".norm is {block.get('norm')!r}; expected one of {', '.join(NORMS)}"
    eps = block.get("eps")
    if not _numbers(eps, len(eps) if isinstance(eps, list) else -1, allow_null=False) or len(eps) < 2:
        return ".eps must be a list of at least 2 numbers"
    if eps[0] != 0 or any(b <= a for a, b in zip(eps, eps[1:])):
        return ".eps must start at 0 and increase strictly"
    if finite(block.get("audited_eps")) is None:
        return ".audited_eps must be a number"
    num_classes, length = len(classes), len(eps)
    per_class = block.get("per_class")
    if not isinstance(per_class, list) or len(per_class) != num_classes:
        return f".per_class must list {num_classes} classes (one per dataset.classes entry)"
    for position, curve in enumerate(per_class):
        problem = _curve_problem(curve, length)
        if problem:
            return f".per_class[{position}]{problem}"
        if curve.get("class", classes[position]) != classes[position]:
            return (f".per_class[{position}] is {curve.get('class')!r} but dataset.classes has "
                    f"{classes[position]!r} there")
    problem = _curve_problem(block.get("overall"), length)
    if problem:
        return f".overall{problem}"
    if not _numbers(block.get("median_eps"), num_classes, allow_null=True):
        return f".median_eps must list {num_classes} numbers or nulls"
    not_found = block.get("not_found")
    if not (isinstance(not_found, list) and len(not_found) == num_classes
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in not_found)):
        return f".not_found must list {num_classes} non-negative integers"
    return None


def validate_curves(results: dict, *, source: str = "results") -> None:
    """Refuse malformed `curves` with one line naming the first problem (absent curves are fine)."""
    curves = results.get("curves")
    if curves is None:
        return
    if not isinstance(curves, dict):
        raise UserError(f"{source}: curves must be an object (attack name -> curves) or absent")
    for name, block in curves.items():
        problem = curves_problem(block, results["dataset"]["classes"])
        if problem:
            raise UserError(f"{source}: curves.{name}{problem}")


# --------------------------------------------------------------------------- reading a curves block


def slug(name: str) -> str:
    """An attack name as it can sit in an element id (ids must not depend on escaping)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-") or "attack"


def audited_index(eps: list[float], audited_eps: float) -> int:
    """The grid position of the audited eps: the schema puts it on the grid exactly; for a
    grid without it, the largest eps below it (the curve is a step function, constant there)."""
    below = [i for i, e in enumerate(eps) if e <= audited_eps * (1 + 1e-9) + 1e-12]
    return below[-1] if below else 0


def median_order(block: dict) -> list[int]:
    """Class indices by median minimal perturbation, least robust first: null medians (more
    than half never fooled) after every finite one, classes without images last; ties by
    accuracy at the audited eps, then dataset order."""
    at = audited_index(block["eps"], block["audited_eps"])

    def sort_key(index: int):
        curve = block["per_class"][index]
        median = finite(block["median_eps"][index])
        empty = not curve.get("n")
        accuracy = finite(curve["accuracy"][at])
        return (empty, median is None, median or 0.0, accuracy is None, accuracy or 0.0, index)

    return sorted(range(len(block["per_class"])), key=sort_key)


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks with ties given their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when undefined."""
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mean = (len(x) + 1) / 2
    sxy = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mean) ** 2 for a in rx), sum((b - mean) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def eps_text(value: float | None, norm: str) -> str:
    """An eps value as users quote it under this norm: k/255 for L-inf, the radius otherwise."""
    value = finite(value)
    if value is None:
        return "—"
    if norm == "linf":
        return eps_as_fraction_of_255(value)
    return f"{value:.3g}"


def _x_scale(norm: str) -> float:
    # Under L-inf the chart's x is eps in units of 1/255, so ticks and hover read "k/255".
    return 255.0 if norm == "linf" else 1.0


# --------------------------------------------------------------------------- figures


def eps_axis(norm: str, cap: float) -> dict:
    """The x axis in the norm's units: k/255 ticks under L-inf, plain radii under L2/L1."""
    label = NORM_LABELS.get(norm, norm)
    if norm != "linf":
        return {"title": {"text": f"ε ({label} radius, [0, 1] pixels)"}, "range": [0, rounded(cap * 1.02)],
                "gridcolor": "#eeeeee", "zeroline": False, "tickformat": ".3~g"}
    top = cap * 255
    step = 1
    while top / step > 8:
        step *= 2
    ticks = list(range(0, int(math.floor(top + 1e-6)) + 1, step))
    return {"title": {"text": "ε (L∞, in 1/255 of the pixel range)"}, "range": [0, rounded(top * 1.02)],
            "tickmode": "array", "tickvals": ticks, "ticktext": [f"{k}/255" if k else "0" for k in ticks],
            "gridcolor": "#eeeeee", "zeroline": False}


def _line(name: str, xs: list, values: list, colour: str, width: float, dash: str = "solid",
          legendgroup: str | None = None, showlegend: bool = True) -> dict:
    trace = {"type": "scatter", "mode": "lines", "name": plotly_text(name), "x": xs,
             "y": [rounded(v, CHART_DIGITS) for v in values], "line": {"color": colour, "width": width,
                                                                       "dash": dash, "shape": "hv"},
             "showlegend": showlegend,
             "hovertemplate": "ε %{x:.3~g}: %{y:.1%}<extra>%{fullData.name}</extra>"}
    if legendgroup:
        trace["legendgroup"] = legendgroup
    return trace


def _band(name: str, xs: list, curve: dict, fill: str) -> list[dict]:
    """A 95% CI band: an invisible upper edge, then the lower edge filled up to it."""
    upper = {"type": "scatter", "mode": "lines", "name": plotly_text(f"{name} 95% CI (upper)"), "x": xs,
             "y": [rounded(v, CHART_DIGITS) for v in curve["high"]],
             "line": {"width": 0, "shape": "hv"}, "hoverinfo": "skip", "showlegend": False}
    lower = {**upper, "name": plotly_text(f"{name} 95% CI"), "y": [rounded(v, CHART_DIGITS) for v in curve["low"]],
             "fill": "tonexty", "fillcolor": fill}
    return [upper, lower]


def _fill(colour: str, alpha: float = 0.18) -> str:
    red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def _audited_marker(x: float, text: str) -> tuple[list[dict], list[dict]]:
    shape = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
             "line": {"color": "#333333", "width": 1, "dash": "dash"}}
    note = {"xref": "x", "yref": "paper", "x": x, "y": 1, "xanchor": "left", "yanchor": "bottom",
            "showarrow": False, "text": plotly_text(f"audited ε = {text}")}
    return [shape], [note]


def curves_figure(block: dict, classes: list[str], order: list[int]) -> dict:
    """Every class's robust-accuracy step curve (or overall + worst + best above MAX_ALL_CURVES),
    the worst highlighted with CI bands, the overall curve and its band, the audited-eps marker."""
    norm, scale = block["norm"], _x_scale(block["norm"])
    xs = [rounded(e * scale, CHART_DIGITS) for e in block["eps"]]
    num_classes = len(classes)
    drawn = [i for i in order if block["per_class"][i].get("n")]
    reduced = num_classes > MAX_ALL_CURVES
    if reduced:   # the worst MANY_WORST and the most robust class
        coloured, others = drawn[:MANY_WORST], drawn[MANY_WORST:][-1:]
    else:
        coloured, others = drawn[:HIGHLIGHT], drawn[HIGHLIGHT:]
    traces = []
    if reduced and others:
        traces.append(_line(f"most robust: {classes[others[0]]}", xs, block["per_class"][others[0]]["accuracy"],
                            "#777777", 1.5, "dot"))
    elif others:
        # One legend entry for the grey lines (toggles them all); each line keeps its class name on hover.
        traces.append({"type": "scatter", "mode": "lines", "name": "other classes", "x": [None], "y": [None],
                       "line": {"color": OTHER_COLOUR, "width": 1, "shape": "hv"}, "legendgroup": "others",
                       "hoverinfo": "skip"})
        traces.extend(_line(classes[index], xs, block["per_class"][index]["accuracy"], OTHER_COLOUR, 1,
                            legendgroup="others", showlegend=False) for index in others)
    # Bands for the worst HIGHLIGHT classes; in the reduced chart (many classes, few images each,
    # wide intervals that would cover one another) for the worst class only.
    banded = 1 if reduced else HIGHLIGHT
    for rank, index in enumerate(coloured):
        colour = OKABE_ITO[rank % len(OKABE_ITO)]
        if rank < banded:
            traces.extend(_band(classes[index], xs, block["per_class"][index], _fill(colour)))
        traces.append(_line(f"#{rank + 1} {classes[index]}", xs, block["per_class"][index]["accuracy"], colour,
                            2.5, LINE_DASHES[rank % len(LINE_DASHES)]))
    traces.extend(_band("all classes", xs, block["overall"], "rgba(0,0,0,0.12)"))
    traces.append(_line("all classes", xs, block["overall"]["accuracy"], OVERALL_COLOUR, 3))
    shapes, notes = _audited_marker(rounded(block["audited_eps"] * scale, CHART_DIGITS),
                                    eps_text(block["audited_eps"], norm))
    layout = base_layout(460)
    layout.update({"xaxis": eps_axis(norm, block["eps"][-1]),
                   "yaxis": {**accuracy_axis(), "title": {"text": "robust accuracy (bands: 95% CI)"}},
                   "shapes": shapes, "annotations": notes,
                   # "normal": plotly would reverse the legend of a chart with filled traces.
                   "legend": {"orientation": "v", "x": 1.02, "y": 1, "traceorder": "normal"},
                   "margin": {"l": 64, "r": 24, "t": 40, "b": 64}})
    return {"data": traces, "layout": layout}


def compare_figure(after_block: dict, before_block: dict, classes: list[str], worst: list[int]) -> dict:
    """Before (dashed) and after (solid) step curves: overall with bands, and the after model's
    worst classes, one colour per class."""
    norm, scale = after_block["norm"], _x_scale(after_block["norm"])
    after_x = [rounded(e * scale, CHART_DIGITS) for e in after_block["eps"]]
    before_x = [rounded(e * scale, CHART_DIGITS) for e in before_block["eps"]]
    traces = (_band("all classes, before", before_x, before_block["overall"], "rgba(153,153,153,0.18)")
              + [_line("all classes, before", before_x, before_block["overall"]["accuracy"], "#777777", 2.5,
                       "dash")]
              + _band("all classes, after", after_x, after_block["overall"], _fill(OKABE_ITO[3]))
              + [_line("all classes, after", after_x, after_block["overall"]["accuracy"], OKABE_ITO[3], 3)])
    for rank, index in enumerate(worst):
        colour = COMPARE_COLOURS[rank % len(COMPARE_COLOURS)]
        traces.append(_line(f"{classes[index]}, before", before_x, before_block["per_class"][index]["accuracy"],
                            colour, 1.5, "dash", legendgroup=f"class{index}"))
        traces.append(_line(f"{classes[index]}, after", after_x, after_block["per_class"][index]["accuracy"],
                            colour, 2.5, "solid", legendgroup=f"class{index}"))
    shapes, notes = _audited_marker(rounded(after_block["audited_eps"] * scale, CHART_DIGITS),
                                    eps_text(after_block["audited_eps"], norm))
    layout = base_layout(440)
    layout.update({"xaxis": eps_axis(norm, max(after_block["eps"][-1], before_block["eps"][-1])),
                   "yaxis": {**accuracy_axis(), "title": {"text": "robust accuracy (bands: 95% CI)"}},
                   "shapes": shapes, "annotations": notes,
                   "legend": {"orientation": "v", "x": 1.02, "y": 1, "traceorder": "normal"},
                   "margin": {"l": 64, "r": 24, "t": 40, "b": 64}})
    return {"data": traces, "layout": layout}


# --------------------------------------------------------------------------- the section


def _median_cell(block: dict, index: int) -> dict:
    """The median minimal perturbation as shown: its value, "not reached" (more than half of
    the class never fooled, so no finite median), or "—" for a class without images."""
    norm, cap = block["norm"], block["eps"][-1]
    n = block["per_class"][index].get("n")
    median = finite(block["median_eps"][index])
    not_found = block["not_found"][index]
    if median is not None:
        beyond = median > cap * (1 + 1e-9)
        return {"value": median, "text": eps_text(median, norm), "sort": median, "reached": True,
                "detail": f"beyond the curve's cap {eps_text(cap, norm)}" if beyond else ""}
    if not n:
        return {"value": None, "text": "—", "sort": None, "reached": False, "detail": "no images"}
    # Sorted after every finite median: more than half of the class survived every perturbation tried.
    return {"value": None, "text": "not reached", "sort": 1e9, "reached": False,
            "detail": f"median > {eps_text(cap, norm)}: {not_found} of {n} never fooled"}


def _fixed_eps_ranking(results: dict, block: dict) -> tuple[str, list[float | None], dict[int, int]]:
    """Label, per-class accuracy and rank (1 = least robust) at the audited eps under the
    fixed-eps headline; the curve's own accuracy there when no fixed-eps attack ran."""
    key = headline_key(results)
    if key == CLEAN_KEY:
        at = audited_index(block["eps"], block["audited_eps"])
        accuracy = [finite(curve["accuracy"][at]) for curve in block["per_class"]]
        order = sorted(range(len(accuracy)), key=lambda i: (accuracy[i] is None, accuracy[i] or 0.0, i))
        return "this curve (no fixed-eps attack ran)", accuracy, {i: r for r, i in enumerate(order, start=1)}
    accuracy = [finite(entry["accuracy"]) for entry in records(results)[key]["per_class"]]
    order = robustness_order(results, key)
    return attack_label(results, key), accuracy, {i: r for r, i in enumerate(order, start=1)}


def _agreement(block: dict, classes: list[str], by_median: list[int], fixed_rank: dict[int, int],
               fixed_accuracy: list, fixed_label: str, audited: str) -> dict:
    """How far the ranking by median minimal perturbation and the one at the audited eps agree."""
    scored = [i for i in by_median if block["per_class"][i].get("n") and fixed_accuracy[i] is not None]
    medians = [finite(block["median_eps"][i]) for i in scored]
    rho = spearman([math.inf if m is None else m for m in medians], [fixed_accuracy[i] for i in scored])
    k = min(HIGHLIGHT, len(scored))
    worst_median = scored[:k]
    worst_fixed = sorted(scored, key=lambda i: fixed_rank[i])[:k]
    shared = len(set(worst_median) & set(worst_fixed))
    rho_text = "" if rho is None else f"Spearman's ρ between the two rankings is {rho:.2f} over {len(scored)} classes. "
    if shared == k:
        sentence = (f"The two rankings agree on the {k} least robust classes "
                    f"({', '.join(classes[i] for i in worst_median)}). " + rho_text).strip()
    else:
        sentence = (f"The two rankings disagree: {shared} of the {k} least robust classes by median minimal "
                    f"perturbation ({', '.join(classes[i] for i in worst_median)}) are among the {k} least robust "
                    f"at ε = {audited} under {fixed_label} ({', '.join(classes[i] for i in worst_fixed)}). "
                    + rho_text + "A class can break at small perturbations yet hold at the audited ε, or the "
                    "reverse; its curve shows where.")
    return {"rho": rho, "shared": shared, "k": k, "agree": shared == k, "sentence": sentence}


def _rows(block: dict, classes: list[str], by_median: list[int], fixed_rank: dict[int, int],
          fixed_accuracy: list) -> list[dict]:
    at = audited_index(block["eps"], block["audited_eps"])
    rows = []
    for rank, index in enumerate(by_median, start=1):
        curve = block["per_class"][index]
        rows.append({
            "rank": rank, "index": index, "class": classes[index], "n": curve.get("n"),
            "median": _median_cell(block, index), "not_found": block["not_found"][index],
            "clean": finite(curve["accuracy"][0]), "clean_ci": (finite(curve["low"][0]), finite(curve["high"][0])),
            "at_eps": finite(curve["accuracy"][at]), "at_eps_ci": (finite(curve["low"][at]), finite(curve["high"][at])),
            "fixed_rank": fixed_rank.get(index), "fixed_accuracy": fixed_accuracy[index],
            "is_highlighted": rank <= HIGHLIGHT and bool(curve.get("n")),
        })
    return rows


def _curve_checks(results: dict) -> list[dict]:
    return [{"id": str(check.get("id")), "severity": str(check.get("severity") or "info")}
            for check in results["checks"] if check.get("id") in CURVE_CHECK_IDS]


def curve_section(results: dict, name: str, block: dict, figures: dict, anchor: str) -> dict:
    """One attack's curves: the figure (added to `figures`), the table rows and the sentences."""
    classes = results["dataset"]["classes"]
    norm = block["norm"]
    by_median = median_order(block)
    fixed_label, fixed_accuracy, fixed_rank = _fixed_eps_ranking(results, block)
    audited = eps_text(block["audited_eps"], norm)
    figure_id = f"fig-{anchor}"
    figures[figure_id] = curves_figure(block, classes, by_median)
    rows = _rows(block, classes, by_median, fixed_rank, fixed_accuracy)
    at = audited_index(block["eps"], block["audited_eps"])
    overall = block["overall"]["accuracy"]
    worst = [row for row in rows if row["is_highlighted"]]
    summary = (f"Over all classes, robust accuracy falls from {pct(overall[0])} without perturbation to "
               f"{pct(overall[at])} at the audited ε = {audited} and {pct(overall[-1])} at the cap "
               f"ε = {eps_text(block['eps'][-1], norm)}. Least robust by median minimal perturbation: "
               + "; ".join(f"{row['class']} ({row['median']['text']})" for row in worst) + ".")
    num_classes = len(classes)
    return {
        "attack": name, "anchor": anchor, "heading": f"Robustness curves ({name})",
        "description": str(block.get("description") or ""), "norm": norm,
        "norm_label": NORM_LABELS.get(norm, norm), "audited": audited,
        "cap": eps_text(block["eps"][-1], norm), "grid_points": len(block["eps"]),
        "figure_id": figure_id, "table_id": f"table-{anchor}", "head_table_id": f"table-{anchor}-worst",
        "summary": summary, "highlighted": [row["class"] for row in worst],
        "reduced_figure": num_classes > MAX_ALL_CURVES, "collapsed": num_classes > MAX_FULL_TABLE,
        "num_classes": num_classes, "many_worst": MANY_WORST, "highlight": HIGHLIGHT,
        "rows": rows, "head_rows": rows[:RANKING_HEAD], "head_count": min(RANKING_HEAD, num_classes),
        "fixed_label": fixed_label,
        "agreement": _agreement(block, classes, by_median, fixed_rank, fixed_accuracy, fixed_label, audited),
        "checks": _curve_checks(results),
    }


def _anchors(names: list[str]) -> dict[str, str]:
    anchors, used = {}, set()
    for name in names:
        anchor = base = f"curves-{slug(name)}"
        suffix = 2
        while anchor in used:
            anchor, suffix = f"{base}-{suffix}", suffix + 1
        used.add(anchor)
        anchors[name] = anchor
    return anchors


def curves_sections(results: dict, figures: dict) -> list[dict]:
    """One section per attack in `results["curves"]` (empty when the results have none)."""
    curves = results.get("curves") or {}
    anchors = _anchors(list(curves))
    return [curve_section(results, name, block, figures, anchors[name]) for name, block in curves.items()]


# --------------------------------------------------------------------------- before / after


def curves_comparison(after: dict, before: dict, figures: dict) -> list[dict]:
    """Per attack with curves on either side: a before/after overlay when both have curves
    under the same norm, else one line saying why there is none."""
    after_curves, before_curves = after.get("curves") or {}, before.get("curves") or {}
    names = list(after_curves) + [name for name in before_curves if name not in after_curves]
    anchors = _anchors(names)
    classes = after["dataset"]["classes"]
    items = []
    for name in names:
        a_block, b_block = after_curves.get(name), before_curves.get(name)
        item = {"attack": name, "anchor": f"compare-{anchors[name]}", "figure_id": None,
                "table_id": f"table-compare-{anchors[name]}", "note": "", "sentence": "", "rows": []}
        items.append(item)
        if a_block is None or b_block is None:
            side = "after (this audit)" if b_block is None else "before (the baseline)"
            item["note"] = f"Only the {side} results have robustness curves for {name}; there is no before/after overlay."
            continue
        if a_block["norm"] != b_block["norm"]:
            item["note"] = (f"The {name} curves use different norms (before {NORM_LABELS.get(b_block['norm'])}, "
                            f"after {NORM_LABELS.get(a_block['norm'])}); they are not overlaid.")
            continue
        worst = [i for i in median_order(a_block) if a_block["per_class"][i].get("n")][:HIGHLIGHT]
        item["figure_id"] = "fig-curves-compare-" + anchors[name][len("curves-"):]
        figures[item["figure_id"]] = compare_figure(a_block, b_block, classes, worst)
        a_at = audited_index(a_block["eps"], a_block["audited_eps"])
        b_at = audited_index(b_block["eps"], b_block["audited_eps"])
        item["sentence"] = (f"Over all classes, robust accuracy at the audited ε went from "
                            f"{pct(b_block['overall']['accuracy'][b_at])} (before, ε = "
                            f"{eps_text(b_block['audited_eps'], b_block['norm'])}) to "
                            f"{pct(a_block['overall']['accuracy'][a_at])} (after, ε = "
                            f"{eps_text(a_block['audited_eps'], a_block['norm'])}).")
        item["rows"] = [{"class": classes[i], "before": _median_cell(b_block, i), "after": _median_cell(a_block, i)}
                        for i in worst]
    return items


# --------------------------------------------------------------------------- the embedded results


# The page embeds the results JSON. Per-class curves are 3 x C x grid numbers (2 to 5 MB at
# 1000 classes and 101 eps values, by how the floats are written), more than the rest of a
# 1000-class report: above this size the embedded copy leaves out the per-class 95% bounds,
# which are the Wilson intervals of accuracy x n, and writes the accuracies to 6 decimals,
# which still tells every k/n apart for n below 500,000 (results.json keeps them in full).
EMBEDDED_CURVES_BUDGET = 1_000_000
OMITTED_NOTE = ("per_class[*].low and .high left out of the report's embedded copy and per_class[*].accuracy "
                "written to 6 decimals, to keep the page small: the bounds are the 95% Wilson intervals of "
                "accuracy x n; results.json holds them")


def embedded_results(results: dict | None) -> tuple[dict | None, bool]:
    """The results as the page embeds them, and whether curve bounds were left out."""
    curves = (results or {}).get("curves")
    if not curves:
        return results, False
    size = sum(len(json.dumps(block["per_class"], separators=(",", ":"))) for block in curves.values())
    if size <= EMBEDDED_CURVES_BUDGET:
        return results, False
    trimmed = {}
    for name, block in curves.items():
        per_class = [{**{key: value for key, value in curve.items() if key not in ("low", "high")},
                      "accuracy": [rounded(value) for value in curve["accuracy"]]}
                     for curve in block["per_class"]]
        trimmed[name] = {**block, "per_class": per_class, "omitted_in_report": OMITTED_NOTE}
    return {**results, "curves": trimmed}, True
