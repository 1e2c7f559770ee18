"""The checks ledger and the per-class checks: every known check once, each passed, failed or not run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from report_fixtures import class_entry, make_results, set_accuracy
from robaudit.audit import class_checks
from robaudit.audit.checks import result_checks
from robaudit.audit.checks_ledger import build_ledger, list_checks
from robaudit.audit.results_schema import validate_results

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checks.md"
CLASSES = ("airplane", "cross", "bird")
N = 60   # per class: the demo's class size, so the demo's intervals come out as in the issue


def audit(attacks=("fgsm", "pgd"), *, robust=None, clean=None, white_box=True, requested=None) -> dict:
    """Results of a 3-class audit, N images per class: robust[attack] = correct count per class."""
    results = make_results(classes=CLASSES, attacks=attacks, n_per_class=N, checks=False)
    results["checks"] = []
    for name, counts in (robust or {}).items():
        for class_name, correct in zip(CLASSES, counts):
            set_accuracy(results, name, class_name, correct)
    if clean is not None:
        for class_name, correct in zip(CLASSES, clean):
            set_accuracy(results, "clean", class_name, correct)
    results["model"]["white_box"] = white_box
    results["config"]["attacks"] = {name: {} for name in (requested or ("clean", *attacks))}
    return results


def ledger_of(results: dict, flags=None) -> dict:
    results = copy.deepcopy(results)
    results["checks"] = (flags or []) + result_checks(results)
    entries = build_ledger(results)
    return {entry["id"]: entry for entry in entries}


def flag(id: str) -> dict:
    return {"id": id, "severity": "warning", "message": f"{id} fired", "why": "..."}


# --------------------------------------------------------------------------- the ledger's shape


def test_every_known_check_appears_exactly_once_and_is_documented():
    ids = [check.id for check in list_checks()]
    assert len(ids) == len(set(ids)) and len(ids) >= 19
    entries = build_ledger(ledger_ready(audit()))
    assert [entry["id"] for entry in entries] == ids
    for entry in entries:
        assert set(entry) == {"id", "title", "state", "reason", "severity", "scope", "class"}
        assert entry["state"] in ("passed", "failed", "not_run") and entry["reason"]
        assert entry["severity"] in ("error", "warning", "info") and entry["scope"] in ("audit", "class")
    documented = set(re.findall(r"`([a-z0-9_]+)`", DOCS.read_text(encoding="utf-8")))
    assert set(ids) <= documented, set(ids) - documented


def ledger_ready(results: dict) -> dict:
    results["checks"] = result_checks(results)
    return results


FLAG_IDS = ["nondeterministic_output", "probability_outputs", "tied_or_zero_logits", "zero_gradients",
            "near_chance", "pgd_weaker_than_fgsm", "aa_much_stronger", "blackbox_stronger_than_pgd",
            "blackbox_stronger_than_aa", "no_effect_cw", "small_classes", "tpgd_loss_not_converged",
            "refused_pgd", "curve_not_reaching_zero", "curve_below_fixed_eps", "curve_far_above_fixed_eps",
            "class_multistep_weaker_than_fgsm", "class_blackbox_stronger_than_whitebox",
            "class_clean_below_chance"]


@pytest.mark.parametrize("flag_id", FLAG_IDS)
def test_every_flag_robaudit_writes_belongs_to_exactly_one_check(flag_id):
    owners = [check.id for check in list_checks() if check.owns(flag_id)]
    assert len(owners) == 1, owners
    entry = ledger_of(audit(), [flag(flag_id)])[owners[0]]
    assert entry["state"] == "failed" and f"{flag_id} fired" in entry["reason"]


def test_a_flag_no_check_owns_still_gets_an_entry():
    entries = build_ledger({**audit(), "checks": [flag("something_new")]})
    stray = [entry for entry in entries if entry["id"] == "something_new"]
    assert len(stray) == 1 and stray[0]["state"] == "failed"
    assert len(entries) == len(list_checks()) + 1


def test_ledger_passes_the_results_schema():
    results = ledger_ready(audit())
    results["checks_ledger"] = build_ledger(results)
    validate_results(results)
    results["checks_ledger"][0]["state"] = "skipped"
    with pytest.raises(Exception, match="checks_ledger"):
        validate_results(results)
    del results["checks_ledger"]   # older files have none
    validate_results(results)


# --------------------------------------------------------------------------- states of the audit-wide checks


def test_blackbox_vs_whitebox_passed_failed_and_not_run():
    without_square = ledger_of(audit(("fgsm", "pgd")))["blackbox_stronger_than_whitebox"]
    assert without_square["state"] == "not_run"
    assert without_square["reason"] == "no black-box attack (square) in --attacks"
    fair = audit(("pgd", "square"), robust={"pgd": [20, 20, 20], "square": [30, 30, 30]})
    assert ledger_of(fair)["blackbox_stronger_than_whitebox"]["state"] == "passed"
    masked = audit(("pgd", "square"), robust={"pgd": [30, 30, 30], "square": [10, 10, 10]})
    entry = ledger_of(masked)["blackbox_stronger_than_whitebox"]
    assert entry["state"] == "failed" and "beats white-box pgd" in entry["reason"]


def test_pgd_vs_fgsm_passed_failed_and_not_run():
    assert ledger_of(audit(("pgd",)))["pgd_weaker_than_fgsm"]["reason"] == "no fgsm in --attacks"
    ok = audit(robust={"fgsm": [30, 30, 30], "pgd": [20, 20, 20]})
    assert ledger_of(ok)["pgd_weaker_than_fgsm"]["state"] == "passed"
    weak = audit(robust={"fgsm": [10, 10, 10], "pgd": [30, 30, 30]})
    assert ledger_of(weak)["pgd_weaker_than_fgsm"]["state"] == "failed"


def test_refused_attack_is_a_failed_check_and_makes_its_comparisons_not_run():
    results = audit(("fgsm",), requested=("clean", "fgsm", "pgd"), white_box=False)
    ledger = ledger_of(results, [flag("refused_pgd")])
    assert ledger["refused_attacks"]["state"] == "failed"
    assert ledger["pgd_weaker_than_fgsm"]["state"] == "not_run"
    assert "requested but did not run" in ledger["pgd_weaker_than_fgsm"]["reason"]
    assert ledger["zero_gradients"]["state"] == "not_run"
    assert ledger_of(audit())["refused_attacks"]["state"] == "passed"


def test_curve_and_loss_checks_cannot_run_without_their_data():
    ledger = ledger_of(audit())
    for check in ("curve_not_reaching_zero", "curve_below_fixed_eps", "curve_far_above_fixed_eps"):
        assert ledger[check]["state"] == "not_run" and "fmn" in ledger[check]["reason"]
    assert ledger["loss_not_converged"]["state"] == "not_run"
    assert ledger["replay_confirmed"]["state"] == "not_run"
    results = audit()
    results["attacks"]["pgd"]["diagnostics"] = {"loss_mean_unfooled": [1.0, 2.0, 2.5, 2.6, 2.6, 2.6],
                                                "n_unfooled": 40}
    assert ledger_of(results)["loss_not_converged"]["state"] == "passed"
    results["attacks"]["pgd"]["diagnostics"]["loss_mean_unfooled"] = [1.0, 1.1, 1.2, 1.3, 2.0, 3.0]
    assert ledger_of(results)["loss_not_converged"]["state"] == "failed"


def test_replay_check_reads_the_recorded_replay():
    results = audit()
    assert ledger_of(results)["replay_confirmed"]["state"] == "not_run"
    results["attacks"]["clean"]["replay"] = None
    for name in ("fgsm", "pgd"):
        results["attacks"][name]["replay"] = {"runtime": "onnxruntime 1.17", "confirmed": [5, 5, 5],
                                              "unconfirmed": [0, 0, 0], "realizable": [5, 5, 5]}
    assert ledger_of(results)["replay_confirmed"]["state"] == "passed"
    results["attacks"]["pgd"]["replay"]["unconfirmed"] = [0, 2, 0]
    entry = ledger_of(results)["replay_confirmed"]
    assert entry["state"] == "failed" and "pgd 2 (onnxruntime 1.17)" in entry["reason"]


def test_near_chance_and_small_classes_states():
    assert ledger_of(audit(clean=[55, 55, 55]))["near_chance"]["state"] == "passed"
    assert ledger_of(audit(clean=[5, 5, 5]))["near_chance"]["state"] == "failed"
    no_clean = audit(requested=("fgsm", "pgd"))
    del no_clean["attacks"]["clean"]
    assert ledger_of(no_clean)["near_chance"]["reason"] == "no clean in --attacks"
    assert ledger_of(audit())["small_classes"]["state"] == "passed"       # 60 per class
    small = make_results(classes=CLASSES, n_per_class=20, checks=False)
    small["checks"] = []
    assert ledger_of(small)["small_classes"]["state"] == "failed"


# --------------------------------------------------------------------------- per-class checks


def test_the_demo_case_multistep_weaker_than_fgsm_on_one_class_is_flagged():
    # TPGD 38.3% [27.1-51.0] vs FGSM 11.7% [5.8-22.2] on class "cross"; the averages hide it
    results = audit(("fgsm", "tpgd"), robust={"fgsm": [20, 7, 20], "tpgd": [10, 23, 10]})
    tpgd = results["attacks"]["tpgd"]["per_class"][1]
    assert [round(100 * v, 1) for v in tpgd["ci95"]] == [27.1, 51.0]
    assert [round(100 * v, 1) for v in results["attacks"]["fgsm"]["per_class"][1]["ci95"]] == [5.8, 22.2]
    assert results["attacks"]["tpgd"]["avg"] < results["attacks"]["fgsm"]["avg"]   # on average tpgd is stronger
    as_pgd = audit(("fgsm", "pgd"), robust={"fgsm": [20, 7, 20], "pgd": [10, 23, 10]})
    assert ledger_of(as_pgd)["pgd_weaker_than_fgsm"]["state"] == "passed"   # the average check cannot see it
    assert ledger_of(as_pgd)["class_multistep_weaker_than_fgsm"]["state"] == "failed"
    entry = ledger_of(results)["class_multistep_weaker_than_fgsm"]
    assert entry["state"] == "failed" and entry["scope"] == "class" and entry["class"] == 1
    assert "cross: tpgd 38.3% [27.1-51.0%] vs fgsm 11.7% [5.8-22.2%]" in entry["reason"]
    flags = [f for f in result_checks(results) if f["id"] == "class_multistep_weaker_than_fgsm"]
    assert len(flags) == 1 and flags[0]["severity"] == "warning"


def test_multistep_vs_fgsm_with_overlapping_intervals_passes_and_without_fgsm_cannot_run():
    # 13/60 = 21.7% [13.1-33.6] vs 7/60 = 11.7% [5.8-22.2]: more robust, but the intervals overlap
    results = audit(("fgsm", "pgd"), robust={"fgsm": [20, 7, 20], "pgd": [12, 13, 12]})
    entry = ledger_of(results)["class_multistep_weaker_than_fgsm"]
    assert entry["state"] == "passed" and entry["class"] is None
    assert not class_checks.multistep_weaker_findings(results)
    no_fgsm = ledger_of(audit(("pgd", "cw")))["class_multistep_weaker_than_fgsm"]
    assert no_fgsm["state"] == "not_run" and no_fgsm["reason"] == "no fgsm in --attacks"
    only_fgsm = ledger_of(audit(("fgsm",)))["class_multistep_weaker_than_fgsm"]
    assert only_fgsm["state"] == "not_run" and "multi-step attack" in only_fgsm["reason"]


def test_worst_class_is_the_widest_gap_and_findings_name_at_most_three():
    results = audit(("fgsm", "pgd", "aa"), robust={"fgsm": [2, 7, 0], "pgd": [30, 23, 12], "aa": [2, 2, 40]})
    found = class_checks.multistep_weaker_findings(results)
    assert [f.class_index for f in found] == [2, 0, 1]            # aa on bird: 40/60 vs 0/60 is the widest
    assert found[0].text.startswith("bird: aa 66.7%")
    assert ledger_of(results)["class_multistep_weaker_than_fgsm"]["class"] == 2


def test_per_class_blackbox_and_clean_below_chance():
    results = audit(("pgd", "square"), robust={"pgd": [20, 40, 20], "square": [20, 10, 20]})
    entry = ledger_of(results)["class_blackbox_stronger_than_whitebox"]
    assert entry["state"] == "failed" and entry["class"] == 1 and "cross: pgd 66.7%" in entry["reason"]
    fair = audit(("pgd", "square"), robust={"pgd": [20, 20, 20], "square": [22, 22, 22]})
    assert ledger_of(fair)["class_blackbox_stronger_than_whitebox"]["state"] == "passed"
    # chance is 1/3: 2/60 has its interval wholly below it, 15/60 does not
    low = audit(clean=[55, 2, 55])
    entry = ledger_of(low)["class_clean_below_chance"]
    assert entry["state"] == "failed" and entry["class"] == 1
    assert ledger_of(audit(clean=[55, 15, 55]))["class_clean_below_chance"]["state"] == "passed"


def test_empty_classes_are_skipped_not_flagged():
    results = audit(("fgsm", "pgd"))
    for name in ("fgsm", "pgd"):
        results["attacks"][name]["per_class"][1] = class_entry("cross", 0, 0)
    assert not class_checks.multistep_weaker_findings(results)


# --------------------------------------------------------------------------- every state from real results


def _with_curves(scales=None, never=None):
    from test_report_curves import add_curves

    results = audit(robust={"fgsm": [30, 30, 30], "pgd": [25, 25, 25]}, clean=[58, 58, 58])
    add_curves(results, scales=scales, never=never)
    return results


def _no_effect_on_pgd():
    results = audit(clean=[58, 58, 58])
    for class_name in CLASSES:
        set_accuracy(results, "pgd", class_name, 58)    # pgd fooled nothing
    return results


def _without_clean():
    results = audit(requested=("fgsm", "pgd"))
    del results["attacks"]["clean"]
    return results


def _eps_zero():
    results = audit()
    results["config"]["eps"] = 0.0
    return results


STATE_CASES = [
    ("aa_much_stronger", lambda: audit(("pgd", "aa"), robust={"pgd": [30] * 3, "aa": [28] * 3}), "passed"),
    ("aa_much_stronger", lambda: audit(("pgd", "aa"), robust={"pgd": [40] * 3, "aa": [20] * 3}), "failed"),
    ("aa_much_stronger", lambda: audit(), "not_run"),
    ("no_effect", lambda: audit(clean=[58, 58, 58]), "passed"),
    ("no_effect", _no_effect_on_pgd, "failed"),
    ("no_effect", _eps_zero, "not_run"),
    ("curve_not_reaching_zero", lambda: _with_curves(), "passed"),
    ("curve_not_reaching_zero", lambda: _with_curves([0.01] * 3, [30] * 3), "failed"),
    ("curve_below_fixed_eps", lambda: _with_curves([20] * 3), "passed"),
    ("curve_below_fixed_eps", lambda: _with_curves([0.01] * 3), "failed"),
    ("curve_far_above_fixed_eps", lambda: _with_curves([0.01] * 3), "passed"),
    ("curve_far_above_fixed_eps", lambda: _with_curves([20] * 3), "failed"),
    ("zero_gradients", lambda: audit(), "passed"),
    ("zero_gradients", lambda: audit(white_box=False), "not_run"),
    ("class_clean_below_chance", lambda: _without_clean(), "not_run"),
    ("near_chance", lambda: _without_clean(), "not_run"),
]


@pytest.mark.parametrize("check_id, build, state", STATE_CASES,
                         ids=[f"{case[0]}-{case[2]}" for case in STATE_CASES])
def test_each_state_from_the_checks_themselves(check_id, build, state):
    entry = ledger_of(build())[check_id]
    assert entry["state"] == state, entry
