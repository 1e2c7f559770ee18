"""The report's first screen: what a reviewer reads in one minute, as plain data.

One card at the top of every page (1280x800, no scrolling): the verdict in one sentence,
the policy result when gates were given (--fail-under-worst / --fail-over-nsd: pass or
fail, by the same rule as the engine's gate), every class whose 95% interval lies wholly
below the class average (not only the single worst), the results digest (sha256 of
results.json's bytes as written, `integrity.results_digest`, of the results as given,
before any --redact-paths copy) and who made the numbers: the model's identity and the
robaudit version and commit that wrote results.json.
"""

from __future__ import annotations

from robaudit.audit.integrity import results_digest
from robaudit.audit.report.formatting import ci, finite, pct
from robaudit.audit.report.records import CLEAN_KEY, ENSEMBLE_KEY, attack_label, headline_key, records
from robaudit.audit.report.redaction import basename


def below_average(results: dict, key: str) -> list[dict]:
    """Every class whose 95% Wilson interval lies wholly below the class average under `key`,
    least robust first; 0% reads as every correctly classified image being flipped."""
    record = records(results)[key]
    average = finite(record.get("avg"))
    if average is None:
        return []
    rows = []
    for entry in record["per_class"]:
        low, high = ci(entry)
        accuracy = finite(entry["accuracy"])
        if high is None or accuracy is None or not high < average:
            continue
        rows.append({"class": entry["class"], "accuracy": accuracy, "ci": (low, high), "n": entry.get("n"),
                     "all_flipped": accuracy == 0 and key != CLEAN_KEY})
    return sorted(rows, key=lambda r: (r["accuracy"], r["class"]))


def gate_block(results: dict, attack: str | None) -> tuple[str, dict | None]:
    """The block a gate checks: as audit/engine.check_gates picks it (ensemble, else clean)."""
    if attack == ENSEMBLE_KEY or (not attack and results.get("ensemble")):
        return "ensemble", results.get("ensemble")
    if attack:
        return attack, results["attacks"].get(attack)
    return "clean", results["attacks"].get(CLEAN_KEY)


def policy(results: dict, gates: dict | None) -> dict | None:
    """Pass/fail of --fail-under-worst / --fail-over-nsd, or None when no gate was given.
    `gates` (a render option) wins over results["config"]["gates"] (when the engine records it)."""
    gates = gates or (results.get("config") or {}).get("gates") or {}
    worst_gate, nsd_gate = finite(gates.get("fail_under_worst")), finite(gates.get("fail_over_nsd"))
    if worst_gate is None and nsd_gate is None:
        return None
    label, block = gate_block(results, gates.get("attack"))
    items = []
    if block is None or finite(block.get("worst")) is None:
        return {"passed": False, "items": [f"no {label} results to check: a gate fails closed"]}
    passed = True
    if worst_gate is not None:
        ok = block["worst"] >= worst_gate
        passed &= ok
        items.append(f"worst-class accuracy {pct(block['worst'])} ({block.get('worst_class')}) "
                     f"{'≥' if ok else '<'} --fail-under-worst {pct(worst_gate)}: {'pass' if ok else 'FAIL'}")
    if nsd_gate is not None:
        nsd = finite(block.get("nsd"))
        ok = nsd is None or nsd <= nsd_gate
        passed &= ok
        items.append(f"NSD {'—' if nsd is None else f'{nsd:.3f}'} {'≤' if ok else '>'} --fail-over-nsd "
                     f"{nsd_gate:g}: {'pass' if ok else 'FAIL'}")
    return {"passed": passed, "items": items, "attack": attack_label(results, label) if label != "clean"
            else "Clean (no attack)"}


def identity(results: dict) -> dict:
    model, tool = results["model"], results.get("tool") or {}
    sha = model.get("sha256")
    commit = tool.get("commit")
    return {
        "model": basename(model.get("path") or "") or "model",
        "arch": model.get("arch"), "format": model.get("format"),
        "sha256": sha, "sha256_short": sha[:12] if isinstance(sha, str) else None,
        "tool": f"{tool.get('name', 'robaudit')} {tool.get('version', '?')}",
        "commit": commit if commit else "commit not recorded",
    }


def digest_or_none(results: dict) -> str | None:
    """results_digest, or None when the results hold NaN/infinity (results.json, as robaudit
    writes it, cannot hold them, so no file has this digest; the page says so)."""
    try:
        return results_digest(results)
    except ValueError:
        return None


def headline_section(results: dict, verdict: dict, gates: dict | None = None, digest: str | None = None) -> dict:
    """The first-screen card. `results` must be the results as given (the digest names them);
    `digest`, when given, is the one the page's integrity stamp names (render.build_context)."""
    key = headline_key(results)
    worst = below_average(results, key)
    return {
        "digest": digest if digest is not None else digest_or_none(results),
        "identity": identity(results),
        "policy": policy(results, gates),
        "below_average": worst,
        "measure": attack_label(results, key),
        "summary": verdict["summary"],
        "lowest": verdict["worst"],
        "average": verdict["average"],
    }
