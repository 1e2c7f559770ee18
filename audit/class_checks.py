"""Per-class reliability checks: where an average over classes hides one class.

The audit-wide checks (audit/checks.py) compare averages: "PGD-20 leaves more robust than
FGSM" is judged on the mean over all classes, so one class on which an iterative attack fails
(masked or vanishing gradients there, e.g. a class the model maps to saturated logits) drowns
in nine where it works. These checks compare the same two attacks class by class, and flag a
class only when the two 95% Wilson intervals (results per_class ci95) do not overlap, so that
a flag is not attack noise on a few points.

Each `*_findings(results)` returns the offending classes, worst first, as
`ClassFinding(class_index, gap, text)`; `class_flags(results)` turns them into flags for
results["checks"], and audit/checks_ledger.py reads the same findings for the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

# Attacks that take many gradient steps: each should leave at most as many points robust as
# one-step FGSM on every class (AutoAttack's flags_doc, "PGD weaker than FGSM", per class).
MULTI_STEP = ("pgd", "cw", "tpgd", "aa")
BLACK_BOX = ("square",)
# Classes named in a flag's message before "and N more".
NAMED_CLASSES = 3


@dataclass(frozen=True)
class ClassFinding:
    class_index: int
    gap: float        # how far apart the two intervals are (fractions); the largest is the worst
    text: str         # "cross: tpgd 38.3% [27.1-51.0%] vs fgsm 11.7% [5.8-22.2%]"


def _interval(entry: dict) -> Optional[tuple]:
    """(accuracy, low, high) of one per_class entry, None for an empty class or missing values."""
    ci = entry.get("ci95")
    if not entry.get("n") or entry.get("accuracy") is None or not ci or None in ci:
        return None
    return float(entry["accuracy"]), float(ci[0]), float(ci[1])


def _show(name: str, value: tuple) -> str:
    return f"{name} {value[0]:.1%} [{value[1] * 100:.1f}-{value[2]:.1%}]"


def _above(results: dict, higher: tuple, lower: tuple) -> List[ClassFinding]:
    """Classes where an attack of `higher` has its whole interval above an attack of `lower`'s.
    One finding per class: the pair with the widest gap."""
    attacks = results["attacks"]
    best: Dict[int, ClassFinding] = {}
    for high_name in (name for name in higher if name in attacks):
        for low_name in (name for name in lower if name in attacks and name != high_name):
            rows = zip(attacks[high_name]["per_class"], attacks[low_name]["per_class"])
            for k, (high_entry, low_entry) in enumerate(rows):
                high, low = _interval(high_entry), _interval(low_entry)
                if high is None or low is None or high[1] <= low[2]:
                    continue
                gap = high[1] - low[2]
                if k not in best or gap > best[k].gap:
                    best[k] = ClassFinding(k, gap, f"{high_entry.get('class', k)}: {_show(high_name, high)} "
                                                   f"vs {_show(low_name, low)}")
    return sorted(best.values(), key=lambda finding: -finding.gap)


def multistep_weaker_findings(results: dict) -> List[ClassFinding]:
    """Classes where a multi-step attack (pgd, cw, tpgd, aa) leaves significantly more points
    robust than one-step FGSM: its 95% interval lies wholly above FGSM's."""
    return _above(results, MULTI_STEP, ("fgsm",))


def blackbox_stronger_findings(results: dict) -> List[ClassFinding]:
    """Classes where the black-box Square attack leaves significantly fewer points robust than a
    multi-step white-box attack: the white-box interval lies wholly above Square's."""
    return _above(results, MULTI_STEP, BLACK_BOX)


def clean_below_chance_findings(results: dict) -> List[ClassFinding]:
    """Classes whose clean accuracy is significantly below chance (1/C): the whole interval under it."""
    clean = results["attacks"].get("clean")
    num_classes = _num_classes(results)
    if clean is None or num_classes < 2:
        return []
    chance = 1.0 / num_classes
    found = []
    for k, entry in enumerate(clean["per_class"]):
        value = _interval(entry)
        if value is not None and value[2] < chance:
            found.append(ClassFinding(k, chance - value[2], f"{entry.get('class', k)}: clean {value[0]:.1%} "
                                                            f"[{value[1] * 100:.1f}-{value[2]:.1%}]"))
    return sorted(found, key=lambda finding: -finding.gap)


def _num_classes(results: dict) -> int:
    dataset = results.get("dataset") or {}
    clean = results["attacks"].get("clean") or {}
    return int(dataset.get("num_classes") or len(dataset.get("classes") or clean.get("per_class") or []))


def _listing(findings: List[ClassFinding]) -> str:
    named = "; ".join(finding.text for finding in findings[:NAMED_CLASSES])
    more = len(findings) - NAMED_CLASSES
    return named + (f"; and {more} more" if more > 0 else "")


def class_flags(results: dict) -> List[Dict[str, str]]:
    """results["checks"] flags of the per-class checks (docs/checks.md)."""
    flags = []
    found = multistep_weaker_findings(results)
    if found:
        flags.append({
            "id": "class_multistep_weaker_than_fgsm", "severity": "warning",
            "message": (f"in {len(found)} class(es) a multi-step attack leaves more points robust than "
                        f"one-step FGSM, with non-overlapping 95% intervals: {_listing(found)}"),
            "why": ("an iterative attack that loses to a single step on one class suggests masked or vanishing "
                    "gradients on that class, hidden in the average; trust the lowest number of each class "
                    "(the ensemble) and run aa and square")})
    found = blackbox_stronger_findings(results)
    if found:
        flags.append({
            "id": "class_blackbox_stronger_than_whitebox", "severity": "warning",
            "message": (f"in {len(found)} class(es) the black-box Square attack beats a white-box attack, "
                        f"with non-overlapping 95% intervals: {_listing(found)}"),
            "why": ("a gradient-free attack should not beat a gradient attack on a differentiable model; on "
                    "these classes the gradients are likely masked, so the white-box numbers overstate "
                    "robustness there")})
    found = clean_below_chance_findings(results)
    if found:
        flags.append({
            "id": "class_clean_below_chance", "severity": "warning",
            "message": (f"{len(found)} class(es) have clean accuracy significantly below chance "
                        f"(1/{_num_classes(results)}): {_listing(found)}"),
            "why": ("a model that is almost never right on a class it was trained on usually sees that class "
                    "under another label: check the class order (--class-map FILE) and --class-names")})
    return flags
