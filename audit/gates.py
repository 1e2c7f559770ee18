"""The CI gates (--fail-under-worst, --fail-over-nsd), one outcome per policy.

`gate_outcomes` is what `robaudit scan` raises on (engine.check_gates: the first failure)
and what `robaudit export --format junit` writes (one testcase per policy). Both read the
block the headline rule names (audit/headline.py), or the one --gate-attack names.
A gate fails closed: numbers that were not produced cannot pass it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from robaudit.audit.headline import headline_key, summary_block


@dataclass(frozen=True)
class GateOutcome:
    policy: str            # "fail_under_worst" | "fail_over_nsd"
    threshold: float
    block: str             # the summary block read ("ensemble", an attack, "clean")
    value: Optional[float]
    passed: bool
    message: str           # why it failed, or what passed


def gate_outcomes(results: dict, *, fail_under_worst: Optional[float] = None,
                  fail_over_nsd: Optional[float] = None, gate_attack: Optional[str] = None) -> List[GateOutcome]:
    label = gate_attack or headline_key(results)
    block = summary_block(results, label)
    outcomes = []
    missing = block is None or block["worst"] is None
    missing_text = f"gate failed: no {label} results to check (was the attack refused?)"
    if fail_under_worst is not None:
        if missing:
            outcomes.append(GateOutcome("fail_under_worst", fail_under_worst, label, None, False, missing_text))
        else:
            passed = not block["worst"] < fail_under_worst
            outcomes.append(GateOutcome(
                "fail_under_worst", fail_under_worst, label, block["worst"], passed,
                f"{label} worst-class accuracy {block['worst']:.4f} ({block['worst_class']}) is at least "
                f"{fail_under_worst}" if passed else
                f"gate failed: {label} worst-class accuracy {block['worst']:.4f} "
                f"({block['worst_class']}) is under --fail-under-worst {fail_under_worst}"))
    if fail_over_nsd is not None:
        if missing:
            outcomes.append(GateOutcome("fail_over_nsd", fail_over_nsd, label, None, False, missing_text))
        else:
            nsd = block["nsd"]
            passed = nsd is None or not nsd > fail_over_nsd   # NSD is undefined when the mean is 0
            outcomes.append(GateOutcome(
                "fail_over_nsd", fail_over_nsd, label, nsd, passed,
                (f"{label} NSD {nsd:.4f} is at most {fail_over_nsd}" if nsd is not None else
                 f"{label} NSD is undefined (mean accuracy 0); not checked") if passed else
                f"gate failed: {label} NSD {nsd:.4f} is over --fail-over-nsd {fail_over_nsd}"))
    return outcomes
