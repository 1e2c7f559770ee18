"""`--preset NAME` for `robaudit remediate` and `robaudit list --presets` (remediate/presets.py).

The preset fills every option the command line did not give (click's parameter source
tells given from defaulted); given ones win and are recorded as overrides. The record
goes to RemediateConfig.preset -> results.json training.options.preset.
"""

from __future__ import annotations

import functools

import click

PRESET_KEY = "robaudit.preset"
_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def preset_option(f):
    """--preset NAME: the preset's values for the options the command line leaves out."""

    @click.option("--preset", default=None,
                  help="A named paper configuration (robaudit list --presets): sets method, student, "
                       "teacher --arch, schedule, eps, ... with their sources; explicit flags override it.")
    @functools.wraps(f)
    def wrapper(*args, preset=None, **kwargs):
        if preset is not None:
            from robaudit.remediate.presets import apply_preset

            ctx = click.get_current_context()
            given = {name for name in kwargs if ctx.get_parameter_source(name) in _GIVEN}
            kwargs, record = apply_preset(preset, kwargs, given)
            ctx.meta[PRESET_KEY] = record
            shown = ", ".join(f"--{k.replace('_', '-')} {v['given']}" for k, v in record["overrides"].items())
            click.echo(f"robaudit: preset {record['name']} ({record['row']})"
                       + (f"; overridden: {shown}" if shown else ""), err=True)
        return f(*args, **kwargs)

    return wrapper


def dataset_notes(cfg, dataset_name: str):
    """Notes on the training data against the preset and the dataset's defaults (per-dataset
    augmentation: none for MNIST, audit/data/paper_datasets.py DATASET_DEFAULTS)."""
    from robaudit.audit.data.paper_datasets import dataset_defaults
    from robaudit.remediate.presets import check_dataset

    notes = []
    if cfg.preset is not None:
        note = check_dataset(cfg.preset, dataset_name)
        if note:
            notes.append(note)
    defaults = dataset_defaults(dataset_name)
    if defaults is not None and cfg.augment and not defaults["augment"]:
        cfg.augment = False
        notes.append(f"no crop/flip augmentation on {dataset_name} ({defaults['source']})")
    return notes


def describe_presets() -> str:
    """Every preset: its paper row, its dataset, and each value with its source."""
    from robaudit.remediate.presets import PRESETS

    lines = []
    for name in sorted(PRESETS):
        preset = PRESETS[name]
        lines.append(f"{name}: {preset.row} [--dataset {preset.dataset}]")
        for key, (value, source) in preset.values.items():
            lines.append(f"    --{key.replace('_', '-'):<14} {value!s:<14} {source}")
        if preset.note:
            lines.append(f"    note: {preset.note}")
    return "\n".join(lines)


def eps_note(dataset_name: str, norm: str) -> str | None:
    """A note when --eps was left at its default and the dataset's usual budget differs
    (MNIST: 0.3 L-inf, audit/data/paper_datasets.py DATASET_DEFAULTS, with its source)."""
    from robaudit.audit.data.paper_datasets import dataset_defaults

    ctx = click.get_current_context(silent=True)
    defaults = dataset_defaults(dataset_name)
    if ctx is None or defaults is None or norm != defaults["norm"] or ctx.get_parameter_source("eps") in _GIVEN:
        return None
    if abs(defaults["eps"] - 8 / 255) < 1e-12:
        return None
    return (f"--eps is at its default 8/255; {dataset_name}'s usual L-inf budget is {defaults['eps']:g} "
            f"({defaults['source'].split(';')[0]}): pass --eps {defaults['eps']:g} to audit at it")
