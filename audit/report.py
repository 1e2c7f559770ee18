"""The HTML audit report: results.json -> plain context -> one self-contained HTML file.

The flow is the one coverage.py uses for its HTML report: `build_context` turns the
results (and, in comparison mode, the baseline results) into plain dicts and lists,
and a jinja2 template renders them. The page is a pure view of the results: the same
results render to the same bytes apart from the render timestamp, because figure ids
are fixed, dict order follows the results and nothing reads the clock except
`rendered_at`.

Safety: every string that came from a user or a model (class names, paths, the
command, check messages) reaches the page only through jinja2 autoescaping, or as
JSON inside a `<script type="application/json">` with `<`, `>` and `&` written as
`\\u003c`-style escapes. Text inside plotly figures is additionally HTML-escaped,
because plotly.js interprets a small HTML subset in labels and decodes entities back
to plain text when drawing.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import html
import importlib.resources
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import jinja2
from markupsafe import Markup

from robaudit import __version__ as ROBAUDIT_VERSION
from robaudit.audit.io import write_bytes_atomic
from robaudit.errors import UserError

__all__ = ["build_context", "render_report", "render_html", "load_results", "validate_results"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "schema_version", "tool", "command", "started_at", "finished_at", "model", "dataset",
    "config", "attacks", "ensemble", "target_flow", "examples", "checks", "timing",
    "environment", "notes",
)
PER_CLASS_KEYS = ("class", "n", "correct", "accuracy", "ci95")
CLEAN_KEY = "clean"
ENSEMBLE_KEY = "ensemble"

# Okabe & Ito (2008): distinguishable with the common colour-vision deficiencies.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000"]
CLEAN_COLOUR = "#999999"
ENSEMBLE_COLOUR = "#000000"
# Bar fill patterns and line dashes, so series differ in more than colour.
BAR_PATTERNS = ["/", "\\", "x", "-", "|", "+", "."]
LINE_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
LINE_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon"]

# Above these class counts a heatmap or full matrix table stops being readable (and
# grows the file quadratically); the top-destinations table still covers every class.
MAX_HEATMAP_CLASSES = 100
MAX_MATRIX_TABLE_CLASSES = 20
MAX_CELL_LABEL_CLASSES = 20
TOP_DESTINATIONS = 3
MAX_TRAJECTORY_TABLE_EPOCHS = 10
# Deltas smaller than this (a twentieth of a percentage point) read as "unchanged".
UNCHANGED_TOLERANCE = 0.0005

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")

PLOTLY_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "showLink": False,
    "modeBarButtonsToRemove": ["sendDataToCloud", "select2d", "lasso2d"],
}
CHART_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"

TRAINING_CURVE_SHORT_LABELS = {
    "loss": "Loss", "val_clean_avg": "Clean (avg)", "val_robust_avg": "Robust (avg)",
    "val_robust_worst": "Robust (worst)",
}
TRAINING_CURVE_LABELS = {
    "loss": "Training loss",
    "val_clean_avg": "Validation clean accuracy (class average)",
    "val_robust_avg": "Validation robust accuracy (class average)",
    "val_robust_worst": "Validation robust accuracy (worst class)",
}
TRAJECTORY_LABELS = {
    "class_probabilities": "Class sampling probability of synthetic labels (FERD; more for less robust classes)",
    "tau_adv": "Teacher temperature per class on adversarial inputs (τ_adv)",
    "tau_nat": "Teacher temperature per class on clean inputs (τ_nat)",
    "class_weights": "Per-class loss weights",
}


# --------------------------------------------------------------------------- loading


def load_results(path) -> dict:
    """Read and validate a results.json; any problem becomes a one-line UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"results file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; pass the results.json file inside it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; pass a results.json written by `robaudit scan`") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "pass a results.json written by `robaudit scan`"
        ) from None
    validate_results(results, source=str(path))
    return results


def validate_results(results: Any, *, source: str = "results") -> None:
    """Check what the report relies on; raise UserError naming the first problem."""

    def fail(message: str) -> None:
        raise UserError(f"{source}: {message}")

    if not isinstance(results, dict):
        fail("expected a JSON object at the top level; is this a robaudit results.json?")
    if "schema_version" not in results:
        fail("no schema_version; is this a robaudit results.json?")
    if results["schema_version"] != SCHEMA_VERSION:
        fail(f"schema_version is {results['schema_version']!r} but this robaudit reads "
             f"{SCHEMA_VERSION}; re-run `robaudit scan` with this version")
    missing = [key for key in REQUIRED_KEYS if key not in results]
    if missing:
        fail(f"missing required keys: {', '.join(missing)}")
    for key in ("model", "dataset", "config", "attacks", "target_flow", "timing", "environment"):
        if not isinstance(results[key], dict):
            fail(f"{key} must be an object")
    for key in ("examples", "checks", "notes"):
        if not isinstance(results[key], list):
            fail(f"{key} must be a list")
    classes = results["dataset"].get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        fail("dataset.classes must be a non-empty list of class names")
    num_classes = len(classes)
    if not results["attacks"]:
        fail("attacks is empty; the scan ran no attack")
    records = dict(results["attacks"])
    if results["ensemble"] is not None:
        records[ENSEMBLE_KEY] = results["ensemble"]
    for name, record in records.items():
        where = "ensemble" if record is results["ensemble"] else f"attacks.{name}"
        if not isinstance(record, dict):
            fail(f"{where} must be an object")
        for key in ("per_class", "avg", "worst", "worst_class", "nsd"):
            if key not in record:
                fail(f"{where} has no {key}")
        per_class = record["per_class"]
        if not isinstance(per_class, list) or len(per_class) != num_classes:
            fail(f"{where}.per_class must list {num_classes} classes (one per dataset.classes entry)")
        for position, entry in enumerate(per_class):
            if not isinstance(entry, dict) or any(key not in entry for key in PER_CLASS_KEYS):
                fail(f"{where}.per_class[{position}] needs keys {', '.join(PER_CLASS_KEYS)}")
            if entry["class"] != classes[position]:
                fail(f"{where}.per_class[{position}] is {entry['class']!r} but dataset.classes has "
                     f"{classes[position]!r} there")
    for name, matrix in results["target_flow"].items():
        if (not isinstance(matrix, list) or len(matrix) != num_classes
                or not all(isinstance(row, list) and len(row) == num_classes for row in matrix)):
            fail(f"target_flow.{name} must be a {num_classes}x{num_classes} matrix")
    for position, example in enumerate(results["examples"]):
        if not isinstance(example, dict):
            fail(f"examples[{position}] must be an object")
    for position, check in enumerate(results["checks"]):
        if not isinstance(check, dict) or "message" not in check:
            fail(f"checks[{position}] needs a message")
    training = results.get("training")
    if training is not None:
        if not isinstance(training, dict):
            fail("training must be an object or null")
        for key, rows in _trajectory_sources(training):
            if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == num_classes
                                                     for r in rows):
                fail(f"training.{key} must hold one list of {num_classes} values per epoch")
        curves = training.get("curves")
        if curves is not None and (not isinstance(curves, list)
                                   or not all(isinstance(c, dict) for c in curves)):
            fail("training.curves must be a list of objects")


# --------------------------------------------------------------------------- redaction

# An absolute path inside free text: rooted at "/", "\", "~/" or a drive letter, and not
# glued to a preceding word, number or URL scheme (so "8/255" and "https://" survive).
_PATH_IN_TEXT = re.compile(
    r"(?<![\w.:/\\~-])(?:[A-Za-z]:|~)?[\\/][^\s\\/'\"<>|,;()\[\]]+(?:[\\/][^\s\\/'\"<>|,;()\[\]]*)*"
)
_FRACTION = re.compile(r"^\d+(?:\.\d+)?/\d+(?:\.\d+)?$")
REDACTED = "[redacted]"


def _basename(path: str) -> str:
    parts = [part for part in re.split(r"[\\/]", path) if part]
    return parts[-1] if parts else REDACTED


def _redact_text(text: str) -> str:
    return _PATH_IN_TEXT.sub(lambda match: _basename(match.group(0)), text)


def _redact_command(command: str) -> str:
    """Every argv token that is a path (relative ones too) becomes its basename."""

    def token(match: re.Match) -> str:
        word = match.group(0)
        prefix = ""
        if word.startswith("-") and "=" in word:
            prefix, word = word.split("=", 1)
            prefix += "="
        quote = word[0] if word[:1] in ("'", '"') and word.endswith(word[0]) and len(word) > 1 else ""
        bare = word[1:-1] if quote else word
        if ("/" in bare or "\\" in bare) and not _FRACTION.match(bare):
            bare = _basename(bare)
        return f"{prefix}{quote}{bare}{quote}"

    # A token runs to unquoted whitespace, so a quoted path with spaces stays one token.
    return re.sub(r"(?:\"[^\"]*\"|'[^']*'|\S)+", token, command)


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, list):
        return [_redact_strings(item) for item in value]
    if isinstance(value, dict):
        return {key: _redact_strings(item) for key, item in value.items()}
    return value


# Free text that may quote a path. Class names, attack blocks and example images are
# left alone: a class may legitimately be called "/m/01g317", and base64 contains "/".
_REDACTED_SECTIONS = ("model", "config", "checks", "notes", "environment", "training", "tool")


def redact_results(results: dict) -> dict:
    """A copy of `results` with filesystem paths cut to their basename.

    model.path, dataset.source and training.teacher lose their directories even when
    relative; so do command tokens that are paths; any absolute path inside free text
    (check messages, notes, adaptations, options) is cut as well.
    """
    redacted = copy.deepcopy(results)
    for section in _REDACTED_SECTIONS:
        if section in redacted:
            redacted[section] = _redact_strings(redacted[section])
    dataset = redacted.get("dataset")
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            if key != "classes":
                dataset[key] = _redact_strings(value)
    for section, key in (("model", "path"), ("dataset", "source"), ("training", "teacher")):
        holder = redacted.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and re.search(r"[\\/]", holder[key]):
            holder[key] = _basename(holder[key])
    if isinstance(redacted.get("command"), str):
        redacted["command"] = _redact_command(redacted["command"])
    return redacted


# --------------------------------------------------------------------------- small helpers


def _finite(value: Any) -> float | None:
    """A JSON-safe float: NaN, infinities and non-numbers become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (which JSON.parse rejects) with null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value


def _rounded(value: Any, digits: int = 6) -> float | None:
    value = _finite(value)
    return None if value is None else round(value, digits)


def _ci(entry: dict) -> tuple[float | None, float | None]:
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return _finite(ci[0]), _finite(ci[1])
    return None, None


def _plotly_text(text: Any) -> str:
    """Text for plotly labels: it parses a small HTML subset and decodes entities, so
    escaping &, < and > makes any class name display literally and inject nothing."""
    return html.escape(str(text), quote=False)


def eps_as_fraction_of_255(eps: float | None, eps_255: float | None = None) -> str:
    """8/255 style: how perturbation budgets are usually quoted for [0, 1] images."""
    k = _finite(eps_255)
    if k is None:
        eps = _finite(eps)
        if eps is None:
            return "—"
        k = eps * 255
    if abs(k - round(k)) < 1e-3:
        return f"{round(k)}/255"
    return f"{k:.2f}/255"


def _display(value: Any) -> str:
    """Provenance values as text: strings as-is, structures as compact sorted JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(_json_safe(value), sort_keys=True, ensure_ascii=False)


def _records(results: dict) -> dict:
    """Attack name -> summary block, in run order, with the ensemble last."""
    records = {name: record for name, record in results["attacks"].items() if name != ENSEMBLE_KEY}
    if results.get("ensemble"):
        records[ENSEMBLE_KEY] = results["ensemble"]
    return records


def _ensemble_members(results: dict) -> list[str]:
    return [m for m in (results["ensemble"] or {}).get("attacks", []) if m != CLEAN_KEY]


def _attack_label(results: dict, key: str) -> str:
    if key == ENSEMBLE_KEY:
        members = _ensemble_members(results)
        return f"Ensemble (worst case over {', '.join(members)})" if members else "Ensemble"
    if key == CLEAN_KEY:
        return "Clean (no attack)"
    return key


def _attack_in_words(results: dict, key: str) -> str:
    """The attack as it reads inside a sentence."""
    if key == ENSEMBLE_KEY:
        members = _ensemble_members(results)
        return (f"all attacks combined ({', '.join(members)}; an image counts as robust only if it survives "
                "every one)") if members else "the attack ensemble"
    return f"the {key} attack"


def headline_key(results: dict) -> str:
    """The robust accuracy the verdict leads with: the per-point worst case over all
    attacks (ensemble) when present, else the strongest single attack, else clean."""
    if results.get("ensemble"):
        return ENSEMBLE_KEY
    attacked = [(name, rec) for name, rec in results["attacks"].items() if name != CLEAN_KEY]
    if attacked:
        return min(attacked, key=lambda item: (_finite(item[1].get("avg")) is None,
                                               _finite(item[1].get("avg")) or 0.0))[0]
    return CLEAN_KEY


def _robustness_order(results: dict, key: str) -> list[int]:
    """Class indices from least to most robust under `key` (the worst class first;
    classes without a value last; ties keep dataset order)."""
    record = _records(results)[key]
    worst = record.get("worst_class")

    def sort_key(index: int):
        accuracy = _finite(record["per_class"][index]["accuracy"])
        return (accuracy is None, accuracy or 0.0, record["per_class"][index]["class"] != worst, index)

    return sorted(range(len(record["per_class"])), key=sort_key)


def _pct(value: float | None) -> str:
    value = _finite(value)
    return "—" if value is None else f"{value * 100:.1f}%"


def _pp(value: float | None) -> str:
    value = _finite(value)
    return "—" if value is None else f"{value * 100:+.1f} pp"


# --------------------------------------------------------------------------- sections


def _significance(worst: dict, average: float | None, measure: str) -> dict:
    """Is the worst class significantly below the class average? CI-based: yes when
    the upper end of its 95% Wilson interval lies below the average."""
    low, high = worst["ci"]
    name, n = worst["class"], worst["n"]
    if average is None or high is None or low is None or not n:
        return {"status": "unknown", "answer": "Cannot tell",
                "explanation": f"There is no confidence interval for {name} (no test images of it were "
                               "scored, or none was recorded), so its gap to the average cannot be judged."}
    if high < average:
        return {"status": "significant", "answer": "Yes",
                "explanation": (
                    f"{name} is significantly below the average class: even the top of its "
                    f"95% confidence interval ({_pct(high)}) is below the class average ({_pct(average)}). "
                    + (f"An attacker who targets {name} succeeds more often, and sampling noise "
                       f"from {n} test images does not explain the gap." if measure == "robust accuracy" else
                       f"Sampling noise from {n} test images does not explain the gap."))}
    return {"status": "not_significant", "answer": "Not established",
            "explanation": (
                f"{name} has the lowest {measure}, but its 95% confidence interval "
                f"({_pct(low)} to {_pct(high)}) reaches the class average ({_pct(average)}), so with "
                f"{n} test images of this class the gap may be sampling noise. Audit more images "
                "per class to decide.")}


def _verdict(results: dict) -> dict:
    model, dataset, config = results["model"], results["dataset"], results["config"]
    records = _records(results)
    key = headline_key(results)
    headline = records[key]
    classes = dataset["classes"]
    worst_name = headline.get("worst_class")
    worst_index = classes.index(worst_name) if worst_name in classes else _robustness_order(results, key)[0]
    worst_entry = headline["per_class"][worst_index]
    worst = {"class": worst_entry["class"], "accuracy": _finite(worst_entry["accuracy"]),
             "ci": _ci(worst_entry), "n": worst_entry.get("n")}
    average = _finite(headline.get("avg"))
    clean = results["attacks"].get(CLEAN_KEY)
    rows = []
    for name, record in records.items():
        worst_class = record.get("worst_class")
        worst_ci = next((_ci(e) for e in record["per_class"] if e["class"] == worst_class), (None, None))
        rows.append({
            "key": name, "label": _attack_label(results, name),
            "description": record.get("description") or "",
            "avg": _finite(record.get("avg")), "worst": _finite(record.get("worst")),
            "worst_class": worst_class, "worst_ci": worst_ci,
            "nsd": _finite(record.get("nsd")), "worst10": _finite(record.get("worst10")),
            "n_attacked": None if name == CLEAN_KEY else record.get("n_attacked"),
            "seconds": _finite(record.get("seconds")),
            "is_headline": name == key, "is_clean": name == CLEAN_KEY,
        })
    warnings = [check for check in results["checks"] if check.get("severity") == "warning"]
    eps_text = eps_as_fraction_of_255(config.get("eps"), config.get("eps_255"))
    if key == CLEAN_KEY:
        summary = (f"Only clean accuracy was measured: {_pct(average)} on average across classes; "
                   f"no attack ran, so this report says nothing about robustness.")
    else:
        summary = (f"Against {_attack_in_words(results, key)} at ε = {eps_text}, {_pct(average)} of test images "
                   f"stay correctly classified on average across classes"
                   + (f" (clean: {_pct(clean.get('avg'))})" if clean else "")
                   + f". The weakest class is {worst['class']} at {_pct(worst['accuracy'])}.")
    return {
        "model_name": _basename(model.get("path") or "") if model.get("path") else "model",
        "model_path": model.get("path"), "arch": model.get("arch"), "format": model.get("format"),
        "white_box": model.get("white_box", True),
        "dataset_name": dataset.get("name"), "split": dataset.get("split"), "n": dataset.get("n"),
        "num_classes": len(classes),
        "eps": _finite(config.get("eps")), "eps_255": eps_text,
        "scoring": config.get("scoring") or {},
        "clean_avg": _finite(clean.get("avg")) if clean else None,
        "headline_key": key, "headline_label": _attack_label(results, key),
        "is_robustness": key != CLEAN_KEY,
        "average": average, "worst": worst,
        "nsd": _finite(headline.get("nsd")), "worst10": _finite(headline.get("worst10")),
        "significance": _significance(worst, average, "robust accuracy" if key != CLEAN_KEY else "clean accuracy"),
        "summary": summary, "rows": rows,
        "warning_count": len(warnings), "check_count": len(results["checks"]),
        "finished_at": _display(results.get("finished_at")),
    }


def _checks(results: dict) -> list[dict]:
    order = {"warning": 0, "info": 1}
    checks = [{
        "id": str(check.get("id") or ""), "severity": str(check.get("severity") or "info"),
        "message": str(check.get("message") or ""), "why": str(check.get("why") or ""),
    } for check in results["checks"]]
    return sorted(checks, key=lambda c: order.get(c["severity"], 2))  # stable: scan order within a severity


def _accuracy_cell(entry: dict) -> dict:
    low, high = _ci(entry)
    return {"accuracy": _finite(entry["accuracy"]), "ci": (low, high), "correct": entry.get("correct"),
            "n": entry.get("n")}


def _bar_trace(name: str, x: list, entries: list[dict], colour: str, pattern: str, legend_rank: int) -> dict:
    """One bar series with asymmetric 95% CI error bars; hover shows value and CI."""
    values, upper, lower, custom = [], [], [], []
    for entry in entries:
        accuracy = _finite(entry["accuracy"])
        low, high = _ci(entry)
        values.append(_rounded(accuracy))
        upper.append(_rounded(high - accuracy) if None not in (high, accuracy) else None)
        lower.append(_rounded(accuracy - low) if None not in (low, accuracy) else None)
        custom.append([_rounded(low), _rounded(high), entry.get("correct"), entry.get("n")])
    return {
        "type": "bar", "name": _plotly_text(name), "x": x, "y": values,
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


def _category_axis(labels: list[str], worst_position: int | None, title: str) -> dict:
    # Angle the labels when they would collide (long class names or many classes).
    angle = -35 if _labels_crowd([html.unescape(label) for label in labels], 1100) else 0
    ticktext = [f"<b>{label}</b><br>▲ worst" if i == worst_position else label for i, label in enumerate(labels)]
    return {"type": "category", "categoryorder": "array", "categoryarray": labels,
            "tickmode": "array", "tickvals": labels, "ticktext": ticktext,
            "tickangle": angle, "title": {"text": title}, "automargin": True}


def _labels_crowd(labels: list[str], width_px: int) -> bool:
    """Would these tick labels overlap side by side (about 7 px per character)?"""
    return max(len(label) for label in labels) * 7 + 12 > width_px / max(1, len(labels))


def _worst_band(position: int | None) -> list[dict]:
    if position is None:
        return []
    return [{"type": "rect", "xref": "x", "yref": "paper", "x0": position - 0.5, "x1": position + 0.5,
             "y0": 0, "y1": 1, "fillcolor": "rgba(0,0,0,0.07)", "line": {"width": 0}, "layer": "below"}]


def _base_layout(height: int) -> dict:
    return {"font": {"family": CHART_FONT, "size": 13, "color": "#1a1a1a"},
            "height": height, "autosize": True,
            "margin": {"l": 64, "r": 24, "t": 48, "b": 64},
            "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
            "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
            "hoverlabel": {"namelength": -1}}


def _accuracy_axis() -> dict:
    return {"title": {"text": "accuracy (error bars: 95% CI)"}, "tickformat": ".0%", "range": [0, 1.05],
            "gridcolor": "#dddddd", "zeroline": True, "zerolinecolor": "#888888"}


def _series_style(key: str, attack_position: int) -> tuple[str, str]:
    if key == CLEAN_KEY:
        return CLEAN_COLOUR, ""
    if key == ENSEMBLE_KEY:
        return ENSEMBLE_COLOUR, ""
    return OKABE_ITO[attack_position % len(OKABE_ITO)], BAR_PATTERNS[attack_position % len(BAR_PATTERNS)]


def _per_class(results: dict, figures: dict) -> dict:
    records = _records(results)
    key = headline_key(results)
    order = _robustness_order(results, key)
    classes = results["dataset"]["classes"]
    worst_name = records[key].get("worst_class")
    columns = [{"key": name, "label": name, "is_headline": name == key} for name in records]
    rows = []
    for rank, index in enumerate(order, start=1):
        reference = next(iter(records.values()))["per_class"][index]
        rows.append({
            "rank": rank, "index": index, "class": classes[index], "n": reference.get("n"),
            "is_worst": classes[index] == worst_name,
            "cells": [_accuracy_cell(record["per_class"][index]) for record in records.values()],
        })
    labels = [_plotly_text(classes[i]) for i in order]
    worst_position = next((p for p, i in enumerate(order) if classes[i] == worst_name), None)
    traces = []
    attack_position = 0
    for rank, (name, record) in enumerate(records.items()):
        colour, pattern = _series_style(name, attack_position)
        if name not in (CLEAN_KEY, ENSEMBLE_KEY):
            attack_position += 1
        traces.append(_bar_trace(name if name != ENSEMBLE_KEY else "ensemble", labels,
                                 [record["per_class"][i] for i in order], colour, pattern, rank))
    layout = _base_layout(440)
    layout.update({"barmode": "group", "bargap": 0.25, "bargroupgap": 0.05,
                   "xaxis": _category_axis(labels, worst_position, "class (least robust first)"),
                   "yaxis": _accuracy_axis(), "shapes": _worst_band(worst_position)})
    figure_id, table_id = "fig-per-class", "table-per-class"
    figures[figure_id] = {"data": traces, "layout": layout}
    return {"columns": columns, "rows": rows, "figure_id": figure_id, "table_id": table_id,
            "sorted_by": _attack_label(results, key), "worst_class": worst_name}


def _flow_for(results: dict, name: str, position: int, figures: dict) -> dict:
    classes = results["dataset"]["classes"]
    matrix = [[int(count or 0) for count in row] for row in results["target_flow"][name]]
    num_classes = len(classes)
    rows, largest = [], None
    for source, row in enumerate(matrix):
        fooled = sum(count for target, count in enumerate(row) if target != source)
        ranked = sorted(((count, target) for target, count in enumerate(row) if target != source and count > 0),
                        key=lambda item: (-item[0], item[1]))
        top = [{"class": classes[target], "count": count, "share": count / fooled}
               for count, target in ranked[:TOP_DESTINATIONS]]
        rows.append({"class": classes[source], "fooled": fooled, "top": top,
                     "more": max(0, len(ranked) - TOP_DESTINATIONS)})
        if ranked and (largest is None or ranked[0][0] > largest["count"]):
            largest = {"source": classes[source], "target": classes[ranked[0][1]], "count": ranked[0][0]}
    total = sum(row["fooled"] for row in rows)
    figure_id = f"fig-flow-{position}"
    has_chart = num_classes <= MAX_HEATMAP_CLASSES
    if has_chart:
        labels = [_plotly_text(c) for c in classes]
        shares = [[_rounded(count / row_total if row_total else 0.0, 4) for count in row]
                  for row, row_total in zip(matrix, (r["fooled"] for r in rows))]
        trace = {"type": "heatmap", "z": matrix, "x": labels, "y": labels, "customdata": shares,
                 "colorscale": "Viridis", "zmin": 0, "xgap": 1, "ygap": 1,
                 "colorbar": {"title": {"text": "images"}, "thickness": 14},
                 "hovertemplate": ("true %{y} → predicted %{x}: %{z} images"
                                   "<br>(%{customdata:.0%} of this class's fooled images)<extra></extra>")}
        if num_classes <= MAX_CELL_LABEL_CLASSES:
            trace["texttemplate"] = "%{z}"
        rotated = _labels_crowd(classes, 520)
        # Angled tick labels need room below the cells, about 5 px per character.
        side = 300 + 28 * num_classes + (5 * max(len(c) for c in classes) if rotated else 0)
        layout = _base_layout(min(side, 1000))
        layout.update({
            "margin": {"l": 110, "r": 24, "t": 24, "b": 110},
            "xaxis": {"type": "category", "title": {"text": "predicted class (after attack)"},
                      "tickangle": -45 if rotated else 0, "automargin": True},
            "yaxis": {"type": "category", "title": {"text": "true class"}, "autorange": "reversed",
                      "automargin": True},
        })
        figures[figure_id] = {"data": [trace], "layout": layout}
    return {
        "key": name, "label": _attack_label(results, name), "position": position,
        "figure_id": figure_id if has_chart else None, "table_id": f"table-flow-{position}",
        "matrix_table_id": f"table-flow-matrix-{position}",
        "rows": rows, "total_fooled": total, "largest": largest,
        "matrix": matrix if num_classes <= MAX_MATRIX_TABLE_CLASSES else None, "classes": classes,
    }


def _target_flow(results: dict, figures: dict) -> dict:
    flows = results["target_flow"]
    run_order = [name for name in _records(results) if name in flows]
    names = run_order + [name for name in flows if name not in run_order]
    return {"attacks": [_flow_for(results, name, position, figures) for position, name in enumerate(names)],
            "has_heatmaps": len(results["dataset"]["classes"]) <= MAX_HEATMAP_CLASSES,
            "max_heatmap_classes": MAX_HEATMAP_CLASSES}


def _png_data_uri(value: Any) -> str | None:
    """A data: URI for a base64 PNG, or None when the value is not one (never a link)."""
    if not isinstance(value, str):
        return None
    text = "".join(value.split())
    if not _BASE64_TEXT.match(text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + text


def _examples(results: dict) -> dict:
    classes = results["dataset"]["classes"]
    key = headline_key(results)
    order = _robustness_order(results, key)
    rank_of = {classes[index]: rank for rank, index in enumerate(order)}
    attack_rank = {name: rank for rank, name in enumerate(_records(results))}
    worst_name = _records(results)[key].get("worst_class")
    pairs, skipped = [], 0
    for example in results["examples"]:
        clean_src, adv_src = _png_data_uri(example.get("clean_png")), _png_data_uri(example.get("adv_png"))
        if clean_src is None or adv_src is None:
            skipped += 1
            continue
        true_class = str(example.get("class", ""))
        pairs.append({
            "attack": str(example.get("attack", "")), "index": example.get("index"), "class": true_class,
            "clean_pred": str(example.get("clean_pred", "")), "adv_pred": str(example.get("adv_pred", "")),
            "clean_src": clean_src, "adv_src": adv_src,
            "fooled": example.get("adv_pred") != true_class,
        })
    pairs.sort(key=lambda p: (rank_of.get(p["class"], len(classes)), attack_rank.get(p["attack"], len(attack_rank)),
                              p["index"] if isinstance(p["index"], int) else 0))
    groups: list[dict] = []
    for pair in pairs:
        if not groups or groups[-1]["class"] != pair["class"]:
            accuracy = None
            if pair["class"] in classes:
                accuracy = _finite(_records(results)[key]["per_class"][classes.index(pair["class"])]["accuracy"])
            groups.append({"class": pair["class"], "is_worst": pair["class"] == worst_name,
                           "accuracy": accuracy, "pairs": []})
        groups[-1]["pairs"].append(pair)
    return {"groups": groups, "count": len(pairs), "skipped": skipped,
            "headline_label": _attack_label(results, key)}


def _comparison_key(after: dict, before: dict) -> str:
    after_records, before_records = _records(after), _records(before)
    for candidate in (headline_key(after), headline_key(before)):
        if candidate in after_records and candidate in before_records:
            return candidate
    shared = [name for name in after_records if name in before_records and name != CLEAN_KEY]
    if shared:
        return shared[0]
    if CLEAN_KEY in after_records and CLEAN_KEY in before_records:
        return CLEAN_KEY
    raise UserError("cannot compare: BEFORE and AFTER results share no attack; run the same attacks on both")


def _like_for_like(after: dict, before: dict, key: str) -> list[str]:
    """Differences that make before/after deltas not directly comparable."""
    notes = []
    a_data, b_data = after["dataset"], before["dataset"]
    for field, label in (("name", "dataset"), ("split", "split"), ("n", "number of test images")):
        if a_data.get(field) != b_data.get(field):
            notes.append(f"The {label} differs: before {_display(b_data.get(field))}, "
                         f"after {_display(a_data.get(field))}.")
    a_config, b_config = after["config"], before["config"]
    if _finite(a_config.get("eps")) != _finite(b_config.get("eps")):
        notes.append(f"The perturbation budget differs: before ε = "
                     f"{eps_as_fraction_of_255(b_config.get('eps'), b_config.get('eps_255'))}, after ε = "
                     f"{eps_as_fraction_of_255(a_config.get('eps'), a_config.get('eps_255'))}.")
    if (a_config.get("scoring") or {}) != (b_config.get("scoring") or {}):
        notes.append(f"The scoring rule differs: before {_display(b_config.get('scoring'))}, "
                     f"after {_display(a_config.get('scoring'))}.")
    if key == ENSEMBLE_KEY:
        a_members = sorted((after["ensemble"] or {}).get("attacks", []))
        b_members = sorted((before["ensemble"] or {}).get("attacks", []))
        if a_members != b_members:
            notes.append(f"The ensembles hold different attacks: before {', '.join(b_members) or '—'}, "
                         f"after {', '.join(a_members) or '—'}.")
        names = [m for m in a_members if m in b_members]
    else:
        names = [key]
    for name in names:
        a_params = {k: v for k, v in (a_config.get("attacks") or {}).get(name, {}).items() if k != "repr"}
        b_params = {k: v for k, v in (b_config.get("attacks") or {}).get(name, {}).items() if k != "repr"}
        if a_params != b_params:
            notes.append(f"The {name} attack ran with different settings: before {_display(b_params)}, "
                         f"after {_display(a_params)}.")
    if after["model"].get("sha256") and after["model"].get("sha256") == before["model"].get("sha256"):
        notes.append("Both results come from the same model file (identical sha256): any difference is "
                     "from the audit settings, not the model.")
    return notes


def _change_word(delta: float | None, higher_is_better: bool = True) -> str:
    if delta is None:
        return "—"
    if abs(delta) < UNCHANGED_TOLERANCE:
        return "unchanged"
    return "better" if (delta > 0) == higher_is_better else "worse"


def _delta(after_value: Any, before_value: Any) -> float | None:
    a, b = _finite(after_value), _finite(before_value)
    return None if a is None or b is None else a - b


def _comparison(after: dict, before: dict, figures: dict) -> dict:
    if after["dataset"]["classes"] != before["dataset"]["classes"]:
        raise UserError("cannot compare: BEFORE and AFTER have different class lists "
                        "(dataset.classes must match in names and order)")
    key = _comparison_key(after, before)
    classes = after["dataset"]["classes"]
    a_record, b_record = _records(after)[key], _records(before)[key]
    a_clean, b_clean = after["attacks"].get(CLEAN_KEY), before["attacks"].get(CLEAN_KEY)
    order = _robustness_order(after, key)
    worst_after, worst_before = a_record.get("worst_class"), b_record.get("worst_class")
    rows = []
    for index in order:
        a_entry, b_entry = a_record["per_class"][index], b_record["per_class"][index]
        delta = _delta(a_entry["accuracy"], b_entry["accuracy"])
        clean_before = _finite(b_clean["per_class"][index]["accuracy"]) if b_clean else None
        clean_after = _finite(a_clean["per_class"][index]["accuracy"]) if a_clean else None
        rows.append({
            "class": classes[index], "before": _finite(b_entry["accuracy"]), "after": _finite(a_entry["accuracy"]),
            "ci_before": _ci(b_entry), "ci_after": _ci(a_entry), "delta": delta, "change": _change_word(delta),
            "clean_before": clean_before, "clean_after": clean_after,
            "clean_delta": _delta(clean_after, clean_before),
            "was_worst": classes[index] == worst_before, "is_worst": classes[index] == worst_after,
        })

    def metric(label: str, before_value: Any, after_value: Any, kind: str, higher_is_better: bool = True,
               before_class: str | None = None, after_class: str | None = None) -> dict:
        delta = _delta(after_value, before_value)
        return {"label": label, "before": _finite(before_value), "after": _finite(after_value), "delta": delta,
                "kind": kind, "change": _change_word(delta, higher_is_better),
                "before_class": before_class, "after_class": after_class}

    summary = [
        metric("Average robust accuracy across classes", b_record.get("avg"), a_record.get("avg"), "pct"),
        metric("Worst-class robust accuracy", b_record.get("worst"), a_record.get("worst"), "pct",
               before_class=worst_before, after_class=worst_after),
        metric("NSD (population SD / mean of class accuracies; lower is more even)",
               b_record.get("nsd"), a_record.get("nsd"), "ratio", higher_is_better=False),
    ]
    if a_clean and b_clean:
        summary.insert(0, metric("Clean accuracy (class average)", b_clean.get("avg"), a_clean.get("avg"), "pct"))
    attack_rows = []
    for name, a_rec in _records(after).items():
        b_rec = _records(before).get(name)
        if b_rec is None:
            continue
        attack_rows.append({
            "key": name, "label": _attack_label(after, name),
            "avg_before": _finite(b_rec.get("avg")), "avg_after": _finite(a_rec.get("avg")),
            "avg_delta": _delta(a_rec.get("avg"), b_rec.get("avg")),
            "worst_before": _finite(b_rec.get("worst")), "worst_after": _finite(a_rec.get("worst")),
            "worst_delta": _delta(a_rec.get("worst"), b_rec.get("worst")),
            "nsd_before": _finite(b_rec.get("nsd")), "nsd_after": _finite(a_rec.get("nsd")),
            "nsd_delta": _delta(a_rec.get("nsd"), b_rec.get("nsd")),
        })
    avg_delta, worst_delta, nsd_delta = (summary[-3]["delta"], summary[-2]["delta"], summary[-1]["delta"])
    label = _attack_label(after, key)
    sentence = (
        f"Average robust accuracy under {label} went from {_pct(b_record.get('avg'))} to {_pct(a_record.get('avg'))} "
        f"({_pp(avg_delta)}). The worst class went from {worst_before} at {_pct(b_record.get('worst'))} to "
        f"{worst_after} at {_pct(a_record.get('worst'))} ({_pp(worst_delta)}). NSD went from "
        f"{_ratio(b_record.get('nsd'))} to {_ratio(a_record.get('nsd'))}"
        + ("" if nsd_delta is None else f" ({nsd_delta:+.3f}; {_change_word(nsd_delta, False)})") + "."
    )
    labels = [_plotly_text(classes[i]) for i in order]
    worst_position = next((p for p, i in enumerate(order) if classes[i] == worst_after), None)
    traces = [
        _bar_trace("before", labels, [b_record["per_class"][i] for i in order], CLEAN_COLOUR, "/", 0),
        _bar_trace("after", labels, [a_record["per_class"][i] for i in order], OKABE_ITO[3], "", 1),
    ]
    layout = _base_layout(420)
    layout.update({"barmode": "group", "bargap": 0.3,
                   "xaxis": _category_axis(labels, worst_position, "class (least robust after first)"),
                   "yaxis": _accuracy_axis(), "shapes": _worst_band(worst_position)})
    figure_id = "fig-compare"
    figures[figure_id] = {"data": traces, "layout": layout}
    return {
        "key": key, "label": label, "rows": rows, "summary": summary, "attack_rows": attack_rows,
        "warnings": _like_for_like(after, before, key), "sentence": sentence,
        "figure_id": figure_id, "table_id": "table-compare", "has_clean": bool(a_clean and b_clean),
        "worst_before": worst_before, "worst_after": worst_after,
    }


def _ratio(value: Any) -> str:
    value = _finite(value)
    return "—" if value is None else f"{value:.3f}"


def _trajectory_sources(training: dict) -> Iterable[tuple[str, Any]]:
    temperatures = training.get("temperatures")
    if isinstance(temperatures, dict):
        for key, rows in temperatures.items():
            if rows is not None:
                yield f"temperatures.{key}", rows
    if training.get("class_weights") is not None:
        yield "class_weights", training["class_weights"]
    if training.get("class_probabilities") is not None:  # FERD: label distribution of synthetic data
        yield "class_probabilities", training["class_probabilities"]


def _shown_epochs(count: int) -> list[int]:
    """At most MAX_TRAJECTORY_TABLE_EPOCHS epoch positions, evenly spread, first and last included."""
    if count <= MAX_TRAJECTORY_TABLE_EPOCHS:
        return list(range(count))
    step = (count - 1) / (MAX_TRAJECTORY_TABLE_EPOCHS - 1)
    return sorted({round(i * step) for i in range(MAX_TRAJECTORY_TABLE_EPOCHS)})


def _training(results: dict, figures: dict) -> dict | None:
    training = results.get("training")
    if not training:
        return None
    classes = results["dataset"]["classes"]
    curves_rows = [curve for curve in (training.get("curves") or [])]
    curves = None
    if curves_rows:
        keys: list[str] = []
        for curve in curves_rows:
            keys += [k for k in curve if k != "epoch" and k not in keys]
        known = [k for k in TRAINING_CURVE_LABELS if k in keys]
        keys = known + [k for k in keys if k not in TRAINING_CURVE_LABELS]
        columns = [{"key": k, "label": TRAINING_CURVE_LABELS.get(k, k),
                    "short_label": TRAINING_CURVE_SHORT_LABELS.get(k, k), "is_fraction": k.startswith("val_")}
                   for k in keys]
        epochs = [curve.get("epoch", position + 1) for position, curve in enumerate(curves_rows)]
        traces = []
        for position, column in enumerate(columns):
            on_loss_axis = not column["is_fraction"]
            traces.append({
                "type": "scatter", "mode": "lines+markers", "name": _plotly_text(column["label"]),
                "x": epochs, "y": [_rounded(curve.get(column["key"])) for curve in curves_rows],
                "yaxis": "y2" if on_loss_axis else "y",
                "line": {"color": OKABE_ITO[position % len(OKABE_ITO)],
                         "dash": LINE_DASHES[position % len(LINE_DASHES)], "width": 2},
                "marker": {"symbol": LINE_SYMBOLS[position % len(LINE_SYMBOLS)], "size": 7},
                "hovertemplate": ("epoch %{x}: %{y:.4f}" if on_loss_axis else "epoch %{x}: %{y:.1%}")
                + "<extra>%{fullData.name}</extra>",
            })
        layout = _base_layout(400)
        layout.update({
            "xaxis": {"title": {"text": "epoch"}, "dtick": 1 if len(epochs) <= 20 else None, "gridcolor": "#eeeeee"},
            "yaxis": {"title": {"text": "validation accuracy"}, "tickformat": ".0%", "gridcolor": "#dddddd"},
            "yaxis2": {"title": {"text": "loss"}, "overlaying": "y", "side": "right", "showgrid": False,
                       "tickformat": ".3~g"},
            "margin": {"l": 64, "r": 64, "t": 80, "b": 56},
        })
        if layout["xaxis"]["dtick"] is None:
            del layout["xaxis"]["dtick"]
        figures["fig-training-curves"] = {"data": traces, "layout": layout}
        curves = {"columns": columns, "figure_id": "fig-training-curves", "table_id": "table-training-curves",
                  "rows": [{"epoch": epoch, "cells": [_finite(curve.get(c["key"])) for c in columns]}
                           for epoch, curve in zip(epochs, curves_rows)]}
    trajectories = []
    for position, (source, per_epoch) in enumerate(_trajectory_sources(training)):
        key = source.split(".")[-1]
        epochs = list(range(1, len(per_epoch) + 1))
        traces = []
        for index, name in enumerate(classes):
            traces.append({
                "type": "scatter", "mode": "lines+markers", "name": _plotly_text(name),
                "x": epochs, "y": [_rounded(row[index]) for row in per_epoch],
                "line": {"color": OKABE_ITO[index % len(OKABE_ITO)],
                         "dash": LINE_DASHES[(index // len(OKABE_ITO)) % len(LINE_DASHES)], "width": 1.5},
                "marker": {"symbol": LINE_SYMBOLS[index % len(LINE_SYMBOLS)], "size": 5},
                "hovertemplate": "epoch %{x}: %{y:.4f}<extra>%{fullData.name}</extra>",
            })
        layout = _base_layout(380)
        layout.update({"xaxis": {"title": {"text": "epoch"}, "gridcolor": "#eeeeee", "tickformat": "d",
                                 **({"dtick": 1} if len(epochs) <= 20 else {})},
                       "yaxis": {"title": {"text": key}, "gridcolor": "#dddddd"},
                       "legend": {"orientation": "v", "x": 1.02, "y": 1},
                       "margin": {"l": 64, "r": 24, "t": 24, "b": 56}})
        figure_id = f"fig-trajectory-{position}"
        figures[figure_id] = {"data": traces, "layout": layout}
        shown = _shown_epochs(len(per_epoch))
        trajectories.append({
            "key": key, "label": TRAJECTORY_LABELS.get(key, key), "figure_id": figure_id,
            "table_id": f"table-trajectory-{position}", "epochs": [i + 1 for i in shown],
            "total_epochs": len(per_epoch),
            "rows": [{"class": name,
                      "cells": [_finite(per_epoch[i][index]) for i in shown],
                      "change": _delta(per_epoch[-1][index], per_epoch[0][index]) if per_epoch else None}
                     for index, name in enumerate(classes)],
        })
    options = training.get("options") or {}
    return {
        "method": training.get("method"), "teacher": training.get("teacher"), "epochs": training.get("epochs"),
        "options": [(str(k), _display(v)) for k, v in options.items()] if isinstance(options, dict) else [],
        "curves": curves, "trajectories": trajectories,
        "synthetic": [{"class": str(item.get("class")), "src": uri}
                      for item in (training.get("synthetic_examples") or []) if isinstance(item, dict)
                      for uri in [_png_data_uri(item.get("png"))] if uri is not None],
    }


def _provenance(results: dict, role: str, anchor: str) -> dict:
    model, dataset, config = results["model"], results["dataset"], results["config"]
    subset = dataset.get("subset") or {}
    adaptations = model.get("adaptations") or {}
    timing = results["timing"] or {}
    per_attack_seconds = timing.get("per_attack") or {}
    attacks = []
    for name, params in (config.get("attacks") or {}).items():
        params = params if isinstance(params, dict) else {"value": params}
        record = results["attacks"].get(name) or {}
        attacks.append({
            "name": name, "class": _display(params.get("class")),
            "params": [(k, _display(v)) for k, v in params.items() if k not in ("class", "repr")],
            "repr": params.get("repr") or record.get("description") or "",
            "seconds": _finite(per_attack_seconds.get(name, record.get("seconds"))),
        })
    scoring = config.get("scoring") or {}
    subset_text = ", ".join(f"{k} = {_display(v)}" for k, v in subset.items()) if subset else "—"
    return {
        "role": role, "anchor": anchor,
        "tool": f"{results['tool'].get('name', 'robaudit')} {results['tool'].get('version', '')}".strip()
        if isinstance(results["tool"], dict) else _display(results["tool"]),
        "command": results.get("command") or "",
        "model": [
            ("File", _display(model.get("path"))), ("Format", _display(model.get("format"))),
            ("SHA-256", _display(model.get("sha256"))),
            ("Parameters", f"{model['num_params']:,}" if isinstance(model.get("num_params"), int) else "—"),
            ("Architecture", _display(model.get("arch"))),
            ("Gradient (white-box) attacks", "allowed" if model.get("white_box", True)
             else "not possible: only black-box attacks ran"),
        ] + [(f"Adaptation: {k}", _display(v)) for k, v in adaptations.items()],
        "dataset": [
            ("Dataset", _display(dataset.get("name"))), ("Split", _display(dataset.get("split"))),
            ("Images audited", _display(dataset.get("n"))), ("Classes", _display(len(dataset["classes"]))),
            ("Subset", subset_text), ("Source", _display(dataset.get("source"))),
        ],
        "config": [
            ("ε (L∞ budget)", f"{eps_as_fraction_of_255(config.get('eps'), config.get('eps_255'))} "
                             f"= {_display(config.get('eps'))}"),
            ("Seed", _display(config.get("seed"))), ("Device", _display(config.get("device"))),
            ("Batch size", _display(config.get("batch_size"))),
            ("Iterates scored", _display(scoring.get("iterates"))), ("Score", _display(scoring.get("score"))),
        ],
        "attacks": attacks,
        "environment": [(str(k), _display(v)) for k, v in (results["environment"] or {}).items()],
        "timing": [("Started", _display(results.get("started_at"))), ("Finished", _display(results.get("finished_at"))),
                   ("Total seconds", _display(_rounded(timing.get("total_seconds"), 1)))],
        "notes": [str(note) for note in results["notes"]],
    }


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no raw <, > or & (so no "</script>"
    or "<!--" can appear), and no U+2028/2029 line separators."""
    text = json.dumps(_json_safe(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


# --------------------------------------------------------------------------- public API


def build_context(results: dict, *, baseline: dict | None = None, redact_paths: bool = False) -> dict:
    """Plain dicts and lists the template renders: results -> what each section shows.

    With `baseline` (the BEFORE results) the context also holds the comparison
    section; `redact_paths` cuts filesystem paths to basenames everywhere, including
    the embedded results JSON.
    """
    validate_results(results, source="results")
    if baseline is not None:
        validate_results(baseline, source="baseline results")
    if redact_paths:
        results = redact_results(results)
        baseline = redact_results(baseline) if baseline is not None else None
    figures: dict = {}
    verdict = _verdict(results)
    checks = _checks(results)
    per_class = _per_class(results, figures)
    target_flow = _target_flow(results, figures)
    examples = _examples(results)
    comparison = _comparison(results, baseline, figures) if baseline is not None else None
    training = _training(results, figures)
    provenance = [_provenance(results, "This audit" if baseline is None else "After (this audit)", "prov-run")]
    if baseline is not None:
        provenance.append(_provenance(baseline, "Before (baseline)", "prov-baseline"))
    sections = [("verdict", "Verdict"), ("checks", "Reliability flags"), ("per-class", "Per-class robustness"),
                ("target-flow", "Where attacks push each class"), ("examples", "Example adversarial images")]
    if comparison is not None or training is not None:
        sections.append(("comparison", "Before and after" if comparison is not None else "Remediation training"))
    sections.append(("provenance", "Provenance"))
    model_name = verdict["model_name"]
    return {
        "title": f"Robustness audit: {model_name} on {verdict['dataset_name']}",
        "nav": [{"id": anchor, "label": label} for anchor, label in sections],
        "verdict": verdict, "checks": checks, "per_class": per_class, "target_flow": target_flow,
        "examples": examples, "comparison": comparison, "training": training, "provenance": provenance,
        "figures": figures, "plotly_config": PLOTLY_CONFIG,
        "redacted": redact_paths,
        "embedded": {"results": results, "baseline": baseline},
    }


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("robaudit.templates", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters.update({
        "pct": _pct, "pp": _pp, "ratio": _ratio,
        "pct_ci": lambda ci: "—" if ci is None or None in ci else f"{ci[0] * 100:.1f}–{ci[1] * 100:.1f}%",
        "delta_ratio": lambda d: "—" if _finite(d) is None else f"{d:+.3f}",
        "count": lambda n: f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else _display(n),
        "seconds": lambda s: "—" if _finite(s) is None else f"{s:.1f} s",
        "sig4": lambda v: "—" if _finite(v) is None else f"{v:.4g}",
        "sort_value": lambda v: "" if _finite(v) is None else repr(_rounded(v, 9)),
        "script_json": lambda value: Markup(_script_json(value)),
    })
    return env


def _asset(name: str, closing_tag: str) -> Markup:
    """A packaged CSS/JS file, inlined as-is (trusted project code, not user data)."""
    text = importlib.resources.files("robaudit.templates").joinpath(name).read_text(encoding="utf-8")
    if closing_tag in text.lower():
        raise RuntimeError(f"{name} contains {closing_tag!r} and cannot be inlined")
    return Markup(text)


@functools.lru_cache(maxsize=1)
def _plotly_js() -> tuple[Markup, str]:
    from plotly.offline import get_plotlyjs

    source = get_plotlyjs()
    if "</script" in source.lower():
        raise RuntimeError("the bundled plotly.js contains '</script' and cannot be inlined")
    match = re.search(r"plotly\.js v(\d+\.\d+\.\d+)", source[:500])
    return Markup(source), match.group(1) if match else "unknown"


def render_html(results: dict, *, baseline: dict | None = None, redact_paths: bool = False,
                rendered_at: str | None = None) -> str:
    """The report page as a string (what render_report writes)."""
    context = build_context(results, baseline=baseline, redact_paths=redact_paths)
    if rendered_at is None:
        rendered_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    plotly_js, plotly_js_version = _plotly_js()
    return _environment().get_template("report.html.j2").render(
        **context, rendered_at=rendered_at, renderer_version=ROBAUDIT_VERSION,
        plotly_js=plotly_js, plotly_js_version=plotly_js_version,
        report_css=_asset("report.css", "</style"), report_js=_asset("report.js", "</script"),
    )


def render_report(results: dict, out_path, *, baseline: dict | None = None, redact_paths: bool = False,
                  rendered_at: str | None = None) -> Path:
    """Write the self-contained HTML report to `out_path` atomically; return its path."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory; pass the report file name, e.g. {out_path / 'report.html'}")
    page = render_html(results, baseline=baseline, redact_paths=redact_paths, rendered_at=rendered_at)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_path, page.encode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot write the report to {out_path}: {err.strerror or err}") from None
    return out_path
