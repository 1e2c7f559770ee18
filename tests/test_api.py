"""robaudit as a library (robaudit/api.py, robaudit/results.py): scan, Audit, compare,
quick_audit, remediate; the one headline rule; the engine renders no report.

Models are the tiny nearest-centroid classifier of test_engine (5 classes, 8x8 images),
so every scan takes well under a second.
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import robaudit
from robaudit.audit.engine import ScanConfig, check_gates, run_scan
from robaudit.audit.headline import headline_key
from robaudit.audit.models.loading import save_export
from robaudit.cli import main
from robaudit.errors import GateFailed, UserError

from test_engine import CLASSES, Centroid, make_arrays, make_data, make_model

FAST = {"pgd": {"steps": 3}}


def test_notebook_scan_compare_report_in_under_15_lines(tmp_path):
    # --- the user's code: 7 lines -------------------------------------------------------
    user_code = textwrap.dedent(f"""
        import robaudit, torch
        x, y = (torch.from_numpy(a) for a in make_arrays())
        model, weaker = Centroid(), Centroid()
        with torch.no_grad(): weaker.mu.mul_(0.9)
        before = robaudit.scan(weaker, (x, y), attacks=["clean", "pgd"], out=r"{tmp_path / 'before'}")
        after = robaudit.scan(model, (x, y), attacks=["clean", "pgd"], out=r"{tmp_path / 'after'}")
        after.compare(before).write_report(r"{tmp_path / 'compare.html'}")
    """)
    assert len([line for line in user_code.splitlines() if line.strip()]) < 15
    space = {"make_arrays": make_arrays, "Centroid": Centroid}
    exec(compile(user_code, "notebook", "exec"), space)
    before, after = space["before"], space["after"]
    assert isinstance(after, robaudit.Audit)
    page = (tmp_path / "compare.html").read_text()
    assert "c0" in page and len(page) > 10_000
    # The typed view says what results.json says.
    saved = json.loads((tmp_path / "after" / "results.json").read_text())
    assert after.headline_key == "ensemble" and after.nsd == saved["ensemble"]["nsd"]
    assert [r.accuracy for r in after.per_class] == [c["accuracy"] for c in saved["ensemble"]["per_class"]]
    assert after.worst.name == saved["ensemble"]["worst_class"]
    assert after.worst.accuracy == min(r.accuracy for r in after.per_class)
    # Robust accuracy never exceeds clean accuracy, class by class; intervals hold the estimate.
    for clean, robust in zip(after.block("clean").per_class, after.per_class):
        assert robust.correct <= clean.correct
        assert robust.ci95[0] <= robust.accuracy <= robust.ci95[1]
    comparison = after.compare(before)
    assert comparison.key == "ensemble"
    assert [c.delta for c in comparison.per_class] == pytest.approx(
        [a.accuracy - b.accuracy for a, b in zip(after.per_class, before.per_class)], abs=0)
    assert after.to_json() == (tmp_path / "after" / "results.json").read_text()


def test_library_scan_equals_cli_scan(tmp_path, capsys):
    x, y = make_arrays()
    np.savez(tmp_path / "tiny.npz", x_test=x, y_test=y, class_names=np.array(CLASSES))
    save_export(Centroid(), str(tmp_path / "centroid.pt2"), torch.from_numpy(x[:2]))
    args = ["--dataset", str(tmp_path / "tiny.npz"), "--attacks", "clean,fgsm,pgd", "--attack-opt", "pgd.steps=3",
            "--device", "cpu", "--batch-size", "16"]
    main(["scan", str(tmp_path / "centroid.pt2"), *args, "--out", str(tmp_path / "cli")])   # exits only on error
    cli_table = capsys.readouterr().out
    from robaudit.workflows import Console

    shown = []
    audit = robaudit.scan(str(tmp_path / "centroid.pt2"), str(tmp_path / "tiny.npz"), attacks="clean,fgsm,pgd",
                          attack_options=FAST, device="cpu", batch_size=16, out=tmp_path / "lib",
                          console=Console(out=shown.append))
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    for key in ("attacks", "ensemble", "target_flow", "examples", "checks", "config", "dataset"):
        lib_value, cli_value = audit.results[key], cli[key]
        if key == "attacks":   # the seconds differ, nothing else
            lib_value = {a: {k: v for k, v in b.items() if k != "seconds"} for a, b in lib_value.items()}
            cli_value = {a: {k: v for k, v in b.items() if k != "seconds"} for a, b in cli_value.items()}
        if key == "ensemble":
            lib_value, cli_value = ({k: v for k, v in b.items() if k != "seconds"} for b in (lib_value, cli_value))
        assert lib_value == cli_value, key
    assert (tmp_path / "lib" / "report.html").exists()
    assert shown[0] in cli_table   # the same table


def test_repr_html_escapes_and_shows_the_verdict():
    x, y = make_arrays()
    audit = robaudit.scan(Centroid(), (x, y), attacks=["clean", "pgd"], attack_options=FAST,
                          classes=["<script>alert(1)</script>", "b&b", "c", "d", "e"])
    page = audit._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "b&amp;b" in page
    assert "worst class" in page and page.count("<tr>") == 1 + len(CLASSES)
    assert "8/255" in page


def test_audit_load_reads_files_written_before_the_api(tmp_path):
    from report_fixtures import make_results

    old = make_results()   # the report's fixture: a complete results.json as earlier versions wrote it
    old["tool"].pop("commit", None)   # keys added since (tool.commit, checks_ledger, replay) are absent
    old.pop("checks_ledger", None)
    (tmp_path / "results.json").write_text(json.dumps(old))
    audit = robaudit.Audit.load(tmp_path / "results.json")
    assert audit.headline_key == "ensemble" and audit.nsd == old["ensemble"]["nsd"]
    assert audit.block("pgd").avg == old["attacks"]["pgd"]["avg"]
    with pytest.raises(KeyError):
        audit.block("cw")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError):
        robaudit.Audit.load(tmp_path / "bad.json")


def test_in_memory_data_is_checked():
    x, y = make_arrays()
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        robaudit.scan(Centroid(), (x * 255, y), attacks=["clean"])
    with pytest.raises(UserError, match="labels"):
        robaudit.scan(Centroid(), (x, y[:-1]), attacks=["clean"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                                         batch_size=7, shuffle=True)
    with pytest.raises(UserError, match="shuffle"):
        robaudit.scan(Centroid(), loader, attacks=["clean"])


def test_dataloader_and_tensors_give_the_same_audit():
    x, y = (torch.from_numpy(a) for a in make_arrays())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    a = robaudit.scan(Centroid(), (x, y), attacks=["clean", "pgd"], attack_options=FAST)
    b = robaudit.scan(Centroid(), loader, attacks=["clean", "pgd"], attack_options=FAST)
    assert a.results["ensemble"]["per_class"] == b.results["ensemble"]["per_class"]


def test_quick_audit_is_flat_deterministic_and_leaves_the_model_as_it_was():
    x, y = (torch.from_numpy(a) for a in make_arrays())
    model = Centroid().train()
    before = model.mu.detach().clone()
    first = robaudit.quick_audit(model, x, y, steps=3, classes=CLASSES)
    assert model.training and model.mu.grad is None and torch.equal(model.mu, before)
    assert first == robaudit.quick_audit(model, x, y, steps=3, classes=CLASSES)
    assert all(isinstance(v, (int, float)) for v in first.values())
    for name in CLASSES:
        assert 0 <= first[f"robaudit/robust/{name}"] <= first[f"robaudit/clean/{name}"] <= 1
    robust = [first[f"robaudit/robust/{name}"] for name in CLASSES]
    assert first["robaudit/robust_worst"] == min(robust)
    assert first["robaudit/robust_worst_class"] == robust.index(min(robust))
    mean = sum(robust) / len(robust)
    sd = math.sqrt(sum((r - mean) ** 2 for r in robust) / len(robust))
    assert first["robaudit/robust_nsd"] == pytest.approx(sd / mean, rel=1e-12)   # population SD / mean
    assert first["robaudit/robust_acc"] == pytest.approx(mean, rel=1e-12)


def test_scan_gate_raises_after_the_report_is_written(tmp_path):
    x, y = make_arrays()
    with pytest.raises(GateFailed):
        robaudit.scan(Centroid(), (x, y), attacks=["clean", "pgd"], attack_options=FAST, out=tmp_path,
                      fail_under_worst=1.0)
    assert (tmp_path / "results.json").exists() and (tmp_path / "report.html").exists()
    with pytest.raises(UserError, match="fraction"):   # a bad gate fails before anything is written
        robaudit.scan(Centroid(), (x, y), attacks=["clean"], out=tmp_path / "never", fail_under_worst=30)
    assert not (tmp_path / "never").exists()


def test_engine_renders_no_report(tmp_path):
    cfg = ScanConfig(out_dir=tmp_path, attacks=["clean"], device="cpu", write_report=True)
    run_scan(cfg, model=make_model(), data=make_data())
    assert (tmp_path / "results.json").exists() and not (tmp_path / "report.html").exists()


def test_one_headline_rule_for_gates_table_and_report():
    from report_fixtures import make_results

    from robaudit.audit.report.records import headline_key as report_headline
    from robaudit.audit.report.text import format_table

    results = make_results(attacks=("fgsm", "pgd"), ensemble=False)   # hand-made: no ensemble
    key = headline_key(results)
    assert report_headline is headline_key
    assert key == min(("fgsm", "pgd"), key=lambda a: results["attacks"][a]["avg"])   # the strongest attack
    block = results["attacks"][key]
    assert f"worst class ({key}): {block['worst_class']}" in format_table(results)
    # the gate reads the same block: just above its worst passes, just below fails
    check_gates(results, ScanConfig(out_dir=None, fail_under_worst=block["worst"]))
    with pytest.raises(GateFailed, match=key):
        check_gates(results, ScanConfig(out_dir=None, fail_under_worst=block["worst"] + 1e-9))


def test_a_module_with_batchnorm_is_audited_in_eval_mode_and_left_unchanged():
    x, y = (torch.from_numpy(a) for a in make_arrays())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}   # incl. the 0-dim num_batches_tracked
    from robaudit.audit.models.in_memory import module_sha256

    digest = module_sha256(model)
    robaudit.quick_audit(model, x, y, steps=2)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert module_sha256(model) == digest
    with torch.no_grad():
        model[3].bias[0] += 1e-3
    assert module_sha256(model) != digest   # another weight, another digest (resume never mixes them)


def test_remediate_returns_the_student_and_both_audits(tmp_path):
    x, y = make_arrays(per_class=12)
    x_test, y_test = make_arrays(seed=1)
    np.savez(tmp_path / "tiny.npz", x_train=x, y_train=y, x_test=x_test, y_test=y_test, class_names=np.array(CLASSES))
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, len(CLASSES)))
    run = robaudit.remediate(Centroid(), str(tmp_path / "tiny.npz"), student=student, method="rslad", epochs=1,
                             batch_size=20, steps=2, val_per_class=2, val_steps=1, audit_attacks="clean,fgsm",
                             device="cpu", out=tmp_path / "rem")
    assert run.teacher_audit is not None and run.student_audit.classes == CLASSES
    saved = json.loads((tmp_path / "rem" / "student" / "results.json").read_text())
    assert run.student_audit.results == saved and saved["training"]["method"] == "rslad"
    assert run.teacher_audit.results["model"]["path"] == "<in-memory Centroid>"
    with torch.no_grad():   # the returned student is the audited one: its clean accuracy per class matches
        pred = run.student(torch.from_numpy(x_test)).argmax(1).numpy()
    clean = run.student_audit.block("clean").per_class
    assert [int(((pred == y_test) & (y_test == k)).sum()) for k in range(len(CLASSES))] == [r.correct for r in clean]
    assert run.comparison.key == "ensemble"
    assert (tmp_path / "rem" / "report.html").exists()


def test_layout_rules_small_modules_and_a_thin_cli():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    too_long = {str(p.relative_to(root)): n for p in (root / "audit").rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 600}
    assert not too_long
    tree = ast.parse((root / "robaudit" / "cli.py").read_text())
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not defined & {"format_table", "_remediate_and_compare", "_run_demo", "_demo_student",
                          "_print_comparison", "_paired", "load_model_from_options"}
    called = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
              for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not called & {"run_scan", "run_remediate", "train_demo_model", "load_model"}
