"""The results.json contract: what `robaudit scan` writes and what the report reads.

One module for both sides, as coverage.py's html.py feeds its templates from plain data:
the engine builds every results document with `results_document` (the keys, their order
and the schema version in one place), the report checks what it is given with
`validate_results` before rendering, and docs/results-schema.md describes the same keys.

Remediation adds a `training` block. What a method learns per class is listed in
`training.class_state` ([{"name", "key", "label", "per_epoch"}], drawn from what each
method declares, remediate/base.py ClassState), so the report shows any method's
trajectories without knowing its vocabulary. Results files written before class_state
existed hold three fixed keys instead (temperatures.tau_adv / tau_nat, class_weights,
class_probabilities); `class_state_trajectories` reads those too, and
`legacy_class_state_keys` keeps writing them for readers of schema version 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from robaudit.errors import UserError

SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "schema_version", "tool", "command", "started_at", "finished_at", "model", "dataset",
    "config", "attacks", "ensemble", "target_flow", "examples", "checks", "timing",
    "environment", "notes",
)
PER_CLASS_KEYS = ("class", "n", "correct", "accuracy", "ci95")
ENSEMBLE_KEY = "ensemble"

# The trajectories of results written before training.class_state, with the labels the
# methods that wrote them declare today (remediate/distillation.py, remediate/ferd.py).
LEGACY_TRAJECTORIES = (
    ("temperatures.tau_adv", "tau_adv", "Teacher temperature per class on adversarial inputs (τ_adv)"),
    ("temperatures.tau_nat", "tau_nat", "Teacher temperature per class on clean inputs (τ_nat)"),
    ("class_weights", "class_weights", "Per-class loss weights"),
    ("class_probabilities", "class_probabilities",
     "Class sampling probability of synthetic labels (FERD; more for less robust classes)"),
)


def results_document(*, command: Optional[str], started_at: str, finished_at: str, model: dict, dataset: dict,
                     config: dict, attacks: dict, ensemble: Optional[dict], target_flow: dict, examples: list,
                     checks: list, timing: dict, environment: dict, notes: List[str],
                     training: Optional[dict] = None) -> Dict[str, Any]:
    """A results.json document with every key in its place (docs/results-schema.md)."""
    from robaudit.audit.integrity import tool_identity   # integrity imports this module

    return {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_identity(),
        "command": command, "started_at": started_at, "finished_at": finished_at,
        "model": model, "dataset": dataset, "config": config, "attacks": attacks, "ensemble": ensemble,
        "target_flow": target_flow, "examples": examples, "checks": checks,
        "checks_ledger": None,   # filled once the result checks ran (audit/checks_ledger.build_ledger)
        "timing": timing,
        "environment": environment, "notes": notes, "training": training,
    }


@dataclass(frozen=True)
class Trajectory:
    """One per-class quantity over the epochs, as the report draws it."""

    source: str          # where it sits in the training block (for messages)
    key: str             # short name (the chart's axis title)
    label: str           # the chart's heading
    per_epoch: Any       # [[value per class] per epoch]


def results_json_text(results: dict, indent: int = 2) -> str:
    """results.json's text: indented like json.dumps(indent=2), except that a list holding
    only numbers / null / booleans goes on one line. Per-class curves are 1000 classes x
    3 lists of ~100 numbers: one number per line would make them ~6 MB of whitespace, on
    one line they are ~2.7 MB. The JSON value is the same (json.loads gives it back);
    NaN and infinities are refused as by allow_nan=False."""
    def scalar(value) -> bool:
        return value is None or isinstance(value, (bool, int, float))

    def dump(value, level: int) -> str:
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(value, dict) and value:
            items = [f"{inner}{json.dumps(str(k))}: {dump(v, level + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, (list, tuple)) and value and not all(scalar(v) for v in value):
            return "[\n" + ",\n".join(inner + dump(v, level + 1) for v in value) + "\n" + pad + "]"
        return json.dumps(value, allow_nan=False, separators=(", ", ": "))

    return dump(results, 0) + "\n"


def class_state_trajectories(training: dict) -> List[Trajectory]:
    """The per-class trajectories a training block holds: training.class_state, else the legacy keys."""
    if isinstance(training.get("class_state"), list):
        return [Trajectory(f"class_state.{s['name']}", str(s["name"]), str(s.get("label") or s["name"]),
                           s["per_epoch"])
                for s in training["class_state"] if isinstance(s, dict) and s.get("per_epoch") is not None]
    found = []
    for source, key, label in LEGACY_TRAJECTORIES:
        holder, _, inner = source.rpartition(".")
        block = training.get(holder) if holder else training
        rows = block.get(inner) if isinstance(block, dict) else None
        if rows is not None:
            found.append(Trajectory(source, key, label, rows))
    return found


def legacy_class_state_keys(class_state: List[dict]) -> dict:
    """The schema-1 keys (temperatures, class_weights[, class_probabilities]) for a class_state list."""
    rows = {s["name"]: s["per_epoch"] for s in class_state}
    out: Dict[str, Any] = {
        "temperatures": ({"tau_adv": rows["tau_adv"], "tau_nat": rows.get("tau_nat")} if "tau_adv" in rows
                         else None),
        "class_weights": rows.get("class_weights"),
    }
    if "class_probabilities" in rows:
        out["class_probabilities"] = rows["class_probabilities"]
    return out


# --------------------------------------------------------------------------- target flows
#
# results.json stores each attack's target flow sparsely: only the non-zero cells of the
# C x C matrix (row = true class, column = adversarial prediction), as
# {"format": "sparse", "entries": [[source, target, count], ...]} sorted by (source, target).
# Results written before that hold the dense C x C list of lists; every reader goes through
# `flow_rows` / `dense_flow`, which accept both.

SPARSE_FLOW_FORMAT = "sparse"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sparse_flow(matrix) -> Dict[str, Any]:
    """The sparse results.json form of a dense C x C target-flow matrix (zeros dropped)."""
    entries = [[source, target, int(count)] for source, row in enumerate(matrix)
               for target, count in enumerate(row) if count]
    return {"format": SPARSE_FLOW_FORMAT, "entries": entries}


def is_sparse_flow(flow: Any) -> bool:
    return isinstance(flow, dict) and flow.get("format") == SPARSE_FLOW_FORMAT


def flow_rows(flow: Any, num_classes: int) -> List[Dict[int, int]]:
    """Either form as one {target: count} dict per true class (non-zero cells only)."""
    rows: List[Dict[int, int]] = [{} for _ in range(num_classes)]
    if is_sparse_flow(flow):
        for source, target, count in flow["entries"]:
            if count:
                rows[source][target] = rows[source].get(target, 0) + int(count)
    else:
        for source, row in enumerate(flow):
            for target, count in enumerate(row):
                if count:
                    rows[source][target] = int(count)
    return rows


def dense_flow(flow: Any, num_classes: int) -> List[List[int]]:
    """Either form as the dense C x C matrix (for small C: heatmaps, matrix tables, tests)."""
    if not is_sparse_flow(flow):
        return [[int(count or 0) for count in row] for row in flow]
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for source, row in enumerate(flow_rows(flow, num_classes)):
        for target, count in row.items():
            matrix[source][target] = count
    return matrix


def target_flow_problem(flow: Any, num_classes: int) -> Optional[str]:
    """What is wrong with one attack's target flow (a suffix for "target_flow.<attack>"), or None."""
    if isinstance(flow, dict):
        if flow.get("format") != SPARSE_FLOW_FORMAT:
            return (f' has format {flow.get("format")!r}; expected "sparse" (or a dense '
                    f"{num_classes}x{num_classes} matrix)")
        entries = flow.get("entries")
        if not isinstance(entries, list):
            return ".entries must be a list of [source, target, count] triples"
        seen = set()
        for position, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 3 and all(_is_int(v) for v in entry)
                    and 0 <= entry[0] < num_classes and 0 <= entry[1] < num_classes
                    and entry[0] != entry[1] and entry[2] > 0):
                return (f".entries[{position}] must be [source, target, count]: class indices in "
                        f"0..{num_classes - 1}, source != target, count a positive integer; "
                        f"got {json.dumps(entry, default=str)[:80]}")
            if (entry[0], entry[1]) in seen:
                return f".entries[{position}] repeats the pair [{entry[0]}, {entry[1]}]"
            seen.add((entry[0], entry[1]))
        return None
    if (not isinstance(flow, list) or len(flow) != num_classes
            or not all(isinstance(row, list) and len(row) == num_classes for row in flow)):
        return f' must be a {num_classes}x{num_classes} matrix or {{"format": "sparse", "entries": [...]}}'
    return None


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
    for name, flow in results["target_flow"].items():
        problem = target_flow_problem(flow, num_classes)
        if problem:
            fail(f"target_flow.{name}{problem}")
    for position, example in enumerate(results["examples"]):
        if not isinstance(example, dict):
            fail(f"examples[{position}] must be an object")
    for position, check in enumerate(results["checks"]):
        if not isinstance(check, dict) or "message" not in check:
            fail(f"checks[{position}] needs a message")
    ledger = results.get("checks_ledger")   # optional: results written before it have none
    if ledger is not None and not (isinstance(ledger, list) and all(
            isinstance(entry, dict) and isinstance(entry.get("id"), str)
            and entry.get("state") in ("passed", "failed", "not_run") for entry in ledger)):
        fail('checks_ledger must be a list of {"id", "state": "passed" | "failed" | "not_run", ...} objects')
    training = results.get("training")
    if training is not None:
        if not isinstance(training, dict):
            fail("training must be an object or null")
        if "class_state" in training and not (isinstance(training["class_state"], list) and all(
                isinstance(s, dict) and "name" in s and "per_epoch" in s for s in training["class_state"])):
            fail("training.class_state must be a list of {name, label, per_epoch} objects")
        for trajectory in class_state_trajectories(training):
            rows = trajectory.per_epoch
            if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == num_classes
                                                     for r in rows):
                fail(f"training.{trajectory.source} must hold one list of {num_classes} values per epoch")
        curves = training.get("curves")
        if curves is not None and (not isinstance(curves, list)
                                   or not all(isinstance(c, dict) for c in curves)):
            fail("training.curves must be a list of objects")
