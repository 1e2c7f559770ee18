"""The sections of a single audit's report, as plain dicts for the template.

One builder per section of the page, in page order: the verdict (headline robust
accuracy, weakest class and whether its gap is significant), the reliability flags,
per-class robustness, where attacks push each class (target flow), the example
adversarial images, and provenance. Builders that draw a chart add its plotly spec to
the shared `figures` dict under a fixed id (see `report_figures`). The before/after
comparison and remediation training sections live in `report_comparison` and
`report_training`.
"""

from __future__ import annotations

import math

from robaudit.audit.report.figures import accuracy_curve_figure, flow_heatmap, per_class_figure
from robaudit.audit.report.formatting import ci, display, budget_text, norm_label, finite, pct, png_data_uri, rounded
from robaudit.audit.report.records import (
    CLEAN_KEY, attack_in_words, attack_label, headline_key, records, robustness_order,
)
from robaudit.audit.report.plain import readable_rows
from robaudit.audit.report.redaction import basename
from robaudit.audit.results_schema import dense_flow, flow_rows

# Above these class counts a heatmap or full matrix table stops being readable (and
# grows the file quadratically); the top-destinations table still covers every class.
MAX_HEATMAP_CLASSES = 100
MAX_MATRIX_TABLE_CLASSES = 20
TOP_DESTINATIONS = 3
# Above this many classes per-class bars are unreadable: the page shows a sorted accuracy
# curve, the worst ceil(C/10) classes' table first and the full table collapsed; the
# target flow shows its TOP_FLOWS largest source -> target pairs instead of a heatmap.
MAX_BAR_CLASSES = 100
TOP_FLOWS = 20


# --------------------------------------------------------------------------- verdict and flags


def significance(worst: dict, average: float | None, measure: str) -> dict:
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
                    f"95% confidence interval ({pct(high)}) is below the class average ({pct(average)}). "
                    + (f"At 0%, every correctly classified {name} image was flipped by an attack; sampling "
                       f"noise from {n} test images does not explain the gap."
                       if measure == "robust accuracy" and worst.get("accuracy") == 0 else
                       f"An attacker who targets {name} succeeds more often, and sampling noise "
                       f"from {n} test images does not explain the gap." if measure == "robust accuracy" else
                       f"Sampling noise from {n} test images does not explain the gap."))}
    return {"status": "not_significant", "answer": "Not established",
            "explanation": (
                f"{name} has the lowest {measure}, but its 95% confidence interval "
                f"({pct(low)} to {pct(high)}) reaches the class average ({pct(average)}), so with "
                f"{n} test images of this class the gap may be sampling noise. Audit more images "
                "per class to decide.")}


def _verdict_rows(results: dict, key: str) -> list[dict]:
    """One row per attack (clean and ensemble included) for the verdict's summary table."""
    rows = []
    for name, record in records(results).items():
        worst_class = record.get("worst_class")
        worst_ci = next((ci(e) for e in record["per_class"] if e["class"] == worst_class), (None, None))
        rows.append({
            "key": name, "label": attack_label(results, name),
            "description": record.get("description") or "",
            "avg": finite(record.get("avg")), "worst": finite(record.get("worst")),
            "worst_class": worst_class, "worst_ci": worst_ci,
            "nsd": finite(record.get("nsd")), "worst10": finite(record.get("worst10")),
            "n_attacked": None if name == CLEAN_KEY else record.get("n_attacked"),
            "seconds": finite(record.get("seconds")),
            "is_headline": name == key, "is_clean": name == CLEAN_KEY,
        })
    return rows


def verdict_section(results: dict) -> dict:
    model, dataset, config = results["model"], results["dataset"], results["config"]
    key = headline_key(results)
    headline = records(results)[key]
    classes = dataset["classes"]
    worst_name = headline.get("worst_class")
    worst_index = classes.index(worst_name) if worst_name in classes else robustness_order(results, key)[0]
    worst_entry = headline["per_class"][worst_index]
    worst = {"class": worst_entry["class"], "accuracy": finite(worst_entry["accuracy"]),
             "ci": ci(worst_entry), "n": worst_entry.get("n")}
    average = finite(headline.get("avg"))
    clean = results["attacks"].get(CLEAN_KEY)
    rows = _verdict_rows(results, key)
    warnings = [check for check in results["checks"] if check.get("severity") == "warning"]
    eps_text = budget_text(config)
    if key == CLEAN_KEY:
        summary = (f"Only clean accuracy was measured: {pct(average)} on average across classes; "
                   f"no attack ran, so this report says nothing about robustness.")
    else:
        summary = (f"Against {attack_in_words(results, key)} at ε = {eps_text}, {pct(average)} of test images "
                   f"stay correctly classified on average across classes"
                   + (f" (clean: {pct(clean.get('avg'))})" if clean else "")
                   + f". The weakest class is {worst['class']} at {pct(worst['accuracy'])}.")
    return {
        "model_name": basename(model.get("path") or "") if model.get("path") else "model",
        "model_path": model.get("path"), "arch": model.get("arch"), "format": model.get("format"),
        "white_box": model.get("white_box", True),
        "dataset_name": dataset.get("name"), "split": dataset.get("split"), "n": dataset.get("n"),
        "num_classes": len(classes),
        "eps": finite(config.get("eps")), "eps_255": eps_text,
        "scoring": config.get("scoring") or {},
        "clean_avg": finite(clean.get("avg")) if clean else None,
        "headline_key": key, "headline_label": attack_label(results, key),
        "is_robustness": key != CLEAN_KEY,
        "average": average, "worst": worst,
        "nsd": finite(headline.get("nsd")), "worst10": finite(headline.get("worst10")),
        "significance": significance(worst, average, "robust accuracy" if key != CLEAN_KEY else "clean accuracy"),
        "summary": summary, "rows": rows,
        "warning_count": len(warnings), "check_count": len(results["checks"]),
        "finished_at": display(results.get("finished_at")),
    }


def checks_section(results: dict) -> list[dict]:
    order = {"warning": 0, "info": 1}
    checks = [{
        "id": str(check.get("id") or ""), "severity": str(check.get("severity") or "info"),
        "message": str(check.get("message") or ""), "why": str(check.get("why") or ""),
    } for check in results["checks"]]
    return sorted(checks, key=lambda c: order.get(c["severity"], 2))  # stable: scan order within a severity


# --------------------------------------------------------------------------- per class and target flow


def _accuracy_cell(entry: dict) -> dict:
    low, high = ci(entry)
    return {"accuracy": finite(entry["accuracy"]), "ci": (low, high), "correct": entry.get("correct"),
            "n": entry.get("n")}


def per_class_section(results: dict, figures: dict) -> dict:
    by_attack = records(results)
    key = headline_key(results)
    order = robustness_order(results, key)
    classes = results["dataset"]["classes"]
    worst_name = by_attack[key].get("worst_class")
    columns = [{"key": name, "label": name, "is_headline": name == key} for name in by_attack]
    rows = []
    for rank, index in enumerate(order, start=1):
        reference = next(iter(by_attack.values()))["per_class"][index]
        rows.append({
            "rank": rank, "index": index, "class": classes[index], "n": reference.get("n"),
            "is_worst": classes[index] == worst_name,
            "cells": [_accuracy_cell(record["per_class"][index]) for record in by_attack.values()],
        })
    figure_id, table_id = "fig-per-class", "table-per-class"
    many = len(classes) > MAX_BAR_CLASSES
    section = {"columns": columns, "rows": rows, "figure_id": figure_id, "table_id": table_id,
               "sorted_by": attack_label(results, key), "worst_class": worst_name, "many_classes": many}
    if not many:
        figures[figure_id] = per_class_figure(by_attack, classes, order, worst_name)
        return section
    # Many classes: a sorted accuracy curve, the worst 10% first, the full table collapsed.
    headline = by_attack[key]["per_class"]
    k = math.ceil(len(classes) / 10)
    worst_accuracies = [finite(headline[i]["accuracy"]) for i in order[:k]]
    known = [a for a in worst_accuracies if a is not None]
    widths = sorted(high - low for low, high in (ci(headline[i]) for i in order) if None not in (low, high))
    sizes = sorted(e.get("n") for e in headline if isinstance(e.get("n"), int))
    figures[figure_id] = accuracy_curve_figure(headline, classes, order, k, attack_label(results, key))
    section.update({
        "worst_k": k, "worst_rows": rows[:k], "worst_table_id": "table-per-class-worst",
        "worst10": finite(by_attack[key].get("worst10")) if by_attack[key].get("worst10") is not None
        else (sum(known) / len(known) if known else None),
        "median_n": sizes[len(sizes) // 2] if sizes else None,
        "median_ci_width": widths[len(widths) // 2] if widths else None,
    })
    return section


def _flow_for(results: dict, name: str, position: int, figures: dict) -> dict:
    classes = results["dataset"]["classes"]
    num_classes = len(classes)
    cells = flow_rows(results["target_flow"][name], num_classes)   # sparse or dense results
    rows, largest, pairs = [], None, []
    for source, row in enumerate(cells):
        off_diagonal = {target: count for target, count in row.items() if target != source}
        fooled = sum(off_diagonal.values())
        ranked = sorted(((count, target) for target, count in off_diagonal.items() if count > 0),
                        key=lambda item: (-item[0], item[1]))
        top = [{"class": classes[target], "count": count, "share": count / fooled}
               for count, target in ranked[:TOP_DESTINATIONS]]
        rows.append({"class": classes[source], "fooled": fooled, "top": top,
                     "more": max(0, len(ranked) - TOP_DESTINATIONS)})
        if ranked and (largest is None or ranked[0][0] > largest["count"]):
            largest = {"source": classes[source], "target": classes[ranked[0][1]], "count": ranked[0][0]}
        pairs.extend((count, source, target, fooled) for count, target in ranked)
    total = sum(row["fooled"] for row in rows)
    figure_id = f"fig-flow-{position}"
    has_chart = num_classes <= MAX_HEATMAP_CLASSES
    matrix = dense_flow(results["target_flow"][name], num_classes) if has_chart else None
    if has_chart:
        figures[figure_id] = flow_heatmap(classes, matrix, [r["fooled"] for r in rows])
    top_flows = None
    if num_classes > MAX_BAR_CLASSES:
        pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
        top_flows = [{"rank": rank, "source": classes[source], "target": classes[target], "count": count,
                      "share": count / fooled}
                     for rank, (count, source, target, fooled) in enumerate(pairs[:TOP_FLOWS], start=1)]
    return {
        "key": name, "label": attack_label(results, name), "position": position,
        "figure_id": figure_id if has_chart else None, "table_id": f"table-flow-{position}",
        "matrix_table_id": f"table-flow-matrix-{position}",
        "top_flows": top_flows, "top_table_id": f"table-flow-top-{position}",
        "rows": rows, "total_fooled": total, "largest": largest,
        "matrix": matrix if num_classes <= MAX_MATRIX_TABLE_CLASSES else None, "classes": classes,
    }


def target_flow_section(results: dict, figures: dict) -> dict:
    flows = results["target_flow"]
    run_order = [name for name in records(results) if name in flows]
    names = run_order + [name for name in flows if name not in run_order]
    return {"attacks": [_flow_for(results, name, position, figures) for position, name in enumerate(names)],
            "has_heatmaps": len(results["dataset"]["classes"]) <= MAX_HEATMAP_CLASSES,
            "max_heatmap_classes": MAX_HEATMAP_CLASSES, "top_flow_count": TOP_FLOWS}


# --------------------------------------------------------------------------- examples and provenance


def examples_section(results: dict) -> dict:
    classes = results["dataset"]["classes"]
    key = headline_key(results)
    order = robustness_order(results, key)
    rank_of = {classes[index]: rank for rank, index in enumerate(order)}
    # Strongest attack first (lowest average robust accuracy): the failures a reader should see.
    strength = sorted((name for name in records(results) if name != CLEAN_KEY),
                      key=lambda name: (finite(records(results)[name].get("avg")) is None,
                                        finite(records(results)[name].get("avg")) or 0.0))
    attack_rank = {name: rank for rank, name in enumerate(strength)}
    worst_name = records(results)[key].get("worst_class")
    pairs, skipped = [], 0
    for example in results["examples"]:
        clean_src, adv_src = png_data_uri(example.get("clean_png")), png_data_uri(example.get("adv_png"))
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
                accuracy = finite(records(results)[key]["per_class"][classes.index(pair["class"])]["accuracy"])
            groups.append({"class": pair["class"], "is_worst": pair["class"] == worst_name,
                           "accuracy": accuracy, "pairs": []})
        groups[-1]["pairs"].append(pair)
    return {"groups": groups, "count": len(pairs), "skipped": skipped,
            "headline_label": attack_label(results, key)}


def preprocessing_text(preprocessing) -> str:
    """dataset.preprocessing as a reader quotes it: "preset robustbench-imagenet: resize 256, ..."."""
    if preprocessing is None:
        return "none: images used at their stored size"
    if not isinstance(preprocessing, dict):
        return display(preprocessing)
    steps = {k: v for k, v in preprocessing.items() if k != "preset" and v is not None}
    words = {"resize": "resize shorter side to", "center_crop": "center crop", "interpolation": "interpolation",
             "antialias": "antialias"}
    text = ", ".join(f"{words.get(k, k.replace('_', ' '))} {display(v)}" for k, v in steps.items()) or "none"
    return f"preset {display(preprocessing['preset'])}: {text}" if preprocessing.get("preset") else text


def _input_rows(dataset: dict, subset: dict) -> list[tuple[str, str]]:
    """Preprocessing and unreadable images skipped, when the results record them."""
    rows = []
    if "preprocessing" in dataset:
        rows.append(("Preprocessing", preprocessing_text(dataset["preprocessing"])))
    if "skipped_bad_images" in subset:
        rows.append(("Unreadable images skipped", display(subset["skipped_bad_images"])))
    return rows


def provenance_section(results: dict, role: str, anchor: str) -> dict:
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
            "name": name, "class": display(params.get("class")),
            "params": readable_rows({k: v for k, v in params.items() if k not in ("class", "repr")}),
            "repr": params.get("repr") or record.get("description") or "",
            "seconds": finite(per_attack_seconds.get(name, record.get("seconds"))),
        })
    scoring = config.get("scoring") or {}
    subset_text = ", ".join(f"{k} = {display(v)}" for k, v in subset.items()
                            if k != "skipped_bad_images") if subset else "—"
    return {
        "role": role, "anchor": anchor,
        "tool": f"{results['tool'].get('name', 'robaudit')} {results['tool'].get('version', '')}".strip()
        if isinstance(results["tool"], dict) else display(results["tool"]),
        "command": results.get("command") or "",
        "model": [
            ("File", display(model.get("path"))), ("Format", display(model.get("format"))),
            ("SHA-256", display(model.get("sha256"))),
            ("Parameters", f"{model['num_params']:,}" if isinstance(model.get("num_params"), int) else "—"),
            ("Architecture", display(model.get("arch"))),
            ("Gradient (white-box) attacks", "allowed" if model.get("white_box", True)
             else "not possible: only black-box attacks ran"),
        ] + (readable_rows(adaptations, "Adaptation") if isinstance(adaptations, dict) and adaptations else []),
        "dataset": [
            ("Dataset", display(dataset.get("name"))), ("Split", display(dataset.get("split"))),
            ("Images audited", display(dataset.get("n"))), ("Classes", display(len(dataset["classes"]))),
            ("Subset", subset_text or "—"), ("Source", display(dataset.get("source"))),
        ] + _input_rows(dataset, subset),
        "config": [
            (f"ε ({norm_label(config)} budget)", f"{budget_text(config)} = {display(config.get('eps'))}"),
            ("Seed", display(config.get("seed"))), ("Device", display(config.get("device"))),
            ("Batch size", display(config.get("batch_size"))),
            ("Iterates scored", display(scoring.get("iterates"))), ("Score", display(scoring.get("score"))),
        ],
        "attacks": attacks,
        "environment": readable_rows(results["environment"]) if results["environment"] else [],
        "timing": [("Started", display(results.get("started_at"))), ("Finished", display(results.get("finished_at"))),
                   ("Total seconds", display(rounded(timing.get("total_seconds"), 1)))],
        "notes": [str(note) for note in results["notes"]],
    }
