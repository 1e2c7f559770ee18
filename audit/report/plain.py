"""Plain words for the report: configuration as readable rows, and what a remediation did.

Raw JSON dumps (`method {"adapt": "both", "alpha": 0.8333333333333334, ...}`) and
snake_case keys become rows of "Label | value" with nested structures flattened
("Method · alpha"), numbers to 4 significant digits and known keys given their words.
For a remediation the page says in sentences what the method did, how the kept epoch
was chosen and on which images (held-out training images per class, never the test
set), and where a per-class control (ABSLD's temperatures) sat at a bound.
"""

from __future__ import annotations

import math
from typing import Any

from robaudit.audit.report.formatting import display

OPTION_LABELS = {
    "lr": "learning rate", "beta": "β (temperature step)", "alpha": "α (weight of the attacked-image term)",
    "tau_bounds": "temperature bounds [τ min, τ max]", "adapt": "temperatures adapted",
    "risk": "per-class error risk", "loss_scale": "loss scale", "classwise_mean": "class-wise mean of the loss",
    "reference_compat": "authors' code behaviour", "reweight": "sample re-weighting",
    "beta_milestones": "β decay epochs", "weight_decay": "weight decay", "batch_size": "batch size",
    "milestones": "learning-rate decay epochs", "eps": "ε (training budget)", "norm": "norm",
    "steps": "inner attack steps", "step_size": "inner attack step size",
    "val_per_class": "held-out validation images per class", "val_per_class_rule": "how that number was set",
    "val_steps": "selection attack steps (PGD)", "augment": "augmentation", "seed": "seed",
    "precision": "precision", "world_size": "processes", "sync_bn": "synchronised batch norm",
    "schedule_preset": "schedule", "student": "student", "student_arch": "student architecture",
    "student_note": "student note", "student_init": "student initialised from", "epochs": "epochs",
    "momentum": "momentum", "method": "method option", "weight_power": "class-weight power",
}
MAX_DEPTH = 3


def readable_key(key: str) -> str:
    key = str(key)
    return OPTION_LABELS.get(key, key.replace("_", " "))


def readable_value(value: Any) -> str:
    """One value in words: 4 significant digits, yes/no, lists joined, missing as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "—"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list, tuple)) for v in value):
        return ", ".join(readable_value(v) for v in value) if value else "none"
    if isinstance(value, (dict, list, tuple)):
        return display(value)
    return str(value)


def readable_rows(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """A nested configuration as (label, value) rows; dicts flatten into "outer · inner"."""
    if isinstance(value, dict) and value and depth < MAX_DEPTH:
        rows = []
        for key, inner in value.items():
            label = readable_key(key) if not prefix else f"{prefix} · {readable_key(key)}"
            rows += readable_rows(inner, label, depth + 1)
        return rows
    if isinstance(value, dict) and not value and depth == 0:
        return []
    if isinstance(value, dict):
        return [(prefix or "value", "none" if not value else display(value))]
    return [(prefix or "value", readable_value(value))]


# --------------------------------------------------------------------------- remediation in words

METHOD_WORDS = {
    "absld": ("ABSLD distilled the student from the teacher: on each batch it attacked the student (PGD) and "
              "trained it to match the teacher's soft labels on both the clean and the attacked images. Each class "
              "had its own teacher temperature, updated after every epoch: lowered (sharper labels) for classes "
              "the student got wrong more often than average, raised for the easy ones, within fixed bounds."),
    "rslad": ("RSLAD distilled the student from the teacher: on each batch it attacked the student (PGD) and "
              "trained it to match the teacher's soft labels on both the clean and the attacked images, with one "
              "temperature for every class."),
    "fair-rslad": ("Fair-RSLAD is RSLAD (distillation on clean and attacked images) with each training image "
                   "weighted by its class: classes the student finds hard count more."),
    "sat": "Standard adversarial training: the model was trained on its own PGD adversarial images.",
    "trades": ("TRADES trained the model on clean images while penalising any change of its prediction under "
               "a PGD attack."),
    "cfa": ("CFA: adversarial training with a per-class attack budget and regularisation, and a weight average "
            "over epochs chosen per class."),
    "frl": "FRL fine-tuned the model, re-weighting and re-margining the classes whose robust error was highest.",
    "ferd": ("FERD distilled the student from the teacher without real data: the student learned from "
             "synthetic images generated to match the teacher's statistics, per class."),
}


def method_sentence(training: dict) -> str:
    method = str(training.get("method") or "")
    options = training.get("options") or {}
    method_options = options.get("method") if isinstance(options.get("method"), dict) else options
    words = METHOD_WORDS.get(method.lower(), f"The method {method or '(not recorded)'} trained the student.")
    details = []
    if isinstance(method_options, dict):
        if isinstance(method_options.get("alpha"), (int, float)):
            details.append(f"weight of the attacked-image term α = {method_options['alpha']:.4g}")
        if isinstance(method_options.get("beta"), (int, float)) and method.lower() == "absld":
            details.append(f"temperature step β = {method_options['beta']:.4g}")
        bounds = method_options.get("tau_bounds")
        if isinstance(bounds, list) and len(bounds) == 2:
            details.append(f"temperatures kept within [{readable_value(bounds[0])}, {readable_value(bounds[1])}]")
    if isinstance(options.get("steps"), int):
        details.append(f"PGD-{options['steps']} inner attack")
    return words + (f" Settings: {'; '.join(details)}." if details else "")


def selection_sentence(training: dict) -> str:
    """How the kept epoch was chosen, and on which images."""
    options = training.get("options") or {}
    epoch, epochs = training.get("selected_epoch"), training.get("epochs")
    selection = training.get("selection")
    val = options.get("val_per_class")
    if epoch is None and selection is None:
        return "The results do not record how the kept epoch was chosen."
    kept = f"The shipped student is the model after epoch {epoch} of {epochs}" if epoch is not None else \
        "The shipped student's epoch is not recorded"
    if isinstance(val, int) and val > 0:
        return (f"{kept}: the epoch with the highest sum of average and worst-class robust accuracy on {val} "
                f"held-out training images per class (set aside before training, never trained on). The test "
                f"images this report scores played no part in the choice"
                + (" (the ABSLD paper selected on the test set, so its numbers were chosen differently)."
                   if str(training.get("method")).lower() == "absld" else "."))
    return f"{kept}: {selection or 'the last epoch (no held-out validation images)'}."


def bound_notes(training: dict, classes: list[str], tolerance: float = 1e-6) -> list[str]:
    """Where a per-class control sat at one of its bounds, from which epoch on (ABSLD temperatures)."""
    options = training.get("options") or {}
    method_options = options.get("method") if isinstance(options.get("method"), dict) else options
    bounds = (method_options or {}).get("tau_bounds") if isinstance(method_options, dict) else None
    if not (isinstance(bounds, list) and len(bounds) == 2):
        return []
    notes = []
    for state in training.get("class_state") or []:
        per_epoch = state.get("per_epoch") or []
        if not per_epoch or not any(str(state.get(f) or "").startswith("tau") for f in ("name", "key")):
            continue
        for bound, word in ((bounds[0], "lower"), (bounds[1], "upper")):
            hits = []
            for k, name in enumerate(classes):
                column = [row[k] if row and k < len(row) else None for row in per_epoch]
                if column[-1] is None or abs(column[-1] - bound) > tolerance:
                    continue
                since = len(column)
                while since > 1 and column[since - 2] is not None and abs(column[since - 2] - bound) <= tolerance:
                    since -= 1
                hits.append(f"{name} (from epoch {since})")
            if hits:
                notes.append(f"{state.get('label') or state.get('key')}: {', '.join(hits)} ended at the {word} "
                             f"bound {readable_value(bound)}; the method could not move "
                             f"{'them' if len(hits) > 1 else 'it'} further.")
    return notes
