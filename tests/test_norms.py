"""--norm on `robaudit scan`: refusals before anything runs, and the norm recorded in
results.json. The attacks' L2 behaviour itself is tested in test_attacks.py."""

from __future__ import annotations

import json

import pytest

from robaudit.audit.attacks import ATTACKS
from robaudit.audit.engine import parse_eps
from robaudit.errors import UserError

from test_cli import _scan_args, files, run_cli  # noqa: F401  (files: the module fixture)


def test_norm_l1_is_refused_in_one_line_before_loading_anything(tmp_path, capsys):
    # The model and data do not exist: the refusal must come first.
    code, stdout, stderr = run_cli(capsys, "scan", tmp_path / "missing.pt", "--dataset", tmp_path / "none.npz",
                                   "--out", tmp_path / "out", "--norm", "l1", "--attacks", "clean,pgd")
    assert code != 0 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "l1 is not supported yet" in stderr and "APGD-L1" in stderr
    assert not (tmp_path / "out").exists()


def test_attack_without_the_requested_norm_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ATTACKS.get("square"), "norms", ("linf",))
    code, stdout, stderr = run_cli(capsys, "scan", tmp_path / "missing.pt", "--dataset", tmp_path / "none.npz",
                                   "--out", tmp_path / "out", "--norm", "l2", "--eps", "0.5",
                                   "--attacks", "clean,pgd,square")
    assert code != 0 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "attack square has no l2 variant; attacks with one: aa, clean, cw, fgsm, pgd, tpgd" in stderr


def test_parse_eps_reads_l2_radii_as_given():
    assert parse_eps("8") == pytest.approx(8 / 255)              # linf: k/255
    assert parse_eps("3", norm="l2") == 3.0                       # l2: a radius, as given
    assert parse_eps("0.5", norm="l2") == 0.5
    assert parse_eps("128/255", norm="l2") == pytest.approx(128 / 255)
    with pytest.raises(UserError, match="L2 radius"):
        parse_eps("-1", norm="l2")


def test_l2_scan_records_the_norm_everywhere(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm,pgd", "--norm", "l2",
                                                       "--eps", "0.5", "--attack-opt", "pgd.steps=3"))
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["norm"] == "l2" and config["eps"] == 0.5
    for name in ("clean", "fgsm", "pgd"):
        assert config["attacks"][name]["norm"] == "l2"
    pgd = config["attacks"]["pgd"]
    assert pgd["steps"] == 3 and pgd["step_size"] == pytest.approx(2.5 * 0.5 / 3)
    assert pgd["repr"].startswith("PGD(eps=0.5, norm=l2, steps=3,")


def test_report_quotes_the_budget_in_its_norm_and_old_results_read_as_linf():
    from robaudit.audit.report_comparison import like_for_like
    from robaudit.audit.report_format import budget_text

    assert budget_text({"eps": 8 / 255, "eps_255": 8.0}) == "8/255"            # results without a norm: L-inf
    assert budget_text({"eps": 0.5, "eps_255": 127.5, "norm": "l2"}) == "0.5 (L2)"
    old = {"dataset": {"name": "d", "split": "test", "n": 3}, "model": {},
           "config": {"eps": 0.03, "attacks": {"pgd": {"steps": 10}}}, "ensemble": None}
    new = {**old, "config": {"eps": 0.03, "norm": "linf", "attacks": {"pgd": {"steps": 10, "norm": "linf"}}}}
    assert like_for_like(new, old, "pgd") == []
    l2 = {**old, "config": {"eps": 0.03, "norm": "l2", "attacks": {"pgd": {"steps": 10, "norm": "l2"}}}}
    notes = like_for_like(l2, old, "pgd")
    assert any("budget differs" in n and "(L2)" in n for n in notes) and any("pgd attack" in n for n in notes)
