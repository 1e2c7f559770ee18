"""The plain-text views of a results document that `robaudit` prints on stdout.

`format_table`: per-class accuracy (%) under every attack, then avg / worst / NSD rows and
the headline's worst class. `before_after_line`: the headline's worst class and NSD of two
audits. Both lead with the block that `audit/headline.py` names.
"""

from __future__ import annotations

from robaudit.audit.headline import ENSEMBLE_KEY, headline_block, headline_key, summary_block


def _nsd(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: dict) -> str:
    """Compact per-class table (accuracy %) for stdout."""
    blocks = dict(results["attacks"])
    if results.get(ENSEMBLE_KEY):
        blocks[ENSEMBLE_KEY] = results[ENSEMBLE_KEY]
    names = list(blocks)
    if not names:
        return "no attack ran"
    classes = results["dataset"]["classes"]
    width = max([7] + [len(c) for c in classes])

    def cell(value, fmt="{:8.1f}", scale=100.0):
        return f"{'-':>8}" if value is None else fmt.format(scale * value)

    head = f"{'class':<{width}} {'n':>5} " + " ".join(f"{n:>8}" for n in names)
    lines = [head, "-" * len(head)]
    for i, cls in enumerate(classes):
        n = blocks[names[0]]["per_class"][i]["n"]
        cells = " ".join(cell(blocks[a]["per_class"][i]["accuracy"]) for a in names)
        lines.append(f"{cls[:width]:<{width}} {n:>5} {cells}")
    lines.append("-" * len(head))
    for label, key, fmt, scale in (("avg %", "avg", "{:8.1f}", 100.0), ("worst %", "worst", "{:8.1f}", 100.0),
                                   ("NSD", "nsd", "{:8.3f}", 1.0)):
        cells = " ".join(cell(blocks[a][key], fmt, scale) for a in names)
        lines.append(f"{label:<{width}} {'':>5} {cells}")
    key = headline_key(results)
    lead = summary_block(results, key)
    if lead is not None and lead["worst"] is not None:
        lines.append(f"worst class ({key}): {lead['worst_class']} "
                     f"{100 * lead['worst']:.1f}% (NSD = population SD / mean)")
    return "\n".join(lines)


def before_after_line(before: dict, after: dict) -> str:
    """'worst class: before X a% -> after Y b%; NSD p -> q' of the two headlines."""
    (_, b), (_, a) = headline_block(before), headline_block(after)
    return (f"worst class: before {b['worst_class']} {100 * b['worst']:.1f}% -> after "
            f"{a['worst_class']} {100 * a['worst']:.1f}%; NSD {_nsd(b['nsd'])} -> {_nsd(a['nsd'])}")
