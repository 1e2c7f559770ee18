"""The checks ledger and replayed failures, as the report shows them.

`checks_ledger` (results.json, written by the engine when present): every check robaudit
knows, one entry each, with its state (passed, failed, not_run) and why. The report lists
all of them, failed first, so a reader sees what was checked and not only what went
wrong; results without a ledger fall back to the old `checks` flags.

`attacks.<name>.replay` (when present): per class, how many failures the attack found
were replayed on the shipped artifact (8-bit images, the exported model) and still fooled
it ("realizable"), and how many could not be confirmed.
"""

from __future__ import annotations

from robaudit.audit.report.formatting import display
from robaudit.audit.report.records import CLEAN_KEY

STATE_ORDER = {"failed": 0, "not_run": 1, "passed": 2}
STATE_WORDS = {"failed": "Failed", "not_run": "Not run", "passed": "Passed"}


def ledger_section(results: dict) -> dict | None:
    """The ledger rows (failed, then not run, then passed; ledger order within), or None when absent."""
    ledger = results.get("checks_ledger")
    if not isinstance(ledger, list):
        return None
    classes = results["dataset"]["classes"]
    rows = []
    for position, entry in enumerate(item for item in ledger if isinstance(item, dict)):
        state = str(entry.get("state") or "not_run")
        cls = entry.get("class")
        rows.append({
            "id": str(entry.get("id") or ""), "title": str(entry.get("title") or entry.get("id") or ""),
            "state": state if state in STATE_ORDER else "not_run", "state_word": STATE_WORDS.get(state, display(state)),
            "reason": str(entry.get("reason") or ""), "severity": str(entry.get("severity") or "info"),
            "scope": "class " + (classes[cls] if isinstance(cls, int) and 0 <= cls < len(classes) else display(cls))
            if entry.get("scope") == "class" else "audit",
            "position": position,
        })
    rows.sort(key=lambda r: (STATE_ORDER.get(r["state"], 1), r["position"]))
    counts = {state: sum(1 for r in rows if r["state"] == state) for state in STATE_ORDER}
    return {"rows": rows, "counts": counts,
            "failed_warnings": sum(1 for r in rows if r["state"] == "failed" and r["severity"] in ("warning", "error"))}


def replay_section(results: dict) -> dict | None:
    """Per class and attack: realizable failures (and unconfirmed ones), or None when no attack has a replay."""
    classes = results["dataset"]["classes"]
    attacks = []
    for name, record in results["attacks"].items():
        replay = record.get("replay") if isinstance(record, dict) and name != CLEAN_KEY else None
        if not isinstance(replay, dict):
            continue
        realizable = replay.get("realizable") or []
        unconfirmed = replay.get("unconfirmed") or []
        if len(realizable) != len(classes):
            continue
        attacks.append({"name": name, "runtime": display(replay.get("runtime")), "realizable": realizable,
                        "unconfirmed": unconfirmed if len(unconfirmed) == len(classes) else [None] * len(classes),
                        "total_unconfirmed": sum(v for v in unconfirmed if isinstance(v, int))})
    if not attacks:
        return None
    rows = [{"class": name, "cells": [(a["realizable"][k], a["unconfirmed"][k]) for a in attacks]}
            for k, name in enumerate(classes)]
    return {"attacks": attacks, "rows": rows, "any_unconfirmed": any(a["total_unconfirmed"] for a in attacks)}
