"""Reading a validated results dict for the report: attack records, the headline, class order.

Every section asks the same questions of the results: which attack summaries exist
(in run order, the ensemble last), which one the verdict leads with, how an attack is
named in a table and in a sentence, and in which order the classes go (least robust
first). The answers live here so that the sections agree on them.
"""

from __future__ import annotations

from robaudit.audit.headline import CLEAN_KEY, headline_key  # noqa: F401 (the one headline rule)
from robaudit.audit.report.formatting import finite
from robaudit.audit.results_schema import ENSEMBLE_KEY


def records(results: dict) -> dict:
    """Attack name -> summary block, in run order, with the ensemble last."""
    found = {name: record for name, record in results["attacks"].items() if name != ENSEMBLE_KEY}
    if results.get("ensemble"):
        found[ENSEMBLE_KEY] = results["ensemble"]
    return found


def ensemble_members(results: dict) -> list[str]:
    return [m for m in (results["ensemble"] or {}).get("attacks", []) if m != CLEAN_KEY]


def attack_label(results: dict, key: str) -> str:
    """The attack as it reads in a table row or a chart legend."""
    if key == ENSEMBLE_KEY:
        members = ensemble_members(results)
        return f"Ensemble (worst case over {', '.join(members)})" if members else "Ensemble"
    if key == CLEAN_KEY:
        return "Clean (no attack)"
    return key


def attack_in_words(results: dict, key: str) -> str:
    """The attack as it reads inside a sentence."""
    if key == ENSEMBLE_KEY:
        members = ensemble_members(results)
        return (f"all attacks combined ({', '.join(members)}; an image counts as robust only if it survives "
                "every one)") if members else "the attack ensemble"
    return f"the {key} attack"


def robustness_order(results: dict, key: str) -> list[int]:
    """Class indices from least to most robust under `key` (the worst class first;
    classes without a value last; ties keep dataset order)."""
    record = records(results)[key]
    worst = record.get("worst_class")

    def sort_key(index: int):
        accuracy = finite(record["per_class"][index]["accuracy"])
        return (accuracy is None, accuracy or 0.0, record["per_class"][index]["class"] != worst, index)

    return sorted(range(len(record["per_class"])), key=sort_key)
