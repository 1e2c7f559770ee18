"""The remediation training part of the report: training curves and per-class trajectories.

Results written by `robaudit remediate` carry a `training` block: the method and its
options, per-epoch curves (loss, validation accuracies), the per-class quantities the
method declares it adapts over the epochs (training.class_state: whatever the method
names, with its own labels) and, for FERD, synthetic example images. This module turns
that block into the charts and tables of the page's comparison section; which
trajectories a block holds is results_schema.class_state_trajectories, shared with
validation.
"""

from __future__ import annotations

from robaudit.audit.report.comparison import delta
from robaudit.audit.report.figures import trajectory_figure, training_curves_figure
from robaudit.audit.report.formatting import finite, png_data_uri
from robaudit.audit.report.plain import bound_notes, method_sentence, readable_rows, selection_sentence
from robaudit.audit.results_schema import Trajectory, class_state_trajectories

MAX_TRAJECTORY_TABLE_EPOCHS = 10

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
def shown_epochs(count: int) -> list[int]:
    """At most MAX_TRAJECTORY_TABLE_EPOCHS epoch positions, evenly spread, first and last included."""
    if count <= MAX_TRAJECTORY_TABLE_EPOCHS:
        return list(range(count))
    step = (count - 1) / (MAX_TRAJECTORY_TABLE_EPOCHS - 1)
    return sorted({round(i * step) for i in range(MAX_TRAJECTORY_TABLE_EPOCHS)})


def _curves(training: dict, figures: dict) -> dict | None:
    """The training-curves chart and table; None when no curves were recorded."""
    curves_rows = [curve for curve in (training.get("curves") or [])]
    if not curves_rows:
        return None
    keys: list[str] = []
    for curve in curves_rows:
        keys += [k for k in curve if k != "epoch" and k not in keys]
    known = [k for k in TRAINING_CURVE_LABELS if k in keys]
    keys = known + [k for k in keys if k not in TRAINING_CURVE_LABELS]
    columns = [{"key": k, "label": TRAINING_CURVE_LABELS.get(k, k),
                "short_label": TRAINING_CURVE_SHORT_LABELS.get(k, k), "is_fraction": k.startswith("val_")}
               for k in keys]
    epochs = [curve.get("epoch", position + 1) for position, curve in enumerate(curves_rows)]
    figures["fig-training-curves"] = training_curves_figure(columns, epochs, curves_rows)
    return {"columns": columns, "figure_id": "fig-training-curves", "table_id": "table-training-curves",
            "rows": [{"epoch": epoch, "cells": [finite(curve.get(c["key"])) for c in columns]}
                     for epoch, curve in zip(epochs, curves_rows)]}


def _bounds(training: dict, key: str) -> list | None:
    """A temperature trajectory's [tau_min, tau_max] from the method options, when recorded."""
    options = training.get("options") or {}
    method = options.get("method") if isinstance(options.get("method"), dict) else options
    bounds = method.get("tau_bounds") if isinstance(method, dict) else None
    if key.startswith("tau") and isinstance(bounds, list) and len(bounds) == 2 \
            and all(finite(b) is not None for b in bounds) and bounds[0] < bounds[1]:
        return [float(bounds[0]), float(bounds[1])]
    return None


def _trajectory(classes: list[str], position: int, trajectory: Trajectory, figures: dict,
                bounds: list | None = None) -> dict:
    """One per-class trajectory: its chart and a table of at most MAX_TRAJECTORY_TABLE_EPOCHS epochs."""
    key, per_epoch = trajectory.key, trajectory.per_epoch
    figure_id = f"fig-trajectory-{position}"
    figures[figure_id] = trajectory_figure(classes, key, per_epoch, bounds)
    shown = shown_epochs(len(per_epoch))
    return {
        "key": key, "label": trajectory.label, "figure_id": figure_id,
        "table_id": f"table-trajectory-{position}", "epochs": [i + 1 for i in shown],
        "total_epochs": len(per_epoch),
        "rows": [{"class": name,
                  "cells": [finite(per_epoch[i][index]) for i in shown],
                  "change": delta(per_epoch[-1][index], per_epoch[0][index]) if per_epoch else None}
                 for index, name in enumerate(classes)],
    }


def training_section(results: dict, figures: dict) -> dict | None:
    """The training block as the template shows it; None for results of a plain scan."""
    training = results.get("training")
    if not training:
        return None
    classes = results["dataset"]["classes"]
    curves = _curves(training, figures)
    trajectories = [_trajectory(classes, position, trajectory, figures, _bounds(training, trajectory.key))
                    for position, trajectory in enumerate(class_state_trajectories(training))]
    options = training.get("options") or {}
    return {
        "method": training.get("method"), "teacher": training.get("teacher"), "epochs": training.get("epochs"),
        "options": readable_rows(options) if isinstance(options, dict) else [],
        "in_words": method_sentence(training), "selection": selection_sentence(training),
        "bound_notes": bound_notes(training, classes), "selected_epoch": training.get("selected_epoch"),
        "curves": curves, "trajectories": trajectories,
        "synthetic": [{"class": str(item.get("class")), "src": uri}
                      for item in (training.get("synthetic_examples") or []) if isinstance(item, dict)
                      for uri in [png_data_uri(item.get("png"))] if uri is not None],
    }
