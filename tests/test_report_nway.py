"""N-way comparison page (`robaudit report A B C ...`, issue 25): leaderboard, paired tests
between models on the same images, per-class leaderboard; escaped, offline, deterministic."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest

from report_fixtures import XSS_CLASS, make_results
from robaudit.audit.report.nway import Candidate, nway_context
from robaudit.audit.report.render import render_nway_html, render_nway_report
from robaudit.errors import UserError
from test_report import RENDERED_AT, parse

CLASSES = ("airplane", XSS_CLASS, "bird", "cat")


def _audit(tmp_path, name: str, seed: int, strength: float, method: str | None = None) -> Candidate:
    """A pgd-only audit and a samples.npz that holds exactly its per-class counts."""
    results = make_results(classes=CLASSES, attacks=("pgd",), ensemble=False, seed=seed, strength=strength,
                           training=method is not None)
    if method:
        results["training"]["method"] = method
    results["model"]["path"] = f"/models/{name}.pt2"
    n = 20
    y = np.repeat(np.arange(len(CLASSES)), n)
    robust = np.zeros(len(y), dtype=bool)
    for k, entry in enumerate(results["attacks"]["pgd"]["per_class"]):
        robust[k * n:k * n + entry["correct"]] = True
    rng = np.random.default_rng(seed)
    robust_shuffled = robust.copy()
    for k in range(len(CLASSES)):          # same counts, a different set of images per model
        block = slice(k * n, (k + 1) * n)
        robust_shuffled[block] = rng.permutation(robust[block])
    folder = tmp_path / name
    folder.mkdir()
    np.savez(folder / "samples.npz", index=np.arange(len(y)), y=y, clean_pred=y, robust_pgd=robust_shuffled)
    return Candidate(label="", results=results, results_dir=folder)


@pytest.fixture
def three(tmp_path):
    return [_audit(tmp_path, "teacher", 1, 0.6), _audit(tmp_path, "absld", 2, 1.4, "absld"),
            _audit(tmp_path, "rslad", 3, 1.0, "rslad")]


def test_leaderboard_pairs_and_per_class_board(three):
    context = nway_context(three)
    assert context["paired"] and context["key"] == "pgd"
    board = context["leaderboard"]
    worst = [row["worst"] for row in board]
    assert worst == sorted(worst, reverse=True)                     # ranked by worst class
    assert [c.label for c in three] == ["teacher.pt2", "ABSLD student (absld.pt2)", "RSLAD student (rslad.pt2)"]
    assert len(context["pairs"]) == 3                                # every two of three
    for pair in context["pairs"]:
        assert pair["worst"]["low"] <= pair["worst"]["delta"] <= pair["worst"]["high"]
    for row in context["classes"]:
        values = [c["accuracy"] for c in row["cells"]]
        best = [c for c in row["cells"] if c["is_best"]]
        assert len(best) == 1 and best[0]["accuracy"] == max(values)
        assert row["test"] is not None
    hardest = [row["hardest"] for row in context["classes"]]
    assert hardest == sorted(hardest)


def test_page_is_escaped_offline_deterministic_and_says_why_when_unpaired(three, tmp_path):
    page = render_nway_html(three, rendered_at=RENDERED_AT)
    assert page == render_nway_html(three, rendered_at=RENDERED_AT)
    assert "<img src=x" not in page and html.escape(XSS_CLASS, quote=False) in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    parsed = parse(page)
    assert json.loads(parsed.script("results-data-1")["text"])["dataset"]["classes"][1] == XSS_CLASS
    anchors = [a["href"][1:] for a in parsed.all("a") if a.get("href", "").startswith("#")]
    assert all(anchor in parsed.ids for anchor in anchors)
    assert 'id="table-pairs"' in page
    (three[2].results_dir / "samples.npz").unlink()
    unpaired = render_nway_html(three, rendered_at=RENDERED_AT)
    assert "No paired tests" in unpaired and "samples.npz is missing" in unpaired
    out = render_nway_report(three, tmp_path / "comparison.html", rendered_at=RENDERED_AT)
    assert out.read_text(encoding="utf-8") == unpaired


def test_different_class_lists_are_refused(three):
    three[1].results["dataset"]["classes"] = list(reversed(CLASSES))
    with pytest.raises(UserError, match="different class list"):
        nway_context(three)


def test_report_command_with_three_files_writes_the_nway_page(three, capsys):
    from robaudit.cli import main

    paths = []
    for candidate in three:
        path = candidate.results_dir / "results.json"
        path.write_text(json.dumps(candidate.results), encoding="utf-8")
        paths.append(str(path))
    out = three[0].results_dir.parent / "board.html"
    main(["report", *paths, "--out", str(out), "--redact-paths"])
    page = out.read_text(encoding="utf-8")
    assert "Comparison of 3 models" in page and 'id="table-pairs"' in page
    assert "/models/" not in page                     # --redact-paths reaches the embedded results
    assert f"wrote {out}" in capsys.readouterr().out
