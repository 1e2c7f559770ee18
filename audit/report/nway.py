"""N-way comparison page: `robaudit report A B C ...` and the demo's teacher / ABSLD / RSLAD page.

Several audits of candidate models on the same test images, side by side: a leaderboard
(models ranked by worst-class robust accuracy, then the class average), paired tests
between every two models on the same images (paired bootstrap intervals of the worst-class
and average changes, exact McNemar on all images), and a per-class leaderboard (each
class's robust accuracy under every model, the best marked, with the exact McNemar test of
the best against the runner-up on that class's images). The per-image outcomes come from
each audit's samples.npz; they are used only when every audit's file is its own and all
ran on the same image indices (audit/paired.py's rules), otherwise the page says why not
and shows the unpaired numbers.

Like the single-audit page, this one is a pure function of its inputs: the same audits,
outcomes and `rendered_at` give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Optional

import numpy as np

from robaudit.audit.integrity import results_digest
from robaudit.audit.paired import correct_under, paired_test
from robaudit.audit.report.figures import OKABE_ITO, BAR_PATTERNS, base_layout, accuracy_axis, bar_trace, category_axis
from robaudit.audit.report.formatting import ci, finite, plotly_text
from robaudit.audit.report.headline import identity
from robaudit.audit.report.paired_stats import METHOD_TEXT, paired_deltas, pooled_mcnemar
from robaudit.audit.report.records import CLEAN_KEY, ENSEMBLE_KEY, attack_label, records
from robaudit.audit.report.redaction import basename, redact_results
from robaudit.errors import UserError

MAX_NWAY_BAR_CLASSES = 40     # grouped bars of several models per class stay readable up to here


@dataclass
class Candidate:
    """One audited model: its results, where they came from, and its per-image outcomes."""

    label: str
    results: dict
    results_dir: Optional[Path] = None


def shared_key(candidates: list[Candidate]) -> str:
    """The attack record every audit holds: the ensemble, else the first shared attack, else clean."""
    held = [set(records(c.results)) for c in candidates]
    common = set.intersection(*held)
    if ENSEMBLE_KEY in common:
        return ENSEMBLE_KEY
    for name in records(candidates[0].results):
        if name in common and name != CLEAN_KEY:
            return name
    if CLEAN_KEY in common:
        return CLEAN_KEY
    raise UserError("cannot compare: the audits share no attack; run the same attacks on all of them")


def check_comparable(candidates: list[Candidate]) -> list[str]:
    """UserError when the class lists differ; warnings when the test images may differ."""
    first = candidates[0].results["dataset"]
    for candidate in candidates[1:]:
        if candidate.results["dataset"]["classes"] != first["classes"]:
            raise UserError(f"cannot compare: {candidate.label} has a different class list from "
                            f"{candidates[0].label} (dataset.classes must match in names and order)")
    notes = []
    for field, label in (("name", "dataset"), ("split", "split"), ("n", "number of test images")):
        values = {str(c.results["dataset"].get(field)) for c in candidates}
        if len(values) > 1:
            notes.append(f"The {label} differs between the audits ({', '.join(sorted(values))}): the models were "
                         "not scored on the same images.")
    by_sha: dict[str, list[str]] = {}
    for candidate in candidates:
        sha = candidate.results["model"].get("sha256")
        if sha:
            by_sha.setdefault(sha, []).append(candidate.label)
    for labels in by_sha.values():
        if len(labels) > 1:
            notes.append(f"{' and '.join(labels)} are the same model file (identical sha256): any difference "
                         "between them comes from the audit settings, not the model.")
    eps = {str(finite(c.results["config"].get("eps"))) for c in candidates}
    if len(eps) > 1:
        notes.append(f"The audits ran at different budgets ε ({', '.join(sorted(eps))}).")
    return notes


def unique_labels(candidates: list[Candidate]) -> None:
    """Name each model by its method and file; number duplicates so every column is distinct."""
    seen: dict[str, int] = {}
    for candidate in candidates:
        if not candidate.label:
            method = (candidate.results.get("training") or {}).get("method")
            name = basename(candidate.results["model"].get("path") or "") or "model"
            candidate.label = f"{str(method).upper()} student ({name})" if method else name
        count = seen.get(candidate.label, 0) + 1
        seen[candidate.label] = count
        if count > 1:
            candidate.label = f"{candidate.label} #{count}"


def load_outcomes(candidates: list[Candidate], key: str) -> tuple[Optional[dict], str]:
    """{"y", "ok": [per model bool per image], "clean": [...]} aligned by dataset index, or (None, why)."""
    y_ref = index_ref = None
    ok, clean = [], []
    for candidate in candidates:
        if candidate.results_dir is None:
            return None, f"no samples.npz given for {candidate.label}"
        path = Path(candidate.results_dir) / "samples.npz"
        if not path.is_file():
            return None, f"{path} is missing"
        try:
            with np.load(path, allow_pickle=False) as samples:
                robust = correct_under(samples, candidate.results, key)
                clean_ok = np.asarray(samples["clean_pred"] == samples["y"], dtype=bool)
                index, y = samples["index"].astype(np.int64), samples["y"].astype(np.int64)
        except (OSError, KeyError, ValueError) as err:
            return None, f"{path} cannot be read ({type(err).__name__})"
        record = records(candidate.results)[key]
        counts = np.bincount(y[robust], minlength=len(candidate.results["dataset"]["classes"]))
        if [int(c) for c in counts] != [int(e["correct"]) for e in record["per_class"]]:
            return None, f"{path} does not hold the per-image outcomes behind {candidate.label}'s results"
        order = np.argsort(index, kind="stable")
        if index_ref is None:
            index_ref, y_ref = index[order], y[order]
        elif len(index) != len(index_ref) or not np.array_equal(index[order], index_ref) \
                or not np.array_equal(y[order], y_ref):
            return None, f"{candidate.label} was audited on different images (dataset indices or labels differ)"
        ok.append(robust[order])
        clean.append(clean_ok[order])
    return {"y": y_ref, "ok": ok, "clean": clean}, ""


# --------------------------------------------------------------------------- tables


def leaderboard(candidates: list[Candidate], key: str) -> list[dict]:
    rows = []
    for position, candidate in enumerate(candidates):
        results = candidate.results
        record = records(results)[key]
        clean = results["attacks"].get(CLEAN_KEY)
        worst_name = record.get("worst_class")
        worst_entry = next((e for e in record["per_class"] if e["class"] == worst_name), None)
        rows.append({
            "position": position, "label": candidate.label, "identity": identity(results),
            "digest": _digest(results), "clean": finite(clean.get("avg")) if clean else None,
            "avg": finite(record.get("avg")), "worst": finite(record.get("worst")), "worst_class": worst_name,
            "worst_ci": ci(worst_entry) if worst_entry else (None, None), "nsd": finite(record.get("nsd")),
            "worst10": finite(record.get("worst10")),
        })
    rows.sort(key=lambda r: (-(r["worst"] if r["worst"] is not None else -1), -(r["avg"] or 0.0), r["position"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _digest(results: dict) -> Optional[str]:
    try:
        return results_digest(results)
    except ValueError:
        return None


def pairwise(candidates: list[Candidate], outcomes: Optional[dict]) -> list[dict]:
    """Every two models: the paired changes of worst class and average, and McNemar on all images."""
    if outcomes is None:
        return []
    num_classes = len(candidates[0].results["dataset"]["classes"])
    rows = []
    for i, j in combinations(range(len(candidates)), 2):
        deltas = paired_deltas(outcomes["y"], outcomes["ok"][i], outcomes["ok"][j], num_classes)
        rows.append({"first": candidates[i].label, "second": candidates[j].label,
                     "worst": deltas["worst"], "avg": deltas["avg"], "nsd": deltas["nsd"],
                     "test": pooled_mcnemar(outcomes["ok"][i], outcomes["ok"][j])})
    return rows


def per_class_board(candidates: list[Candidate], key: str, outcomes: Optional[dict]) -> list[dict]:
    """Per class (hardest first: lowest best-model accuracy): every model's accuracy, the best
    marked, and McNemar of the best against the runner-up on this class's images."""
    classes = candidates[0].results["dataset"]["classes"]
    rows = []
    for k, name in enumerate(classes):
        entries = [records(c.results)[key]["per_class"][k] for c in candidates]
        values = [finite(e["accuracy"]) for e in entries]
        ranked = sorted((v, -m) for m, v in enumerate(values) if v is not None)
        best = -ranked[-1][1] if ranked else None
        runner = -ranked[-2][1] if len(ranked) > 1 else None
        test = None
        if outcomes is not None and best is not None and runner is not None:
            members = outcomes["y"] == k
            test = paired_test(outcomes["ok"][runner][members], outcomes["ok"][best][members])
        rows.append({"class": name, "cells": [{"accuracy": v, "ci": ci(e), "is_best": m == best}
                                              for m, (v, e) in enumerate(zip(values, entries))],
                     "best": candidates[best].label if best is not None else None,
                     "runner": candidates[runner].label if runner is not None else None, "test": test,
                     "hardest": max((v for v in values if v is not None), default=None)})
    rows.sort(key=lambda r: (r["hardest"] is None, r["hardest"] or 0.0, r["class"]))
    return rows


def nway_figure(candidates: list[Candidate], key: str, board: list[dict]) -> dict:
    classes = [row["class"] for row in board]
    labels = [plotly_text(c) for c in classes]
    index = {name: k for k, name in enumerate(candidates[0].results["dataset"]["classes"])}
    traces = [bar_trace(c.label, labels, [records(c.results)[key]["per_class"][index[name]] for name in classes],
                        OKABE_ITO[m % len(OKABE_ITO)], BAR_PATTERNS[m % len(BAR_PATTERNS)], m)
              for m, c in enumerate(candidates)]
    layout = base_layout(440)
    layout.update({"barmode": "group", "bargap": 0.25,
                   "xaxis": category_axis(labels, None, "class (hardest first)"), "yaxis": accuracy_axis()})
    return {"data": traces, "layout": layout}


def verdict_sentence(board: list[dict], pairs: list[dict], label: str) -> str:
    top = board[0]
    text = (f"Under {label}, {top['label']} has the highest worst-class robust accuracy: {top['worst_class']} at "
            f"{_pct(top['worst'])} (class average {_pct(top['avg'])}).")
    if len(board) > 1:
        second = board[1]
        pair = next((p for p in pairs if {p["first"], p["second"]} == {top["label"], second["label"]}), None)
        tied = (second["worst"], second["avg"]) == (top["worst"], top["avg"])
        text += (f" {second['label']} ties with it (same worst class and average)." if tied else
                 f" Next: {second['label']}, {second['worst_class']} at {_pct(second['worst'])}.")
        if pair is not None and pair["worst"]["low"] is not None:
            sign = 1 if pair["second"] == top["label"] else -1
            low, high = sorted((sign * pair["worst"]["low"], sign * pair["worst"]["high"]))
            text += (f" The paired 95% interval of the worst-class difference is {_pp(low)} to {_pp(high)} pp "
                     f"({'excludes' if low > 0 or high < 0 else 'includes'} 0); McNemar on all images "
                     f"p = {pair['test']['p']:.2g}.")
    return text


def _pp(fraction: float) -> str:
    """Signed percentage points, with no "-0.0" for a change that rounds to zero."""
    return f"{round(fraction * 100, 1) + 0.0:+.1f}"


def _pct(value) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def nway_context(candidates: list[Candidate], redact_paths: bool = False) -> dict:
    """Everything the N-way template renders. Digests name the results as given; with
    `redact_paths` the embedded copies have filesystem paths cut to basenames."""
    if len(candidates) < 2:
        raise UserError("an N-way comparison needs at least two results files")
    unique_labels(candidates)
    notes = check_comparable(candidates)
    key = shared_key(candidates)
    label = attack_label(candidates[0].results, key)
    outcomes, why_not = load_outcomes(candidates, key)
    board = leaderboard(candidates, key)
    pairs = pairwise(candidates, outcomes)
    classes_board = per_class_board(candidates, key, outcomes)
    figures = {}
    if len(classes_board) <= MAX_NWAY_BAR_CLASSES:
        figures["fig-nway"] = nway_figure(candidates, key, classes_board)
    dataset = candidates[0].results["dataset"]
    return {
        "title": f"Comparison of {len(candidates)} models on {dataset.get('name')}",
        "label": label, "key": key, "models": [c.label for c in candidates], "notes": notes,
        "leaderboard": board, "pairs": pairs, "classes": classes_board, "figures": figures,
        "paired": outcomes is not None, "why_not": why_not, "interval_method": METHOD_TEXT,
        "verdict": verdict_sentence(board, pairs, label),
        "embedded": [redact_results(c.results) if redact_paths else c.results for c in candidates],
        "redacted": redact_paths,
    }
