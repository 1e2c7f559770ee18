"""The before/after comparison section of the report (`robaudit report BEFORE.json AFTER.json`).

Given the AFTER results (this audit) and the BEFORE results (the baseline), pick the
attack both ran (`comparison_key`), list per-class and per-attack deltas with a word
for each (better, worse, unchanged), say in one sentence what changed, and warn about
differences that make the deltas not like for like (dataset, budget, scoring, attack
settings). Results that cannot be compared at all raise UserError.
"""

from __future__ import annotations

import math
from typing import Any

from robaudit.audit.report.curves import curves_comparison
from robaudit.audit.report.figures import comparison_curve_figure, comparison_figure
from robaudit.audit.paired import per_class_tests
from robaudit.audit.report.formatting import ci, display, budget_text, finite, pct, pp, ratio
from robaudit.audit.report.headline import below_average
from robaudit.audit.report.paired_stats import METHOD_TEXT, paired_deltas, pooled_mcnemar
from robaudit.audit.report.sections import MAX_BAR_CLASSES
from robaudit.audit.report.records import CLEAN_KEY, ENSEMBLE_KEY, attack_label, headline_key, records, robustness_order
from robaudit.errors import UserError

# Deltas smaller than this (a twentieth of a percentage point) read as "unchanged".
UNCHANGED_TOLERANCE = 0.0005


def comparison_key(after: dict, before: dict) -> str:
    """The attack record both results hold that the comparison is about."""
    after_records, before_records = records(after), records(before)
    for candidate in (headline_key(after), headline_key(before)):
        if candidate in after_records and candidate in before_records:
            return candidate
    shared = [name for name in after_records if name in before_records and name != CLEAN_KEY]
    if shared:
        return shared[0]
    if CLEAN_KEY in after_records and CLEAN_KEY in before_records:
        return CLEAN_KEY
    raise UserError("cannot compare: BEFORE and AFTER results share no attack; run the same attacks on both")


def like_for_like(after: dict, before: dict, key: str) -> list[str]:
    """Differences that make before/after deltas not directly comparable."""
    notes = []
    a_data, b_data = after["dataset"], before["dataset"]
    for field, label in (("name", "dataset"), ("split", "split"), ("n", "number of test images")):
        if a_data.get(field) != b_data.get(field):
            notes.append(f"The {label} differs: before {display(b_data.get(field))}, "
                         f"after {display(a_data.get(field))}.")
    a_config, b_config = after["config"], before["config"]
    if (finite(a_config.get("eps")) != finite(b_config.get("eps"))
            or (a_config.get("norm") or "linf") != (b_config.get("norm") or "linf")):
        notes.append(f"The perturbation budget differs: before ε = {budget_text(b_config)}, "
                     f"after ε = {budget_text(a_config)}.")
    if (a_config.get("scoring") or {}) != (b_config.get("scoring") or {}):
        notes.append(f"The scoring rule differs: before {display(b_config.get('scoring'))}, "
                     f"after {display(a_config.get('scoring'))}.")
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
        # Results written before --norm existed have no "norm" parameter: they were L-inf.
        a_params = {"norm": "linf", **{k: v for k, v in (a_config.get("attacks") or {}).get(name, {}).items()
                                       if k != "repr"}}
        b_params = {"norm": "linf", **{k: v for k, v in (b_config.get("attacks") or {}).get(name, {}).items()
                                       if k != "repr"}}
        if a_params != b_params:
            notes.append(f"The {name} attack ran with different settings: before {display(b_params)}, "
                         f"after {display(a_params)}.")
    if after["model"].get("sha256") and after["model"].get("sha256") == before["model"].get("sha256"):
        notes.append("Both results come from the same model file (identical sha256): any difference is "
                     "from the audit settings, not the model.")
    return notes


def change_word(delta_value: float | None, higher_is_better: bool = True) -> str:
    if delta_value is None:
        return "—"
    if abs(delta_value) < UNCHANGED_TOLERANCE:
        return "unchanged"
    return "better" if (delta_value > 0) == higher_is_better else "worse"


def delta(after_value: Any, before_value: Any) -> float | None:
    """after - before, or None when either is missing or not finite."""
    a, b = finite(after_value), finite(before_value)
    return None if a is None or b is None else a - b


def _class_rows(after: dict, before: dict, key: str, order: list[int]) -> list[dict]:
    """One row per class (in `order`): robust and clean accuracy before, after and the change."""
    classes = after["dataset"]["classes"]
    a_record, b_record = records(after)[key], records(before)[key]
    a_clean, b_clean = after["attacks"].get(CLEAN_KEY), before["attacks"].get(CLEAN_KEY)
    worst_after, worst_before = a_record.get("worst_class"), b_record.get("worst_class")
    rows = []
    for index in order:
        a_entry, b_entry = a_record["per_class"][index], b_record["per_class"][index]
        change = delta(a_entry["accuracy"], b_entry["accuracy"])
        clean_before = finite(b_clean["per_class"][index]["accuracy"]) if b_clean else None
        clean_after = finite(a_clean["per_class"][index]["accuracy"]) if a_clean else None
        rows.append({
            "class": classes[index], "before": finite(b_entry["accuracy"]), "after": finite(a_entry["accuracy"]),
            "ci_before": ci(b_entry), "ci_after": ci(a_entry), "delta": change, "change": change_word(change),
            "clean_before": clean_before, "clean_after": clean_after,
            "clean_delta": delta(clean_after, clean_before),
            "was_worst": classes[index] == worst_before, "is_worst": classes[index] == worst_after,
            "paired": None,   # the paired test of this class, when both audits' samples are given
        })
    return rows


def _metric(label: str, before_value: Any, after_value: Any, kind: str, higher_is_better: bool = True,
            before_class: str | None = None, after_class: str | None = None, measure: str | None = None) -> dict:
    change = delta(after_value, before_value)
    return {"label": label, "before": finite(before_value), "after": finite(after_value), "delta": change,
            "kind": kind, "change": change_word(change, higher_is_better),
            "before_class": before_class, "after_class": after_class, "measure": measure,
            "interval": None, "test": None}   # filled by _paired_intervals when samples.npz pair up


def _summary(a_record: dict, b_record: dict, a_clean: dict | None, b_clean: dict | None) -> list[dict]:
    """The headline metrics before and after; the last three are average, worst class and NSD."""
    summary = [
        _metric("Worst-class robust accuracy", b_record.get("worst"), a_record.get("worst"), "pct",
                before_class=b_record.get("worst_class"), after_class=a_record.get("worst_class"), measure="worst"),
        _metric("NSD (population SD / mean of class accuracies; lower is more even)",
                b_record.get("nsd"), a_record.get("nsd"), "ratio", higher_is_better=False, measure="nsd"),
        _metric("Average robust accuracy across classes", b_record.get("avg"), a_record.get("avg"), "pct",
                measure="avg"),
    ]
    if a_clean and b_clean:
        summary.append(_metric("Clean accuracy (class average)", b_clean.get("avg"), a_clean.get("avg"), "pct",
                               measure="clean"))
    return summary


def _attack_rows(after: dict, before: dict) -> list[dict]:
    """Average, worst class and NSD before and after, for every attack both results hold."""
    attack_rows = []
    for name, a_rec in records(after).items():
        b_rec = records(before).get(name)
        if b_rec is None:
            continue
        attack_rows.append({
            "key": name, "label": attack_label(after, name),
            "avg_before": finite(b_rec.get("avg")), "avg_after": finite(a_rec.get("avg")),
            "avg_delta": delta(a_rec.get("avg"), b_rec.get("avg")),
            "worst_before": finite(b_rec.get("worst")), "worst_after": finite(a_rec.get("worst")),
            "worst_delta": delta(a_rec.get("worst"), b_rec.get("worst")),
            "nsd_before": finite(b_rec.get("nsd")), "nsd_after": finite(a_rec.get("nsd")),
            "nsd_delta": delta(a_rec.get("nsd"), b_rec.get("nsd")),
        })
    return attack_rows


def _sentence(label: str, a_record: dict, b_record: dict, summary: list[dict]) -> str:
    """What changed under the compared attack, in one sentence."""
    by_measure = {item["measure"]: item for item in summary}
    avg_delta, worst_delta, nsd_delta = (by_measure[m]["delta"] for m in ("avg", "worst", "nsd"))
    worst_after, worst_before = a_record.get("worst_class"), b_record.get("worst_class")
    return (
        f"Average robust accuracy under {label} went from {pct(b_record.get('avg'))} to {pct(a_record.get('avg'))} "
        f"({pp(avg_delta)}). The worst class went from {worst_before} at {pct(b_record.get('worst'))} to "
        f"{worst_after} at {pct(a_record.get('worst'))} ({pp(worst_delta)}). NSD went from "
        f"{ratio(b_record.get('nsd'))} to {ratio(a_record.get('nsd'))}"
        + ("" if nsd_delta is None else f" ({nsd_delta:+.3f}; {change_word(nsd_delta, False)})") + "."
    )


def _paired_verdict(classes: list[str], rows: list[dict], tests: list[dict] | None, why_not: str,
                    worst_before: str | None, label: str) -> dict:
    """The comparison's opening verdict: is the change in the worst class (before) real?"""
    if tests is None:
        return {"available": False, "text": f"No paired test: {why_not}. The intervals below are per audit; "
                                            f"overlapping intervals do not show that nothing changed."}
    for row, test in zip(sorted(rows, key=lambda r: classes.index(r["class"])), tests):
        row["paired"] = test
    worst = next((r for r in rows if r["class"] == worst_before), None)
    if worst is None or worst["paired"]["n"] == 0:
        return {"available": True, "text": "Paired McNemar tests per class are in the table below."}
    test = worst["paired"]
    significant = [r["class"] for r in rows if r["paired"]["significant"]]
    return {"available": True, "text": (
        f"The class that was worst before, {worst_before}, went from {pct(worst['before'])} to "
        f"{pct(worst['after'])} under {label} ({pp(worst['delta'])}): on its {test['n']} images "
        f"{test['only_after']} became correct and {test['only_before']} became wrong, exact McNemar "
        f"p = {test['p']:.2g}, {'a significant change' if test['significant'] else 'not a significant change'} "
        f"at the 5% level. Classes with a significant change (paired, per class, uncorrected): "
        f"{', '.join(significant) if significant else 'none'}.")}


def _paired_intervals(summary: list[dict], paired, num_classes: int) -> str | None:
    """Fill each headline measure's paired interval (and the pooled McNemar test); the method text."""
    if paired is None:
        return None
    robust = paired_deltas(paired.y, paired.before, paired.after, num_classes)
    clean = None
    if paired.clean_before is not None and paired.clean_after is not None:
        clean = paired_deltas(paired.y, paired.clean_before, paired.clean_after, num_classes)
    tests = {"avg": pooled_mcnemar(paired.before, paired.after),
             "clean": pooled_mcnemar(paired.clean_before, paired.clean_after) if clean is not None else None}
    for item in summary:
        measure = item.get("measure")
        source = clean if measure == "clean" else robust if measure in ("avg", "worst", "nsd") else None
        if source is None:
            continue
        band = source["avg" if measure == "clean" else measure]
        if band["low"] is not None:
            item["interval"] = {"low": band["low"], "high": band["high"], "excludes_zero": band["excludes_zero"]}
        if tests.get(measure):
            item["test"] = tests[measure]
    return METHOD_TEXT


def _got_worse(rows: list[dict]) -> list[dict]:
    """Every class that lost robust or clean accuracy, the larger loss first."""
    worse = [r for r in rows if (r["delta"] is not None and r["delta"] <= -UNCHANGED_TOLERANCE)
             or (r["clean_delta"] is not None and r["clean_delta"] <= -UNCHANGED_TOLERANCE)]
    return sorted(worse, key=lambda r: min(r["delta"] or 0.0, r["clean_delta"] or 0.0))


def comparison_section(after: dict, before: dict, figures: dict, paired=None, paired_why: str = "") -> dict:
    """The before/after section. `paired` (audit/paired.PairedOutcomes of the same images under
    both models, or None with `paired_why`) adds per-class McNemar tests and the verdict."""
    if after["dataset"]["classes"] != before["dataset"]["classes"]:
        raise UserError("cannot compare: BEFORE and AFTER have different class lists "
                        "(dataset.classes must match in names and order)")
    key = comparison_key(after, before)
    classes = after["dataset"]["classes"]
    a_record, b_record = records(after)[key], records(before)[key]
    a_clean, b_clean = after["attacks"].get(CLEAN_KEY), before["attacks"].get(CLEAN_KEY)
    order = robustness_order(after, key)
    worst_after, worst_before = a_record.get("worst_class"), b_record.get("worst_class")
    rows = _class_rows(after, before, key, order)
    summary = _summary(a_record, b_record, a_clean, b_clean)
    attack_rows = _attack_rows(after, before)
    label = attack_label(after, key)
    sentence = _sentence(label, a_record, b_record, summary)
    figure_id = "fig-compare"
    many = len(classes) > MAX_BAR_CLASSES
    worst_k = math.ceil(len(classes) / 10)
    if many:  # grouped bars of 1000 classes are a solid block: sorted curves + the worst 10% table
        figures[figure_id] = comparison_curve_figure(classes, b_record, a_record, worst_k)
        summary.append(_metric(f"Worst-10% mean ({worst_k} least robust classes)",
                               b_record.get("worst10"), a_record.get("worst10"), "pct"))
    else:
        figures[figure_id] = comparison_figure(classes, order, b_record, a_record, worst_after)
    tests = per_class_tests(paired, len(classes)) if paired is not None else None
    verdict = _paired_verdict(classes, rows, tests, paired_why or "the per-image outcomes (samples.npz) of both "
                              "audits are needed", worst_before, label)
    interval_method = _paired_intervals(summary, paired, len(classes))
    return {
        "verdict": verdict, "interval_method": interval_method,
        "got_worse": _got_worse(rows),
        "still_below": below_average(after, key), "average_after": finite(a_record.get("avg")),
        "method": (after.get("training") or {}).get("method"),
        "key": key, "label": label, "rows": rows, "summary": summary, "attack_rows": attack_rows,
        "warnings": like_for_like(after, before, key), "sentence": sentence,
        "figure_id": figure_id, "table_id": "table-compare", "has_clean": bool(a_clean and b_clean),
        "worst_before": worst_before, "worst_after": worst_after,
        "curves": curves_comparison(after, before, figures),   # empty when neither side has curves
        "many_classes": many, "worst_k": worst_k, "worst_rows": rows[:worst_k] if many else rows,
        "worst_table_id": "table-compare-worst",
    }
