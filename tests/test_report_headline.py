"""The report's first screen (issue 25): verdict, policy result, every class significantly
below average, the results digest and who wrote the numbers; plus the glossary links."""

from __future__ import annotations

import json
import re

import pytest

from report_fixtures import CIFAR10_CLASSES, class_entry, make_results, summarise
from robaudit.audit.integrity import results_digest
from robaudit.audit.report.headline import below_average, policy
from robaudit.audit.report.render import build_context, render_html
from test_report import RENDERED_AT, parse


def _two_broken_classes() -> dict:
    """10 classes of 60 images; under pgd two classes sit far below the average (0% and 2/60)."""
    results = make_results(classes=CIFAR10_CLASSES, attacks=("pgd",), n_per_class=60, ensemble=False)
    correct = [0, 2, 40, 42, 38, 45, 41, 39, 44, 43]
    per_class = [class_entry(name, c, 60) for name, c in zip(CIFAR10_CLASSES, correct)]
    record = results["attacks"]["pgd"]
    results["attacks"]["pgd"] = {**record, **summarise(per_class, record["description"], 600, 1.0)}
    return results


def test_every_class_whose_interval_lies_below_the_average_is_listed():
    results = _two_broken_classes()
    rows = below_average(results, "pgd")
    assert [r["class"] for r in rows] == ["airplane", "automobile"]      # both, not only the worst
    assert rows[0]["all_flipped"] and not rows[1]["all_flipped"]
    average = results["attacks"]["pgd"]["avg"]
    assert all(r["ci"][1] < average for r in rows)
    page = render_html(results, rendered_at=RENDERED_AT)
    card = page[page.index('<section id="summary"'):page.index("</section>")]
    assert "2 classes significantly below the class average" in card
    assert "<strong>airplane</strong> 0.0%" in card and "every correctly classified image of it was flipped" in card


def test_policy_says_pass_or_fail_by_the_engine_rule():
    results = _two_broken_classes()          # worst 0%, NSD large
    assert policy(results, None) is None
    # Without an ensemble and without --gate-attack the engine gates clean accuracy: so does the page.
    assert policy(results, {"fail_under_worst": 0.05})["passed"] is True
    failed = policy(results, {"fail_under_worst": 0.05, "attack": "pgd"})
    assert failed["passed"] is False and "FAIL" in failed["items"][0]
    assert policy(results, {"fail_under_worst": 0.0, "attack": "pgd"})["passed"] is True  # fails only if worst < gate
    nsd = results["attacks"]["pgd"]["nsd"]
    assert policy(results, {"fail_over_nsd": nsd + 0.01, "attack": "pgd"})["passed"] is True
    assert policy(results, {"fail_over_nsd": nsd - 0.01, "attack": "pgd"})["passed"] is False
    page = render_html(results, rendered_at=RENDERED_AT, gates={"fail_under_worst": 0.05, "attack": "pgd"})
    assert re.search(r'id="summary-policy"><strong>Policy FAILED</strong>', page)
    options = json.loads(parse(page).script("render-options")["text"])   # what a re-render needs
    assert options == {"gates": {"fail_under_worst": 0.05, "attack": "pgd"}}
    assert 'id="summary-policy"' not in render_html(results, rendered_at=RENDERED_AT)


def test_digest_and_identity_name_the_results_as_given_even_when_redacted():
    results = make_results()
    results["tool"]["commit"] = "0123456789ab"
    page = render_html(results, redact_paths=True, rendered_at=RENDERED_AT)
    digest = parse(page).ids and re.search(r'id="results-digest"[^>]*>sha256 ([0-9a-f]{64})<', page).group(1)
    assert digest == results_digest(results)
    assert "robaudit 0.1.0 · 0123456789ab" in page
    del results["tool"]["commit"]           # old results: no commit recorded, still renders
    assert "commit not recorded" in render_html(results, rendered_at=RENDERED_AT)


def test_first_screen_order_and_glossary_links_resolve():
    page = render_html(_two_broken_classes(), rendered_at=RENDERED_AT)
    # the card comes before every section of the page
    assert page.index('id="summary"') < page.index('<section id="verdict"')
    parsed = parse(page)
    terms = [a["href"][1:] for a in parsed.all("a") if a.get("href", "").startswith("#term-")]
    assert {"term-wilson", "term-nsd", "term-pgd", "term-digest"} <= set(terms)
    assert all(term in parsed.ids for term in terms)


@pytest.mark.parametrize("method, word", [("absld", "ABSLD"), (None, "Before and after:")])
def test_comparison_title_says_before_after_and_the_method(method, word):
    after = make_results(training=True)
    after["training"]["method"] = method
    context = build_context(after, baseline=make_results(seed=1))
    assert context["title"].startswith("Before and after") and word in context["title"]
    assert ("training", "Remediation training") in [(n["id"], n["label"]) for n in context["nav"]] or method is None


def test_checks_ledger_lists_every_check_failed_first_and_old_results_keep_their_flags():
    results = make_results()
    old_page = render_html(results, rendered_at=RENDERED_AT)
    assert "Reliability flags" in old_page and "table-checks-ledger" not in old_page
    results["checks_ledger"] = [
        {"id": "near_chance", "title": "Clean accuracy above chance", "state": "passed", "reason": "87% > 10%",
         "severity": "info", "scope": "audit", "class": None},
        {"id": "fgsm_beats_pgd", "title": "PGD at least as strong as FGSM", "state": "failed",
         "reason": "FGSM fooled 3 points PGD did not", "severity": "warning", "scope": "audit", "class": None},
        {"id": "per_class_n", "title": "Enough images per class", "state": "not_run", "reason": "<b>x</b>",
         "severity": "info", "scope": "class", "class": 1},
    ]
    page = render_html(results, rendered_at=RENDERED_AT)
    table = page[page.index('id="table-checks-ledger"'):]
    table = table[:table.index("</table>")]
    assert table.index("fgsm_beats_pgd") < table.index("per_class_n") < table.index("near_chance")
    assert "class automobile" in table and "&lt;b&gt;x&lt;/b&gt;" in table and "<b>x</b>" not in table
    assert "1 reliability warning" in page


def test_replay_shows_realizable_per_class_and_flags_unconfirmed():
    results = make_results()
    assert 'id="table-replay"' not in render_html(results, rendered_at=RENDERED_AT)   # absent: no section
    results["attacks"]["pgd"]["replay"] = {"runtime": "onnxruntime 1.20", "confirmed": [5, 6, 7],
                                           "unconfirmed": [0, 2, 0], "realizable": [5, 6, 7]}
    page = render_html(results, rendered_at=RENDERED_AT)
    table = page[page.index('id="table-replay"'):]
    table = table[:table.index("</table>")]
    assert ">6 (2)</td>" in table and ">5</td>" in table
    assert "Some failures were not confirmed on replay" in page


def test_examples_show_the_strongest_attack_first():
    results = make_results(attacks=("fgsm", "pgd"))
    template = dict(results["examples"][0])
    results["attacks"]["fgsm"]["avg"], results["attacks"]["pgd"]["avg"] = 0.4, 0.1   # pgd is the stronger
    results["examples"] = [{**template, "attack": "fgsm", "index": 1}, {**template, "attack": "pgd", "index": 2}]
    group = build_context(results)["examples"]["groups"][0]
    assert [p["attack"] for p in group["pairs"]] == ["pgd", "fgsm"]


def test_training_in_plain_words_with_bounds_held_out_selection_and_readable_settings():
    results = make_results(classes=("ring", "cross", "dot"), training=True)
    training = results["training"]
    training["options"] = {"method": {"alpha": 5 / 6, "beta": 0.5, "tau_bounds": [0.5, 5.0], "adapt": "both"},
                           "val_per_class": 10, "steps": 5, "lr": 0.03}
    training["selected_epoch"] = 3
    training["selection"] = "epoch with the highest avg + worst-class PGD-20 robust accuracy on 10 held-out ..."
    training["class_state"] = [{"name": "tau_adv", "key": "tau_adv", "label": "τ_adv",
                                "per_epoch": [[1.0, 1.0, 1.0], [0.5, 1.2, 0.9], [0.5, 1.3, 0.7], [0.5, 1.4, 0.5]]}]
    context = build_context(results)
    section = context["training"]
    assert "10 held-out training images per class" in section["selection"] and "epoch 3 of 4" in section["selection"]
    assert "test images this report scores played no part" in section["selection"]
    notes = " ".join(section["bound_notes"])
    assert "ring (from epoch 2)" in notes and "dot (from epoch 4)" in notes and "cross" not in notes
    assert "lower bound 0.5" in notes
    labels = dict(section["options"])
    assert labels["method option · α (weight of the attacked-image term)"] == "0.8333"
    assert labels["method option · temperature bounds [τ min, τ max]"] == "0.5, 5"
    assert not any("{" in value for value in labels.values())          # no raw JSON dumps
    figure = next(v for k, v in context["figures"].items() if k.startswith("fig-trajectory"))
    assert figure["layout"]["bounds"] == [0.5, 5.0]


def test_no_gate_given_means_no_policy_line_and_no_render_options():
    results = make_results()
    page = render_html(results, rendered_at=RENDERED_AT,
                       gates={"fail_under_worst": None, "fail_over_nsd": None, "attack": None})
    assert page == render_html(results, rendered_at=RENDERED_AT)
    assert 'id="summary-policy"' not in page and 'id="render-options"' not in page


def test_pages_with_gates_and_clean_paired_intervals_pass_their_own_integrity_check(tmp_path):
    import numpy as np

    from robaudit.audit.paired import PairedOutcomes
    from robaudit.audit.report.integrity import check_page
    from robaudit.audit.report.render import render_report

    results = _two_broken_classes()
    page = render_report(results, tmp_path / "gated.html", gates={"fail_under_worst": 0.05, "attack": "pgd"})
    assert check_page(page) == []
    after, before = make_results(seed=2), make_results(seed=1)
    n = before["dataset"]["n"]
    rng = np.random.default_rng(0)
    paired = PairedOutcomes(y=np.repeat(np.arange(3), n // 3), before=rng.random(n) < 0.3, after=rng.random(n) < 0.5,
                            clean_before=rng.random(n) < 0.8, clean_after=rng.random(n) < 0.9)
    compare = render_report(after, tmp_path / "compare.html", baseline=before, paired=(paired, ""))
    assert "paired class-stratified bootstrap" in compare.read_text(encoding="utf-8")
    assert check_page(compare) == []
